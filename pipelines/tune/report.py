"""The end of a search: trial records from Tune's results, the MLflow child runs closed with their
outcome, and the parent run's artifacts (best config, results table, plots)."""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from lsnet.config import flatten, to_dict
from pipelines.config import ExperimentConfig
from pipelines.tune.records import (
    EARLY_STOPPED_TAG,
    ERROR_TAG,
    PARENT_DIRNAME,
    TRIALS_DIRNAME,
    SearchOutcome,
    SearchSettings,
    TrialRecord,
    trial_run_name,
    variant_key,
)
from pipelines.tune.space import trial_config

TABLE_COLUMNS = ("trial", "status", "epochs", "final", "best", "mlflow_run_id")


def _finite(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def metric_history(rows: list[dict[str, Any]], metric: str) -> list[tuple[int, float]]:
    """``(epoch, metric)`` of the reports that carry ``metric``; an epoch reported twice (a trial that
    resumed from an earlier checkpoint) keeps its last value."""
    by_epoch: dict[int, float] = {}
    for row in rows:
        epoch, value = _finite(row.get("epoch")), _finite(row.get(metric))
        if epoch is not None and value is not None:
            by_epoch[int(epoch)] = value
    return sorted(by_epoch.items())


def error_line(error: BaseException | str | None) -> str | None:
    """The last non-empty line of an error (the exception itself, under Ray's traceback wrapping)."""
    if error is None:
        return None
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:500]


def trial_records(grid, base: ExperimentConfig, settings: SearchSettings, search_dir: Path) -> list[TrialRecord]:
    """One :class:`TrialRecord` per Tune trial, in trial-id order."""
    records = []
    base_dict = to_dict(base)
    for result in grid:
        trial_id = Path(result.path).name
        values = dict((result.config or {}).get("overrides", {}))
        rows = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
        if result.metrics:
            rows.append(result.metrics)
        history = metric_history(rows, settings.metric)
        epochs_run = max((int(e) for r in rows if (e := _finite(r.get("epoch"))) is not None), default=0)
        epochs = trial_config(base_dict, values).train.epochs
        if result.error is not None:
            status = "FAILED"
        elif epochs_run < epochs:
            status = "EARLY_STOPPED"
        else:
            status = "FINISHED"
        pick = max if settings.mode == "max" else min
        name = trial_run_name(settings.name, trial_id)
        records.append(TrialRecord(
            trial_id=trial_id, run_name=name, run_dir=search_dir / TRIALS_DIRNAME / name,
            values={k: v.item() if hasattr(v, "item") else v for k, v in values.items()},
            status=status, epochs_run=epochs_run, final_metric=history[-1][1] if history else None,
            best_metric=pick(v for _, v in history) if history else None, history=history,
            error=error_line(result.error)))
    return sorted(records, key=lambda r: r.trial_id)


def best_trial(records: list[TrialRecord], mode: str) -> TrialRecord | None:
    """The trial with the best metric over its evaluation epochs (failed trials excluded)."""
    scored = [r for r in records if r.status != "FAILED" and r.best_metric is not None]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r.best_metric)


