"""The end of a search: trial records from Tune's results, the MLflow child runs closed with their
outcome, and the parent run's artifacts (best config, results table, plots) and description.

What MLflow shows is what the report says: every child run ends with its trial's status -- FINISHED;
early-stopped (by ASHA): FINISHED with the tag ``lsnet.early_stopped=true``; FAILED with the error in the
tag ``lsnet.error`` and the run's description; KILLED when the search was interrupted (Ctrl-C, SIGTERM)
before the trial ended -- and the parent's counts are those of the table on its description."""
from __future__ import annotations

import csv
import io
import json
import math
import socket
import time
from pathlib import Path
from typing import Any

from lsnet.config import flatten, to_dict
from pipelines.config import ExperimentConfig
from pipelines.tune.records import (
    EARLY_STOPPED_TAG,
    ERROR_TAG,
    NOTE_TAG,
    PARENT_DIRNAME,
    TRIALS_DIRNAME,
    SearchOutcome,
    SearchSettings,
    TrialRecord,
    format_value,
    short_names,
    trial_run_name,
    values_label,
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


def tune_statuses(grid) -> dict[str, str]:
    """Tune's status of each trial when ``Tuner.fit()`` ended (TERMINATED, ERROR, or -- after an
    interrupted search -- RUNNING / PENDING / PAUSED), by trial id; empty when nothing says.

    Read from the experiment state Tune saved last (``experiment_state-*.json`` in the search directory,
    which ``--resume`` restores from): after Ctrl-C Tune saves the state and only then stops the trials,
    marking them TERMINATED in memory -- so the grid's own trials would call an interrupted trial ended."""
    path = getattr(grid, "experiment_path", None)
    states = sorted(Path(path).glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime) if path else []
    if states:
        try:
            trials = [json.loads(trial) for trial, _ in json.loads(states[-1].read_text())["trial_data"]]
            return {t["trial_id"]: str(t["status"]) for t in trials}
        except (OSError, ValueError, KeyError, TypeError):
            pass
    analysis = getattr(grid, "_experiment_analysis", None)
    return {t.trial_id: str(t.status) for t in getattr(analysis, "trials", None) or []}


def trial_records(grid, base: ExperimentConfig, settings: SearchSettings, search_dir: Path,
                  statuses: dict[str, str] | None = None, interrupted: bool = False) -> list[TrialRecord]:
    """One :class:`TrialRecord` per Tune trial, in trial-id order. ``interrupted``: the trials Tune had
    not ended (``statuses``) are KILLED."""
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
        elif interrupted and (statuses or {}).get(trial_id) not in ("TERMINATED", "ERROR"):
            status = "KILLED"
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


#: the MLflow status of each report status (an early-stopped trial did what the search asked of it)
MLFLOW_STATUS = {"FINISHED": "FINISHED", "EARLY_STOPPED": "FINISHED", "FAILED": "FAILED", "KILLED": "KILLED"}


def close_child_run(record: TrialRecord, base: ExperimentConfig, tracking_uri: str | None,
                    tags: dict[str, str], writers_deadline: float | None = None) -> None:
    """Give the trial's MLflow run the status of ``record`` (:data:`MLFLOW_STATUS`), whatever its workers
    managed to log before they ended. The driver continues the trial's own journal (same run): what
    rank 0 had not uploaded goes up; a run that did not end (workers killed while saving), or ended
    otherwise (the trial's driver ends it FAILED when Tune stops the trial), ends as the report says; an
    early-stopped, failed or killed run gets the loss/AP curves its rank 0 never drew; a trial that
    failed before its run existed gets one now, with its config as params. A KILLED trial that never
    started has no run."""
    from pipelines.tracking.journal import Journal
    from pipelines.tracking.tracker import RunTracker

    if tracking_uri is None:
        return
    existed = Journal.exists(record.run_dir)
    if not existed and record.status == "KILLED":
        return
    status = MLFLOW_STATUS[record.status]
    if existed and Journal(record.run_dir).end_status() != status:
        wait_for_trial_processes(record.run_dir, writers_deadline or time.monotonic() + 30)
    record.run_dir.mkdir(parents=True, exist_ok=True)
    tracker = RunTracker(record.run_dir, tracking_uri, base.tracking.experiment, record.run_name,
                         background=False, verbose=False)
    if not existed:
        cfg = trial_config(to_dict(base), record.values)
        tracker.log_params(flatten(to_dict(cfg)))
        tracker.set_tags({**tags, "lsnet.trial_id": record.trial_id,
                          "mlflow.runName": tags.get("mlflow.runName") or values_label(record.values) or record.run_name,
                          **{k: v if isinstance(v, str) else json.dumps(v) for k, v in record.values.items()}})
    if record.status != "FINISHED":
        _log_missing_curves(record, base, tracker)
    if record.status == "EARLY_STOPPED":
        tracker.set_tags({EARLY_STOPPED_TAG: "true", "lsnet.stopped_after_epoch": record.epochs_run,
                          NOTE_TAG: f"Stopped early by the search's scheduler after epoch {record.epochs_run} "
                                    f"of {trial_config(to_dict(base), record.values).train.epochs}."})
    elif record.status == "FAILED":
        error = record.error or "unknown error"
        tracker.set_tags({ERROR_TAG: error, NOTE_TAG: f"**Failed** after {record.epochs_run} epoch(s):\n\n"
                                                       f"```\n{error}\n```"})
    elif record.status == "KILLED":
        tracker.set_tags({NOTE_TAG: f"Killed after {record.epochs_run} epoch(s): the search was interrupted. "
                                    "`lsnet tune ... --name NAME --resume` continues it from its last checkpoint."})
    if Journal(record.run_dir).end_status() != status:
        tracker.close(status, final_flush_timeout_s=10)
    else:
        tracker.flush()
        if tracker.journal.pending():
            print(f"[mlflow] {record.run_name}: upload pending; lsnet mlflow-sync {record.run_dir}", flush=True)
    record.mlflow_run_id = tracker.run_id


def _log_missing_curves(record: TrialRecord, base: ExperimentConfig, tracker) -> None:
    """``curves/loss.png`` and ``curves/<AP>.png`` from the epochs the trial ran (rank 0 draws them only at
    the end of a full run)."""
    from pipelines.plots import run_curve_plots
    from pipelines.train.progress import LOSS_KEYS

    if not (record.run_dir / "epochs.jsonl").is_file() or (record.run_dir / "curves").is_dir():
        return
    try:
        for png in run_curve_plots(record.run_dir, trial_config(to_dict(base), record.values).primary_metric,
                                   LOSS_KEYS):
            tracker.log_artifact(png, "curves")
    except (OSError, ValueError, KeyError) as err:  # a torn epochs.jsonl: the metrics are in MLflow anyway
        print(f"[mlflow] {record.run_name}: no curves ({type(err).__name__}: {err})", flush=True)


def wait_for_trial_processes(run_dir: Path, deadline: float) -> None:
    """Wait (until ``deadline``, a ``time.monotonic()`` value) for the trial's rank-0 worker on this
    machine to be gone, so that nothing writes to its journal after the driver ends the run. A worker
    on another node: nothing to wait for (its actor was killed with the trial)."""
    import psutil

    info = run_dir / "workers" / "rank0.json"
    try:
        worker = json.loads(info.read_text())
    except (OSError, ValueError):
        return
    if worker.get("hostname") != socket.gethostname():
        return
    while time.monotonic() < deadline:
        try:
            if psutil.Process(int(worker["pid"])).status() == psutil.STATUS_ZOMBIE:
                return
        except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, ValueError):
            return
        time.sleep(0.2)


