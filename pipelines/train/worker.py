"""What runs on each Ray Train worker: :func:`train_loop_per_worker`.

build -> resume -> for each epoch: train, evaluate (every ``train.eval_every`` epochs, all workers'
predictions gathered on rank 0), record, checkpoint + report to Ray -> final weights. The loop itself is
:func:`run_worker`, one screen; its steps live in :mod:`~pipelines.train.parts` (building, resuming) and
:mod:`~pipelines.train.progress` (what is printed and logged).
"""
from __future__ import annotations

import contextlib
import io
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lsnet.errors import LsnetError
from pipelines.config import ExperimentConfig, config_from_dict
from pipelines.train.parts import (
    FaultInjector,
    TrainingParts,
    WorkerContext,
    broadcast_object,
    build_training,
    resume_training,
    wrap_distributed,
)
from pipelines.train.progress import EpochRecorder, open_tracker, save_final, step_logger
from pipelines.train.rundir import record_worker_error, write_worker_info


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train worker entry point. ``loop_config``: {"config": plain dict, "run_location": the run's
    location (a path or a URI, see :mod:`pipelines.train.rundir`), "tags": {}, "resume_from": ...}.

    build -> resume -> for each epoch: train, evaluate, record, checkpoint + report -> final weights.
    """
    import logging

    # Ray Train logs every report and checkpoint at INFO; the epoch summary line says what matters.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    cfg = config_from_dict(loop_config["config"])
    ctx = WorkerContext.current(loop_config["run_location"])
    ctx.resume_from = loop_config.get("resume_from")
    try:
        run_worker(cfg, ctx, loop_config["tags"])
    except LsnetError as err:  # bad data/config: no restart can fix it -- tell the driver, which stops the run
        record_worker_error(ctx.location, ctx.rank, err)
        raise


def run_worker(cfg: ExperimentConfig, ctx: WorkerContext, tags: dict[str, Any]) -> None:
    """The training loop of one worker; ``tags``: the MLflow run tags the driver composed."""
    parts = build_training(cfg, ctx)
    resumed_from = resume_training(parts, ctx)
    write_worker_info(ctx.location, ctx.rank, ctx.world, ctx.device, resumed_from=resumed_from)
    wrap_distributed(parts, ctx)
    tracker = open_tracker(cfg, ctx, tags)
    recorder = EpochRecorder(parts, ctx, tracker)
    injector = FaultInjector(cfg, ctx.rank, ctx.location)
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
            store_records(ctx, tracker)
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
        if ctx.rank == 0:
            ctx.run.push()


def store_records(ctx: WorkerContext, tracker) -> None:
    """Rank 0, before the epoch's checkpoint: the run's records (``epochs.jsonl``, ``model_best.pt``, the
    tracking journal, ...) to the run's location, so the attempt that resumes from this checkpoint -- on
    any node -- and the driver find them there (a no-op for a local run directory)."""
    if ctx.rank != 0 or not ctx.run.remote:
        return
    if tracker is not None:
        tracker.flush()  # the journal's sync state with the epoch's metrics on the server
    ctx.run.push()


def train_epoch(parts: TrainingParts, ctx: WorkerContext, injector: FaultInjector, log_fn) -> dict[str, float]:
    """One epoch over this rank's share; returns the epoch's loss summary (engine.train_one_epoch)."""
    from lsnet.engine import train_one_epoch

    batches = parts.epoch_batches(parts.state.epoch, ctx)
    return train_one_epoch(parts.model, injector.wrap(batches, parts.state), parts.optimizer, parts.scheduler,
                           parts.scaler, parts.state, log_fn, cfg=parts.cfg.train, device=ctx.device)


def is_eval_epoch(cfg: ExperimentConfig, done: int, has_val: bool) -> bool:
    """Evaluate after every ``train.eval_every`` epochs and after the last one."""
    from lsnet import engine

    return has_val and engine.is_eval_epoch(done, cfg.train.epochs, cfg.train.eval_every)  # fit's policy


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
    from lsnet.engine import checkpoint_state, is_improvement, save_checkpoint

    state = parts.state
    score = eval_metrics.get(parts.cfg.primary_metric, -1.0)
    if is_improvement(score, state.best_metric):
        state.best_metric, state.best_epoch = score, done
        save_checkpoint(checkpoint_state(parts.model, state=state, extra=parts.checkpoint_metadata(),
                                         include_rng=False), ctx.run_dir / "model_best.pt")


def share_best(parts: TrainingParts, ctx: WorkerContext) -> None:
    """The best score lives in the checkpointed TrainState: every rank must hold rank 0's value."""
    if ctx.world > 1:
        state = parts.state
        state.best_metric, state.best_epoch = broadcast_object((state.best_metric, state.best_epoch), ctx.rank)


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
