"""A plain, single-process training loop for LSNet (no Ray, no MLflow).

The distributed pipeline (``pipelines/train/worker.py``) runs exactly these functions inside each Ray
Train worker: it wraps the model in DDP, hands :func:`train_one_epoch` that worker's batches, passes a
``gather_fn`` to :func:`evaluate_detailed` so that COCO metrics are computed over every worker's
predictions, and decides when to evaluate and what is a new best with :func:`is_eval_epoch` and
:func:`is_improvement` -- the same epoch policy as :func:`fit`, the single-process loop.

Training recipe (paper §4, "Training"; the mmdetection 2.x 1x schedule the authors used):

- SGD, momentum 0.9, weight decay 1e-4, learning rate 0.01 per 16 images, scaled linearly with the
  global batch (Goyal et al., 2017): :func:`scaled_lr`.
- Linear warmup over the first 500 iterations from 0.001x, then x0.1 at epochs 8 and 11 of 12.
  The schedule is a pure function of the optimiser step (:func:`lr_factor`) so that a resumed run
  continues on exactly the same curve.
- Gradient clipping at a global L2 norm of 35; mixed precision only on CUDA.

Everything a resumed run needs to continue bit-identically (on CPU) is in the checkpoint: model,
optimiser (momentum buffers), scheduler, AMP scaler, :class:`TrainState` and the torch / NumPy /
Python RNG states, all stored as tensors and plain Python values so that
``torch.load(path, weights_only=True)`` reads it.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from lsnet.atomic import atomic_write
from lsnet.config import check_range
from lsnet.evaluation import (
    TASK_IOU_TYPES,
    TASK_MAIN_METRIC,
    CocoEvaluation,
    detections_to_coco,
    evaluate_coco_detailed,
)
from lsnet.structures import Batch, Detections, ImageMeta

#: Version of the checkpoint layout written by :func:`checkpoint_state`.
CHECKPOINT_FORMAT = 1


@dataclass
class TrainConfig:
    """Optimisation settings (the ``train:`` section of an experiment config).

    ``batch_size`` is per worker; the learning rate follows the *global* batch
    (``batch_size * num_workers``), see :func:`scaled_lr`.
    """

    epochs: int = 12
    lr_steps: tuple[int, ...] = (8, 11)  # epochs after which the lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    lr_per_16_images: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    # Weight decay on biases and normalisation scales/shifts (every parameter with ndim <= 1):
    # True (default) = plain SGD decay on every trainable parameter, as the paper (wd 1e-4) and the
    # reference (mmdetection's SGD without paramwise options) train; False = no decay on them
    # (a common modern choice: decaying them pulls GN/BN affine terms and biases towards 0 without
    # regularising any filter).
    decay_norm_and_bias: bool = True
    # A checkpoint whose *model weights* start this run (e.g. Table 5's kps-box models fine-tune the
    # obj-box model): optimiser, scheduler, epoch and RNG start fresh. Distinct from resuming, which
    # continues a run exactly; a resume takes precedence (its weights already include the init).
    init_from: str | None = None
    warmup_iters: int = 500
    warmup_ratio: float = 0.001  # lr at step 0 = warmup_ratio * lr
    grad_clip: float | None = 35.0  # max global L2 norm; None = no clipping
    amp: bool = True  # mixed precision; only takes effect on CUDA
    amp_dtype: Literal["float16", "bfloat16"] = "float16"
    channels_last: bool = False  # NHWC memory format for images (and the model, in fit())
    batch_size: int = 2  # images per worker and step
    seed: int = 0
    log_every: int = 20  # call log_fn every this many optimiser steps
    eval_every: int = 1  # evaluate every this many epochs in fit() (and after the last)

    def __post_init__(self) -> None:
        # Range checks (a config with epochs 0 would write an untrained "final" model).
        check_range(self.epochs, "epochs", ge=1)
        for step in self.lr_steps:
            check_range(step, "lr_steps", ge=1)
        check_range(self.lr_gamma, "lr_gamma", gt=0)
        check_range(self.lr_per_16_images, "lr_per_16_images", gt=0)
        check_range(self.momentum, "momentum", ge=0, lt=1)
        check_range(self.weight_decay, "weight_decay", ge=0)
        check_range(self.warmup_iters, "warmup_iters", ge=0)
        check_range(self.warmup_ratio, "warmup_ratio", gt=0, le=1)
        check_range(self.grad_clip, "grad_clip", gt=0)
        check_range(self.batch_size, "batch_size", ge=1)
        check_range(self.log_every, "log_every", ge=1)
        check_range(self.eval_every, "eval_every", ge=1)


@dataclass
class TrainState:
    """Progress counters saved in every checkpoint.

    ``epoch`` = number of *completed* epochs (= the index of the next epoch to run);
    ``global_step`` = number of optimiser steps taken so far (drives the lr schedule).
    """

    epoch: int = 0
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# --------------------------------------------------------------------------------------------------
# Optimiser, schedule, precision
# --------------------------------------------------------------------------------------------------


def scaled_lr(cfg: TrainConfig, global_batch: int) -> float:
    """Linear scaling rule: ``lr_per_16_images * global_batch / 16``."""
    if global_batch <= 0:
        raise ValueError(f"global batch must be positive, got {global_batch}")
    return cfg.lr_per_16_images * global_batch / 16.0


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel/DataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def parameter_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Trainable parameters split into a weight-decay group and a no-decay group.

    With ``cfg.decay_norm_and_bias`` (default, as the paper) every parameter decays; otherwise
    biases and normalisation parameters -- every parameter with ``ndim <= 1`` (conv/linear biases,
    BatchNorm/GroupNorm weight and bias, scalar scales) -- go to a no-decay group. Frozen parameters
    (``requires_grad == False``) are left out.
    """
    decay, no_decay = [], []
    for _, param in unwrap_model(model).named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 and not cfg.decay_norm_and_bias else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig, global_batch: int) -> torch.optim.SGD:
    """SGD with momentum at the linearly scaled lr, param groups from :func:`parameter_groups`."""
    groups = parameter_groups(model, cfg)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.SGD(groups, lr=scaled_lr(cfg, global_batch), momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def lr_factor(step: int, milestones: Sequence[int], gamma: float, warmup_iters: int, warmup_ratio: float) -> float:
    """Multiplier of the base lr at optimiser step ``step`` (0-based).

    Step decay: ``gamma ** (number of milestones <= step)``. Linear warmup on top of it for
    ``step < warmup_iters``: from ``warmup_ratio`` at step 0 rising linearly to 1 at ``warmup_iters``
    (mmdetection's 'linear' warmup).
    """
    factor = gamma ** sum(step >= m for m in milestones)
    if step < warmup_iters:
        factor *= 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
    return factor


class WarmupStepLR(LRScheduler):
    """lr = base_lr * :func:`lr_factor` (step), with ``step`` = number of ``scheduler.step()`` calls.

    Call ``scheduler.step()`` once after every optimiser step. Closed form, no chained updates, so
    the lr after loading a state dict is exactly that of an uninterrupted run.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, milestones: Sequence[int], gamma: float = 0.1,
                 warmup_iters: int = 500, warmup_ratio: float = 0.001, last_epoch: int = -1):
        self.milestones = [int(m) for m in milestones]
        self.gamma = float(gamma)
        self.warmup_iters = int(warmup_iters)
        self.warmup_ratio = float(warmup_ratio)
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int | None = None) -> float:
        step = self.last_epoch if step is None else step
        return lr_factor(step, self.milestones, self.gamma, self.warmup_iters, self.warmup_ratio)

    def get_lr(self) -> list[float]:
        f = self.factor()
        return [base * f for base in self.base_lrs]

    _get_closed_form_lr = get_lr


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, iters_per_epoch: int) -> WarmupStepLR:
    """Warmup + step schedule with the epoch milestones converted to optimiser steps."""
    if iters_per_epoch <= 0:
        raise ValueError(f"iters_per_epoch must be positive, got {iters_per_epoch}")
    return WarmupStepLR(optimizer, [e * iters_per_epoch for e in cfg.lr_steps], cfg.lr_gamma,
                        cfg.warmup_iters, cfg.warmup_ratio)


def amp_enabled(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.amp and torch.device(device).type == "cuda"


def build_grad_scaler(cfg: TrainConfig, device: torch.device | str) -> torch.amp.GradScaler:
    """Loss scaler for float16 AMP on CUDA; a disabled (pass-through) scaler otherwise."""
    device = torch.device(device)
    enabled = amp_enabled(cfg, device) and cfg.amp_dtype == "float16"
    return torch.amp.GradScaler(device.type if device.type == "cuda" else "cpu", enabled=enabled)


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(unwrap_model(model).parameters()).device
    except StopIteration:
        return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """torch (CPU + CUDA), NumPy and Python RNG states as tensors and plain values (weights_only-safe)."""
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"name": str(np_name), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "python": {"version": int(py_version), "state": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`get_rng_state`. CUDA states are restored only when the device count matches."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

LogFn = Callable[[int, dict[str, float]], None]


def _mean(total: Tensor, count: int) -> float:
    return float(total) / count if count else float("nan")


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler | None,
    scaler: torch.amp.GradScaler | None,
    state: TrainState,
    log_fn: LogFn | None = None,
    *,
    cfg: TrainConfig | None = None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """One pass over ``batches``; updates ``state`` (``global_step`` per step, ``epoch`` + 1 at the end).

    The model is called as ``model(images, targets, image_sizes=...)`` and must return a dict of
    scalar losses with the total under ``"loss"``. Per step: forward (autocast on CUDA when
    ``cfg.amp``), scaled backward, unscale, clip the global grad norm to ``cfg.grad_clip``,
    optimiser step, ``scheduler.step()``.

    ``log_fn(global_step, values)`` is called every ``cfg.log_every`` steps with the mean of each
    loss term over the steps since the previous call, ``lr``, ``grad_norm``, ``images_per_s`` and
    ``epoch``. Loss values are fetched from the device only then (no per-step host sync).

    Returns the epoch means of every loss term plus ``lr`` (last), ``grad_norm``, ``images_per_s``,
    ``steps``, ``images``, ``time_s`` and ``nonfinite_steps`` (steps whose loss was inf/NaN: with
    float16 AMP the scaler skips those updates). Raises ``FloatingPointError`` when every step of a
    logging window (or of the epoch) had a non-finite loss: training has diverged.
    """
    cfg = cfg or TrainConfig()
    device = torch.device(device) if device is not None else model_device(model)
    use_amp = amp_enabled(cfg, device)
    amp_dtype = torch.float16 if cfg.amp_dtype == "float16" else torch.bfloat16
    scaler = scaler if scaler is not None else torch.amp.GradScaler("cpu", enabled=False)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    model.train()

    epoch_sums: dict[str, Tensor] = {}
    window_sums: dict[str, Tensor] = {}
    epoch_bad = window_bad = torch.zeros((), dtype=torch.int64, device=device)
    epoch_steps = window_steps = epoch_images = window_images = 0
    epoch_start = window_start = time.perf_counter()

    def add(sums: dict[str, Tensor], key: str, value: Tensor) -> None:
        sums[key] = sums[key] + value if key in sums else value.clone()

    for batch in batches:
        batch = batch.to(device)
        images = batch.images
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        image_sizes = [tuple(m.size) for m in batch.metas]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
            losses = model(images, batch.targets, image_sizes=image_sizes)
        if "loss" not in losses:
            raise KeyError(f"the model's loss dict has no 'loss' (total) entry; keys: {sorted(losses)}")
        loss = losses["loss"]
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # no-op when the scaler is disabled
        if cfg.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            grads = [p.grad.detach().flatten() for p in params if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.cat(grads)) if grads else torch.zeros((), device=device)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        state.global_step += 1

        # Book-keeping on the device; non-finite steps are counted, not averaged in.
        finite = torch.isfinite(loss.detach())
        window_bad = window_bad + (~finite).long()
        epoch_bad = epoch_bad + (~finite).long()
        for key, value in list(losses.items()) + [("grad_norm", grad_norm)]:
            value = torch.where(finite, value.detach().float(), torch.zeros((), device=device))
            add(window_sums, key, value)
            add(epoch_sums, key, value)
        n = len(batch)
        window_steps += 1
        epoch_steps += 1
        window_images += n
        epoch_images += n

        if log_fn is not None and cfg.log_every > 0 and state.global_step % cfg.log_every == 0:
            bad = int(window_bad)
            if bad == window_steps:
                raise FloatingPointError(f"loss is not finite for all of the last {bad} steps "
                                         f"(global step {state.global_step}, epoch {state.epoch}): training diverged")
            now = time.perf_counter()
            values = {k: _mean(v, window_steps - bad) for k, v in window_sums.items()}
            values.update(lr=optimizer.param_groups[0]["lr"], images_per_s=window_images / max(now - window_start, 1e-9),
                          epoch=float(state.epoch), nonfinite_steps=float(bad))
            log_fn(state.global_step, values)
            window_sums, window_steps, window_images, window_start = {}, 0, 0, now
            window_bad = torch.zeros((), dtype=torch.int64, device=device)

    elapsed = time.perf_counter() - epoch_start
    bad = int(epoch_bad)
    if epoch_steps and bad == epoch_steps:
        raise FloatingPointError(f"loss was not finite in any of the {bad} steps of epoch {state.epoch}")
    summary = {k: _mean(v, epoch_steps - bad) for k, v in epoch_sums.items()}
    summary.update(lr=optimizer.param_groups[0]["lr"], images_per_s=epoch_images / max(elapsed, 1e-9),
                   steps=float(epoch_steps), images=float(epoch_images), time_s=elapsed, nonfinite_steps=float(bad))
    state.epoch += 1
    return summary


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------

#: ``predict_fn(model, images, metas) -> list[Detections]`` (e.g. flip test-time augmentation).
PredictFn = Callable[[nn.Module, Tensor, list[ImageMeta]], list[Detections]]
#: ``gather_fn(local_items) -> all workers' items`` (or None on workers that do not compute metrics).
GatherFn = Callable[[list], "list | None"]


def _default_predict(model: nn.Module, images: Tensor, metas: list[ImageMeta]) -> list[Detections]:
    return model(images, image_sizes=[tuple(m.size) for m in metas])


def predict_to_coco(
    model: nn.Module,
    batches: Iterable[Batch],
    category_ids: Sequence[int],
    task: str,
    *,
    device: torch.device | str | None = None,
    amp: bool = False,
    predict_fn: PredictFn | None = None,
) -> list[tuple[int, list[dict]]]:
    """Run the model in eval mode; one ``(image_id, COCO result records)`` item per image seen.

    The DDP wrapper (if any) is bypassed: inference needs no collective, so each worker can predict
    its own share independently.
    """
    net = unwrap_model(model)
    device = torch.device(device) if device is not None else model_device(net)
    predict_fn = predict_fn or _default_predict
    was_training = net.training
    net.eval()
    items: list[tuple[int, list[dict]]] = []
    try:
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=amp and device.type == "cuda"):
            for batch in batches:
                images = batch.images.to(device, non_blocking=True)
                dets = [d.to("cpu") for d in predict_fn(net, images, list(batch.metas))]
                for det, meta in zip(dets, batch.metas):
                    items.append((int(meta.image_id), detections_to_coco([det], [meta], category_ids, task)))
    finally:
        net.train(was_training)
    return items


@dataclass
class EvalResult:
    """Output of :func:`evaluate_detailed` on the worker that computed metrics."""

    metrics: dict[str, float]
    per_category: dict[str, list[dict]]
    results: list[dict]  # COCO result records of every evaluated image (deduplicated)
    image_ids: list[int]


def evaluate_detailed(
    model: nn.Module,
    batches: Iterable[Batch],
    gt: Any,
    category_ids: Sequence[int],
    task: str,
    *,
    iou_types: Sequence[str] | None = None,
    gather_fn: GatherFn | None = None,
    device: torch.device | str | None = None,
    amp: bool = False,
    predict_fn: PredictFn | None = None,
    backend: str = "pycocotools",
) -> EvalResult | None:
    """Predict on ``batches``, optionally gather across workers, and compute COCO metrics.

    ``gather_fn`` receives this worker's list of ``(image_id, records)`` items and returns the items
    of all workers (e.g. ``torch.distributed.all_gather_object`` + concatenation), or ``None`` on a
    worker that should not compute metrics (then this returns ``None``). An image seen more than
    once (a distributed sampler pads the last round with repeats) counts once. Metrics are computed
    over exactly the images seen (``image_ids``), so evaluating a subset of the ground truth is fine.
    """
    items = predict_to_coco(model, batches, category_ids, task, device=device, amp=amp, predict_fn=predict_fn)
    if gather_fn is not None:
        items = gather_fn(items)
        if items is None:
            return None
    seen: set[int] = set()
    results: list[dict] = []
    image_ids: list[int] = []
    for image_id, records in items:
        if image_id in seen:
            continue
        seen.add(image_id)
        image_ids.append(image_id)
        results.extend(records)
    if iou_types is None:
        iou_types = TASK_IOU_TYPES[task]
        # pose with the box branch predicts person boxes of its own: evaluate them too (as the reference)
        if task == "pose" and getattr(getattr(unwrap_model(model), "cfg", None), "pose_box_vectors", False):
            iou_types = ("bbox", *iou_types)
    coco: CocoEvaluation = evaluate_coco_detailed(gt, results, iou_types, image_ids=image_ids, backend=backend)
    return EvalResult(coco.metrics, coco.per_category, results, image_ids)


def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    gt: Any,
    category_ids: Sequence[int],
    task: str,
    *,
    iou_types: Sequence[str] | None = None,
    gather_fn: GatherFn | None = None,
    device: torch.device | str | None = None,
    amp: bool = False,
    predict_fn: PredictFn | None = None,
    backend: str = "pycocotools",
) -> dict[str, float]:
    """COCO metrics of ``model`` on ``batches`` (see :func:`evaluate_detailed`); ``{}`` on workers
    whose ``gather_fn`` returned ``None``. Default iou types per task: bbox -> bbox; segm -> bbox +
    segm; pose -> keypoints."""
    out = evaluate_detailed(model, batches, gt, category_ids, task, iou_types=iou_types, gather_fn=gather_fn,
                            device=device, amp=amp, predict_fn=predict_fn, backend=backend)
    return {} if out is None else out.metrics


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------

_PLAIN = (str, int, float, bool, type(None), Tensor)


def _check_plain(value: Any, where: str) -> None:
    """Only values ``torch.load(weights_only=True)`` can read back."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} must be str or int")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"{where}: {type(value).__name__} cannot be stored in a weights_only checkpoint "
                        "(use tensors, numbers, strings, lists and dicts)")


