"""The optimiser (SGD, lr scaled by the global batch, paper section 4), the warmup + step schedule as a
pure function of the step, the AMP grad scaler."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from lsnet.engine.config import TrainConfig


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