def close_child_run(record: TrialRecord, base: ExperimentConfig, tracking_uri: str | None,
                    tags: dict[str, str]) -> None:
    """Give the trial's MLflow run its outcome. Its workers are gone: the driver continues the trial's
    own journal (same run). Early-stopped: FINISHED + tag; failed: FAILED + the error's last line (a
    trial that failed before its run existed gets one now, with its config as params)."""
    from pipelines.tracking.journal import Journal, sync_run_dir
    from pipelines.tracking.tracker import RunTracker

    if record.status == "FINISHED" or tracking_uri is None:
        if Journal.exists(record.run_dir):
            try:  # what the trial's rank 0 had not uploaded when its actor ended
                sync_run_dir(record.run_dir)
            except Exception as err:  # noqa: BLE001 - stays in the journal for lsnet mlflow-sync
                print(f"[mlflow] {record.run_name}: upload pending ({type(err).__name__}); "
                      f"lsnet mlflow-sync {record.run_dir}", flush=True)
            record.mlflow_run_id = Journal(record.run_dir).state.get("run_id")
        return
    existed = Journal.exists(record.run_dir)
    record.run_dir.mkdir(parents=True, exist_ok=True)
    tracker = RunTracker(record.run_dir, tracking_uri, base.tracking.experiment, record.run_name,
                         background=False, verbose=False)
    if not existed:
        cfg = trial_config(to_dict(base), record.values)
        tracker.log_params(flatten(to_dict(cfg)))
        tracker.set_tags({**tags, "lsnet.trial_id": record.trial_id,
                          **{k: v if isinstance(v, str) else json.dumps(v) for k, v in record.values.items()}})
    if record.status == "EARLY_STOPPED":
        tracker.set_tags({EARLY_STOPPED_TAG: "true", "lsnet.stopped_after_epoch": record.epochs_run})
        tracker.close("FINISHED", final_flush_timeout_s=10)
    else:
        tracker.set_tags({ERROR_TAG: record.error or "unknown error"})
        tracker.close("FAILED", final_flush_timeout_s=10)
    record.mlflow_run_id = tracker.run_id


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def results_rows(records: list[TrialRecord], keys: list[str]) -> list[dict[str, str]]:
    rows = []
    for r in records:
        row = {"trial": r.trial_id}
        row.update({key: _fmt_value(r.values.get(key, "")) for key in keys})
        row.update(status=r.status, epochs=str(r.epochs_run),
                   final="" if r.final_metric is None else f"{r.final_metric:.4f}",
                   best="" if r.best_metric is None else f"{r.best_metric:.4f}",
                   mlflow_run_id=r.mlflow_run_id or "")
        rows.append(row)
    return rows


def searched_keys(records: list[TrialRecord]) -> list[str]:
    keys: list[str] = []
    for r in records:
        keys += [k for k in r.values if k not in keys]
    return keys


def results_csv(records: list[TrialRecord]) -> str:
    keys = searched_keys(records)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["trial", *keys, *TABLE_COLUMNS[1:], "error"])
    writer.writeheader()
    for row, r in zip(results_rows(records, keys), records):
        writer.writerow({**row, "error": r.error or ""})
    return out.getvalue()


