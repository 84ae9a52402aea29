"""Run config variants as Ray Tune trials, each one Ray Train run, tracked as MLflow child runs.

This is the machinery behind ``lsnet tune`` (a search space) and reusable for any list of config
variants (ablations): :func:`run_trials` takes a base config and either a :class:`SearchSpace` or a
list of ``{dotted key: value}`` variants and returns one :class:`TrialRecord` per trial.

Ray's documented pattern for Train V2 + Tune: each trial is a Tune *function* trainable
(:func:`_trial`) that runs one ``TorchTrainer.fit()`` through :func:`pipelines.train.driver.run_training`,
with ``ray.tune.integration.ray_train.TuneReportCallback()`` in the trainer's run callbacks, so rank
0's per-epoch ``ray.train.report`` (``epoch``, loss, and the COCO metrics on evaluation epochs)
reaches Tune every epoch (ASHA decides on ``epoch``). The trial's Train run is named after the trial
id (``<search>-<trial id>``, no timestamp) under ``<search dir>/trials/``: a trial restarted by Tune
(a retry, or ``--resume`` after the driver died) resumes its own Train checkpoints, and its MLflow run
continues through the same tracking journal.

Layout of a search (``<run.storage_path>/<name>/``, the *search directory*; ``run.storage_path`` may be an
object-store URI: then Tune and the trials write there, and the driver works on a local copy of the search's
own records, :func:`search_mirror`, pulled when it starts and pushed before the trials start and at the end)::

    <tune experiment state>       Tune's files (Tuner.restore reads them)
    search.json                   what the search was started with (for --resume)
    parent/                       the parent MLflow run's journal (pipelines.tracking.journal) + report files
    trials/<name>-<trial id>/     one Ray Train run directory per trial (pipelines.train.rundir)

The names and records of a search live in :mod:`pipelines.tune.records`; the report written at its end
(:func:`pipelines.tune.report.finish_search`) in :mod:`pipelines.tune.report`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
from pathlib import Path
from typing import Any

from lsnet import storage
from lsnet.config import ConfigError, to_dict
from pipelines.config import ExperimentConfig, required_resources
from pipelines.tune.records import (
    PARENT_DIRNAME,
    SEARCH_FILE,
    TRIAL_DRIVER_RESOURCES,
    TRIALS_DIRNAME,
    SearchOutcome,
    SearchSettings,
    _plain,
    check_metric,
    trial_run_name,
    values_label,
    variant_key,
)
from pipelines.tune.report import end_interrupted_search, finish_search, tune_statuses
from pipelines.tune.space import SearchSpace, trial_config, validate_space, validate_variants

# --------------------------------------------------------------------------------------------------
# The trial (runs inside a Tune trial actor)
# --------------------------------------------------------------------------------------------------


def _trial(config: dict[str, Any], *, base: dict[str, Any], search_name: str, search_dir: str,
           tags: dict[str, str], variant_tags: dict[str, dict[str, str]] | None = None) -> None:
    """Tune function trainable: one Ray Train run of ``base`` with ``config["overrides"]`` (the tracking
    store: ``base``'s ``tracking.uri``, resolved by the search's driver)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.train.driver import run_training

    trial_id = ray.tune.get_context().get_trial_id()
    overrides = dict(config["overrides"])
    cfg = trial_config(base, overrides)
    name = trial_run_name(search_name, trial_id)
    run = dataclasses.replace(cfg.run, name=name, storage_path=storage.join(search_dir, TRIALS_DIRNAME))
    cfg = dataclasses.replace(cfg, run=run)
    trial_tags = {**tags, "lsnet.trial_id": trial_id,
                  "mlflow.runName": values_label(overrides) or name,  # the trial by its values: alpha=0.1
                  **{key: json.dumps(_plain(value)) if not isinstance(value, str) else value
                     for key, value in overrides.items()},
                  **(variant_tags or {}).get(variant_key(overrides), {})}
    run_training(cfg, run_name=name, callbacks=[TuneReportCallback()], extra_tags=trial_tags, verbose=False)


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What one trial holds while it trains: its Train workers, and the trial driver's bit of memory."""
    need = required_resources(cfg)
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
    from ray.tune.schedulers import FIFOScheduler

    if settings.scheduler == "fifo":
        return FIFOScheduler()
    from pipelines.tune.scheduler import LastEpochASHA

    # (its own module: the class subclasses Ray's, and Tune pickles it into the search state)
    return LastEpochASHA(time_attr="epoch", max_t=epochs, grace_period=settings.grace_period,
                         reduction_factor=settings.reduction_factor, stop_last_trials=False)


