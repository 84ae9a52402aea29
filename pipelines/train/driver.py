"""What runs on the driver of ``lsnet train``: :func:`run_training` checks the config, data and cluster,
starts a Ray Train ``TorchTrainer`` whose workers run :func:`pipelines.train.worker.train_loop_per_worker`,
stops it at once on Ctrl-C or a worker's data error (:class:`RunGuard`), and says where the results are.

When a worker dies, Ray restarts the worker group (``run.max_failures`` times) and the loop resumes from
the latest checkpoint (:mod:`pipelines.train.parts`). The run directory's layout: :mod:`pipelines.train.rundir`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lsnet import storage
from lsnet.config import ConfigError, to_dict
from lsnet.errors import LsnetError
from pipelines.config import ExperimentConfig, default_run_name, required_resources
from pipelines.provenance import run_tags
from pipelines.tracking.journal import Journal
from pipelines.tracking.store import check_store_for_cluster, open_store, run_url, ui_command
from pipelines.tracking.tracker import RunTracker
from pipelines.train.rundir import (
    clear_worker_errors,
    is_uri,
    newest_complete_checkpoint,
    run_location,
    run_mirror,
    worker_error,
)
from pipelines.train.worker import train_loop_per_worker


class ClusterResourceError(LsnetError, RuntimeError):
    """The Ray cluster does not have the resources the requested workers need."""


def check_cluster_resources(cfg: ExperimentConfig, cluster_resources=None, wait_s: float | None = None,
                            poll_s: float = 5.0) -> None:
    """Fail at once (or after ``run.resource_wait_s`` on an autoscaling cluster) when the cluster
    cannot hold the worker group -- Ray would otherwise retry starting it forever.

    ``cluster_resources``: a callable returning ``{"CPU": n, "GPU": m, ...}`` (default
    ``ray.cluster_resources``).
    """
    if cluster_resources is None:
        import ray

        cluster_resources = ray.cluster_resources
    wait_s = cfg.run.resource_wait_s if wait_s is None else wait_s
    need = required_resources(cfg)
    deadline = time.monotonic() + wait_s
    while True:
        have = cluster_resources()
        short = {k: v for k, v in need.items() if have.get(k, 0.0) < v}
        if not short or time.monotonic() >= deadline:
            break
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
    if short:
        per = {k: v / cfg.run.num_workers for k, v in need.items()}
        has = ", ".join(f"{k} {have.get(k, 0.0):g}" for k in sorted(set(need) | {"CPU", "GPU"}))
        waited = f" after waiting {wait_s:g}s" if wait_s else ""
        raise ClusterResourceError(
            f"run.num_workers={cfg.run.num_workers} x {_fmt_resources(per)} needs {_fmt_resources(need)}, "
            f"but the Ray cluster has {has}{waited}: use fewer workers (--num-workers), smaller "
            f"run.resources_per_worker, --cpus, or set run.resource_wait_s on an autoscaling cluster")


def _fmt_resources(res: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items())) + "}"


def check_data(cfg: ExperimentConfig) -> None:
    """Cheap checks in the driver before Ray starts workers (a worker that fails on them would only
    be restarted): the shards exist, their sizes match the manifest, there are enough training
    images for the workers, and the class count matches the model."""
    from lsnet.data.shards import load_manifest, verify_shards

    d = cfg.data
    for role, shard_dir in (("data.train_shards", d.train_shards), ("data.val_shards", d.val_shards)):
        if shard_dir is None:
            continue
        manifest = load_manifest(shard_dir)
        verify_shards(shard_dir, manifest, full=False)
        if role == "data.train_shards":
            n_train = int(manifest.get("num_images", 0))
            if d.max_train_images is not None:
                n_train = min(n_train, d.max_train_images)
            if n_train < cfg.run.num_workers:
                raise ConfigError(f"{role} {shard_dir}: {n_train} training images for {cfg.run.num_workers} "
                                  f"workers (each worker needs at least one)")
            num_classes = len(manifest.get("categories", []))
            if num_classes != cfg.model.num_classes:
                raise ConfigError(f"model.num_classes is {cfg.model.num_classes} but the shards in {shard_dir} "
                                  f"have {num_classes} categories")


def absolutize_paths(cfg: ExperimentConfig, base: Path | None = None) -> ExperimentConfig:
    """Relative data/storage paths resolved against the driver's working directory (Ray workers run
    elsewhere). URIs are left alone."""
    base = base or Path.cwd()

    def fix(path: str | None) -> str | None:
        if path is None or is_uri(path) or Path(path).is_absolute():
            return path
        return str((base / path).resolve())

    data = dataclasses.replace(cfg.data, train_shards=fix(cfg.data.train_shards),
                               val_shards=fix(cfg.data.val_shards), val_ann=fix(cfg.data.val_ann))
    run = dataclasses.replace(cfg.run, storage_path=fix(cfg.run.storage_path))
    train = dataclasses.replace(cfg.train, init_from=fix(cfg.train.init_from))
    return dataclasses.replace(cfg, data=data, run=run, train=train)






class RunGuard:
    """Stops a Ray Train run from the driver at once: on Ctrl-C, and when a worker recorded a data
    error (``worker_errors/``), which no restart can fix.

    Ray Train's own SIGINT handler asks the controller to abort and waits for it -- which hangs when
    the worker group cannot start. Here Ctrl-C kills the controller actor (its workers die with it),
    so ``fit()`` returns within seconds; the checkpoints already on disk stay usable (a partial one
    is skipped on resume by :func:`newest_complete_checkpoint`).
    """

    def __init__(self, location: str | Path, poll_s: float | None = None):
        import threading

        # an object store is asked less often (a listing per poll)
        self.location = str(location)
        self.poll_s = poll_s if poll_s is not None else (2.0 if is_uri(self.location) else 0.5)
        self.controller = None
        self.reason: str | None = None
        self._done = threading.Event()
        self._sigints = 0

    def attach(self, controller) -> None:
        """Called with the Ray Train controller's handle when ``fit()`` starts (main thread only)."""
        import signal

        self.controller = controller

        def on_sigint(signum, frame):
            self._sigints += 1
            print("lsnet train: Ctrl-C -- stopping the workers", file=sys.stderr, flush=True)
            self.stop("interrupted")
            if self._sigints > 1:
                raise KeyboardInterrupt

        signal.signal(signal.SIGINT, on_sigint)

    def stop(self, reason: str) -> None:
        import ray

        from pipelines.ray_local import mute_actor_output

        self.reason = self.reason or reason
        if reason == "interrupted":  # the command ends: what the dying actors print is not the user's concern
            mute_actor_output("TrainController", "RayTrainWorker")
        if self.controller is None:
            return
        if reason == "data_error":
            # The worker group is up: a graceful abort shuts it down and frees its placement group at
            # once (after a kill, the workers' CPUs stay reserved until Ray Train's cleaner notices).
            with contextlib.suppress(Exception):
                ray.get(self.controller.abort.remote(), timeout=30)
        with contextlib.suppress(Exception):
            ray.kill(self.controller, no_restart=True)

    @contextlib.contextmanager
    def watching(self):
        """Watch for worker data errors while the body runs; restore the SIGINT handler afterwards."""
        import signal
        import threading

        previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None

        def watch():
            while not self._done.wait(self.poll_s):
                if worker_error(self.location) is not None:
                    self.stop("data_error")
                    return

        thread = threading.Thread(target=watch, name="lsnet-run-guard", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._done.set()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)


