"""Distributed LSNet training on Ray Train (V2 API) with MLflow tracking: ``lsnet train CONFIG``.

Layout of a run (``RunConfig.storage_path / run name``, the *run directory*)::

    config.yaml                   the resolved experiment config
    checkpoint_epoch_0003/        Ray Train checkpoints: state.pt (model, optimiser, scheduler, AMP
                                  scaler, TrainState) + rng_rank{r}.pt (each worker's RNG state);
                                  the best by the task's AP and the latest are kept
    model_best.pt, model_final.pt weights + metadata for ``lsnet predict`` (rank 0)
    overlays/epoch_0003/*.png     prediction overlays of the first validation images
    eval/                         per-category AP tables
    mlflow.db, mlartifacts/       the default embedded MLflow store (pipelines.tracking)
    mlflow_journal/               the tracking write-ahead journal

Each Ray Train worker runs :func:`train_loop_per_worker`: the model and optimiser from
``lsnet.modeling`` / ``lsnet.engine``, DDP (gloo on CPU, NCCL on GPU; AMP and channels-last on GPU),
its own share of the Arrow shards (:class:`lsnet.data.shards.ShardSampler` with its rank and the world
size), the schedule of the config with the learning rate scaled by the global batch, a checkpoint after
every epoch, and COCO evaluation every ``train.eval_every`` epochs with the predictions of all workers
gathered on rank 0. When a worker dies, Ray restarts the worker group (``run.max_failures`` times) and
the loop resumes from the latest checkpoint with the same step count, optimiser, scheduler, sampler
position (the epoch: the sample order is a function of ``(seed, epoch)``) and RNG state — on CPU the
resumed run ends with exactly the weights of an uninterrupted one.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lsnet.bench import git_commit
from lsnet.config import ConfigError, flatten, to_dict
from lsnet.errors import InputError, LsnetError, one_line
from pipelines.config import ExperimentConfig, config_from_dict, default_run_name, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
LOSS_KEYS = ("loss", "loss_cls", "loss_vec_init", "loss_vec_refine", "loss_box_init", "loss_box_refine")
#: per-step training metrics that are not losses: the mean IoU of the output boxes at the positives
#: (paper Figure 4, lsnet.modeling.detector.compute_losses)
STEP_METRIC_KEYS = ("pos_iou",)
FAULT_MARKER = "fault_injected.marker"
#: A worker that hits a data/config error (an LsnetError) writes it here (``rank{r}.json``); the driver
#: stops the run at once instead of letting Ray spend ``run.max_failures`` restarts on it.
WORKER_ERRORS_DIR = "worker_errors"
CHECKPOINT_PREFIX = "checkpoint_epoch_"


class ClusterResourceError(LsnetError, RuntimeError):
    """The Ray cluster does not have the resources the requested workers need."""


def required_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """Resources of the whole worker group, as Ray Train asks for them (default per worker: 1 CPU,
    or 1 GPU with ``run.use_gpu``)."""
    per_worker = dict(cfg.run.resources_per_worker or ({"GPU": 1.0} if cfg.run.use_gpu else {"CPU": 1.0}))
    if cfg.run.use_gpu:
        per_worker.setdefault("GPU", 1.0)
    return {k: float(v) * cfg.run.num_workers for k, v in per_worker.items() if v}


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


def checkpoint_epoch(path: str | Path) -> int:
    """``.../checkpoint_epoch_0003`` -> 3 (-1 for other names)."""
    name = Path(str(path).rstrip("/")).name
    try:
        return int(name.removeprefix(CHECKPOINT_PREFIX)) if name.startswith(CHECKPOINT_PREFIX) else -1
    except ValueError:
        return -1


def newest_complete_checkpoint(run_dir: Path, log=None) -> Path | None:
    """The newest ``checkpoint_epoch_*`` directory of ``run_dir`` whose ``state.pt`` loads (a run killed
    while a checkpoint was being written leaves a partial one, which is skipped and named via ``log``)."""
    from lsnet.engine import load_checkpoint

    candidates = sorted((p for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*") if checkpoint_epoch(p) >= 0),
                        key=checkpoint_epoch, reverse=True)
    for path in candidates:
        try:
            ckpt = load_checkpoint(path / "state.pt")
            if "train_state" in ckpt:
                return path
            reason = "no train_state"
        except (OSError, ValueError) as err:
            reason = one_line(err)[:200]
        if log is not None:
            log(f"[resume] skipping incomplete {path.name}: {reason}")
    return None


# --------------------------------------------------------------------------------------------------
# Helpers shared by the driver and the workers
# --------------------------------------------------------------------------------------------------


def _is_uri(path: str) -> bool:
    return "://" in path


def absolutize_paths(cfg: ExperimentConfig, base: Path | None = None) -> ExperimentConfig:
    """Relative data/storage paths resolved against the driver's working directory (Ray workers run
    elsewhere). URIs are left alone."""
    base = base or Path.cwd()

    def fix(path: str | None) -> str | None:
        if path is None or _is_uri(path) or Path(path).is_absolute():
            return path
        return str((base / path).resolve())

    data = dataclasses.replace(cfg.data, train_shards=fix(cfg.data.train_shards),
                               val_shards=fix(cfg.data.val_shards), val_ann=fix(cfg.data.val_ann))
    run = dataclasses.replace(cfg.run, storage_path=fix(cfg.run.storage_path))
    train = dataclasses.replace(cfg.train, init_from=fix(cfg.train.init_from))
    return dataclasses.replace(cfg, data=data, run=run, train=train)


def manifest_hash(shard_dir: str | None) -> str:
    """SHA-256 of the shard directory's manifest.json (identifies the exact dataset version)."""
    if shard_dir is None:
        return "none"
    import pyarrow as pa

    from lsnet.data.shards import MANIFEST_NAME, resolve_filesystem, sha256_bytes_of

    fs, root = resolve_filesystem(shard_dir)
    try:
        return sha256_bytes_of(f"{root.rstrip('/')}/{MANIFEST_NAME}", fs)[0]
    except (OSError, pa.ArrowException) as err:
        raise ConfigError(f"data shards {shard_dir}: cannot read {MANIFEST_NAME} ({err}); "
                          "run `lsnet preprocess` first") from None


