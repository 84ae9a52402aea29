"""``lsnet convert reference CKPT.pth --config CFG --out OUT.pt``: a whole detector trained with the
authors' code (mmdetection 2.2 checkpoint: ``backbone.*``, ``neck.*``, ``bbox_head.*``) -> an lsnet
checkpoint of the model that ``CFG`` describes (``model.head: reference``).

Backbone keys: mmdet's ResNet/ResNeXt use torchvision's names, except the stem (``conv1``/``bn1`` ->
our ``stem.0``/``stem.1``) and deformable convs (``conv2.weight``/``conv2.conv_offset.*`` -> our
``conv2.conv.weight``/``conv2.offset.*``). BatchNorm's ``num_batches_tracked`` counters are dropped
where our (frozen) BatchNorm has none. Neck and head: :mod:`lsnet.interop.reference`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lsnet.errors import InputError
from lsnet.interop.reference import ReferenceKeyError, convert_state_dict

_STEM = {"conv1.": "stem.0.", "bn1.": "stem.1."}


def _backbone_key(key: str) -> str:
    """mmdet ResNet key (without ``backbone.``) -> ours (without ``backbone.``)."""
    for theirs, ours in _STEM.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    key = key.replace(".conv2.conv_offset.", ".conv2.offset.")
    return key


def convert_detector_state(state: dict[str, Tensor], model: torch.nn.Module, source: str) -> dict[str, Tensor]:
    """The reference detector's state_dict -> ``model``'s (an :class:`lsnet.modeling.LSNet` with a
    reference head). Raises :class:`ReferenceKeyError` naming unknown and missing keys."""
    expected = model.state_dict()
    deformable = {k[: -len(".conv.weight")] for k in expected
                  if k.startswith("backbone.") and k.endswith(".conv2.conv.weight")}

    def backbone_key(key: str) -> str | None:
        if not key.startswith("backbone."):
            return None
        ours = "backbone." + _backbone_key(key[len("backbone."):])
        if ours.endswith(".conv2.weight") and ours[: -len(".weight")] in deformable:
            ours = ours[: -len(".weight")] + ".conv.weight"
        if ours.endswith("num_batches_tracked") and ours not in expected:
            return ""  # a counter, not a weight: our frozen BatchNorm has none
        return ours

    return convert_state_dict(state, model, {"neck.": "fpn.", "bbox_head.": "head."}, source, rename=backbone_key)


def convert_reference_checkpoint(checkpoint: str | Path, config: str | Path, out: str | Path) -> Path:
    """Read an mmdet checkpoint (``weights_only=True``), convert it for the model of ``config``, and
    write an lsnet checkpoint (``{"model": ..., "extra": {"model_config": ...}}``) to ``out``."""
    from lsnet.config import from_dict, load_yaml
    from lsnet.engine import save_checkpoint
    from lsnet.modeling import ModelConfig, build_model

    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_file():
        raise InputError(f"{checkpoint}: no such checkpoint")
    try:
        raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- pickle errors, truncated files, non-tensor content come in many types
        raise InputError(f"{checkpoint}: cannot be loaded with weights_only=True: {str(err).splitlines()[0]}") from None
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(f"{checkpoint}: no state_dict of tensors (an mmdet checkpoint has 'state_dict')")
    section: dict[str, Any] = dict(load_yaml(config).get("model") or {})
    section["pretrained"] = None
    cfg = from_dict(ModelConfig, section, prefix="model")
    if cfg.head != "reference":
        raise InputError(f"{config}: model.head is {cfg.head!r}; a reference checkpoint needs model.head: reference")
    model = build_model(cfg)
    try:
        converted = convert_detector_state(state, model, str(checkpoint))
    except ReferenceKeyError as err:
        raise InputError(str(err)) from None
    model.load_state_dict(converted, strict=True)
    return save_checkpoint({"model": model.state_dict(), "extra": {"model_config": section,
                                                                  "converted_from": str(checkpoint)}}, out)
