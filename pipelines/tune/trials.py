"""Run config variants as Ray Tune trials, each one Ray Train run, tracked as MLflow child runs.

This is the machinery behind ``lsnet tune`` (a search space) and reusable for any list of config
variants (ablations): :func:`run_trials` takes a base config and either a :class:`SearchSpace` or a
list of ``{dotted key: value}`` variants and returns one :class:`TrialRecord` per trial.

Ray's documented pattern for Train V2 + Tune: each trial is a Tune *function* trainable
(:func:`_trial`) that runs one ``TorchTrainer.fit()`` through :func:`pipelines.train.run_training`,
with ``ray.tune.integration.ray_train.TuneReportCallback()`` in the trainer's run callbacks, so rank
0's per-epoch ``ray.train.report`` (``epoch``, loss, and the COCO metrics on evaluation epochs)
reaches Tune every epoch (ASHA decides on ``epoch``). The trial's Train run is named after the trial
id (``<search>-<trial id>``, no timestamp) under ``<search dir>/trials/``: a trial restarted by Tune
(a retry, or ``--resume`` after the driver died) resumes its own Train checkpoints, and its MLflow run
continues through the same tracking journal.

Layout of a search (``<run.storage_path>/<name>/``, the *search directory*)::

    <tune experiment state>       Tune's files (Tuner.restore reads them)
    search.json                   what the search was started with (for --resume)
    parent/                       the parent MLflow run's journal (pipelines.tracking) + report files
    trials/<name>-<trial id>/     one Ray Train run directory per trial (pipelines.train layout)
    mlflow.db                     the default shared MLflow store of the search (parent + children)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lsnet.bench import git_commit
from lsnet.config import ConfigError, check_range, to_dict
from pipelines.config import ExperimentConfig
from pipelines.tune.space import SearchSpace, trial_config, validate_space, validate_variants

PARENT_DIRNAME = "parent"
TRIALS_DIRNAME = "trials"
SEARCH_FILE = "search.json"
EARLY_STOPPED_TAG = "lsnet.early_stopped"
ERROR_TAG = "lsnet.error"
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
    status: str  # FINISHED | EARLY_STOPPED | FAILED
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


def trial_run_name(search_name: str, trial_id: str) -> str:
    """Deterministic: the same trial always trains in the same Train run directory."""
    return f"{search_name}-{trial_id}"


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name)


# --------------------------------------------------------------------------------------------------
# The trial (runs inside a Tune trial actor)
# --------------------------------------------------------------------------------------------------


def variant_key(overrides: dict[str, Any]) -> str:
    """A variant's identity (its overrides, canonical JSON): per-variant tags are looked up by it."""
    return json.dumps({key: _plain(value) for key, value in overrides.items()}, sort_keys=True)


def _trial(config: dict[str, Any], *, base: dict[str, Any], search_name: str, search_dir: str,
           tracking_uri: str | None, tags: dict[str, str],
           variant_tags: dict[str, dict[str, str]] | None = None) -> None:
    """Tune function trainable: one Ray Train run of ``base`` with ``config["overrides"]``."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.train import run_training

    trial_id = ray.tune.get_context().get_trial_id()
    overrides = dict(config["overrides"])
    cfg = trial_config(base, overrides)
    name = trial_run_name(search_name, trial_id)
    run = dataclasses.replace(cfg.run, name=name, storage_path=str(Path(search_dir) / TRIALS_DIRNAME))
    tracking = dataclasses.replace(cfg.tracking, uri=tracking_uri)
    cfg = dataclasses.replace(cfg, run=run, tracking=tracking)
    trial_tags = {**tags, "lsnet.trial_id": trial_id,
                  **{key: json.dumps(_plain(value)) if not isinstance(value, str) else value
                     for key, value in overrides.items()},
                  **(variant_tags or {}).get(variant_key(overrides), {})}
    run_training(cfg, run_name=name, callbacks=[TuneReportCallback()], extra_tags=trial_tags, verbose=False)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What one trial holds while it trains: its Train workers (the trial driver holds nothing)."""
    per_worker = dict(cfg.run.resources_per_worker or {})
    if not per_worker:  # Ray Train's default: 1 CPU per worker, or 1 GPU with use_gpu
        per_worker = {"GPU": 1.0} if cfg.run.use_gpu else {"CPU": 1.0}
    elif cfg.run.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    need = {key: value * cfg.run.num_workers for key, value in per_worker.items()}
    for key, value in TRIAL_DRIVER_RESOURCES.items():
        need[key] = need.get(key, 0.0) + value
    return {key: value for key, value in need.items() if value > 0}


def concurrent_trials(need: dict[str, float], available: dict[str, float], requested: int | None) -> int:
    """How many trials run at once: ``requested``, or as many as ``available`` holds. Raises
    ConfigError (with the numbers) when not even one fits."""
    fits = math.inf
    for key, value in need.items():
        have = float(available.get(key, 0.0))
        if have < value:
            raise ConfigError(f"one trial needs {_fmt(need)} but the Ray cluster has {_fmt(available, need)}; "
                              "lower run.num_workers / run.resources_per_worker or add nodes")
        fits = min(fits, math.floor(have / value + 1e-9))
    fits = 1 if fits is math.inf else int(fits)
    return max(1, min(requested, fits) if requested else fits)