def _trainer_class():
    from ray.train.torch import TorchTrainer

    class GuardedTrainer(TorchTrainer):
        """A TorchTrainer whose controller handle goes to a :class:`RunGuard` (instead of Ray's SIGINT
        handler, which is only installed from the main thread -- so is ours)."""

        def __init__(self, guard: RunGuard, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._guard = guard

        def _register_sigint_handler(self, controller):
            self._guard.attach(controller)

    return GuardedTrainer


def guarded_trainer(guard: RunGuard, *args, **kwargs):
    return _trainer_class()(guard, *args, **kwargs)


@dataclass
class TrainingOutcome:
    run_dir: Path  # the driver's copy of the run directory (the directory itself for a local location)
    run_location: str  # where the run lives: storage_path/name, a path or a URI
    run_name: str
    metrics: dict[str, Any]  # the last report of rank 0
    checkpoint_path: str | None  # latest Ray checkpoint
    best_checkpoint_path: str | None
    tracking_uri: str | None
    mlflow_run_id: str | None


def run_training(cfg: ExperimentConfig, *, address: str | None = None, run_name: str | None = None,
                 verbose: bool = True, callbacks: list | None = None,
                 extra_tags: dict[str, str] | None = None) -> TrainingOutcome:
    """Train ``cfg`` with a Ray Train ``TorchTrainer``; connects to ``address`` (``auto``,
    ``ray://host:10001``) or starts/uses a local Ray.

    ``callbacks``: Ray Train run callbacks (a Tune trial passes ``TuneReportCallback()``);
    ``extra_tags``: more MLflow tags of the run (a trial's parent run id and searched values)."""
    from pipelines.ray_local import start_ray

    cfg, run = prepare_run_dir(cfg, run_name)
    check_data(cfg)  # cheap checks before any worker starts
    # a resubmitted run (same name) continues from the newest complete checkpoint at its location
    resume_from = newest_complete_checkpoint(run.location, log=print if verbose else None)
    if resume_from is not None and verbose:
        print(f"[resume] newest complete checkpoint: {resume_from}", flush=True)
    clear_worker_errors(run.location)  # a previous attempt's data error: this run checks afresh
    # Ray Train V2 routes print() in workers through its logger *and* the console (each line twice);
    # plain prints are enough here. Propagated from the driver to the workers by Ray Train.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    start_ray(address=address, verbose=verbose)  # no-op when Ray is up; a local Ray ends with this process
    check_cluster_resources(cfg)
    if cfg.tracking.enabled:
        # Resolved here, from the driver's environment: workers (started by a raylet, perhaps on another
        # node) do not share it; the resolved URI travels to them in the config (tracking.uri).
        cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=open_store(cfg.tracking.uri)))
        # a SQLite file of this node, with workers on others: refused here, before a worker starts
        check_store_for_cluster(cfg.tracking.uri, cfg.run.num_workers, cfg.run.use_gpu, cfg.run.resources_per_worker)
    tags = {**run_tags(cfg, "lsnet train"), **(extra_tags or {})}
    guard = RunGuard(run.location)
    trainer = build_trainer(cfg, guard, run, tags, resume_from, callbacks)
    result = fit_guarded(trainer, guard, cfg, run, verbose)
    return training_outcome(result, cfg, run, verbose)