def open_parent_tracker(search_dir: Path, tracking_uri: str, experiment: str, name: str, verbose: bool):
    from pipelines.tracking.tracker import RunTracker

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
    (a :class:`pipelines.tracking.tracker.RunTracker` under ``<search dir>/parent``): the search's parameters
    are logged on it and it is left open for the caller to finish. ``source_name``: the MLflow source
    shown for the runs. ``retry_failed`` (with ``resume``): failed trials run again, from their last
    checkpoint (a search leaves them failed; an ablation table needs every row).
    """
    from pipelines.ray_local import start_ray
    from pipelines.train.driver import absolutize_paths

    base = absolutize_paths(base)
    space, settings, search = _check_search_inputs(base, space, settings, source, variant_tags, resume)
    search_dir = search.local
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # The task's AP arrives only on evaluation epochs; ASHA skips results without it (Tune's strict
    # check would instead fail the trial).
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    owns_parent = parent is None
    tracking_uri = None
    start_ray(address=address, verbose=verbose)  # a local Ray on 127.0.0.1 that ends with this command
    with _sigterm_as_ctrl_c() as sigterm:  # (after ray.init, which sets its own SIGTERM handler: exit)
        try:
            need, max_concurrent = _concurrency(base, space, settings)
            search_dir.mkdir(parents=True, exist_ok=True)
            if base.tracking.enabled:
                from pipelines.tracking.store import open_store

                # resolved once (a no-op on the URI a command resolved); the trials get it in tracking.uri
                tracking_uri = open_store(base.tracking.uri)
                base = dataclasses.replace(base, tracking=dataclasses.replace(base.tracking, uri=tracking_uri))
                parent = parent or open_parent_tracker(search_dir, tracking_uri, base.tracking.experiment,
                                                       settings.name, verbose)
                if not resume:
                    _record_search_on_parent(parent, base, space, settings, search_dir, max_concurrent, source_name,
                                             owns_parent)
                elif owns_parent:
                    parent.reopen()  # ended KILLED by an interrupted driver: RUNNING again
                parent.flush()  # the children need the parent's run id
            if not resume:
                (search_dir / SEARCH_FILE).write_text(json.dumps({"settings": dataclasses.asdict(settings),
                                                                  "source": source}, indent=1))
            tags = {"lsnet.search": settings.name, "lsnet.kind": "trial", "mlflow.source.name": source_name}
            if parent is not None and parent.run_id:
                tags["mlflow.parentRunId"] = parent.run_id
            tags_by_variant = None if variant_tags is None else {
                variant_key(v): dict(t) for v, t in zip(space, variant_tags)}
            if verbose:
                print(f"[tune] {settings.name}: up to {max_concurrent} concurrent trial(s) of {_fmt(need)} each; "
                      f"search directory {search_dir}", flush=True)
            tuner = _tuner(base, space, settings, search.location, tags, tags_by_variant, max_concurrent, resume,
                           retry_failed, verbose)
            search.push()  # search.json and the parent's journal: what --resume needs if this driver dies
            grid = tuner.fit()
            search.push()
        except KeyboardInterrupt:  # before the trials ran, or a second Ctrl-C / SIGTERM while they did
            search.push()
            search.pull()  # the trials' journals, to end their runs KILLED
            end_interrupted_search(search_dir, parent if owns_parent else None, tracking_uri, settings,
                                   verbose=verbose)
            search.push()
            raise
    search.pull()  # the trials' records (their journals), written by the trials at the search's location
    statuses = tune_statuses(grid)
    # Tune's Ctrl-C handler stops the trials, saves its state and returns: the unfinished trials are
    # the ones neither TERMINATED nor ERROR
    interrupted = sigterm.received or any(s not in ("TERMINATED", "ERROR") for s in statuses.values())
    try:
        outcome = finish_search(grid, base, settings, search_dir, parent, tracking_uri, verbose=verbose,
                                close_parent=owns_parent, variant_tags=tags_by_variant,
                                interrupted=interrupted, statuses=statuses)
    finally:
        search.push()  # the report and the runs it ended
    if interrupted:
        raise KeyboardInterrupt
    return outcome


def search_mirror(storage_path: str, name: str) -> storage.MirroredDir:
    """The driver's copy of search ``name`` under ``storage_path`` (the directory itself when local): the
    search's own records and the trials' small records, not their checkpoints."""
    from pipelines.train.rundir import NOT_MIRRORED

    return storage.MirroredDir(storage.join(storage_path, name), skip=NOT_MIRRORED)


class _Signals:
    received = False


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """While the search runs, SIGTERM (``kill``, a scheduler ending the job) is handled like Ctrl-C:
    Tune's own handler stops the trials and saves its state (``--resume`` continues), then the runs are
    ended KILLED. A second signal interrupts at once. Only in the main thread (where signals arrive)."""
    seen = _Signals()
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return

    def on_sigterm(signum, frame):
        seen.received = True
        handler = signal.getsignal(signal.SIGINT)  # Tune's while tuner.fit() runs, else Python's
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_search_inputs(base: ExperimentConfig, space, settings: SearchSettings, source: str,
                         variant_tags: list[dict[str, str]] | None, resume: bool):
    """Validate the metric and the space (or variants) against the config, find the search directory
    and, on ``resume``, the settings the search was started with. Returns ``(space, settings, search)``,
    ``search`` the driver's copy of the search directory (:func:`search_mirror`, pulled)."""
    check_metric(base, settings.metric)
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
    search = search_mirror(base.run.storage_path, settings.name)
    search.pull()
    state_file = search.local / SEARCH_FILE
    if resume and not state_file.exists():
        raise ConfigError(f"--resume: no search {settings.name!r} in {base.run.storage_path} (no {SEARCH_FILE})")
    if resume:  # the search goes on as it was started
        settings = SearchSettings(**json.loads(state_file.read_text())["settings"])
    if not resume and state_file.exists():
        raise ConfigError(f"search {settings.name!r} already exists in {base.run.storage_path}: continue it with "
                          "--resume or choose another --name")
    return space, settings, search