def end_interrupted_search(search_dir: Path, parent, tracking_uri: str | None, settings: SearchSettings,
                           verbose: bool = True) -> None:
    """The driver was interrupted before Tune could stop its trials (a second Ctrl-C or SIGTERM, or
    one before the trials started): every trial run that has not ended and the parent (when the search
    owns it) end KILLED; ``--resume`` reopens them."""
    from pipelines.tracking.journal import Journal, find_run_dirs
    from pipelines.tracking.tracker import RunTracker

    if tracking_uri is not None:
        for run_dir in find_run_dirs(search_dir / TRIALS_DIRNAME) if (search_dir / TRIALS_DIRNAME).is_dir() else []:
            if Journal(run_dir).end_status() is None:
                RunTracker(run_dir, background=False, verbose=False).close("KILLED", final_flush_timeout_s=5)
        if parent is not None:
            parent.set_tags({NOTE_TAG: f"**Interrupted** before it ended. Continue it with "
                                       f"`lsnet tune ... --name {settings.name} --resume`."})
            parent.close("KILLED", final_flush_timeout_s=5)
    if verbose:
        print(f"lsnet tune: search {settings.name} interrupted; its unfinished runs are marked KILLED; continue it "
              f"with --name {settings.name} --resume", flush=True)


def results_rows(records: list[TrialRecord], keys: list[str]) -> list[dict[str, str]]:
    rows = []
    for r in records:
        row = {"trial": r.trial_id}
        row.update({key: format_value(r.values.get(key, "")) for key in keys})
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