def results_markdown(records: list[TrialRecord], metric: str) -> str:
    keys = searched_keys(records)
    header = ["trial", *keys, "status", "epochs", f"final {metric}", f"best {metric}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results_rows(records, keys):
        lines.append("| " + " | ".join([row["trial"], *(row[k] for k in keys), row["status"], row["epochs"],
                                         row["final"], row["best"]]) + " |")
    return "\n".join(lines) + "\n"


def plot_metric_vs_params(records: list[TrialRecord], metric: str, out_dir: Path) -> list[Path]:
    """One PNG per searched key: each trial's best metric against its value (failed trials left out;
    early-stopped ones hollow)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key in searched_keys(records):
        fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
        for stopped in (False, True):
            pts = [(r.values[key], r.best_metric) for r in records
                   if key in r.values and r.best_metric is not None and (r.status == "EARLY_STOPPED") == stopped]
            if not pts:
                continue
            xs = [str(x) if isinstance(x, (str, bool)) or x is None else x for x, _ in pts]
            ax.scatter(xs, [y for _, y in pts], facecolors="none" if stopped else "C0", edgecolors="C0",
                       label="early-stopped" if stopped else "finished")
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:  # no trial reported the metric: an empty plot, no legend
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{metric}_vs_{key}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_metric_vs_epoch(records: list[TrialRecord], metric: str, path: Path) -> Path:
    """Every trial's metric per evaluated epoch, one line each (early-stopped dashed, so they show)."""
    from pipelines.plots import plot_series

    keys = searched_keys(records)

    def label(r: TrialRecord) -> str:
        values = ", ".join(f"{k.split('.')[-1]}={_fmt_value(r.values.get(k))}" for k in keys)
        return f"{values} #{r.trial_id.split('_')[-1]}" if values else r.trial_id  # unique per trial

    series = {label(r): list(r.history) for r in records}
    dashed = {label(r) for r in records if r.status == "EARLY_STOPPED"}
    return plot_series(series, path, xlabel="epoch", ylabel=metric, dashed=dashed)


def finish_search(grid, base: ExperimentConfig, settings: SearchSettings, search_dir: Path, parent,
                  tracking_uri: str | None, verbose: bool = True, close_parent: bool = True,
                  variant_tags: dict[str, dict[str, str]] | None = None) -> SearchOutcome:
    """Records, child-run outcomes, parent artifacts; prints the table and where to look.
    ``close_parent=False``: the caller finishes the parent run (it owns it). ``variant_tags``: extra
    child tags by :func:`variant_key` (a trial that failed before its run existed gets them too)."""
    records = trial_records(grid, base, settings, search_dir)
    tags = {"lsnet.search": settings.name, "lsnet.kind": "trial"}
    if parent is not None and parent.run_id:
        tags["mlflow.parentRunId"] = parent.run_id
    for record in records:
        close_child_run(record, base, tracking_uri, {**tags, **(variant_tags or {}).get(variant_key(record.values), {})})
    best = best_trial(records, settings.mode)
    best_cfg = None
    out = search_dir / PARENT_DIRNAME / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.csv").write_text(results_csv(records))
    (out / "results.md").write_text(results_markdown(records, settings.metric))
    plots = plot_metric_vs_params(records, settings.metric, out)
    plots.append(plot_metric_vs_epoch(records, settings.metric, out / f"{settings.metric}_vs_epoch.png"))
    if best is not None:
        best_cfg = trial_config(to_dict(base), best.values)
        (out / "best_config.yaml").write_text(best_cfg.to_yaml())
    if parent is not None:
        if best is not None:
            parent.log_params({f"best.{k}": v for k, v in best.values.items()}
                              | {"best.trial_id": best.trial_id, "best.mlflow_run_id": best.mlflow_run_id or ""})
            parent.log_metrics({f"best_{settings.metric}": best.best_metric}, step=0)
            parent.log_artifact(out / "best_config.yaml", "best")
        parent.log_metrics({"trials_finished": sum(r.status == "FINISHED" for r in records),
                            "trials_early_stopped": sum(r.status == "EARLY_STOPPED" for r in records),
                            "trials_failed": sum(r.status == "FAILED" for r in records)}, step=0)
        for path in (out / "results.csv", out / "results.md"):
            parent.log_artifact(path, "results")
        for path in plots:
            parent.log_artifact(path, "plots")
        if close_parent:
            parent.close("FINISHED")
    outcome = SearchOutcome(search_dir=search_dir, trials=records, best=best, best_config=best_cfg,
                            tracking_uri=tracking_uri, parent_run_id=parent.run_id if parent else None,
                            settings=settings)
    if verbose:
        print_summary(outcome)
    return outcome


def print_summary(outcome: SearchOutcome) -> None:
    from pipelines.tracking.store import ui_command

    metric = outcome.settings.metric
    print(results_markdown(outcome.trials, metric))
    best = outcome.best
    if best is not None:
        print(f"best trial {best.trial_id}: {metric} {best.best_metric:.4f} with "
              + ", ".join(f"{k}={_fmt_value(v)}" for k, v in best.values.items()))
        print(f"best config: {outcome.search_dir / PARENT_DIRNAME / 'report' / 'best_config.yaml'}")
    else:
        print(f"no trial reported {metric}")
    print(f"search directory: {outcome.search_dir}")
    if outcome.tracking_uri:
        print(f"MLflow parent run {outcome.parent_run_id} at {outcome.tracking_uri}; open the UI with:\n"
              f"  {ui_command(outcome.tracking_uri)}")