def _concurrency(base: ExperimentConfig, space, settings: SearchSettings) -> tuple[dict[str, float], int]:
    """One trial's resources and how many trials run at once on the cluster (Ray is up)."""
    import ray

    need = trial_resources(base)
    max_concurrent = concurrent_trials(need, ray.cluster_resources(), settings.max_concurrent)
    if isinstance(space, list) and space:
        max_concurrent = min(max_concurrent, len(space))
    return need, max_concurrent


def _record_search_on_parent(parent, base: ExperimentConfig, space, settings: SearchSettings, search_dir: Path,
                             max_concurrent: int, source_name: str, owns_parent: bool) -> None:
    """A new search's parameters, provenance tags and base config on its parent run."""
    from pipelines.provenance import run_tags

    searched = space.describe() if isinstance(space, SearchSpace) else {
        f"variant_{i}": json.dumps(v) for i, v in enumerate(space)}
    parent.log_params({**{f"space.{k}": v for k, v in searched.items()},
                       "scheduler": settings.scheduler, "search": settings.search,
                       "metric": settings.metric, "mode": settings.mode,
                       "num_samples": settings.num_samples, "max_concurrent": max_concurrent,
                       "grace_period": settings.grace_period,
                       "reduction_factor": settings.reduction_factor,
                       "max_failures": settings.max_failures})
    parent.set_tags({**run_tags(base, source_name),
                     **({"lsnet.kind": "search", "lsnet.search": settings.name} if owns_parent else {})})  # else the caller's kind
    (search_dir / "base_config.yaml").write_text(base.to_yaml())
    parent.log_artifact(search_dir / "base_config.yaml", "config")


def _tuner(base: ExperimentConfig, space, settings: SearchSettings, search_dir: str, tags: dict[str, str],
           tags_by_variant: dict | None, max_concurrent: int, resume: bool, retry_failed: bool, verbose: bool):
    """The Tuner of the search (restored from ``search_dir``, its location, on ``resume``)."""
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(_trial, base=to_dict(base), search_name=settings.name, search_dir=str(search_dir),
                             tags=tags, variant_tags=tags_by_variant),
        TRIAL_DRIVER_RESOURCES)
    if resume:
        return tune.Tuner.restore(search_dir, trainable, resume_unfinished=True, resume_errored=retry_failed,
                                  restart_errored=False)
    return tune.Tuner(
        trainable,
        param_space=_param_space(space),
        tune_config=tune.TuneConfig(
            metric=settings.metric, mode=settings.mode, search_alg=_search_algorithm(settings, max_concurrent),
            scheduler=_scheduler(settings, base.train.epochs),
            num_samples=1 if isinstance(space, list) else settings.num_samples,  # (concurrency: search_alg)
            trial_name_creator=lambda trial: trial.trial_id,
            trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=tune.RunConfig(
            name=settings.name, storage_path=base.run.storage_path,
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            verbose=1 if verbose else 0),
    )
