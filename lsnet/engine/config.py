"""The training settings (:class:`TrainConfig`) and the counters a run carries (:class:`TrainState`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from lsnet.config import check_range


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
