"""``lsnet jobs submit|status|logs|stop|list|schedule`` (see pipelines/jobs/client.py, schedule.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lsnet.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)

    def address_arg(p, none: str = "the jobs that ran on private heads of this checkout"):
        p.add_argument("--address", default=None,
                       help=f"Ray dashboard/job server, http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS / "
                            f"$RAY_ADDRESS; none: {none})")

    p = sub.add_parser("submit", help="submit a job spec (jobs/NAME.yaml or a path)")
    p.add_argument("spec")
    address_arg(p, "a private Ray head on 127.0.0.1 runs the job in this checkout, then stops")
    p.add_argument("--wait", action="store_true", help="wait for the end; FAILED/STOPPED exits 1 with the log tail")
    p.add_argument("--follow", action="store_true", help="stream the job's log until it ends (implies --wait)")
    p.add_argument("--submission-id", default=None)
    p.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    p.add_argument("--head-cpus", type=int, default=None, help="CPUs of the private local head (no --address)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="append `--set KEY=VALUE` to the entrypoint (config overrides of train/ablation)")
    p.add_argument("extra_args", nargs="*", metavar="-- ARG",
                   help="after `--`: arguments appended to the entrypoint as they are (e.g. -- --out DIR)")
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
    k8s = p.add_argument_group("deployment (k8s, k8s-cronjob; each overrides the spec's cluster.* setting)")
    k8s.add_argument("--image", default=None, help="REGISTRY/lsnet:TAG, pinned (default: the spec's cluster.image, "
                                                   "else $LSNET_IMAGE; never :latest)")
    k8s.add_argument("--namespace", default=None, help="metadata.namespace (default: kubectl's, -n at apply)")
    k8s.add_argument("--service-account", default=None, help="serviceAccountName of every pod")
    k8s.add_argument("--image-pull-secret", dest="image_pull_secrets", action="append", default=[], metavar="SECRET",
                     help="imagePullSecrets for a private registry (repeatable)")
    k8s.add_argument("--pvc", default=None, metavar="CLAIM",
                     help="PersistentVolumeClaim mounted at --mount-path: outputs, checkpoints, --resume state")
    k8s.add_argument("--mount-path", default=None, help="where --pvc is mounted (default /mnt/lsnet)")
    k8s.add_argument("--storage", default=None, metavar="URI",
                     help="or object storage for outputs and checkpoints (s3://bucket/prefix; train and tune)")
    k8s.add_argument("--storage-secret", default=None, metavar="SECRET",
                     help="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY [/ AWS_ENDPOINT_URL] for --storage")
    k8s.add_argument("--mlflow-uri", default=None,
                     help="MLflow tracking server (default: the spec's MLFLOW_TRACKING_URI; with --pvc and none: "
                          "SQLite on the volume)")
    k8s.add_argument("--mlflow-secret", default=None, metavar="SECRET",
                     help="Secret with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")
    p.add_argument("--on-failure-webhook", dest="webhook", default=None, metavar="URL",
                   help="POST a JSON message here when a run fails (all forms)")
    k8s.add_argument("--on-failure-webhook-secret", dest="failure_webhook_secret", default=None, metavar="SECRET",
                     help="the webhook URL from this Secret's key `url` instead (a Slack URL is a secret)")


def _address(args) -> str | None:
    from pipelines.jobs.client import cluster_address

    return cluster_address(args.address)


def _iso(ms) -> str:
    """Ray's millisecond epoch timestamps as ISO 8601 UTC (``2026-12-07T09:51:02Z``); ``-`` when unset."""
    import datetime as dt

    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(start_ms, end_ms) -> str:
    """``1 h 02 min``, ``3 min 09 s``, ``42 s``; a running job: the time so far (``running``)."""
    import time

    if not start_ms:
        return "-"
    seconds = round(((end_ms or time.time() * 1000) - start_ms) / 1000)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    text = f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"
    return text if end_ms else f"{text} (running)"