def _fmt(resources: dict[str, float], only: dict[str, float] | None = None) -> str:
    def one(key: str) -> str:
        value = float(resources.get(key, 0.0))
        return f"{value / 2**30:.2f} GiB memory" if key == "memory" else f"{value:g} {key}"

    return ", ".join(one(k) for k in (only or resources))


def _param_space(space: SearchSpace | list[dict[str, Any]]) -> dict[str, Any]:
    from ray import tune

    if isinstance(space, SearchSpace):
        return {"overrides": space.to_tune()}
    return {"overrides": tune.grid_search([dict(v) for v in space])}


def check_search(settings: SearchSettings, space: SearchSpace | list[dict[str, Any]]) -> None:
    """The search algorithm can run this space (before Ray starts). Raises ConfigError."""
    if settings.search == "optuna":
        try:
            import optuna  # noqa: F401 - the extra's package
            from ray.tune.search.optuna import OptunaSearch  # noqa: F401
        except ImportError:
            raise ConfigError("--search optuna needs the optional extra: pip install '.[tune]' "
                              "(or pip install optuna)") from None
        if not isinstance(space, SearchSpace) or any(k == "grid" for k, _ in space.params.values()):
            raise ConfigError("--search optuna samples its own points: use choice/uniform/loguniform/randint "
                              "domains, not grid")
    if settings.search == "grid" and isinstance(space, SearchSpace):
        bad = [key for key, (kind, _) in space.params.items() if kind not in ("grid", "choice")]
        if bad:
            raise ConfigError(f"{space.source}: {bad[0]}: --search grid needs grid/choice domains, "
                              f"got {space.params[bad[0]][0]}")