def ray_job_ids() -> dict[str, str]:
    import ray

    ids = {"ray_job_id": ray.get_runtime_context().get_job_id()}
    try:  # a job submitted with `ray job submit` carries its submission id in the job metadata
        meta = ray._private.worker.global_worker.core_worker.get_job_config().metadata
        if "job_submission_id" in meta:
            ids["ray_job_submission_id"] = meta["job_submission_id"]
    except Exception as err:  # noqa: BLE001 - an internal API; the tag is optional
        ids["ray_job_submission_id"] = f"unknown ({type(err).__name__})"
    return ids


def test_time_data_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """The data settings a checkpoint needs at test time (``lsnet.predict.load_model`` reads them)."""
    return {"test_scale": cfg.data.test_scale, "max_size": cfg.data.max_size, "flip_test": cfg.eval.flip_test}


def _format_eta(seconds: float) -> str:
    return str(_dt.timedelta(seconds=max(0, round(seconds))))


def epoch_summary_line(epoch: int, epochs: int, summary: dict[str, float], epoch_time_s: float,
                       eta_s: float, eval_metrics: dict[str, float] | None, primary: str,
                       images_per_s: float) -> str:
    terms = " ".join(f"{k.removeprefix('loss_')} {summary[k]:.4f}" for k in LOSS_KEYS[1:] if k in summary)
    line = (f"[epoch {epoch}/{epochs}] loss {summary.get('loss', float('nan')):.4f} ({terms}) "
            f"lr {summary.get('lr', float('nan')):.5f} | {images_per_s:.1f} img/s | "
            f"{epoch_time_s:.1f}s/epoch | ETA {_format_eta(eta_s)}")
    if eval_metrics:
        line += f" | {primary} {eval_metrics.get(primary, float('nan')):.4f}"
    return line


# --------------------------------------------------------------------------------------------------
# The per-worker training loop
# --------------------------------------------------------------------------------------------------


def _build_loaders(cfg: ExperimentConfig, rank: int, world: int, use_cuda: bool):
    from torch.utils.data import DataLoader

    from lsnet.data.shards import ShardDataset, ShardSampler, collate_batch

    m, d = cfg.model, cfg.data
    train_ds = ShardDataset(d.train_shards, task=m.task, num_points=m.num_points, pose_box=m.pose_box,
                            train=True, scale_range=tuple(d.scale_range), max_size=d.max_size,
                            flip_prob=d.flip_prob, seed=cfg.train.seed, verify=d.verify)
    if train_ds.num_classes != m.num_classes:
        raise ConfigError(f"model.num_classes is {m.num_classes} but the shards in {d.train_shards} have "
                          f"{train_ds.num_classes} categories")
    n_train = len(train_ds) if d.max_train_images is None else min(len(train_ds), d.max_train_images)
    if d.reader == "ray_data" and n_train != len(train_ds):
        raise ConfigError("data.max_train_images is not supported with data.reader=ray_data")
    if n_train < world:
        raise ConfigError(f"{d.train_shards}: {n_train} training images for {world} workers")
    # drop_last: every rank gets the same number of samples, so DDP ranks step in lockstep.
    train_sampler = ShardSampler(n_train, rank, world, seed=cfg.train.seed, shuffle=True, drop_last=True)
    train_loader = DataLoader(train_ds, batch_size=cfg.train.batch_size, sampler=train_sampler,
                              collate_fn=collate_batch, num_workers=d.loader_workers, pin_memory=use_cuda,
                              persistent_workers=d.loader_workers > 0)
    val_ds = val_loader = None
    if d.val_shards:
        val_ds = ShardDataset(d.val_shards, task=m.task, num_points=m.num_points, pose_box=m.pose_box,
                              train=False, scale_range=tuple(d.scale_range), max_size=d.max_size,
                              test_short_side=d.test_scale, seed=cfg.train.seed, verify=d.verify)
        n_val = len(val_ds) if d.max_val_images is None else min(len(val_ds), d.max_val_images)
        # every validation image exactly once across ranks (uneven shares are fine: no collectives)
        val_sampler = ShardSampler(n_val, rank, world, shuffle=False, drop_last=False)
        val_loader = DataLoader(val_ds, batch_size=d.val_batch_size, sampler=val_sampler,
                                collate_fn=collate_batch, num_workers=d.loader_workers, pin_memory=use_cuda)
    return train_ds, train_sampler, train_loader, val_ds, val_loader


def _gather_to_rank0(items: list, rank: int, world: int) -> list | None:
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return items
    parts: list = [None] * world
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part] if rank == 0 else None