def prepare_run_dir(cfg: ExperimentConfig, run_name: str | None) -> tuple[ExperimentConfig, storage.MirroredDir]:
    """The config with absolute paths and its run name, and its run directory holding ``config.yaml``
    (at the run's location, and in the driver's local copy of it)."""
    cfg = absolutize_paths(cfg)
    if cfg.train.init_from and not Path(cfg.train.init_from).is_file():
        raise ConfigError(f"train.init_from: checkpoint {cfg.train.init_from} does not exist")
    timestamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")
    name = run_name or cfg.run.name or default_run_name(cfg, timestamp)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=name))
    run = run_mirror(run_location(cfg.run.storage_path, name))
    run.pull()  # a resubmitted run: its journal (the same MLflow run) and records
    run.local.mkdir(parents=True, exist_ok=True)
    (run.local / "config.yaml").write_text(cfg.to_yaml())
    run.push()
    return cfg, run


def build_trainer(cfg: ExperimentConfig, guard: RunGuard, run: storage.MirroredDir, tags: dict[str, Any],
                  resume_from: str | Path | None, callbacks: list | None):
    """The guarded ``TorchTrainer`` of the run: workers, backend (NCCL on GPU, gloo on CPU), restarts and
    the checkpoints Ray keeps (the best ``run.checkpoint_keep`` by the task's AP, and the latest)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from pipelines.process_group import BoundTorchConfig

    return guarded_trainer(
        guard,
        train_loop_per_worker,
        # the run's location, never the driver's local copy: a worker on another node makes its own
        train_loop_config={"config": to_dict(cfg), "run_location": run.location, "tags": tags,
                           "resume_from": str(resume_from) if resume_from else None},
        # the rendezvous store listens on the node's address only (127.0.0.1 for a local Ray)
        torch_config=BoundTorchConfig(backend="nccl" if cfg.run.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                     resources_per_worker=cfg.run.resources_per_worker),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=cfg.run.storage_path, callbacks=list(callbacks or []),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoint_keep,
                                               checkpoint_score_attribute="checkpoint_score",
                                               checkpoint_score_order="max"),
        ),
    )


def end_mlflow_run(cfg: ExperimentConfig, run: storage.MirroredDir, status: str, verbose: bool) -> None:
    """The workers are gone: the driver ends the MLflow run (same run, same journal -- the one rank 0
    stored at the run's location). Not when it has ended already: rank 0 finished it (a Tune trial stopped
    right after its last report), or the driver of an interrupted search marked it KILLED before this
    trial's driver saw its workers die."""
    if not cfg.tracking.enabled:
        return
    run.pull()
    if Journal.exists(run.local) and Journal(run.local).end_status() is None:
        RunTracker(run.local, background=False, verbose=verbose).close(status, final_flush_timeout_s=5)
        run.push()


