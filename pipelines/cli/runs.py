"""``lsnet runs``: list and compare MLflow runs (pipelines.runs)."""
from __future__ import annotations

import argparse
import csv
import io
import sys
from typing import Any

from pipelines.runs import (
    AP_METRICS,
    RunsError,
    _duration,
    _fmt_duration,
    compare_rows,
    find_runs,
    guess_metric,
    metric_curve,
    run_labels,
    runs_behind,
    search_metric,
    searched_keys_of,
    seed_group_rows,
    seed_groups,
    tracking_uri_from,
)
from pipelines.text import format_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="every run of the store (newest first)")
    listing.add_argument("--experiment", default=None, help="only this experiment")
    compare = sub.add_parser("compare", help="runs of an experiment / trials of a search side by side")
    compare.add_argument("target", help="experiment name, or the run id of a search's parent run")
    compare.add_argument("--metric", default=None,
                         help="metric to show (default: a search's own metric, else the task's AP found in the runs)")
    compare.add_argument("--mode", choices=("max", "min"), default=None,
                         help="what 'best' means for --metric (default: the search's mode, else max)")
    compare.add_argument("--sort", action="store_true", help="best first")
    compare.add_argument("--csv", action="store_true", help="CSV instead of a table")
    compare.add_argument("--per-run", action="store_true",
                         help="an ablation run with several seeds: one row per child run, not per variant")
    plot = sub.add_parser("plot", help="PNG of a metric over epochs (or steps) for runs, or a search's trials")
    plot.add_argument("runs", nargs="+", help="run ids; a search's parent run id stands for its trials")
    plot.add_argument("--metric", default=None,
                      help="metric to plot (default: a search's own metric, else the task's AP found in the runs)")
    plot.add_argument("--x", choices=("epoch", "step"), default="epoch",
                      help="epoch (metrics logged at an epoch's end) or optimiser step")
    plot.add_argument("--out", default="runs.png", help="PNG file to write (default: runs.png)")
    for p in (listing, compare, plot):
        p.add_argument("--tracking-uri", default=None,
                       help="MLflow store: server URL, sqlite:///..., or a .db file (default: $MLFLOW_TRACKING_URI)")


def run(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri_from(args.tracking_uri))
    if args.action == "list":
        return _list(client, args)
    if args.action == "plot":
        return _plot(client, args)
    runs, title, parent = find_runs(client, args.target)
    if not runs:
        print(f"lsnet runs: no runs in {title}", file=sys.stderr)
        return 1
    own_metric, own_mode = search_metric([parent] if parent is not None else [])
    metric = args.metric or own_metric or guess_metric(runs)
    # the search's mode goes with the search's metric only
    mode = args.mode or (own_mode if metric == own_metric and own_mode else "max")
    groups = None if args.per_run else seed_groups(runs)
    if groups:  # an ablation table with K seeds: the seeds view, one row per variant
        header, rows, scores = seed_group_rows(groups, metric)
        title += f", {len(runs)} runs grouped by variant"
    else:
        header, rows, scores = compare_rows(client, runs, metric, mode)
    if args.sort:
        worst = -float("inf") if mode == "max" else float("inf")
        order = sorted(range(len(rows)), key=lambda i: worst if scores[i] is None else scores[i],
                       reverse=mode == "max")
        rows = [rows[i] for i in order]
    if args.csv:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(rows)
        print(out.getvalue(), end="")
    else:
        print(f"{title}: {len(rows)} runs\n{format_table(header, rows)}")
    return 0


def _list(client, args: argparse.Namespace) -> int:
    experiments = client.search_experiments()
    if args.experiment:
        experiments = [e for e in experiments if e.name == args.experiment]
        if not experiments:
            raise RunsError(f"no experiment {args.experiment!r}")
    names = {e.experiment_id: e.name for e in experiments}
    runs = client.search_runs(list(names), max_results=10000, order_by=["attributes.start_time DESC"])
    header = ["run_id", "experiment", "name", "status", "parent", "AP", "duration"]
    rows: list[list[Any]] = []
    for r in runs:
        ap = next((f"{k} {r.data.metrics[k]:.4f}" for k in AP_METRICS if k in r.data.metrics), "-")
        rows.append([r.info.run_id, names[r.info.experiment_id], r.info.run_name or "", r.info.status,
                     r.data.tags.get("mlflow.parentRunId", "")[:8] or "-", ap, _fmt_duration(_duration(r))])
    print(format_table(header, rows) if rows else "no runs")
    return 0 if rows else 1


def _plot(client, args: argparse.Namespace) -> int:
    from pipelines.plots import plot_series

    runs, parents = runs_behind(client, args.runs)
    metric = args.metric or search_metric(parents)[0] or guess_metric(runs)
    labels = run_labels(runs, searched_keys_of(parents))  # a search's trials by their values: alpha=0.1
    series = {labels[r.info.run_id]: metric_curve(client, r.info.run_id, metric, args.x) for r in runs}
    if not any(series.values()):
        raise RunsError(f"no run has {metric} per {args.x}" + (" (try --x step)" if args.x == "epoch" else ""))
    dashed = {labels[r.info.run_id] for r in runs if r.data.tags.get("lsnet.early_stopped") == "true"}
    path = plot_series(series, args.out, xlabel=args.x, ylabel=metric, dashed=dashed)
    print(f"{path}: {metric} per {args.x} of {sum(bool(v) for v in series.values())} runs")
    return 0
