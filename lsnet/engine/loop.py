"""The training loop: one epoch (:func:`train_one_epoch`, the step the distributed workers run too), the
epoch policy (:func:`is_eval_epoch`, :func:`is_improvement`) and :func:`fit`, the single-process loop."""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from lsnet.engine.checkpoint import (
    checkpoint_state,
    init_model_from,
    load_checkpoint_state,
    save_checkpoint,
    seed_everything,
)
from lsnet.engine.config import TrainConfig, TrainState
from lsnet.engine.evaluate import evaluate
from lsnet.engine.optim import amp_enabled, build_grad_scaler, build_optimizer, build_scheduler, model_device
from lsnet.evaluation import (
    TASK_MAIN_METRIC,
)
from lsnet.structures import Batch

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
