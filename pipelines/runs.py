"""``lsnet runs list|compare``: MLflow runs as terminal tables, through ``MlflowClient``.

- ``lsnet runs list [--experiment NAME]``: every run (newest first): id, name, status, parent, the
  run's AP, duration;
- ``lsnet runs compare (EXPERIMENT | PARENT_RUN_ID) [--metric segm_AP] [--sort] [--csv]``: the runs of an
  experiment or the trials of a search side by side: the params that differ between them, status,
  the metric (final and best over its history) and duration;
- ``lsnet runs plot RUN_ID... [--metric segm_AP] [--x epoch|step] [--out runs.png]``: one PNG with the
  metric of each run (a search's parent id stands for its trials), early-stopped runs dashed.

Any tracking URI works: ``--tracking-uri`` (an ``http://`` server, ``sqlite:///...``, or the path of a
``.db`` file such as a search's ``mlflow.db``), else ``$MLFLOW_TRACKING_URI``.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import re
import sys
from pathlib import Path
from typing import Any

#: params that differ between runs by construction (not a choice worth a column)
BOOKKEEPING_PARAMS = {"run.name"}
AP_METRICS = ("bbox_AP", "segm_AP", "kp_AP")


class RunsError(ValueError):
    """The tracking store or the runs asked for cannot be found."""


def tracking_uri_from(arg: str | None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else the checkout's shared store if it exists. For
    commands that only read: a SQLite store that does not exist is an error (MLflow would create it)."""
    from pipelines.tracking.store import default_store_path

    uri = arg or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        if not default_store_path().is_file():
            raise RunsError(f"no tracking store: no {default_store_path()} yet; pass --tracking-uri (a server URL, "
                            "sqlite:///..., or a .db file) or set MLFLOW_TRACKING_URI")
        uri = str(default_store_path())
    if "://" not in uri or uri.startswith("sqlite:///"):  # a local SQLite file: reading never creates one
        path = Path(uri.removeprefix("sqlite:///")).resolve()
        if not path.is_file():
            raise RunsError(f"--tracking-uri {uri}: no MLflow store at {path} (no such database file)")
        uri = f"sqlite:///{path}"
    return uri


def _duration(run) -> float | None:
    if run.info.start_time and run.info.end_time:
        return (run.info.end_time - run.info.start_time) / 1000.0
    return None


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}" if hours else f"{minutes}:{sec:02d}"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def find_runs(client, target: str) -> tuple[list, str]:
    """The runs of experiment ``target``, or the child runs of parent run ``target``; and a title."""
    if re.fullmatch(r"[0-9a-f]{32}", target):
        try:
            parent = client.get_run(target)
        except Exception as err:  # noqa: BLE001 - MLflow raises its own error types per store
            raise RunsError(f"run {target}: not found ({type(err).__name__})") from None
        runs = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{target}'", max_results=10000)
        return runs, f"children of {parent.info.run_name} ({target})"
    experiment = client.get_experiment_by_name(target)
    if experiment is None:
        names = [e.name for e in client.search_experiments()]
        raise RunsError(f"no experiment {target!r} (and not a run id); experiments: {', '.join(names) or 'none'}")
    return client.search_runs([experiment.experiment_id], max_results=10000), f"experiment {target}"


def differing_params(runs) -> list[str]:
    keys = sorted({k for r in runs for k in r.data.params} - BOOKKEEPING_PARAMS)
    # a param only some runs have (a search's parent settings) with one value is not a difference
    return [k for k in keys if len({r.data.params[k] for r in runs if k in r.data.params}) > 1]


def metric_summary(client, run, metric: str, mode: str) -> tuple[float | None, float | None]:
    """(final, best) of ``metric`` in ``run``: the last logged value and the best over its history."""
    final = run.data.metrics.get(metric)
    if final is None:
        return None, None
    history = [m.value for m in client.get_metric_history(run.info.run_id, metric)]
    return final, (max if mode == "max" else min)(history) if history else final