def fit_guarded(trainer, guard: RunGuard, cfg: ExperimentConfig, run: storage.MirroredDir, verbose: bool):
    """``trainer.fit()`` under the guard: Ctrl-C ends the MLflow run KILLED and says how to resume; a
    worker's data error is raised as its own one-line error; any other failure ends the run FAILED."""

    def interrupted() -> KeyboardInterrupt:
        end_mlflow_run(cfg, run, "KILLED", verbose)
        latest = newest_complete_checkpoint(run.location)
        print(f"lsnet train: interrupted; MLflow run marked KILLED; latest complete checkpoint: "
              f"{latest or 'none'}; rerun with --name {cfg.run.name} to resume from it", file=sys.stderr, flush=True)
        return KeyboardInterrupt()

    try:
        with guard.watching():
            return trainer.fit()
    except KeyboardInterrupt:
        guard.stop("interrupted")
        raise interrupted() from None
    except Exception:
        if guard.reason == "interrupted":
            raise interrupted() from None
        end_mlflow_run(cfg, run, "FAILED", verbose)
        data_error = worker_error(run.location)
        if data_error is not None:  # not retryable: the worker's own one-line message
            raise data_error from None
        raise


def training_outcome(result, cfg: ExperimentConfig, run: storage.MirroredDir, verbose: bool) -> TrainingOutcome:
    """What the run left (checkpoints, MLflow run), printed with the command that opens the UI. For a
    stored run the driver's local copy is brought up to date first (the weights, ``epochs.jsonl``)."""
    run.pull()
    run_dir = run.local
    best = None
    if result.best_checkpoints:
        best = max(result.best_checkpoints, key=lambda cm: cm[1].get("checkpoint_score", -1.0))[0].path
    state = Journal(run_dir).state if cfg.tracking.enabled and Journal.exists(run_dir) else {}
    tracking_uri, run_id = state.get("tracking_uri"), state.get("run_id")
    outcome = TrainingOutcome(run_dir=run_dir, run_location=run.location, run_name=cfg.run.name, metrics=dict(result.metrics or {}),
                              checkpoint_path=result.checkpoint.path if result.checkpoint else None,
                              best_checkpoint_path=best, tracking_uri=tracking_uri, mlflow_run_id=run_id)
    if verbose:
        print(f"run directory: {run.location}" + (f" (local copy: {run_dir})" if run.remote else ""))
        print(f"latest checkpoint: {outcome.checkpoint_path}; best: {outcome.best_checkpoint_path}")
        if tracking_uri:
            print(f"MLflow run {run_id} at {tracking_uri}; open the UI with:\n  {ui_command(tracking_uri)}")
            if state.get("experiment_id"):
                print(f"  then {run_url(tracking_uri, state['experiment_id'], run_id)}")
    return outcome
