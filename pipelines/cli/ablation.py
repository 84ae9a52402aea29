"""``lsnet ablation run|render TABLE...`` (pipelines/ablations/runner.py; specs in jobs/ablations/)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_OUT = "results/ablations"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    for action in ("run", "render"):
        p = sub.add_parser(action, help={"run": "train the variants and render the table",
                                         "render": "re-render from MLflow runs (no training)"}[action])
        p.add_argument("tables", nargs="+", help="table names (jobs/ablations/NAME.yaml) or spec paths")
        p.add_argument("--scale", default="tiny", choices=["tiny", "small", "full"])
        p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
        p.add_argument("--tracking-uri", default=None,
                       help="MLflow store (default $MLFLOW_TRACKING_URI, else the checkout's results/mlflow.db)")
        p.add_argument("--experiment", default=None, help="MLflow experiment (default: the spec's)")
        p.add_argument("--fail-on-regression", action="store_true",
                       help="exit 1 when a variant regressed beyond the spec's tolerance")
        if action == "run":
            p.add_argument("--variants", default=None, metavar="NAME[,NAME]",
                           help="train/evaluate only these variants of the table (default: all)")
            p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="config override applied to every variant")
            p.add_argument("--address", default=None, help="Ray address for the training runs")
            p.add_argument("--resume", action="store_true",
                           help="continue the newest unfinished run of the table under --out (killed, or a "
                                "variant failed): finished variants are kept, the rest continue")
        else:
            p.add_argument("--run", dest="parent", default=None, help="parent run id (default: latest finished)")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from pipelines.ablations.data import check_data_present
    from pipelines.ablations.report import render_table
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
        tables = run_tables(specs, args.scale, out, uri, args.overrides, args.address, only=only, resume=args.resume)
    else:  # render only reads
        uri = tracking_uri_from(args.tracking_uri)
        tables = ((render_table(spec, args.scale, uri, out, args.parent), None) for spec in specs)
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