def compare_rows(client, runs, metric: str, mode: str) -> tuple[list[str], list[list[str]], list[float | None]]:
    keys = differing_params(runs)
    header = ["run", *keys, "status", f"final {metric}", f"best {metric}", "duration"]
    rows, scores = [], []
    for run in runs:
        final, best = metric_summary(client, run, metric, mode)
        status = run.info.status
        if run.data.tags.get("lsnet.early_stopped") == "true":
            status += " (early-stopped)"
        rows.append([run.info.run_name or run.info.run_id, *(run.data.params.get(k, "") for k in keys), status,
                     _fmt(final), _fmt(best), _fmt_duration(_duration(run))])
        scores.append(best)
    return header, rows, scores


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def guess_metric(runs) -> str:
    for name in AP_METRICS:
        if any(name in r.data.metrics for r in runs):
            return name
    return "loss"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="every run of the store (newest first)")
    listing.add_argument("--experiment", default=None, help="only this experiment")
    compare = sub.add_parser("compare", help="runs of an experiment / trials of a search side by side")
    compare.add_argument("target", help="experiment name, or the run id of a search's parent run")
    compare.add_argument("--metric", default=None, help="metric to show (default: the task's AP found in the runs)")
    compare.add_argument("--mode", choices=("max", "min"), default="max", help="what 'best' means for --metric")
    compare.add_argument("--sort", action="store_true", help="best first")
    compare.add_argument("--csv", action="store_true", help="CSV instead of a table")
    plot = sub.add_parser("plot", help="PNG of a metric over epochs (or steps) for runs, or a search's trials")
    plot.add_argument("runs", nargs="+", help="run ids; a search's parent run id stands for its trials")
    plot.add_argument("--metric", default=None, help="metric to plot (default: the task's AP found in the runs)")
    plot.add_argument("--x", choices=("epoch", "step"), default="epoch",
                      help="epoch (metrics logged at an epoch's end) or optimiser step")
    plot.add_argument("--out", default="runs.png", help="PNG file to write (default: runs.png)")
    for p in (listing, compare, plot):
        p.add_argument("--tracking-uri", default=None,
                       help="MLflow store: server URL, sqlite:///..., or a .db file (default: $MLFLOW_TRACKING_URI)")


def run(args: argparse.Namespace) -> int:
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri_from(args.tracking_uri))
        if args.action == "list":
            return _list(client, args)
        if args.action == "plot":
            return _plot(client, args)
        runs, title = find_runs(client, args.target)
    except RunsError as err:
        print(f"lsnet runs: {err}", file=sys.stderr)
        return 2
    if not runs:
        print(f"lsnet runs: no runs in {title}", file=sys.stderr)
        return 1
    metric = args.metric or guess_metric(runs)
    header, rows, scores = compare_rows(client, runs, metric, args.mode)
    if args.sort:
        worst = -float("inf") if args.mode == "max" else float("inf")
        order = sorted(range(len(rows)), key=lambda i: worst if scores[i] is None else scores[i],
                       reverse=args.mode == "max")
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


def metric_curve(client, run_id: str, metric: str, x: str) -> list[tuple[float, float]]:
    """``(x, value)`` of ``metric`` in a run: x is the logged step, or the epoch (from the run's
    ``epoch`` metric, logged at the same step as each epoch's results)."""
    points = [(m.step, m.value) for m in client.get_metric_history(run_id, metric)]
    if x == "step":
        return points
    epoch_at = {m.step: m.value for m in client.get_metric_history(run_id, "epoch")}
    return [(epoch_at[step], value) for step, value in points if step in epoch_at]


def _plot(client, args: argparse.Namespace) -> int:
    from pipelines.plots import plot_series

    runs = []
    for run_id in args.runs:
        try:
            run = client.get_run(run_id)
        except Exception as err:  # noqa: BLE001 - MLflow raises its own error types per store
            raise RunsError(f"run {run_id}: not found ({type(err).__name__})") from None
        children = client.search_runs([run.info.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=10000)
        runs += children or [run]
    metric = args.metric or guess_metric(runs)
    series = {r.info.run_name or r.info.run_id: metric_curve(client, r.info.run_id, metric, args.x) for r in runs}
    if not any(series.values()):
        raise RunsError(f"no run has {metric} per {args.x}" + (" (try --x step)" if args.x == "epoch" else ""))
    dashed = {r.info.run_name or r.info.run_id for r in runs if r.data.tags.get("lsnet.early_stopped") == "true"}
    path = plot_series(series, args.out, xlabel=args.x, ylabel=metric, dashed=dashed)
    print(f"{path}: {metric} per {args.x} of {sum(bool(v) for v in series.values())} runs")
    return 0