def checkpoint_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    state: TrainState | None = None,
    extra: dict[str, Any] | None = None,
    include_rng: bool = True,
) -> dict[str, Any]:
    """Everything needed to resume (or just to predict), as a ``weights_only``-loadable dict.

    ``extra`` holds plain metadata, e.g. ``{"category_ids": [...], "class_names": [...],
    "task": "bbox", "model_config": {...}}`` (``lsnet predict`` reads those keys).
    """
    extra = dict(extra or {})
    _check_plain(extra, "extra")
    ckpt: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "model": unwrap_model(model).state_dict(),
        "train_state": (state or TrainState()).to_dict(),
        "extra": extra,
    }
    if optimizer is not None:
        ckpt["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        ckpt["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        ckpt["scaler"] = scaler.state_dict()
    if include_rng:
        ckpt["rng"] = get_rng_state()
    return ckpt


def save_checkpoint(ckpt: dict[str, Any], path: str | Path) -> Path:
    """Write atomically (temp file + rename): a crash mid-write never leaves a truncated checkpoint."""
    return atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle errors, truncated files, non-weights_only content
        raise ValueError(f"checkpoint {path} cannot be loaded with weights_only=True: {err}") from err
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"checkpoint {path} has no 'model' state dict (is it an lsnet checkpoint?)")
    return ckpt