def _write_overlays(model, val_ds, cfg: ExperimentConfig, out_dir: Path, device) -> list[Path]:
    """Predictions drawn on the first ``eval.num_overlays`` validation images (rank 0 only)."""
    import numpy as np
    from PIL import Image

    from lsnet.data.shards import collate_batch
    from lsnet.engine import unwrap_model
    from lsnet.visualize import draw_detections

    count = min(cfg.eval.num_overlays, len(val_ds))
    if count == 0:
        return []
    net = unwrap_model(model)
    names = [c["name"] for c in val_ds.categories]
    items = [val_ds[i] for i in range(count)]
    batch = collate_batch(items)
    was_training = net.training
    net.eval()
    with torch.no_grad():
        dets = net(batch.images.to(device), image_sizes=[tuple(m.size) for m in batch.metas])
    net.train(was_training)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (image, _, meta), det in zip(items, dets):
        hwc = image.permute(1, 2, 0).cpu().numpy().astype(np.uint8)
        drawn = draw_detections(hwc, det.to("cpu"), cfg.model.task, names)
        path = out_dir / f"{meta.image_id}.png"
        Image.fromarray(drawn).save(path)
        paths.append(path)
    return paths


class _FaultInjector:
    """Test-only: worker ``fail_rank`` exits abruptly right after optimiser step ``fail_at_step`` — once
    per run directory (the marker file makes the restarted attempt run through)."""

    def __init__(self, cfg: ExperimentConfig, rank: int, run_dir: Path):
        self.step = cfg.run.fail_at_step
        self.armed = self.step is not None and rank == cfg.run.fail_rank
        self.marker = run_dir / FAULT_MARKER

    def wrap(self, batches, state):
        for batch in batches:
            yield batch
            # the generator resumes only when the next batch is asked for: the step is complete
            if self.armed and state.global_step == self.step and not self.marker.exists():
                import ray.train

                # Ray's controller registers reported checkpoints when it polls the workers (every
                # few seconds); wait for that so the restart deterministically resumes from the
                # latest one rather than from an earlier one.
                ray.train.get_all_reported_checkpoints(timeout_s=120)
                self.marker.write_text(f"worker exited after step {self.step}\n")
                print(f"[fault injection] worker exits after step {self.step}", flush=True)
                os._exit(1)


@dataclass
class WorkerContext:
    """Where this worker runs: its rank in a group of ``world`` workers, its device, the run directory."""

    rank: int
    world: int
    device: torch.device
    run_dir: Path
    #: the newest complete checkpoint directory the driver found on disk (None: Ray's checkpoint only)
    resume_from: str | None = None

    @property
    def use_cuda(self) -> bool:
        return self.device.type == "cuda"

    @classmethod
    def current(cls, run_dir: str | Path) -> WorkerContext:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        device = ray.train.torch.get_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return cls(ctx.get_world_rank(), ctx.get_world_size(), device, Path(run_dir))

    def gather(self, items: list) -> list | None:
        return _gather_to_rank0(items, self.rank, self.world)


@dataclass
class TrainingParts:
    """What one worker trains with: built by :func:`build_training`, advanced epoch by epoch."""

    cfg: ExperimentConfig
    model: torch.nn.Module  # DDP-wrapped when world > 1
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    state: Any  # lsnet.engine.TrainState
    train_ds: Any
    sampler: Any
    train_loader: Any
    val_ds: Any
    val_loader: Any

    def checkpoint_metadata(self) -> dict[str, Any]:
        """What ``lsnet predict`` / ``lsnet test`` read from a weights file besides the weights,
        including the test-time data settings (resize), so a model trained at 128 px is not run at
        800 px by default."""
        return {"task": self.cfg.model.task, "category_ids": self.train_ds.category_ids,
                "class_names": [c["name"] for c in self.train_ds.categories],
                "model_config": to_dict(self.cfg.model), "config_name": self.cfg.name or "",
                "data_config": test_time_data_config(self.cfg)}

    def epoch_batches(self, epoch: int, ctx: WorkerContext):
        """This rank's batches of ``epoch``: the DataLoader over the memory-mapped shards, or the same
        samples streamed by Ray Data tasks (pipelines.datasets) with this rank's sampler share."""
        self.train_ds.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        if self.cfg.data.reader == "shards":
            return self.train_loader
        from pipelines.datasets import build_ray_dataset, iter_ray_batches

        m, d = self.cfg.model, self.cfg.data
        ds = build_ray_dataset(d.train_shards, task=m.task, num_points=m.num_points, pose_box=m.pose_box,
                               train=True, scale_range=tuple(d.scale_range), max_size=d.max_size,
                               flip_prob=d.flip_prob, seed=self.cfg.train.seed, epoch=epoch, rank=ctx.rank,
                               world_size=ctx.world, shuffle=True, drop_last=True, verify="none")
        return iter_ray_batches(ds, self.cfg.train.batch_size)


def build_training(cfg: ExperimentConfig, ctx: WorkerContext) -> TrainingParts:
    """Model, data loaders, optimiser, lr schedule and AMP scaler of a fresh run (before resuming)."""
    from lsnet.engine import TrainState, build_grad_scaler, build_optimizer, build_scheduler, seed_everything
    from lsnet.modeling import build_model

    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model).to(ctx.device)
    if ctx.use_cuda and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_ds, sampler, train_loader, val_ds, val_loader = _build_loaders(cfg, ctx.rank, ctx.world, ctx.use_cuda)
    optimizer = build_optimizer(model, cfg.train, global_batch=cfg.train.batch_size * ctx.world)
    scheduler = build_scheduler(optimizer, cfg.train, len(train_loader))
    scaler = build_grad_scaler(cfg.train, ctx.device)
    return TrainingParts(cfg, model, optimizer, scheduler, scaler, TrainState(), train_ds, sampler, train_loader,
                         val_ds, val_loader)


