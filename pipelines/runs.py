"""``lsnet runs list|compare``: MLflow runs as terminal tables, through ``MlflowClient``.

- ``lsnet runs list [--experiment NAME]``: every run (newest first): id, name, status, parent, the
  run's AP, duration;
- ``lsnet runs compare (EXPERIMENT | PARENT_RUN_ID) [--metric segm_AP] [--sort] [--csv]``: the runs of an
  experiment or the trials of a search side by side: the params that differ between them, status,
  the metric (final and best over its history) and duration;
- ``lsnet runs plot RUN_ID... [--metric segm_AP] [--x epoch|step] [--out runs.png]``: one PNG with the
  metric of each run (a search's parent id stands for its trials), early-stopped runs dashed.

For a search's parent run the metric and mode default to the search's own (its ``metric`` / ``mode``
params), and its trials are labelled by their searched values (``alpha=0.1``, the parent's ``space.*``
params); otherwise the task's AP found in the runs, maximised.

Any tracking URI works: ``--tracking-uri`` (an ``http://`` server, ``sqlite:///...``, or the path of a
``.db`` file such as a search's ``mlflow.db``), else ``$MLFLOW_TRACKING_URI``.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from lsnet.errors import LsnetError

#: params that differ between runs by construction (not a choice worth a column)
BOOKKEEPING_PARAMS = {"run.name"}
AP_METRICS = ("bbox_AP", "segm_AP", "kp_AP")


class RunsError(LsnetError, ValueError):
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


def get_run(client, run_id: str):
    try:
        return client.get_run(run_id)
    except Exception as err:  # noqa: BLE001 - MLflow raises its own error types per store
        raise RunsError(f"run {run_id}: not found ({type(err).__name__})") from None


def child_runs(client, parent) -> list:
    """The child runs of ``parent`` (the trials of a search, the variants of an ablation table)."""
    return client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=10000)


def runs_behind(client, run_ids: list[str]) -> tuple[list, list]:
    """The runs ``run_ids`` name (a parent run stands for its children), and the parents among them."""
    runs, parents = [], []
    for run_id in run_ids:
        run = get_run(client, run_id)
        children = child_runs(client, run)
        runs += children or [run]
        parents += [run] if children else []
    return runs, parents


def find_runs(client, target: str) -> tuple[list, str, object | None]:
    """The runs of experiment ``target``, or the child runs of parent run ``target``; a title; the parent
    run (None for an experiment)."""
    if re.fullmatch(r"[0-9a-f]{32}", target):
        parent = get_run(client, target)
        return child_runs(client, parent), f"children of {parent.info.run_name} ({target})", parent
    experiment = client.get_experiment_by_name(target)
    if experiment is None:
        names = [e.name for e in client.search_experiments()]
        raise RunsError(f"no experiment {target!r} (and not a run id); experiments: {', '.join(names) or 'none'}")
    return client.search_runs([experiment.experiment_id], max_results=10000), f"experiment {target}", None


def search_metric(parents: list) -> tuple[str | None, str | None]:
    """``(metric, mode)`` that the search(es) behind ``parents`` optimised (their ``metric`` / ``mode``
    params, logged by ``lsnet tune``); ``(None, None)`` if none says, or they disagree."""
    found = {(p.data.params.get("metric"), p.data.params.get("mode")) for p in parents if "metric" in p.data.params}
    return next(iter(found)) if len(found) == 1 else (None, None)


def searched_keys_of(parents: list) -> list[str]:
    """The config keys a search varied (its parent's ``space.<key>`` params)."""
    return sorted({k.removeprefix("space.") for p in parents for k in p.data.params if k.startswith("space.")})


def run_labels(runs, keys: list[str]) -> dict[str, str]:
    """Each run's label by run id: its values of ``keys`` (``alpha=0.1``), else its name; unique (two
    runs with the same label get the start of their run ids)."""
    from pipelines.tune.records import values_label

    labels = {}
    for r in runs:
        values = {k: _param_value(r.data.params[k]) for k in keys if k in r.data.params}
        labels[r.info.run_id] = values_label(values, keys) if values else (r.info.run_name or r.info.run_id)
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    return {rid: f"{label} ({rid[:8]})" if counts[label] > 1 else label for rid, label in labels.items()}


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


def guess_metric(runs) -> str:
    for name in AP_METRICS:
        if any(name in r.data.metrics for r in runs):
            return name
    return "loss"


def metric_curve(client, run_id: str, metric: str, x: str) -> list[tuple[float, float]]:
    """``(x, value)`` of ``metric`` in a run: x is the logged step, or the epoch (from the run's
    ``epoch`` metric, logged at the same step as each epoch's results)."""
    points = [(m.step, m.value) for m in client.get_metric_history(run_id, metric)]
    if x == "step":
        return points
    epoch_at = {m.step: m.value for m in client.get_metric_history(run_id, "epoch")}
    return [(epoch_at[step], value) for step, value in points if step in epoch_at]




def _param_value(text: str):
    """A logged param as the value it was (``"0.10"`` -> 0.1), so labels read as the search's names do."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def seed_groups(runs) -> dict[str, list] | None:
    """The children of an ablation table run with several seeds (tags ``ablation_variant`` /
    ``ablation_seed``) grouped by variant, seeds in order; None when no variant has two seeds."""
    groups: dict[str, list] = {}
    for run in runs:
        variant = run.data.tags.get("ablation_variant")
        if variant is None or "ablation_seed" not in run.data.tags:
            return None
        groups.setdefault(variant, []).append(run)
    if not any(len(g) > 1 for g in groups.values()):
        return None
    return {k: sorted(g, key=lambda r: int(r.data.tags["ablation_seed"])) for k, g in groups.items()}


def seed_group_rows(groups: dict[str, list], metric: str) -> tuple[list[str], list[list[str]], list[float | None]]:
    """One row per variant: seeds, the final ``metric``'s mean ± half width of its 95 % t interval over the
    seeds (as the ablation report), every seed's value, the statuses."""
    from pipelines.ablations.stats import t_interval

    header = ["variant", "seeds", f"{metric} mean ± 95 % CI", "per seed", "status"]
    rows, scores = [], []
    for variant, runs in groups.items():
        values = {r.data.tags["ablation_seed"]: r.data.metrics.get(metric) for r in runs}
        present = [v for v in values.values() if v is not None]
        iv = t_interval(present)
        mean = "-" if iv is None else _fmt(iv.mean) + (f" ± {iv.half_width:.4f}" if iv.half_width is not None else "")
        statuses = sorted({r.info.status for r in runs})
        rows.append([variant, str(len(runs)), mean, " ".join(f"s{s}:{_fmt(v)}" for s, v in values.items()),
                     ",".join(statuses)])
        scores.append(None if iv is None else iv.mean)
    return header, rows, scores
