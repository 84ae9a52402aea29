"""What one worker trains with: its place in the group (:class:`WorkerContext`), the model, optimiser,
schedule and loaders (:class:`TrainingParts`), resuming from a checkpoint and the DDP wrap.

Each worker gets its own share of the Arrow shards (:class:`lsnet.data.shards.ShardSampler` with its rank
and the world size) and the learning rate scaled by the global batch; DDP runs on gloo (CPU) or NCCL (GPU,
with AMP and channels-last). A restarted worker group resumes with the same step count, optimiser,
scheduler, sampler position (the sample order is a function of ``(seed, epoch)``) and RNG state -- on CPU
the resumed run ends with exactly the weights of an uninterrupted one.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lsnet import storage
from lsnet.config import ConfigError, to_dict
from pipelines.config import ExperimentConfig
from pipelines.train.rundir import FAULT_MARKER, checkpoint_epoch, run_mirror


def test_time_data_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """The data settings a checkpoint needs at test time (``lsnet.predict.load_model`` reads them)."""
    return {"test_scale": cfg.data.test_scale, "max_size": cfg.data.max_size, "flip_test": cfg.eval.flip_test}


def sample_settings(cfg: ExperimentConfig, train: bool) -> dict[str, Any]:
    """How a sample is made from a shard row, the same for the shard reader (``ShardDataset``) and the Ray
    Data reader (``build_ray_dataset``): task targets, scales, flips (training) or test size (validation)."""
    m, d = cfg.model, cfg.data
    settings = {"task": m.task, "num_points": m.num_points, "pose_box": m.pose_box, "train": train,
                "scale_range": tuple(d.scale_range), "max_size": d.max_size, "seed": cfg.train.seed}
    if train:
        settings["flip_prob"] = d.flip_prob
    else:
        settings["test_short_side"] = d.test_scale
    return settings


def _build_loaders(cfg: ExperimentConfig, rank: int, world: int, use_cuda: bool):
    from torch.utils.data import DataLoader

    from lsnet.data.shards import ShardDataset, ShardSampler, collate_batch

    m, d = cfg.model, cfg.data
    train_ds = ShardDataset(d.train_shards, **sample_settings(cfg, train=True), verify=d.verify)
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
        val_ds = ShardDataset(d.val_shards, **sample_settings(cfg, train=False), verify=d.verify)
        n_val = len(val_ds) if d.max_val_images is None else min(len(val_ds), d.max_val_images)
        # every validation image exactly once across ranks (uneven shares are fine: no collectives)
        val_sampler = ShardSampler(n_val, rank, world, shuffle=False, drop_last=False)
        val_loader = DataLoader(val_ds, batch_size=d.val_batch_size, sampler=val_sampler,
                                collate_fn=collate_batch, num_workers=d.loader_workers, pin_memory=use_cuda)
    return train_ds, train_sampler, train_loader, val_ds, val_loader


def gather_to_rank0(items: list, rank: int, world: int) -> list | None:
    import torch.distributed as dist

    if world == 1 or not dist.is_initialized():
        return items
    parts: list = [None] * world
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part] if rank == 0 else None


def broadcast_object(obj: Any, rank: int) -> Any:
    import torch.distributed as dist

    holder = [obj if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


class FaultInjector:
    """Test-only: worker ``fail_rank`` exits abruptly right after optimiser step ``fail_at_step`` — once
    per run (the marker at the run's location makes the restarted attempt run through, on any node)."""

    def __init__(self, cfg: ExperimentConfig, rank: int, location: str):
        self.step = cfg.run.fail_at_step
        self.armed = self.step is not None and rank == cfg.run.fail_rank
        self.marker = storage.join(location, FAULT_MARKER)

    def wrap(self, batches, state):
        for batch in batches:
            yield batch
            # the generator resumes only when the next batch is asked for: the step is complete
            if self.armed and state.global_step == self.step and not storage.exists(self.marker):
                import ray.train

                # Ray's controller registers reported checkpoints when it polls the workers (every
                # few seconds); wait for that so the restart deterministically resumes from the
                # latest one rather than from an earlier one.
                ray.train.get_all_reported_checkpoints(timeout_s=120)
                storage.write_text(self.marker, f"worker exited after step {self.step}\n")
                print(f"[fault injection] worker exits after step {self.step}", flush=True)
                os._exit(1)


@dataclass
class WorkerContext:
    """Where this worker runs: its rank in a group of ``world`` workers, its device, the run's location
    (a path or a URI: never a path of the driver's disk unless that is shared) and this node's working
    copy of the run directory (``run_dir``, :func:`pipelines.train.rundir.run_mirror`)."""

    rank: int
    world: int
    device: torch.device
    #: this worker's local copy of the run directory (the directory itself for a local location)
    run_dir: Path
    #: the newest complete checkpoint the driver found at the run's location (None: Ray's checkpoint only)
    resume_from: str | None = None
    #: the run's location and its local copy (default: ``run_dir`` is the location)
    run: storage.MirroredDir | None = None

    def __post_init__(self) -> None:
        if self.run is None:
            self.run = storage.MirroredDir(str(self.run_dir))

    @property
    def location(self) -> str:
        """Where the run lives (a path or a URI): what every node reads and writes."""
        return self.run.location

    @property
    def use_cuda(self) -> bool:
        return self.device.type == "cuda"

    @classmethod
    def current(cls, location: str) -> WorkerContext:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        device = ray.train.torch.get_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        rank = ctx.get_world_rank()
        run = run_mirror(str(location))
        if rank == 0:  # rank 0 appends to the run's records (journal, epochs.jsonl): start from the stored ones
            run.pull()
        run.local.mkdir(parents=True, exist_ok=True)
        return cls(rank, ctx.get_world_size(), device, run.local, run=run)

    def gather(self, items: list) -> list | None:
        return gather_to_rank0(items, self.rank, self.world)


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

        ds = build_ray_dataset(self.cfg.data.train_shards, **sample_settings(self.cfg, train=True), epoch=epoch,
                               rank=ctx.rank, world_size=ctx.world, shuffle=True, drop_last=True, verify="none")
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


def newest_stored_checkpoint(ctx: WorkerContext) -> str | None:
    """The newest complete checkpoint at the run's location (or the one the driver found), as rank 0 sees
    it: every rank resumes from the same one."""
    import torch.distributed as dist

    from pipelines.train.rundir import newest_complete_checkpoint

    shared = ctx.world > 1 and dist.is_initialized()
    found = None
    if ctx.rank == 0 or not shared:
        found = newest_complete_checkpoint(ctx.location) or ctx.resume_from
        found = str(found) if found else None
    return broadcast_object(found, ctx.rank) if shared else found


def resume_training(parts: TrainingParts, ctx: WorkerContext) -> dict[str, int] | None:
    """Continue from Ray Train's latest checkpoint if there is one (a restarted worker group, or a
    restored Tune trial): weights, optimiser, schedule, scaler, counters and this rank's RNG streams.
    Returns ``{"epoch", "step"}`` resumed from, or None for a fresh start."""
    import ray.train

    from lsnet.engine import load_checkpoint, load_checkpoint_state, set_rng_state

    resumed = ray.train.get_checkpoint()
    on_disk = newest_stored_checkpoint(ctx)
    if on_disk and (resumed is None or checkpoint_epoch(on_disk) > checkpoint_epoch(resumed.path)):
        # Ray's own record of the run lags behind the storage -- after a Ctrl-C, or when a worker died
        # before Ray's controller had registered the checkpoint the workers had already stored (it polls
        # them every few seconds): take the newest complete one.
        resumed = ray.train.Checkpoint(on_disk) if storage.is_uri(on_disk) else ray.train.Checkpoint.from_directory(on_disk)
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