def load_checkpoint_state(
    ckpt: dict[str, Any] | str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    restore_rng: bool = True,
    strict: bool = True,
) -> TrainState:
    """Restore what :func:`checkpoint_state` saved into fresh objects; returns the :class:`TrainState`.

    Objects passed as ``None`` are skipped (e.g. model only, for inference).
    """
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt, map_location=model_device(model))
    unwrap_model(model).load_state_dict(ckpt["model"], strict=strict)
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if obj is None:
            continue
        if name not in ckpt:
            raise KeyError(f"the checkpoint has no {name} state to resume from")
        obj.load_state_dict(ckpt[name])
    if restore_rng and "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    return TrainState.from_dict(ckpt.get("train_state", {}))


def init_model_from(model: nn.Module, ckpt: dict[str, Any] | str | Path) -> dict[str, list[str]]:
    """Load only the model weights of a checkpoint into ``model`` (``train.init_from``; fine-tuning).

    Parameters/buffers present in both with equal shapes are copied; the model's own ones absent from
    the checkpoint keep their initialisation (e.g. a branch the source model did not have).
    Optimiser, scheduler, counters and RNG are untouched -- the run starts at epoch 0.

    Returns:
        ``{"loaded": [...], "missing": [...], "unexpected": [...]}`` key names.
    Raises:
        ValueError naming the file and key when a shape differs, or when no key matches at all.
    """
    where = str(ckpt) if not isinstance(ckpt, dict) else "the checkpoint"
    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt, map_location=model_device(model))
    source = ckpt.get("model", ckpt)
    target = unwrap_model(model).state_dict()
    for key, value in source.items():
        if key in target and tuple(value.shape) != tuple(target[key].shape):
            raise ValueError(f"init_from {where}: {key} has shape {tuple(value.shape)}, the model "
                             f"{tuple(target[key].shape)} (a different architecture or task?)")
    loaded = [k for k in source if k in target]
    if not loaded:
        raise ValueError(f"init_from {where}: no parameter name matches the model (is it an lsnet checkpoint?)")
    unwrap_model(model).load_state_dict({k: source[k] for k in loaded}, strict=False)
    return {"loaded": loaded, "missing": [k for k in target if k not in source],
            "unexpected": [k for k in source if k not in target]}