def trial_labels(records: list[TrialRecord]) -> dict[str, str]:
    """Each trial by its searched values (``alpha=0.1``), by trial id; two trials with the same values
    (a random search can draw a value twice) get their trial number too."""
    keys = searched_keys(records)
    labels = {r.trial_id: values_label(r.values, keys) or r.trial_id for r in records}
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    return {tid: f"{label} #{tid.split('_')[-1]}" if counts[label] > 1 else label for tid, label in labels.items()}


def ranked(records: list[TrialRecord], mode: str) -> list[TrialRecord]:
    """Best first by each trial's best metric; trials without it last, in trial order."""
    scored = sorted((r for r in records if r.best_metric is not None), key=lambda r: r.best_metric,
                    reverse=mode == "max")
    return scored + [r for r in records if r.best_metric is None]


#: MLflow keeps at most 8000 characters of a tag value (the run's description)
_NOTE_LIMIT = 7800

#: runs in the description's compare link (each takes ~40 characters of the description)
_COMPARE_LIMIT = 40


def share_runs_view(tracking_uri: str | None, experiment_id: str | None, settings: SearchSettings,
                    parent_run_id: str | None, keys: list[str]) -> str | None:
    """A saved view of the experiment's runs list for this search: only its trials, best first, with the
    searched values and the metric as columns -- the list's default columns show neither. Stored as MLflow's shared view state (the experiment tag ``mlflow.sharedViewState.<key>``
    that the UI's Share button writes); returns the key (the UI's ``?viewStateShareKey=``), None when the
    store did not take it (the view is a convenience: never fails the search)."""
    import hashlib

    if not (tracking_uri and experiment_id and parent_run_id):
        return None
    # the trials only: with their parent in the result they would sit folded under it
    state = {"searchFilter": f"tags.`lsnet.search` = '{settings.name}' and tags.`lsnet.kind` = 'trial'",
             "orderByKey": f"metrics.`{settings.metric}`", "orderByAsc": settings.mode == "min",
             "selectedColumns": [f"params.`{k}`" for k in keys] + [f"metrics.`{settings.metric}`",
                                                                    "attributes.`Source`"]}
    text = json.dumps(state, sort_keys=True)
    key = hashlib.sha256(text.encode()).hexdigest()[:32]
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri).set_experiment_tag(experiment_id, f"{SHARED_VIEW_TAG_PREFIX}{key}", text)
    except Exception as err:  # noqa: BLE001 - any store error: no view, the search's records are complete
        print(f"[mlflow] no saved runs view for the search ({type(err).__name__})", flush=True)
        return None
    return key


#: MLflow UI's shared views of an experiment's runs list (experiment tags)
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."


