"""Training LSNet in one process (no Ray, no MLflow): :mod:`~lsnet.engine.config` (TrainConfig, TrainState),
:mod:`~lsnet.engine.optim` (optimiser, schedule, AMP), :mod:`~lsnet.engine.loop` (the epoch, its policy,
``fit``), :mod:`~lsnet.engine.evaluate` (COCO metrics of a model), :mod:`~lsnet.engine.checkpoint`
(checkpoints and RNG state); everything is importable from ``lsnet.engine``.

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

from lsnet.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    checkpoint_state,
    get_rng_state,
    init_model_from,
    load_checkpoint,
    load_checkpoint_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from lsnet.engine.config import (
    TrainConfig,
    TrainState,
)
from lsnet.engine.evaluate import (
    EvalResult,
    GatherFn,
    PredictFn,
    evaluate,
    evaluate_detailed,
    predict_to_coco,
)
from lsnet.engine.loop import (
    LogFn,
    fit,
    is_eval_epoch,
    is_improvement,
    train_one_epoch,
)
from lsnet.engine.optim import (
    WarmupStepLR,
    amp_enabled,
    build_grad_scaler,
    build_optimizer,
    build_scheduler,
    lr_factor,
    model_device,
    parameter_groups,
    scaled_lr,
    unwrap_model,
)

__all__ = ["CHECKPOINT_FORMAT", "EvalResult", "GatherFn", "LogFn", "PredictFn", "TrainConfig", "TrainState", "WarmupStepLR", "amp_enabled", "build_grad_scaler", "build_optimizer", "build_scheduler", "checkpoint_state", "evaluate", "evaluate_detailed", "fit", "get_rng_state", "init_model_from", "is_eval_epoch", "is_improvement", "load_checkpoint", "load_checkpoint_state", "lr_factor", "model_device", "parameter_groups", "predict_to_coco", "save_checkpoint", "scaled_lr", "seed_everything", "set_rng_state", "train_one_epoch", "unwrap_model"]