def format_status(record: dict) -> str:
    rows = [("submission id", record["submission_id"]), ("status", record["status"]),
            ("job", " ".join(x for x in (record.get("job") or "", f"({record['spec']})" if record.get("spec") else "")
                             if x) or "-"),
            ("started", _iso(record.get("start_time"))), ("ended", _iso(record.get("end_time"))),
            ("duration", _duration(record.get("start_time"), record.get("end_time"))),
            ("message", record.get("message") or "-"), ("entrypoint", record.get("entrypoint") or "-")]
    if record.get("driver_exit_code") is not None:
        rows.insert(6, ("exit code", str(record["driver_exit_code"])))
    for key in ("tracking_uri", "head"):
        if record.get(key):
            rows.append(({"tracking_uri": "MLflow store"}.get(key, key), record[key]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows) + "\n"


def format_table(records: list[dict]) -> str:
    """One line per job under a header: id, status, job, start (UTC), duration, entrypoint."""
    header = ("SUBMISSION ID", "STATUS", "JOB", "STARTED (UTC)", "DURATION", "ENTRYPOINT")
    rows = [(r["submission_id"], r["status"], r.get("job") or "-", _iso(r.get("start_time")),
             _duration(r.get("start_time"), r.get("end_time")), r.get("entrypoint") or "-")
            for r in sorted(records, key=lambda r: r.get("start_time") or 0)]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    return "".join("  ".join(str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + f"  {row[-1]}\n"
                   for row in [header, *rows])


def run(args: argparse.Namespace) -> int:
    from pipelines.jobs.spec import load_job_spec, resolve_spec_path

    if args.action == "schedule":
        from pipelines.jobs.schedule import emit

        spec = load_job_spec(resolve_spec_path(args.spec))
        flags = {k: getattr(args, k) for k in ("image", "namespace", "service_account", "image_pull_secrets", "pvc",
                                               "mount_path", "storage", "storage_secret", "mlflow_uri",
                                               "mlflow_secret", "webhook", "failure_webhook_secret")}
        text = emit(spec, args.emit, address=args.address, repo=args.repo, **flags)
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
        extra = [x for item in args.overrides for x in ("--set", item)] + list(args.extra_args)
        outcome = run_job(spec, address=args.address, wait=args.wait, follow=args.follow, extra_args=extra,
                          submission_id=args.submission_id, timeout_s=args.timeout, head_cpus=args.head_cpus)
        print(f"job {outcome.submission_id}: {outcome.status}")
        if outcome.status in ("FAILED", "STOPPED"):
            print(f"--- last lines of the log of {outcome.submission_id} ---\n{outcome.log_tail}", file=sys.stderr)
            return 1
        return 0

    address = _address(args)
    if address is None:  # the jobs that ran on private heads of this checkout (pipelines/jobs/records.py)
        return _local_records(args)
    from pipelines.jobs.client import follow_logs, make_client, server_errors
    from pipelines.jobs.records import job_record

    with server_errors(address):
        client = make_client(address)
        if args.action == "status":
            record = job_record(client.get_job_info(args.submission_id))
            sys.stdout.write(format_status(record))
            return 0 if record["status"] != "FAILED" else 1
        if args.action == "logs":
            if args.follow:
                follow_logs(client, args.submission_id)
            else:
                _write_log(client.get_job_logs(args.submission_id), args.tail)
            return 0
        if args.action == "stop":
            stopped = client.stop_job(args.submission_id)
            print(f"{args.submission_id}: {'stop requested' if stopped else 'already finished'}")
            return 0
        if args.action == "list":
            jobs = client.list_jobs()
            sys.stdout.write(format_table([job_record(job) for job in jobs]))
            if not jobs:
                print(f"(no jobs on {address})")
            return 0
    raise AssertionError(args.action)


def _write_log(text: str, tail: int | None) -> None:
    if tail:
        text = "\n".join(text.splitlines()[-tail:]) + "\n"
    sys.stdout.write(text)


def _local_records(args) -> int:
    from pipelines.jobs.records import all_records, load_record, record_log, records_dir

    if args.action == "status":
        record = load_record(args.submission_id)
        sys.stdout.write(format_status(record))
        return 0 if record["status"] != "FAILED" else 1
    if args.action == "logs":
        _write_log(record_log(args.submission_id), args.tail)
        return 0
    if args.action == "list":
        records = all_records()
        print(f"no --address: jobs that ran on private heads of this checkout ({records_dir()}); "
              "for a cluster's jobs pass --address http://HEAD:8265")
        sys.stdout.write(format_table(records))
        return 0
    raise ConfigError("no cluster address: a private head's job ends with its `lsnet jobs submit` (Ctrl-C "
                      "stops it); for a cluster's job pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS")