def resume_training(parts: TrainingParts, ctx: WorkerContext) -> dict[str, int] | None:
    """Continue from Ray Train's latest checkpoint if there is one (a restarted worker group, or a
    restored Tune trial): weights, optimiser, schedule, scaler, counters and this rank's RNG streams.
    Returns ``{"epoch", "step"}`` resumed from, or None for a fresh start."""
    import ray.train

    from lsnet.engine import load_checkpoint, load_checkpoint_state, set_rng_state

    resumed = ray.train.get_checkpoint()
    on_disk = ctx.resume_from
    if on_disk and (resumed is None or checkpoint_epoch(on_disk) > checkpoint_epoch(resumed.path)):
        # Ray's own record of the run lags behind the disk after a Ctrl-C: take the newest complete one.
        resumed = ray.train.Checkpoint.from_directory(on_disk)
    if resumed is None:
        if parts.cfg.train.init_from:  # fine-tune: weights only, a fresh optimiser and schedule
            from lsnet.engine import init_model_from

            report = init_model_from(parts.model, parts.cfg.train.init_from)
            if ctx.rank == 0:
                print(f"[init_from] {parts.cfg.train.init_from}: {len(report['loaded'])} tensors loaded, "
                      f"{len(report['missing'])} kept their initialisation", flush=True)
        return None
    with resumed.as_directory() as ckpt_dir:
        ckpt = load_checkpoint(Path(ckpt_dir) / "state.pt", map_location=ctx.device)
        parts.state = load_checkpoint_state(ckpt, parts.model, parts.optimizer, parts.scheduler, parts.scaler,
                                            restore_rng=False)
        rng_path = Path(ckpt_dir) / f"rng_rank{ctx.rank}.pt"
        if rng_path.exists():  # same world size as before: continue this rank's random streams
            set_rng_state(torch.load(rng_path, weights_only=True))
    if ctx.rank == 0:
        print(f"[resume] from {Path(resumed.path).name}: epoch {parts.state.epoch}, step "
              f"{parts.state.global_step} ({resumed.path})", flush=True)
    return {"epoch": parts.state.epoch, "step": parts.state.global_step}


def wrap_distributed(parts: TrainingParts, ctx: WorkerContext) -> None:
    """DDP around the model when there is more than one worker (after resuming: plain state-dict keys)."""
    from torch.nn.parallel import DistributedDataParallel

    if ctx.world > 1:
        parts.model = DistributedDataParallel(
            parts.model, device_ids=[ctx.device.index] if ctx.use_cuda else None,
            find_unused_parameters=parts.cfg.run.find_unused_parameters)


def open_tracker(cfg: ExperimentConfig, ctx: WorkerContext, tags: dict[str, Any], tracking_uri: str | None = None):
    """Rank 0's MLflow run (pipelines.tracking: journaled, survives outages and worker restarts);
    None on other ranks or with tracking off. ``tracking_uri``: the store the driver resolved (a worker's
    own environment may name another one, or none)."""
    if ctx.rank != 0 or not cfg.tracking.enabled:
        return None
    from pipelines.tracking import RunTracker, shard_dataset

    tracker = RunTracker(ctx.run_dir, tracking_uri or cfg.tracking.uri, cfg.tracking.experiment, ctx.run_dir.name,
                         flush_interval_s=cfg.tracking.flush_interval_s,
                         retry_interval_s=cfg.tracking.retry_interval_s)
    tracker.log_params(flatten(to_dict(cfg)))
    tracker.set_tags({**tags, "num_workers": ctx.world, "device": ctx.device.type})
    tracker.log_datasets([shard_dataset(cfg.data.train_shards, "train")]
                         + ([shard_dataset(cfg.data.val_shards, "val")] if cfg.data.val_shards else []))
    config_file = ctx.run_dir / "config.yaml"
    if config_file.exists():
        tracker.log_artifact(config_file, "config")
    return tracker


def step_progress_line(epoch: int, epochs: int, step_in_epoch: int, steps_per_epoch: int,
                       values: dict[str, float], images_per_s: float, batch_per_step: int) -> str:
    """``[epoch 2/12 step 40/250] loss 1.2345 (cls 0.5 vec_init 0.3 vec_refine 0.4) lr 0.01000 |
    12.3 img/s | epoch ETA 0:03:10`` -- one plain line (readable in a log file)."""
    terms = " ".join(f"{k.removeprefix('loss_')} {values[k]:.4f}" for k in LOSS_KEYS[1:] if k in values)
    steps_per_s = images_per_s / max(batch_per_step, 1)
    eta = (steps_per_epoch - step_in_epoch) / steps_per_s if steps_per_s > 0 else float("nan")
    eta_text = _format_eta(eta) if math.isfinite(eta) else "?"
    return (f"[epoch {epoch}/{epochs} step {step_in_epoch}/{steps_per_epoch}] loss "
            f"{values.get('loss', float('nan')):.4f} ({terms}) lr {values.get('lr', float('nan')):.5f} | "
            f"{images_per_s:.1f} img/s | epoch ETA {eta_text}")


