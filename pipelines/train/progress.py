"""What a run tells: rank 0's step and epoch lines on the console, ``epochs.jsonl``, and every metric,
table, overlay, curve and model it sends to MLflow (through :class:`pipelines.tracking.tracker.RunTracker`).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any

import torch

from lsnet.config import flatten, to_dict
from pipelines.config import ExperimentConfig
from pipelines.train.parts import TrainingParts, WorkerContext

LOSS_KEYS = ("loss", "loss_cls", "loss_vec_init", "loss_vec_refine", "loss_box_init", "loss_box_refine")


#: per-step training metrics that are not losses: the mean IoU of the output boxes at the positives
#: (paper Figure 4, lsnet.modeling.detector.compute_losses)
STEP_METRIC_KEYS = ("pos_iou",)


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


def open_tracker(cfg: ExperimentConfig, ctx: WorkerContext, tags: dict[str, Any]):
    """Rank 0's MLflow run (pipelines.tracking.tracker: journaled, survives outages and worker restarts);
    None on other ranks or with tracking off. ``cfg.tracking.uri`` is the store the driver resolved (a
    worker's own environment may name another one, or none)."""
    if ctx.rank != 0 or not cfg.tracking.enabled:
        return None
    from pipelines.tracking.tracker import RunTracker, shard_dataset

    tracker = RunTracker(ctx.run_dir, cfg.tracking.uri, cfg.tracking.experiment, ctx.run_dir.name,
                         flush_interval_s=cfg.tracking.flush_interval_s,
                         retry_interval_s=cfg.tracking.retry_interval_s)
    tracker.reopen()  # a run that ended (KILLED by an interrupted driver, FAILED) and resumes: RUNNING again
    tracker.log_params(flatten(to_dict(cfg)))
    tracker.set_tags({**tags, "num_workers": ctx.world, "device": ctx.device.type})
    tracker.log_datasets([shard_dataset(cfg.data.train_shards, "train")]
                         + ([shard_dataset(cfg.data.val_shards, "val")] if cfg.data.val_shards else []))
    config_file = ctx.run_dir / "config.yaml"
    if config_file.exists():
        tracker.log_artifact(config_file, "config")
    return tracker


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
