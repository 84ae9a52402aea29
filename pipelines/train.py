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
from pipelines.config import ExperimentConfig, config_from_dict, default_run_name, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
LOSS_KEYS = ("loss", "loss_cls", "loss_vec_init", "loss_vec_refine")
#: per-step training metrics that are not losses: the mean IoU of the output boxes at the positives
#: (paper Figure 4, lsnet.modeling.detector.compute_losses)
STEP_METRIC_KEYS = ("pos_iou",)
FAULT_MARKER = "fault_injected.marker"


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
    return dataclasses.replace(cfg, data=data, run=run)


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


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry point. ``loop_config``: {"config": plain dict, "run_dir": str, "tags": {}}."""
    import logging

    import ray.train
    import ray.train.torch
    import ray.train.v2._internal.execution.context as ray_train_context
    from torch.nn.parallel import DistributedDataParallel

    from lsnet.engine import (
        TrainState,
        build_grad_scaler,
        build_optimizer,
        build_scheduler,
        checkpoint_state,
        evaluate_detailed,
        get_rng_state,
        load_checkpoint,
        load_checkpoint_state,
        save_checkpoint,
        seed_everything,
        set_rng_state,
        train_one_epoch,
    )
    from lsnet.evaluation import format_per_category
    from lsnet.modeling import build_model

    # Ray Train logs every report and checkpoint at INFO; the epoch summary line says what matters.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger(ray_train_context.__file__).setLevel(logging.WARNING)  # (Ray names it by file)
    cfg = config_from_dict(loop_config["config"])
    run_dir = Path(loop_config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
    primary = cfg.primary_metric

    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    if use_cuda and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_ds, sampler, train_loader, val_ds, val_loader = _build_loaders(cfg, rank, world, use_cuda)
    iters_per_epoch = len(train_loader)

    def epoch_batches(epoch: int):
        """This rank's batches of ``epoch``: the DataLoader over the memory-mapped shards, or the same
        samples streamed by Ray Data tasks (pipelines.datasets) with this rank's sampler share."""
        if cfg.data.reader == "shards":
            return train_loader
        from pipelines.datasets import build_ray_dataset, iter_ray_batches

        m, d = cfg.model, cfg.data
        ds = build_ray_dataset(d.train_shards, task=m.task, num_points=m.num_points, pose_box=m.pose_box,
                               train=True, scale_range=tuple(d.scale_range), max_size=d.max_size,
                               flip_prob=d.flip_prob, seed=cfg.train.seed, epoch=epoch, rank=rank,
                               world_size=world, shuffle=True, drop_last=True, verify="none")
        return iter_ray_batches(ds, cfg.train.batch_size)

    optimizer = build_optimizer(model, cfg.train, global_batch=cfg.train.batch_size * world)
    scheduler = build_scheduler(optimizer, cfg.train, iters_per_epoch)
    scaler = build_grad_scaler(cfg.train, device)
    state = TrainState()
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as ckpt_dir:
            ckpt = load_checkpoint(Path(ckpt_dir) / "state.pt", map_location=device)
            state = load_checkpoint_state(ckpt, model, optimizer, scheduler, scaler, restore_rng=False)
            rng_path = Path(ckpt_dir) / f"rng_rank{rank}.pt"
            if rng_path.exists():  # same world size as before: continue this rank's random streams
                set_rng_state(torch.load(rng_path, weights_only=True))
        if rank == 0:
            print(f"[resume] from epoch {state.epoch}, step {state.global_step} ({resumed.path})", flush=True)
    _write_worker_info(run_dir, rank, world, device,
                       resumed_from=None if resumed is None else {"epoch": state.epoch, "step": state.global_step})
    ddp_model = DistributedDataParallel(
        model, device_ids=[device.index] if use_cuda else None,
        find_unused_parameters=cfg.run.find_unused_parameters,
    ) if world > 1 else model

    tracker = None
    if rank == 0 and cfg.tracking.enabled:
        from pipelines.tracking import RunTracker

        tracker = RunTracker(run_dir, cfg.tracking.uri, cfg.tracking.experiment, run_dir.name,
                             flush_interval_s=cfg.tracking.flush_interval_s,
                             retry_interval_s=cfg.tracking.retry_interval_s)
        tracker.log_params(flatten(to_dict(cfg)))
        tracker.set_tags({**loop_config.get("tags", {}), "num_workers": world, "device": device.type})
        config_file = run_dir / "config.yaml"
        if config_file.exists():
            tracker.log_artifact(config_file, "config")

    def log_fn(step: int, values: dict[str, float]) -> None:
        if tracker is None:
            return
        metrics = {k: v for k, v in values.items()
                   if k in LOSS_KEYS or k in STEP_METRIC_KEYS or k in ("lr", "grad_norm")}
        # the rank-0 rate times the number of workers (all ranks take the same number of steps)
        metrics["images_per_s"] = values["images_per_s"] * world
        if use_cuda:
            metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        tracker.log_metrics(metrics, step)

    extra = {"task": cfg.model.task, "category_ids": train_ds.category_ids,
             "class_names": [c["name"] for c in train_ds.categories],
             "model_config": to_dict(cfg.model), "config_name": cfg.name or ""}
    injector = _FaultInjector(cfg, rank, run_dir)
    gt = cfg.data.val_ann or (val_ds.gt_path if val_ds is not None else None)
    epoch_times: list[float] = []
    status = "FAILED"
    try:
        while state.epoch < cfg.train.epochs:
            epoch = state.epoch
            train_ds.set_epoch(epoch)
            sampler.set_epoch(epoch)
            start = time.perf_counter()
            summary = train_one_epoch(ddp_model, injector.wrap(epoch_batches(epoch), state), optimizer, scheduler,
                                      scaler, state, log_fn, cfg=cfg.train, device=device)
            epoch_time = time.perf_counter() - start
            epoch_times.append(epoch_time)
            done = state.epoch
            eval_metrics: dict[str, float] = {}
            evaluated = val_loader is not None and (done % cfg.train.eval_every == 0 or done == cfg.train.epochs)
            if evaluated:
                with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' tables: we log the numbers
                    result = evaluate_detailed(
                        ddp_model, val_loader, gt, val_ds.category_ids, cfg.model.task,
                        gather_fn=lambda items: _gather_to_rank0(items, rank, world), device=device,
                        amp=use_cuda and cfg.train.amp,
                    )
                if rank == 0 and result is not None:
                    eval_metrics = {k: float(v) for k, v in result.metrics.items()}
                    score = eval_metrics.get(primary, -1.0)
                    if state.best_metric is None or score > state.best_metric:
                        state.best_metric, state.best_epoch = score, done
                        save_checkpoint(checkpoint_state(ddp_model, state=state, extra=extra, include_rng=False),
                                        run_dir / "model_best.pt")
                    if tracker is not None:
                        eval_dir = run_dir / "eval"
                        eval_dir.mkdir(exist_ok=True)
                        for iou_type, rows in result.per_category.items():
                            table = eval_dir / f"per_category_{iou_type}_epoch{done:04d}.txt"
                            table.write_text(format_per_category(rows) + "\n")
                            tracker.log_artifact(table, "eval")
                        for png in _write_overlays(ddp_model, val_ds, cfg, run_dir / "overlays" / f"epoch_{done:04d}",
                                                   device):
                            tracker.log_artifact(png, f"overlays/epoch_{done:04d}")
            # best_metric lives in the checkpointed TrainState: every rank must hold the same value
            if world > 1:
                shared = _broadcast_object((state.best_metric, state.best_epoch), rank)
                state.best_metric, state.best_epoch = shared
            images_per_s = summary.get("images_per_s", 0.0) * world
            remaining = cfg.train.epochs - done
            eta = remaining * (sum(epoch_times) / len(epoch_times))
            if rank == 0:
                print(epoch_summary_line(done, cfg.train.epochs, summary, epoch_time, eta, eval_metrics,
                                         primary, images_per_s), flush=True)
                with (run_dir / "epochs.jsonl").open("a") as fh:  # one line per epoch (and per attempt)
                    fh.write(json.dumps({"epoch": done, "global_step": state.global_step, "world_size": world,
                                         "epoch_time_s": epoch_time, "images_per_s": images_per_s,
                                         **{k: v for k, v in summary.items() if k != "images_per_s"},
                                         **eval_metrics}) + "\n")
                if tracker is not None:
                    epoch_metrics = {f"epoch_{k}": summary[k] for k in LOSS_KEYS + STEP_METRIC_KEYS if k in summary}
                    epoch_metrics.update(epoch=float(done), epoch_time_s=epoch_time,
                                         epoch_images_per_s=images_per_s, **eval_metrics)
                    tracker.log_metrics(epoch_metrics, state.global_step)
            report = {"epoch": done, "global_step": state.global_step, "loss": summary.get("loss", math.nan),
                      "images_per_s": images_per_s, "node_id": ray.get_runtime_context().get_node_id(),
                      # the checkpoint ranking key: the task's AP when evaluated, else -1 (Ray keeps
                      # the top `checkpoint_keep` by it, plus always the latest)
                      "checkpoint_score": eval_metrics.get(primary, -1.0) if evaluated else -1.0,
                      **eval_metrics}
            with tempfile.TemporaryDirectory() as tmp:
                if rank == 0:
                    save_checkpoint(checkpoint_state(ddp_model, optimizer, scheduler, scaler, state, extra=extra,
                                                     include_rng=False), Path(tmp) / "state.pt")
                torch.save(get_rng_state(), Path(tmp) / f"rng_rank{rank}.pt")
                ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"checkpoint_epoch_{done:04d}")
        if rank == 0:
            final = save_checkpoint(checkpoint_state(ddp_model, state=state, extra=extra, include_rng=False),
                                    run_dir / "model_final.pt")
            if tracker is not None:
                tracker.log_artifact(final, "checkpoints")
                if (run_dir / "model_best.pt").exists():
                    tracker.log_artifact(run_dir / "model_best.pt", "checkpoints")
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
                 verbose: bool = True, extra_tags: dict[str, str] | None = None) -> TrainingOutcome:
    """Train ``cfg`` with a Ray Train ``TorchTrainer``; connects to ``address`` (``auto``,
    ``ray://host:10001``) or starts/uses a local Ray. ``extra_tags`` go onto the MLflow run (e.g.
    ``mlflow.parentRunId`` of an ablation's parent run)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.tracking import Journal, RunTracker, ui_command

    cfg = absolutize_paths(cfg)
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

    # Ray Train V2 routes print() in workers through its logger *and* the console (each line twice);
    # plain prints are enough here. Propagated from the driver to the workers by Ray Train.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=verbose, configure_logging=False)
    tags = {"git_commit": git_commit(), "config_name": cfg.name or "",
            "dataset_manifest_sha256": manifest_hash(cfg.data.train_shards),
            "val_manifest_sha256": manifest_hash(cfg.data.val_shards) if cfg.data.val_shards else "none",
            "task": cfg.model.task, **ray_job_ids(), **(extra_tags or {})}
    if cfg.tracking.enabled:
        from pipelines.tracking import prepare_sqlite_store, resolve_tracking_uri

        prepare_sqlite_store(resolve_tracking_uri(run_dir, cfg.tracking.uri))
    backend = "nccl" if cfg.run.use_gpu else "gloo"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "run_dir": str(run_dir), "tags": tags},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                     resources_per_worker=cfg.run.resources_per_worker),
        run_config=RunConfig(
            name=name, storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoint_keep,
                                               checkpoint_score_attribute="checkpoint_score",
                                               checkpoint_score_order="max"),
        ),
    )
    try:
        result = trainer.fit()
    except Exception:
        if cfg.tracking.enabled and Journal.exists(run_dir):
            # The workers are gone: the driver ends the MLflow run as FAILED (same run, same journal).
            RunTracker(run_dir, background=False, verbose=verbose).close("FAILED", final_flush_timeout_s=5)
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
        print("lsnet train: --gpus and --cpus exclude each other", file=sys.stderr)
        return 2
    if args.gpus:
        overrides.append("run.use_gpu=true")
    if args.cpus:
        overrides += ["run.use_gpu=false", "run.resources_per_worker=null"]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"lsnet train: invalid config: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    try:
        outcome = run_training(cfg, address=args.address, run_name=args.name)
    except ConfigError as err:
        print(f"lsnet train: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float, str))}, indent=1))
    return 0