def step_logger(tracker, ctx: WorkerContext, parts: TrainingParts | None = None):
    """The per-step callback of ``train_one_epoch`` (every ``train.log_every`` steps): losses, lr, grad
    norm, throughput to MLflow, and on rank 0 a progress line on the console."""

    def log_fn(step: int, values: dict[str, float]) -> None:
        images_per_s = values["images_per_s"] * ctx.world  # all ranks take the same number of steps
        if parts is not None and ctx.rank == 0:
            steps_per_epoch = max(len(parts.train_loader), 1)
            epoch = int(values.get("epoch", parts.state.epoch))
            in_epoch = step - epoch * steps_per_epoch
            print(step_progress_line(epoch + 1, parts.cfg.train.epochs, in_epoch, steps_per_epoch, values,
                                     images_per_s, parts.cfg.train.batch_size * ctx.world), flush=True)
        if tracker is None:
            return
        metrics = {k: v for k, v in values.items()
                   if k in LOSS_KEYS or k in STEP_METRIC_KEYS or k in ("lr", "grad_norm")}
        # the rank-0 rate times the number of workers (all ranks take the same number of steps)
        metrics["images_per_s"] = images_per_s
        if ctx.use_cuda:
            metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
        tracker.log_metrics(metrics, step)

    return log_fn


def train_epoch(parts: TrainingParts, ctx: WorkerContext, injector: _FaultInjector, log_fn) -> dict[str, float]:
    """One epoch over this rank's share; returns the epoch's loss summary (engine.train_one_epoch)."""
    from lsnet.engine import train_one_epoch

    batches = parts.epoch_batches(parts.state.epoch, ctx)
    return train_one_epoch(parts.model, injector.wrap(batches, parts.state), parts.optimizer, parts.scheduler,
                           parts.scaler, parts.state, log_fn, cfg=parts.cfg.train, device=ctx.device)


def is_eval_epoch(cfg: ExperimentConfig, done: int, has_val: bool) -> bool:
    """Evaluate after every ``train.eval_every`` epochs and after the last one."""
    return has_val and (done % cfg.train.eval_every == 0 or done == cfg.train.epochs)


def evaluate_epoch(parts: TrainingParts, ctx: WorkerContext):
    """COCO evaluation with every rank's predictions gathered on rank 0; the ``EvalResult`` on rank 0,
    None elsewhere."""
    from lsnet.engine import evaluate_detailed

    cfg, val_ds = parts.cfg, parts.val_ds
    gt = cfg.data.val_ann or val_ds.gt_path
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' tables: we log the numbers
        return evaluate_detailed(parts.model, parts.val_loader, gt, val_ds.category_ids, cfg.model.task,
                                 gather_fn=ctx.gather, device=ctx.device, amp=ctx.use_cuda and cfg.train.amp)


def keep_best(parts: TrainingParts, ctx: WorkerContext, eval_metrics: dict[str, float], done: int) -> None:
    """Rank 0: a new best of the task's AP updates the TrainState and writes ``model_best.pt``."""
    from lsnet.engine import checkpoint_state, save_checkpoint

    state = parts.state
    score = eval_metrics.get(parts.cfg.primary_metric, -1.0)
    if state.best_metric is None or score > state.best_metric:
        state.best_metric, state.best_epoch = score, done
        save_checkpoint(checkpoint_state(parts.model, state=state, extra=parts.checkpoint_metadata(),
                                         include_rng=False), ctx.run_dir / "model_best.pt")


def share_best(parts: TrainingParts, ctx: WorkerContext) -> None:
    """The best score lives in the checkpointed TrainState: every rank must hold rank 0's value."""
    if ctx.world > 1:
        state = parts.state
        state.best_metric, state.best_epoch = _broadcast_object((state.best_metric, state.best_epoch), ctx.rank)


class EpochRecorder:
    """Rank 0's record of each epoch: the console summary line, ``epochs.jsonl`` and the MLflow epoch
    metrics, per-category AP tables and prediction overlays."""

    def __init__(self, parts: TrainingParts, ctx: WorkerContext, tracker):
        self.parts, self.ctx, self.tracker = parts, ctx, tracker
        self.epoch_times: list[float] = []

    def record_evaluation(self, result, done: int) -> None:
        from lsnet.evaluation import format_per_category

        if self.ctx.rank != 0 or self.tracker is None:
            return
        eval_dir = self.ctx.run_dir / "eval"
        eval_dir.mkdir(exist_ok=True)
        for iou_type, rows in result.per_category.items():
            table = eval_dir / f"per_category_{iou_type}_epoch{done:04d}.txt"
            table.write_text(format_per_category(rows) + "\n")
            self.tracker.log_artifact(table, "eval")
        overlay_dir = self.ctx.run_dir / "overlays" / f"epoch_{done:04d}"
        for png in _write_overlays(self.parts.model, self.parts.val_ds, self.parts.cfg, overlay_dir, self.ctx.device):
            self.tracker.log_artifact(png, f"overlays/epoch_{done:04d}")

    def record_epoch(self, summary: dict[str, float], epoch_time: float, eval_metrics: dict[str, float]) -> float:
        """Returns the epoch's throughput (images/s over all workers)."""
        self.epoch_times.append(epoch_time)
        cfg, state, world = self.parts.cfg, self.parts.state, self.ctx.world
        done = state.epoch
        images_per_s = summary.get("images_per_s", 0.0) * world
        if self.ctx.rank != 0:
            return images_per_s
        eta = (cfg.train.epochs - done) * (sum(self.epoch_times) / len(self.epoch_times))
        print(epoch_summary_line(done, cfg.train.epochs, summary, epoch_time, eta, eval_metrics,
                                 cfg.primary_metric, images_per_s), flush=True)
        with (self.ctx.run_dir / "epochs.jsonl").open("a") as fh:  # one line per epoch (and per attempt)
            fh.write(json.dumps({"epoch": done, "global_step": state.global_step, "world_size": world,
                                 "epoch_time_s": epoch_time, "images_per_s": images_per_s,
                                 **{k: v for k, v in summary.items() if k != "images_per_s"},
                                 **eval_metrics}) + "\n")
        if self.tracker is not None:
            epoch_metrics = {f"epoch_{k}": summary[k] for k in LOSS_KEYS + STEP_METRIC_KEYS if k in summary}
            epoch_metrics.update(epoch=float(done), epoch_time_s=epoch_time,
                                 epoch_images_per_s=images_per_s, **eval_metrics)
            self.tracker.log_metrics(epoch_metrics, state.global_step)
        return images_per_s