def search_description(records: list[TrialRecord], best: TrialRecord | None, settings: SearchSettings,
                       experiment_id: str | None, searched: dict[str, str] | None = None,
                       interrupted: bool = False, runs_view: str | None = None) -> str:
    """The parent run's MLflow description (markdown): the winner and a link to MLflow's compare view of
    the trials first, then one row per trial best first -- the searched values, status, epochs, final and
    best metric, each row linked to its run -- then the counts, what was searched and the failed trials'
    errors. Links are relative to the UI (``#/experiments/...``): they work on whatever host serves it."""
    from pipelines.tracking.store import compare_route, runs_view_route

    metric = settings.metric
    keys = searched_keys(records)
    short = short_names(keys)
    labels = trial_labels(records)

    def run_link(r: TrialRecord) -> str:
        if experiment_id and r.mlflow_run_id:
            return f"[{labels[r.trial_id]}](#/experiments/{experiment_id}/runs/{r.mlflow_run_id})"
        return labels[r.trial_id]

    head = []
    if interrupted:
        head.append(f"**Interrupted** before every trial ended: continue with `lsnet tune ... --name {settings.name} "
                    "--resume`.")
    if best is not None:
        head.append(f"**Winner: {run_link(best)}** -- best {metric} **{best.best_metric:.4f}** "
                    f"(trial {best.trial_id}, {best.status.lower().replace('_', '-')}).")
    else:
        head.append(f"**No winner**: no trial reported {metric}.")
    run_ids = [r.mlflow_run_id for r in ranked(records, settings.mode) if r.mlflow_run_id]
    if experiment_id and len(run_ids) > 1:
        what = f"the {len(run_ids)} trials" if len(run_ids) <= _COMPARE_LIMIT else f"the best {_COMPARE_LIMIT} trials"
        head[-1] += f" [Compare {what}]({compare_route([experiment_id], run_ids[:_COMPARE_LIMIT])})"
    if experiment_id and runs_view:
        head[-1] += f" · [The trials in the runs list]({runs_view_route(experiment_id, runs_view)})"
    header = ["run", *(short[k] for k in keys), "status", "epochs", f"final {metric}", f"best {metric}"]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in ranked(records, settings.mode):
        status = {"EARLY_STOPPED": "stopped early", "FINISHED": "finished", "FAILED": "**failed**",
                  "KILLED": "killed"}[r.status]
        table.append("| " + " | ".join([run_link(r), *(format_value(r.values.get(k, "")) for k in keys), status,
                                        str(r.epochs_run), "" if r.final_metric is None else f"{r.final_metric:.4f}",
                                        "" if r.best_metric is None else f"{r.best_metric:.4f}"]) + " |")
    counts = {name: sum(r.status == status for r in records) for name, status in (
        ("finished", "FINISHED"), ("stopped early", "EARLY_STOPPED"), ("failed", "FAILED"), ("killed", "KILLED"))}
    tail = [f"{len(records)} trials: " + ", ".join(f"{n} {name}" for name, n in counts.items()
                                                    if n or name != "killed") + "."]
    schedule = settings.scheduler + (f" (grace period {settings.grace_period}, reduction factor "
                                     f"{settings.reduction_factor:g})" if settings.scheduler == "asha" else "")
    tail.append(f"Metric {metric} ({settings.mode}), {settings.search} search, scheduler {schedule}.")
    if searched:
        tail.append("Searched: " + "; ".join(f"`{k}` {v}" for k, v in searched.items()) + ".")
    failed = [r for r in records if r.status == "FAILED"]
    if failed:
        tail.append("Failed: " + "; ".join(f"{labels[r.trial_id]}: `{r.error or 'unknown error'}`" for r in failed))
    text = "\n\n".join([" ".join(head), "\n".join(table), " ".join(tail[:3])] + tail[3:])
    while len(text) > _NOTE_LIMIT and len(table) > 3:  # many trials: the best rows stay
        table = table[:-1]
        more = f"| ... {len(records) - (len(table) - 2)} more rows in the artifact results/results.md |"
        text = "\n\n".join([" ".join(head), "\n".join([*table, more]), " ".join(tail[:3])] + tail[3:])
    return text[:_NOTE_LIMIT]


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
    """Every trial's metric per evaluated epoch, one line each labelled by its values (early-stopped
    dashed, so they show)."""
    from pipelines.plots import plot_series

    labels = trial_labels(records)
    series = {labels[r.trial_id]: list(r.history) for r in records}
    dashed = {labels[r.trial_id] for r in records if r.status == "EARLY_STOPPED"}
    return plot_series(series, path, xlabel="epoch", ylabel=metric, dashed=dashed)


