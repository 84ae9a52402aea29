"""Checkpoints and random state: everything a resumed run needs to continue bit-identically (on CPU),
stored as tensors and plain Python values so that ``torch.load(path, weights_only=True)`` reads it."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from lsnet.atomic import atomic_write
from lsnet.engine.config import TrainState
from lsnet.engine.optim import model_device, unwrap_model

#: Version of the checkpoint layout written by :func:`checkpoint_state`.
CHECKPOINT_FORMAT = 1


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
