"""``lsnet ablation run|render TABLE...`` (pipelines/ablations/runner.py; specs in jobs/ablations/).

A run writes its tables, data cache and training runs under ``--out`` (default :data:`DEFAULT_OUT`,
ignored by git): a user's run never touches the committed reference tables in
:data:`PUBLISHED_DIR` (``results/ablations/<table>-<scale>/``). ``--publish`` replaces those on purpose
with the rendered table of a complete run (``run --publish``, or ``render --publish`` of a parent run).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.ablations.spec import SCALES
from pipelines.paths import REPO_ROOT

#: a user's runs: tables, data cache, Train runs (ignored by git)
DEFAULT_OUT = "results/ablation_runs"
#: the committed reference tables, replaced only with --publish
PUBLISHED_DIR = REPO_ROOT / "results" / "ablations"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    for action in ("run", "render"):
        p = sub.add_parser(action, help={"run": "train the variants and render the table",
                                         "render": "re-render from MLflow runs (no training)"}[action])
        p.add_argument("tables", nargs="+", help="table names (jobs/ablations/NAME.yaml) or spec paths")
        p.add_argument("--scale", default="tiny", choices=list(SCALES))
        p.add_argument("--out", default=DEFAULT_OUT,
                       help=f"output folder (default {DEFAULT_OUT}, ignored by git; never the committed tables)")
        p.add_argument("--publish", action="store_true",
                       help="also write the rendered table over the committed reference table in "
                            "results/ablations/<table>-<scale>/ (only a run whose variants all finished)")
        p.add_argument("--tracking-uri", default=None,
                       help="MLflow store (default $MLFLOW_TRACKING_URI, else the checkout's results/mlflow.db)")
        p.add_argument("--experiment", default=None, help="MLflow experiment (default: the spec's)")
        p.add_argument("--fail-on-regression", action="store_true",
                       help="exit 1 when a variant regressed (mean below the previous run's 95 %% interval; "
                            "with one seed: beyond the spec's tolerance)")
        if action == "run":
            p.add_argument("--variants", default=None, metavar="NAME[,NAME]",
                           help="train/evaluate only these variants of the table (default: all)")
            p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="config override applied to every variant")
            p.add_argument("--address", default=None, help="Ray address for the training runs")
            p.add_argument("--seeds", type=int, default=None, metavar="K",
                           help="seeds per trained variant (default: the scale's `seeds` in the spec)")
            p.add_argument("--max-concurrent", type=int, default=None, metavar="N",
                           help="at most N trials at once (default: as many as the cluster holds)")
            p.add_argument("--resume", action="store_true",
                           help="continue the newest unfinished run of the table under --out (killed, or a "
                                "variant failed): finished variants are kept, the rest continue")
        else:
            p.add_argument("--run", dest="parent", default=None, help="parent run id (default: latest finished)")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from lsnet.config import ConfigError
    from pipelines.ablations.data import check_data_present
    from pipelines.ablations.runner import run_tables, select_variants
    from pipelines.ablations.spec import load_ablation_spec
    from pipelines.runs import tracking_uri_from
    from pipelines.tracking.store import resolve_tracking_uri, run_url, ui_command

    specs = [load_ablation_spec(t) for t in args.tables]  # all validated before anything runs
    only = [n.strip() for n in args.variants.split(",") if n.strip()] if getattr(args, "variants", None) else None
    for spec in specs:
        scale = spec.scale(args.scale, str(spec.name))
        if only:
            select_variants(spec, only)
        if args.action == "run":
            check_data_present(spec, scale)  # e.g. the real data of `small`: before any table runs
    if args.experiment:
        specs = [dataclasses.replace(spec, experiment=args.experiment) for spec in specs]
    out = args.out if "://" in args.out else Path(args.out)  # a URI (s3://...) is no local path
    if args.action == "run":
        uri = resolve_tracking_uri(args.tracking_uri)  # resolved once, here; run_ablation opens the store
        if args.seeds is not None and args.seeds < 1:
            raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
        if args.max_concurrent is not None and args.max_concurrent < 1:
            raise ConfigError(f"--max-concurrent must be >= 1, got {args.max_concurrent}")
        tables = run_tables(specs, args.scale, out, uri, args.overrides, args.address, only=only, resume=args.resume,
                            seeds=args.seeds, max_concurrent=args.max_concurrent,
                            publish=PUBLISHED_DIR if args.publish else None)
    else:  # render only reads
        uri = tracking_uri_from(args.tracking_uri)
        tables = ((_render(spec, args.scale, uri, out, args.parent, args.publish), None) for spec in specs)
    regressed, failures = 0, []
    for report, failure in tables:
        print(report.markdown())
        print(f"written: {', '.join(str(p) for p in report.files)}")
        print(f"MLflow parent run: {run_url(uri, report.experiment_id, report.parent_run_id)}")
        regressed += len(report.regressions)
        failures += [failure] if failure else []
    print(f"open the MLflow UI with: {ui_command(uri)}")
    if failures:
        print(f"lsnet ablation run: {' | '.join(failures)}", file=sys.stderr)
        return 1
    if regressed and args.fail_on_regression:
        print(f"lsnet ablation: {regressed} regression(s) (see the reports)", file=sys.stderr)
        return 1
    return 0


def _render(spec, scale: str, uri: str, out: Path, parent: str | None, publish: bool):
    from pipelines.ablations.report import render_table

    report = render_table(spec, scale, uri, out, parent)
    if publish:
        report.files += render_table(spec, scale, uri, PUBLISHED_DIR, report.parent_run_id).files
    return report
