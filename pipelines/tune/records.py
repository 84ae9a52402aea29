"""What a search is made of and leaves behind, shared by the trials (:mod:`pipelines.tune.trials`) and
the report (:mod:`pipelines.tune.report`): the search directory's names, the trial tags,
:class:`SearchSettings`, :class:`TrialRecord` and :class:`SearchOutcome`."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lsnet.config import ConfigError, check_range
from pipelines.config import ExperimentConfig

PARENT_DIRNAME = "parent"


TRIALS_DIRNAME = "trials"


SEARCH_FILE = "search.json"


EARLY_STOPPED_TAG = "lsnet.early_stopped"


ERROR_TAG = "lsnet.error"


#: the run page's Description in the MLflow UI (markdown)
NOTE_TAG = "mlflow.note.content"


#: what a trial reports to Tune every epoch besides the COCO metrics (pipelines.train.worker.epoch_report);
#: ``epoch`` is ASHA's time attribute, ``global_step`` and ``checkpoint_score`` bookkeeping
REPORTED_EVERY_EPOCH = ("loss", "images_per_s")


#: the trial driver (the function trainable) only waits on TorchTrainer.fit(): it reserves no CPU
#: (so a trial's CPUs/GPUs are exactly its workers'), only memory (Ray needs a non-empty request).
TRIAL_DRIVER_RESOURCES = {"memory": 256 * 2**20}


@dataclass
class SearchSettings:
    """How trials are scheduled (``lsnet tune`` flags)."""

    name: str
    metric: str
    mode: str = "max"
    scheduler: str = "asha"  # "asha" | "fifo"
    grace_period: int = 1
    reduction_factor: float = 2.0
    search: str = "random"  # "random" | "grid" | "optuna"
    num_samples: int = 1
    max_concurrent: int | None = None  # None: what the cluster holds
    max_failures: int = 0  # Tune retries of a failed trial
    seed: int | None = 0  # the search algorithm's seed (optuna / random sampling)

    def __post_init__(self) -> None:
        # flags and space-file options alike: a value Tune would reject only after the search started
        # (ASHA's reduction factor), or take as "no trials" / "no limit" (0 samples, 0 concurrent)
        if self.mode not in ("max", "min"):
            raise ConfigError(f"mode: expected 'max' or 'min', got {self.mode!r}")
        try:
            check_range(self.num_samples, "num_samples", ge=1)
            check_range(self.grace_period, "grace_period", ge=1)
            check_range(self.reduction_factor, "reduction_factor", gt=1)
            check_range(self.max_concurrent, "max_concurrent", ge=1)
            check_range(self.max_failures, "max_failures", ge=0)
        except ValueError as err:
            raise ConfigError(str(err)) from None


@dataclass
class TrialRecord:
    """One trial after the search: its values, outcome and per-epoch metric."""

    trial_id: str
    run_name: str
    run_dir: Path
    values: dict[str, Any]
    status: str  # FINISHED | EARLY_STOPPED | FAILED | KILLED (the search was interrupted before it ended)
    epochs_run: int
    final_metric: float | None
    best_metric: float | None
    history: list[tuple[int, float]] = field(default_factory=list)  # (epoch, metric) on eval epochs
    error: str | None = None
    mlflow_run_id: str | None = None


@dataclass
class SearchOutcome:
    search_dir: Path
    trials: list[TrialRecord]
    best: TrialRecord | None
    best_config: ExperimentConfig | None
    tracking_uri: str | None
    parent_run_id: str | None
    settings: SearchSettings
    experiment_id: str | None = None  # the MLflow experiment of the parent and child runs
    runs_view: str | None = None  # the key of the saved runs-list view of the search (viewStateShareKey)


def trial_run_name(search_name: str, trial_id: str) -> str:
    """Deterministic: the same trial always trains in the same Train run directory."""
    return f"{search_name}-{trial_id}"


def variant_key(overrides: dict[str, Any]) -> str:
    """A variant's identity (its overrides, canonical JSON): per-variant tags are looked up by it."""
    return json.dumps({key: _plain(value) for key, value in overrides.items()}, sort_keys=True)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def searchable_metrics(cfg: ExperimentConfig) -> list[str]:
    """The metrics a trial of ``cfg`` reports to Tune: the COCO metrics of its task's evaluation
    (``bbox_AP``... ; segm adds ``segm_*``; pose ``kp_*``) and the per-epoch loss and throughput."""
    from lsnet.evaluation import TASK_IOU_TYPES, metric_names

    return [name for iou_type in TASK_IOU_TYPES[cfg.model.task] for name in metric_names(iou_type)] + list(
        REPORTED_EVERY_EPOCH)


def check_metric(cfg: ExperimentConfig, metric: str) -> None:
    """``metric`` is one a trial of ``cfg`` reports; else a ConfigError naming the task and what it reports
    (checked before Ray starts: a search on a metric no trial reports would run every trial for nothing)."""
    known = searchable_metrics(cfg)
    if metric not in known:
        raise ConfigError(f"--metric {metric}: a {cfg.model.task} config (model.task={cfg.model.task}) does not "
                          f"report it; its trials report {', '.join(known)}")


def short_names(keys: list[str]) -> dict[str, str]:
    """Dotted config keys by their last part (``model.loss.alpha`` -> ``alpha``), longer where two
    keys would share one (``a.alpha`` / ``b.alpha`` -> ``a.alpha`` / ``b.alpha``)."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[-n:])
            if sum(k == name or k.endswith("." + name) for k in keys) == 1:
                break
        names[key] = name
    return names


def format_value(value: Any) -> str:
    """A searched value as the tables and run names show it (floats to 4 significant digits)."""
    value = _plain(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def values_label(values: dict[str, Any], keys: list[str] | None = None) -> str:
    """``alpha=0.1, num_points=36``: a trial by its searched values (the child run's name)."""
    keys = list(values) if keys is None else keys
    short = short_names(keys)
    return ", ".join(f"{short[k]}={format_value(values[k])}" for k in keys if k in values)