def _search_algorithm(settings: SearchSettings, max_concurrent: int):
    """Tune's search algorithm; it also holds the concurrency limit (TuneConfig.max_concurrent_trials
    does not reach a search algorithm passed in)."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if settings.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return ConcurrencyLimiter(OptunaSearch(seed=settings.seed), max_concurrent=max_concurrent)
    # random: distributions sampled, grid keys crossed; grid: every key a grid (see _grid_space)
    return BasicVariantGenerator(random_state=settings.seed, max_concurrent=max_concurrent)


def _grid_space(space: SearchSpace) -> SearchSpace:
    """--search grid: choice lists are crossed like grid lists."""
    params = {key: ("grid", values) for key, (_, values) in space.params.items()}
    return dataclasses.replace(space, params=params)


def _scheduler(settings: SearchSettings, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if settings.scheduler == "fifo":
        return FIFOScheduler()
    # stop_last_trials=False: a trial that reaches the last epoch ends by itself (writes its final
    # weights and closes its MLflow run) instead of being stopped by the scheduler right after its report.
    return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=settings.grace_period,
                         reduction_factor=settings.reduction_factor, stop_last_trials=False)


def open_parent_tracker(search_dir: Path, tracking_uri: str, experiment: str, name: str, verbose: bool):
    from pipelines.tracking import RunTracker

    return RunTracker(search_dir / PARENT_DIRNAME, tracking_uri, experiment, name, verbose=verbose)


def run_trials(base: ExperimentConfig, space: SearchSpace | list[dict[str, Any]], settings: SearchSettings, *,
               address: str | None = None, resume: bool = False, verbose: bool = True,
               source: str = "<variants>", variant_tags: list[dict[str, str]] | None = None,
               parent=None, source_name: str = "lsnet tune", retry_failed: bool = False) -> SearchOutcome:
    """Run every variant of ``space`` as a trial (see module docstring) and return the records.

    ``space``: a :class:`SearchSpace` (sampled by ``settings.search``) or a list of
    ``{dotted key: value}`` variants (each run once, in order). ``resume``: continue the search of the
    same ``settings.name`` whose driver stopped (``Tuner.restore``): finished trials are not re-run,
    unfinished ones continue from their checkpoints, under the same parent MLflow run.

    Callers that run a fixed list of variants (``lsnet ablation``) may pass ``variant_tags`` (one tag
    dict per variant, set on that variant's MLflow child run) and their own open ``parent`` tracker
    (a :class:`pipelines.tracking.RunTracker` under ``<search dir>/parent``): the search's parameters
    are logged on it and it is left open for the caller to finish. ``source_name``: the MLflow source
    shown for the runs. ``retry_failed`` (with ``resume``): failed trials run again, from their last
    checkpoint (a search leaves them failed; an ablation table needs every row).
    """
    import ray
    from ray import tune

    from pipelines.tracking import prepare_sqlite_store, resolve_tracking_uri
    from pipelines.train import absolutize_paths, manifest_hash, ray_job_ids

    base = absolutize_paths(base)
    check_search(settings, space)
    if isinstance(space, SearchSpace):
        validate_space(base, space)
        if settings.search == "grid":
            space = _grid_space(space)
    else:
        validate_variants(base, space, source)
        if variant_tags is not None and len(variant_tags) != len(space):
            raise ValueError(f"variant_tags: {len(variant_tags)} tag sets for {len(space)} variants")
        if len({variant_key(v) for v in space}) != len(space):
            raise ConfigError(f"{source}: two variants have the same overrides")
    search_dir = Path(base.run.storage_path) / settings.name
    if "://" in base.run.storage_path:
        raise ConfigError("lsnet tune keeps its search directory on a local or shared filesystem: "
                          f"run.storage_path={base.run.storage_path} is a URI")
    state_file = search_dir / SEARCH_FILE
    if resume and not state_file.exists():
        raise ConfigError(f"--resume: no search {settings.name!r} in {search_dir.parent} (no {SEARCH_FILE})")
    if resume:  # the search goes on as it was started
        settings = SearchSettings(**json.loads(state_file.read_text())["settings"])
    if not resume and state_file.exists():
        raise ConfigError(f"search {settings.name!r} already exists in {search_dir.parent}: continue it with "
                          "--resume or choose another --name")

    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # The task's AP arrives only on evaluation epochs; ASHA skips results without it (Tune's strict
    # check would instead fail the trial).
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    from pipelines.ray_local import start_ray

    start_ray(address=address, verbose=verbose)  # a local Ray on 127.0.0.1 that ends with this command
    need = trial_resources(base)
    n_variants = len(space) if isinstance(space, list) else None
    max_concurrent = concurrent_trials(need, ray.cluster_resources(), settings.max_concurrent)
    if n_variants:
        max_concurrent = min(max_concurrent, n_variants)
    search_algorithm = _search_algorithm(settings, max_concurrent)

    search_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = None
    owns_parent = parent is None
    if base.tracking.enabled:
        tracking_uri = resolve_tracking_uri(base.tracking.uri)
        prepare_sqlite_store(tracking_uri)
        if parent is None:
            parent = open_parent_tracker(search_dir, tracking_uri, base.tracking.experiment, settings.name,
                                         verbose)
        if not resume:
            searched = space.describe() if isinstance(space, SearchSpace) else {
                f"variant_{i}": json.dumps(v) for i, v in enumerate(space)}
            parent.log_params({**{f"space.{k}": v for k, v in searched.items()},
                               "scheduler": settings.scheduler, "search": settings.search,
                               "metric": settings.metric, "mode": settings.mode,
                               "num_samples": settings.num_samples, "max_concurrent": max_concurrent,
                               "grace_period": settings.grace_period,
                               "reduction_factor": settings.reduction_factor,
                               "max_failures": settings.max_failures})
            from pipelines.tracking import mlflow_system_tags

            commit = git_commit()
            parent.set_tags({**mlflow_system_tags(source_name, commit), "git_commit": commit,
                             "config_name": base.name or "",
                             "dataset_manifest_sha256": manifest_hash(base.data.train_shards),
                             "task": base.model.task, **ray_job_ids(),
                             **({"lsnet.kind": "search"} if owns_parent else {})})  # else the caller's kind
            (search_dir / "base_config.yaml").write_text(base.to_yaml())
            parent.log_artifact(search_dir / "base_config.yaml", "config")
        parent.flush()  # the children need the parent's run id
    if not resume:
        state_file.write_text(json.dumps({"settings": dataclasses.asdict(settings), "source": source}, indent=1))

    tags = {"lsnet.search": settings.name, "lsnet.kind": "trial", "mlflow.source.name": source_name}
    if parent is not None and parent.run_id:
        tags["mlflow.parentRunId"] = parent.run_id
    tags_by_variant = None if variant_tags is None else {variant_key(v): dict(t) for v, t in zip(space, variant_tags)}
    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=to_dict(base), search_name=settings.name, search_dir=str(search_dir),
                             tracking_uri=tracking_uri, tags=tags, variant_tags=tags_by_variant),
        TRIAL_DRIVER_RESOURCES)
    if verbose:
        print(f"[tune] {settings.name}: up to {max_concurrent} concurrent trial(s) of {_fmt(need)} each; "
              f"search directory {search_dir}", flush=True)
    if resume:
        tuner = tune.Tuner.restore(str(search_dir), trainable, resume_unfinished=True, resume_errored=retry_failed,
                                   restart_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(space),
            tune_config=tune.TuneConfig(
                metric=settings.metric, mode=settings.mode, search_alg=search_algorithm,
                scheduler=_scheduler(settings, base.train.epochs),
                num_samples=1 if n_variants else settings.num_samples,  # (concurrency: search_alg)
                trial_name_creator=lambda trial: trial.trial_id,
                trial_dirname_creator=lambda trial: trial.trial_id),
            run_config=tune.RunConfig(
                name=settings.name, storage_path=str(search_dir.parent),
                failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                verbose=1 if verbose else 0),
        )
    grid = tuner.fit()

    from pipelines.tune.report import finish_search

    return finish_search(grid, base, settings, search_dir, parent, tracking_uri, verbose=verbose,
                         close_parent=owns_parent, variant_tags=tags_by_variant)
