"""``lsnet jobs submit|status|logs|stop|list|schedule`` (see pipelines/jobs/client.py, schedule.py)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lsnet.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)

    def address_arg(p):
        p.add_argument("--address", default=None,
                       help="Ray dashboard/job server, http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS)")

    p = sub.add_parser("submit", help="submit a job spec (jobs/NAME.yaml or a path)")
    p.add_argument("spec")
    address_arg(p)
    p.add_argument("--wait", action="store_true", help="wait for the end; FAILED/STOPPED exits 1 with the log tail")
    p.add_argument("--follow", action="store_true", help="stream the job's log until it ends (implies --wait)")
    p.add_argument("--submission-id", default=None)
    p.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    p.add_argument("--head-cpus", type=int, default=None, help="CPUs of the private local head (no --address)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="append `--set KEY=VALUE` to the entrypoint (config overrides of train/ablation)")
    for action in ("status", "logs", "stop"):
        p = sub.add_parser(action, help=f"{action} of a submitted job")
        p.add_argument("submission_id")
        address_arg(p)
        if action == "logs":
            p.add_argument("--follow", action="store_true")
            p.add_argument("--tail", type=int, default=None, help="only the last N lines")
    p = sub.add_parser("list", help="jobs of a cluster")
    address_arg(p)
    p = sub.add_parser("schedule", help="emit a scheduled form of a spec with a `schedule`")
    p.add_argument("spec")
    p.add_argument("--emit", choices=["k8s", "k8s-cronjob", "crontab"], required=True)
    p.add_argument("--address", default=None, help="k8s-cronjob/crontab: the long-lived cluster to submit to")
    p.add_argument("--out", default=None, help="write here instead of stdout")
    p.add_argument("--repo", default=None, help="crontab: repository checkout on the host (default: this one)")
    p.add_argument("--image", default=None, help="k8s, k8s-cronjob: the container image (default: the spec's "
                                                 "cluster.image, else $LSNET_IMAGE, else lsnet:latest)")


def _need_address(args) -> str:
    from pipelines.jobs.client import cluster_address

    address = cluster_address(args.address)
    if address is None:
        raise ConfigError("no cluster address: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS")
    return address


def run(args: argparse.Namespace) -> int:
    from pipelines.jobs.spec import load_job_spec, resolve_spec_path

    if args.action == "schedule":
        from pipelines.jobs.schedule import emit

        spec = load_job_spec(resolve_spec_path(args.spec))
        if args.image:
            spec.cluster.image = args.image
        text = emit(spec, args.emit, address=args.address, repo=args.repo)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text)
            print(f"wrote {args.out}")
        else:
            sys.stdout.write(text)
        return 0
    if args.action == "submit":
        from pipelines.jobs.client import run_job

        spec = load_job_spec(resolve_spec_path(args.spec))
        extra = [x for item in args.overrides for x in ("--set", item)]
        outcome = run_job(spec, address=args.address, wait=args.wait, follow=args.follow, extra_args=extra,
                          submission_id=args.submission_id, timeout_s=args.timeout, head_cpus=args.head_cpus)
        print(f"job {outcome.submission_id}: {outcome.status}")
        if outcome.status in ("FAILED", "STOPPED"):
            print(f"--- last lines of the log of {outcome.submission_id} ---\n{outcome.log_tail}", file=sys.stderr)
            return 1
        return 0

    from pipelines.jobs.client import follow_logs, make_client

    client = make_client(_need_address(args))
    if args.action == "status":
        info = client.get_job_info(args.submission_id)
        print(json.dumps({"submission_id": args.submission_id, "status": str(info.status.value),
                          "message": info.message, "entrypoint": info.entrypoint,
                          "start_time": info.start_time, "end_time": info.end_time}, indent=1))
        return 0 if str(info.status.value) != "FAILED" else 1
    if args.action == "logs":
        if args.follow:
            follow_logs(client, args.submission_id)
        else:
            text = client.get_job_logs(args.submission_id)
            if args.tail:
                text = "\n".join(text.splitlines()[-args.tail:]) + "\n"
            sys.stdout.write(text)
        return 0
    if args.action == "stop":
        stopped = client.stop_job(args.submission_id)
        print(f"{args.submission_id}: {'stop requested' if stopped else 'already finished'}")
        return 0
    if args.action == "list":
        for job in sorted(client.list_jobs(), key=lambda j: j.start_time or 0):
            print(f"{job.submission_id or job.job_id}\t{job.status.value}\t{(job.metadata or {}).get('lsnet_job', '')}"
                  f"\t{job.entrypoint}")
        return 0
    raise AssertionError(args.action)