def checkpoint_and_report(parts: TrainingParts, ctx: WorkerContext, metrics: dict[str, Any]) -> None:
    """Every rank reports the epoch to Ray Train with a checkpoint directory: rank 0 writes the training
    state, each rank its RNG state. Rank 0's ``metrics`` are what Ray Train (and Tune, through its
    TuneReportCallback) sees for this epoch."""
    import ray.train

    from lsnet.engine import checkpoint_state, get_rng_state, save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        if ctx.rank == 0:
            save_checkpoint(checkpoint_state(parts.model, parts.optimizer, parts.scheduler, parts.scaler,
                                             parts.state, extra=parts.checkpoint_metadata(), include_rng=False),
                            Path(tmp) / "state.pt")
        torch.save(get_rng_state(), Path(tmp) / f"rng_rank{ctx.rank}.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_epoch_{parts.state.epoch:04d}")


def epoch_report(parts: TrainingParts, summary: dict[str, float], images_per_s: float,
                 eval_metrics: dict[str, float], evaluated: bool) -> dict[str, Any]:
    """The per-epoch result reported to Ray: ``epoch`` (Tune's ASHA time attribute), step, loss,
    throughput, and on evaluation epochs the COCO metrics (``bbox_AP``, ``segm_AP``, ...)."""
    import ray

    primary = parts.cfg.primary_metric
    return {"epoch": parts.state.epoch, "global_step": parts.state.global_step,
            "loss": summary.get("loss", math.nan), "images_per_s": images_per_s,
            "node_id": ray.get_runtime_context().get_node_id(),
            # the checkpoint ranking key: the task's AP when evaluated, else -1 (Ray keeps the top
            # `checkpoint_keep` by it, plus always the latest)
            "checkpoint_score": eval_metrics.get(primary, -1.0) if evaluated else -1.0,
            **eval_metrics}


def save_final(parts: TrainingParts, ctx: WorkerContext, tracker) -> None:
    """Rank 0: ``model_final.pt`` (and the best weights) for ``lsnet predict``, logged to MLflow with
    PNG curves of the run (``curves/loss.png``, ``curves/<AP>.png``), and the final model as the run's
    MLflow PyTorch model (``runs:/<run_id>/model``, with the config and the class names)."""
    from lsnet.engine import checkpoint_state, save_checkpoint

    if ctx.rank != 0:
        return
    final = save_checkpoint(checkpoint_state(parts.model, state=parts.state, extra=parts.checkpoint_metadata(),
                                             include_rng=False), ctx.run_dir / "model_final.pt")
    if tracker is not None:
        from pipelines.plots import run_curve_plots

        weights = parts.cfg.tracking.log_weights
        if weights == "all":
            tracker.log_artifact(final, "checkpoints")
            if (ctx.run_dir / "model_best.pt").exists():
                tracker.log_artifact(ctx.run_dir / "model_best.pt", "checkpoints")
        for png in run_curve_plots(ctx.run_dir, parts.cfg.primary_metric, LOSS_KEYS):
            tracker.log_artifact(png, "curves")
        if weights in ("all", "model"):
            log_final_model(parts, ctx, tracker)