def finish_search(grid, base: ExperimentConfig, settings: SearchSettings, search_dir: Path, parent,
                  tracking_uri: str | None, verbose: bool = True, close_parent: bool = True,
                  variant_tags: dict[str, dict[str, str]] | None = None, interrupted: bool = False,
                  statuses: dict[str, str] | None = None) -> SearchOutcome:
    """Records, child-run outcomes, parent artifacts; prints the table and where to look.
    ``close_parent=False``: the caller owns the parent run: it finishes it and says what its best is
    (no ``best.*`` here). ``variant_tags``: extra child tags by :func:`variant_key` (a trial that failed
    before its run existed gets them too). ``interrupted``: the trials Tune had not ended (``statuses``,
    see :func:`tune_statuses`) are KILLED, and so is the parent run."""
    records = trial_records(grid, base, settings, search_dir, statuses if statuses is not None else tune_statuses(grid),
                            interrupted)
    tags = {"lsnet.search": settings.name, "lsnet.kind": "trial"}
    if parent is not None and parent.run_id:
        tags["mlflow.parentRunId"] = parent.run_id
    writers_deadline = time.monotonic() + 60  # for all trials together
    for record in records:
        close_child_run(record, base, tracking_uri, {**tags, **(variant_tags or {}).get(variant_key(record.values), {})},
                        writers_deadline)
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
    experiment_id = None
    if parent is not None:
        if best is not None and close_parent:
            parent.log_params({f"best.{k}": v for k, v in best.values.items()}
                              | {"best.trial_id": best.trial_id, "best.mlflow_run_id": best.mlflow_run_id or ""})
            parent.log_metrics({f"best_{settings.metric}": best.best_metric}, step=0)
            parent.log_artifact(out / "best_config.yaml", "best")
        parent.log_metrics({"trials_finished": sum(r.status == "FINISHED" for r in records),
                            "trials_early_stopped": sum(r.status == "EARLY_STOPPED" for r in records),
                            "trials_failed": sum(r.status == "FAILED" for r in records),
                            "trials_killed": sum(r.status == "KILLED" for r in records)}, step=0)
        for path in (out / "results.csv", out / "results.md"):
            parent.log_artifact(path, "results")
        for path in plots:
            parent.log_artifact(path, "plots")
        parent.flush()
        experiment_id = parent.journal.state.get("experiment_id")
        if close_parent:
            searched = {k.removeprefix("space."): v for k, v in parent.journal.logged_params.items()
                        if k.startswith("space.")}
            view = share_runs_view(tracking_uri, experiment_id, settings, parent.run_id, searched_keys(records))
            parent.set_tags({NOTE_TAG: search_description(records, best, settings, experiment_id, searched,
                                                           interrupted, view),
                             "lsnet.search": settings.name})
            parent.close("KILLED" if interrupted else "FINISHED")
    outcome = SearchOutcome(search_dir=search_dir, trials=records, best=best, best_config=best_cfg,
                            tracking_uri=tracking_uri, parent_run_id=parent.run_id if parent else None,
                            settings=settings, experiment_id=experiment_id,
                            runs_view=view if parent is not None and close_parent else None)
    if verbose:
        print_summary(outcome, interrupted)
    return outcome


def print_summary(outcome: SearchOutcome, interrupted: bool = False) -> None:
    from pipelines.tracking.store import compare_url, run_url, runs_view_url, ui_command

    metric = outcome.settings.metric
    print(results_markdown(outcome.trials, metric))
    best = outcome.best
    if best is not None:
        print(f"best trial {best.trial_id}: {metric} {best.best_metric:.4f} with "
              + ", ".join(f"{k}={format_value(v)}" for k, v in best.values.items()))
        print(f"best config: {outcome.search_dir / PARENT_DIRNAME / 'report' / 'best_config.yaml'}")
    else:
        print(f"no trial reported {metric}")
    print(f"search directory: {outcome.search_dir}")
    if interrupted:
        name = outcome.settings.name
        print(f"search {name} interrupted: its unfinished trials and the parent run are marked KILLED; "
              f"continue it with --name {name} --resume")
    if outcome.tracking_uri:
        print(f"MLflow parent run {outcome.parent_run_id} at {outcome.tracking_uri}; open the UI with:\n"
              f"  {ui_command(outcome.tracking_uri)}")
        run_ids = [r.mlflow_run_id for r in outcome.trials if r.mlflow_run_id]
        if outcome.experiment_id and outcome.parent_run_id:
            print(f"  then the search (its table is the run's description): "
                  f"{run_url(outcome.tracking_uri, outcome.experiment_id, outcome.parent_run_id)}")
        if outcome.experiment_id and len(run_ids) > 1:
            print(f"  the trials side by side (parallel coordinates over the searched values): "
                  f"{compare_url(outcome.tracking_uri, [outcome.experiment_id], run_ids)}")
        if outcome.experiment_id and outcome.runs_view:
            print(f"  the trials in the runs list, values and {metric} as columns: "
                  f"{runs_view_url(outcome.tracking_uri, outcome.experiment_id, outcome.runs_view)}")