# --------------------------------------------------------------------------------------------------
# The epoch policy (fit and the distributed worker loop) and fit, the single-process loop
# --------------------------------------------------------------------------------------------------


def is_eval_epoch(done: int, epochs: int, eval_every: int) -> bool:
    """Evaluate after every ``eval_every`` epochs and after the last one (``done``: epochs completed)."""
    return done % max(eval_every, 1) == 0 or done == epochs


def is_improvement(score: float | None, best: float | None) -> bool:
    """Whether ``score`` of the task's main metric is a new best: a number above the best so far (a
    missing or NaN score never is)."""
    return score is not None and not math.isnan(score) and (best is None or score > best)


def fit(
    model: nn.Module,
    train_batches: Callable[[int], Iterable[Batch]],
    cfg: TrainConfig,
    *,
    iters_per_epoch: int,
    global_batch: int | None = None,
    val_batches: Callable[[], Iterable[Batch]] | None = None,
    gt: Any = None,
    category_ids: Sequence[int] | None = None,
    task: str = "bbox",
    out_dir: str | Path | None = None,
    resume: str | Path | None = None,
    log_fn: LogFn | None = None,
    extra: dict[str, Any] | None = None,
    device: torch.device | str | None = None,
) -> TrainState:
    """Train ``model`` for ``cfg.epochs`` in this process.

    ``train_batches(epoch)`` yields that epoch's batches (``iters_per_epoch`` of them; shuffling
    should depend only on the epoch and the seeded RNGs so a resumed run sees the same data).
    Every ``cfg.eval_every`` epochs and after the last, the model is evaluated on ``val_batches()``
    against ``gt`` when both are given. With ``out_dir``: ``latest.pt`` after every epoch and
    ``best.pt`` when the task's main metric (bbox_AP / segm_AP / kp_AP) improves. ``resume`` = a
    checkpoint to continue from (model, optimiser, scheduler, scaler, counters and RNG states);
    without it, ``cfg.init_from`` (model weights only, :func:`init_model_from`) starts the run.
    ``log_fn(step, values)`` gets the per-step values of :func:`train_one_epoch`, a per-epoch
    summary (keys prefixed ``epoch_``) and the evaluation metrics.
    """
    device = torch.device(device) if device is not None else model_device(model)
    seed_everything(cfg.seed)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    global_batch = global_batch or cfg.batch_size
    optimizer = build_optimizer(model, cfg, global_batch)
    scheduler = build_scheduler(optimizer, cfg, iters_per_epoch)
    scaler = build_grad_scaler(cfg, device)
    state = TrainState()
    if resume is not None:
        state = load_checkpoint_state(resume, model, optimizer, scheduler, scaler)
    elif cfg.init_from:
        init_model_from(model, cfg.init_from)
    extra = {"task": task, **(extra or {})}
    if category_ids is not None:
        extra.setdefault("category_ids", [int(c) for c in category_ids])
    main_metric = TASK_MAIN_METRIC.get(task, "bbox_AP")

    while state.epoch < cfg.epochs:
        summary = train_one_epoch(model, train_batches(state.epoch), optimizer, scheduler, scaler, state, log_fn,
                                  cfg=cfg, device=device)
        if log_fn is not None:
            log_fn(state.global_step, {f"epoch_{k}": v for k, v in summary.items()} | {"epoch": float(state.epoch)})
        improved = False
        if val_batches is not None and gt is not None and is_eval_epoch(state.epoch, cfg.epochs, cfg.eval_every):
            if category_ids is None:
                raise ValueError("evaluation needs category_ids (contiguous label -> COCO category id)")
            metrics = evaluate(model, val_batches(), gt, category_ids, task, device=device,
                               amp=amp_enabled(cfg, device))
            if log_fn is not None:
                log_fn(state.global_step, metrics)
            value = metrics.get(main_metric)
            if is_improvement(value, state.best_metric):
                state.best_metric, state.best_epoch, improved = float(value), state.epoch, True
        if out_dir is not None:
            ckpt = checkpoint_state(model, optimizer, scheduler, scaler, state, extra)
            save_checkpoint(ckpt, Path(out_dir) / "latest.pt")
            if improved:
                save_checkpoint(ckpt, Path(out_dir) / "best.pt")
    return state