def log_final_model(parts: TrainingParts, ctx: WorkerContext, tracker) -> None:
    """The trained network as an MLflow PyTorch model: ``mlflow.pytorch.load_model("runs:/<id>/model")``
    gives the ``torch.nn.Module`` (the lsnet code is bundled with it); ``config.yaml`` (the resolved
    experiment config) and ``classes.json`` (category ids and names in label order) are extra files, and
    the same metadata is in the model's MLmodel file."""
    meta = parts.checkpoint_metadata()
    classes = ctx.run_dir / "classes.json"
    classes.write_text(json.dumps({"category_ids": meta["category_ids"], "class_names": meta["class_names"]},
                                  indent=1))
    model = getattr(parts.model, "module", parts.model)  # unwrapped from DistributedDataParallel
    was_training = model.training
    model.eval()
    try:
        tracker.log_model(model, step=parts.state.global_step,
                          extra_files=[ctx.run_dir / "config.yaml", classes],
                          metadata={"task": meta["task"], "class_names": meta["class_names"],
                                    "category_ids": meta["category_ids"], "config_name": meta["config_name"],
                                    "data_config": meta["data_config"]},
                          params={"task": meta["task"], "backbone": parts.cfg.model.backbone,
                                  "num_classes": len(meta["class_names"]), "epochs": parts.state.epoch},
                          model_type=f"lsnet-{meta['task']}")
    finally:
        model.train(was_training)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry point. ``loop_config``: {"config": plain dict, "run_dir": str, "tags": {}}.

    build -> resume -> for each epoch: train, evaluate, record, checkpoint + report -> final weights.
    """
    import logging

    # Ray Train logs every report and checkpoint at INFO; the epoch summary line says what matters.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    cfg = config_from_dict(loop_config["config"])
    ctx = WorkerContext.current(loop_config["run_dir"])
    ctx.resume_from = loop_config.get("resume_from")
    try:
        _train_worker(cfg, ctx, loop_config)
    except LsnetError as err:  # bad data/config: no restart can fix it -- tell the driver, which stops the run
        _record_worker_error(ctx, err)
        raise


def _record_worker_error(ctx: WorkerContext, err: LsnetError) -> None:
    message = str(err)
    if "Original Traceback" in message:  # re-raised from a DataLoader worker process: its last line
        last = [line for line in message.splitlines() if line.strip()][-1]
        message = last.split(f"{type(err).__name__}: ", 1)[-1]
    out = ctx.run_dir / WORKER_ERRORS_DIR
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".rank{ctx.rank}.json.tmp"
    tmp.write_text(json.dumps({"rank": ctx.rank, "type": type(err).__name__, "message": one_line(message)}))
    os.replace(tmp, out / f"rank{ctx.rank}.json")


def worker_error(run_dir: Path) -> LsnetError | None:
    """The first data/config error a worker recorded (as its own error type), or None."""
    from lsnet.data.shards import ShardError
    from lsnet.modeling.backbone import PretrainedWeightsError

    types = {cls.__name__: cls for cls in (ConfigError, ShardError, InputError, PretrainedWeightsError)}
    for path in sorted((run_dir / WORKER_ERRORS_DIR).glob("rank*.json")):
        try:
            info = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        return types.get(info.get("type"), LsnetError)(f"worker {info.get('rank')}: {info.get('message')}")
    return None


def _train_worker(cfg: ExperimentConfig, ctx: WorkerContext, loop_config: dict[str, Any]) -> None:
    parts = build_training(cfg, ctx)
    resumed_from = resume_training(parts, ctx)
    _write_worker_info(ctx.run_dir, ctx.rank, ctx.world, ctx.device, resumed_from=resumed_from)
    wrap_distributed(parts, ctx)
    tracker = open_tracker(cfg, ctx, loop_config.get("tags", {}), loop_config.get("tracking_uri"))
    recorder = EpochRecorder(parts, ctx, tracker)
    injector = _FaultInjector(cfg, ctx.rank, ctx.run_dir)
    log_fn = step_logger(tracker, ctx, parts)
    status = "FAILED"
    try:
        while parts.state.epoch < cfg.train.epochs:
            start = time.perf_counter()
            summary = train_epoch(parts, ctx, injector, log_fn)
            epoch_time = time.perf_counter() - start
            done = parts.state.epoch
            evaluated = is_eval_epoch(cfg, done, parts.val_loader is not None)
            eval_metrics: dict[str, float] = {}
            if evaluated:
                result = evaluate_epoch(parts, ctx)
                if ctx.rank == 0 and result is not None:
                    eval_metrics = {k: float(v) for k, v in result.metrics.items()}
                    keep_best(parts, ctx, eval_metrics, done)
                    recorder.record_evaluation(result, done)
            share_best(parts, ctx)
            images_per_s = recorder.record_epoch(summary, epoch_time, eval_metrics)
            checkpoint_and_report(parts, ctx, epoch_report(parts, summary, images_per_s, eval_metrics, evaluated))
        save_final(parts, ctx, tracker)
        status = "FINISHED"
    finally:
        if tracker is not None:
            # A failed attempt is restarted by Ray: leave the MLflow run open (RUNNING) for it.
            if status == "FINISHED":
                tracker.close("FINISHED")
            else:
                tracker.flush()


def _write_worker_info(run_dir: Path, rank: int, world: int, device, resumed_from: dict | None) -> None:
    """``workers/rank{r}.json``: where each worker of the latest attempt ran (node id, host, pid)."""
    import socket

    import ray

    info = {"rank": rank, "world_size": world, "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(), "pid": os.getpid(), "device": str(device),
            "resumed_from": resumed_from,
            "time": _dt.datetime.now(_dt.UTC).isoformat()}
    out = run_dir / "workers"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".rank{rank}.json.tmp"
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, out / f"rank{rank}.json")


def _broadcast_object(obj: Any, rank: int) -> Any:
    import torch.distributed as dist

    holder = [obj if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------


class RunGuard:
    """Stops a Ray Train run from the driver at once: on Ctrl-C, and when a worker recorded a data
    error (``worker_errors/``), which no restart can fix.

    Ray Train's own SIGINT handler asks the controller to abort and waits for it -- which hangs when
    the worker group cannot start. Here Ctrl-C kills the controller actor (its workers die with it),
    so ``fit()`` returns within seconds; the checkpoints already on disk stay usable (a partial one
    is skipped on resume by :func:`newest_complete_checkpoint`).
    """

    def __init__(self, run_dir: Path, poll_s: float = 0.5):
        import threading

        self.run_dir, self.poll_s = run_dir, poll_s
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
                if worker_error(self.run_dir) is not None:
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
    run_dir: Path
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
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from pipelines.process_group import BoundTorchConfig
    from pipelines.ray_local import start_ray
    from pipelines.tracking import Journal, RunTracker, run_url, ui_command

    cfg = absolutize_paths(cfg)
    if cfg.train.init_from and not Path(cfg.train.init_from).is_file():
        raise ConfigError(f"train.init_from: checkpoint {cfg.train.init_from} does not exist")
    timestamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")
    name = run_name or cfg.run.name or default_run_name(cfg, timestamp)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, name=name))
    storage = cfg.run.storage_path
    if _is_uri(storage):
        # Checkpoints go to the object store; the tracking journal needs a local directory.
        run_dir = Path.home() / "lsnet_runs" / name
    else:
        run_dir = Path(storage) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())

    check_data(cfg)  # cheap checks before any worker starts
    resume_from = None if _is_uri(storage) else newest_complete_checkpoint(run_dir, log=print if verbose else None)
    if resume_from is not None and verbose:
        print(f"[resume] newest complete checkpoint: {resume_from}", flush=True)
    stale_errors = run_dir / WORKER_ERRORS_DIR
    if stale_errors.exists():  # a previous attempt's data error: this run checks afresh
        for path in stale_errors.glob("*.json"):
            path.unlink()

    # Ray Train V2 routes print() in workers through its logger *and* the console (each line twice);
    # plain prints are enough here. Propagated from the driver to the workers by Ray Train.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    start_ray(address=address, verbose=verbose)  # no-op when Ray is up; a local Ray ends with this process
    check_cluster_resources(cfg)
    from pipelines.tracking import mlflow_system_tags

    commit = git_commit()
    tags = {**mlflow_system_tags("lsnet train", commit), "git_commit": commit, "config_name": cfg.name or "",
            "dataset_manifest_sha256": manifest_hash(cfg.data.train_shards),
            "val_manifest_sha256": manifest_hash(cfg.data.val_shards) if cfg.data.val_shards else "none",
            "task": cfg.model.task, **ray_job_ids(), **(extra_tags or {})}
    tracking_uri = None
    if cfg.tracking.enabled:
        from pipelines.tracking import prepare_sqlite_store, resolve_tracking_uri

        # Resolved here, from the driver's environment: workers (started by a raylet, perhaps on another
        # node) do not share it, and must all log to the store the user asked for.
        tracking_uri = resolve_tracking_uri(cfg.tracking.uri)
        prepare_sqlite_store(tracking_uri)
    backend = "nccl" if cfg.run.use_gpu else "gloo"
    guard = RunGuard(run_dir)
    trainer = guarded_trainer(
        guard,
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "run_dir": str(run_dir), "tags": tags,
                           "tracking_uri": tracking_uri,
                           "resume_from": str(resume_from) if resume_from else None},
        torch_config=BoundTorchConfig(backend=backend),  # the rendezvous store on the node's address only
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                     resources_per_worker=cfg.run.resources_per_worker),
        run_config=RunConfig(
            name=name, storage_path=storage, callbacks=list(callbacks or []),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoint_keep,
                                               checkpoint_score_attribute="checkpoint_score",
                                               checkpoint_score_order="max"),
        ),
    )

    def end_mlflow_run(status: str) -> None:
        if cfg.tracking.enabled and Journal.exists(run_dir) and Journal(run_dir).end_status() != "FINISHED":
            # The workers are gone: the driver ends the MLflow run (same run, same journal).
            # (Not when rank 0 had finished: a Tune trial stopped right after its last report.)
            RunTracker(run_dir, background=False, verbose=verbose).close(status, final_flush_timeout_s=5)

    def interrupted() -> KeyboardInterrupt:
        end_mlflow_run("KILLED")
        latest = newest_complete_checkpoint(run_dir) if not _is_uri(storage) else None
        print(f"lsnet train: interrupted; MLflow run marked KILLED; latest complete checkpoint: "
              f"{latest or 'none'}; rerun with --name {name} to resume from it", file=sys.stderr, flush=True)
        return KeyboardInterrupt()

    try:
        with guard.watching():
            result = trainer.fit()
    except KeyboardInterrupt:
        guard.stop("interrupted")
        raise interrupted() from None
    except Exception:
        if guard.reason == "interrupted":
            raise interrupted() from None
        end_mlflow_run("FAILED")
        data_error = worker_error(run_dir)
        if data_error is not None:  # not retryable: the worker's own one-line message
            raise data_error from None
        raise
    best = None
    if result.best_checkpoints:
        best = max(result.best_checkpoints, key=lambda cm: cm[1].get("checkpoint_score", -1.0))[0].path
    tracking_uri = run_id = None
    if cfg.tracking.enabled and Journal.exists(run_dir):
        state = Journal(run_dir).state
        tracking_uri, run_id = state.get("tracking_uri"), state.get("run_id")
    outcome = TrainingOutcome(run_dir=run_dir, run_name=name, metrics=dict(result.metrics or {}),
                              checkpoint_path=result.checkpoint.path if result.checkpoint else None,
                              best_checkpoint_path=best, tracking_uri=tracking_uri, mlflow_run_id=run_id)
    if verbose:
        print(f"run directory: {run_dir}")
        print(f"latest checkpoint: {outcome.checkpoint_path}; best: {outcome.best_checkpoint_path}")
        if tracking_uri:
            print(f"MLflow run {run_id} at {tracking_uri}; open the UI with:\n  {ui_command(tracking_uri)}")
            if state.get("experiment_id"):
                print(f"  then {run_url(tracking_uri, state['experiment_id'], run_id)}")
    return outcome


# --------------------------------------------------------------------------------------------------
# lsnet train
# --------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment config YAML (configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=2 (repeatable)")
    parser.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (run.num_workers)")
    parser.add_argument("--gpus", action="store_true", help="one GPU per worker (run.use_gpu=true)")
    parser.add_argument("--cpus", action="store_true", help="train on CPU (run.use_gpu=false)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster: 'auto' (the running cluster), 'ray://HOST:10001', or unset (local)")
    parser.add_argument("--name", default=None, help="run name (default: <config>-<UTC time>)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.num_workers is not None:
        overrides.append(f"run.num_workers={args.num_workers}")
    if args.gpus and args.cpus:
        raise InputError("--gpus and --cpus exclude each other")
    if args.gpus:
        overrides.append("run.use_gpu=true")
    if args.cpus:
        overrides += ["run.use_gpu=false", "run.resources_per_worker=null"]
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    outcome = run_training(cfg, address=args.address, run_name=args.name)
    print(json.dumps({k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float, str))}, indent=1))
    return 0
