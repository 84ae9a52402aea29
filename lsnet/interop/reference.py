"""The authors' code (Duankaiwen/LSNet, mmdetection 2.2) <-> our modules.

- :func:`neck_from_config` / :func:`head_from_config`: our FPN and :class:`ReferenceHead` from the
  reference's ``neck`` / ``bbox_head`` config dicts (any channel and class counts, tasks bbox, segm,
  pose_bbox, pose_kbox).
- :func:`convert_state_dict`: the reference's detector-level keys (``neck.…``, ``bbox_head.…``) ->
  ours (``fpn.…``, ``head.…``); every key must be used, none may be missing.
- :func:`reference_outputs`: an oracle file made by running the reference code (see
  ``tests/data/reference_head/README.md``) -> our outputs in the reference's layout and units.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lsnet.errors import LsnetError
from lsnet.modeling.fpn import FPN
from lsnet.modeling.postprocess import DecodeConfig, reference_detections
from lsnet.modeling.reference_head import ReferenceHead, task_branches


class ReferenceKeyError(LsnetError, KeyError):
    """A reference state_dict whose keys do not match the model (names them)."""

    def __str__(self) -> str:  # KeyError quotes its message
        return str(self.args[0])


def _groups(norm_cfg: dict | None) -> int | None:
    if not norm_cfg:
        return None
    if norm_cfg.get("type") != "GN":
        raise ValueError(f"reference config: only GroupNorm is supported in the neck/head, got {norm_cfg}")
    return int(norm_cfg.get("num_groups", 32))


def neck_from_config(neck: dict[str, Any]) -> FPN:
    """Our FPN from an mmdet ``FPN`` config (``start_level`` 1 of C2..C5, 5 outputs)."""
    if neck.get("type", "FPN") != "FPN":
        raise ValueError(f"reference config: neck type {neck.get('type')!r} is not FPN")
    start = int(neck.get("start_level", 0))
    in_channels = list(neck["in_channels"])[start:]
    if len(in_channels) != 3 or int(neck.get("num_outs", 5)) != 5:
        raise ValueError(f"reference config: the neck must map C3-C5 to P3-P7, got {neck}")
    extra = neck.get("add_extra_convs", False)
    if extra is True:  # mmdet 2.2: True means on the inputs unless extra_convs_on_inputs=False
        extra = "on_input" if neck.get("extra_convs_on_inputs", True) else "on_output"
    sources = {"on_input": "c5", "on_output": "p5", "on_lateral": None}
    if sources.get(extra) is None:
        raise ValueError(f"reference config: neck add_extra_convs={extra!r} is not supported (on_input, on_output)")
    groups = _groups(neck.get("norm_cfg"))
    return FPN(in_channels, int(neck["out_channels"]), extra_source=sources[extra],
               norm="gn" if groups else "none", relu_before_p7=bool(neck.get("relu_before_extra_convs", False)),
               norm_groups=groups or 32)


def head_from_config(head: dict[str, Any], offset_scaling: str = "compound") -> ReferenceHead:
    """Our :class:`ReferenceHead` from the reference's ``LSHead`` or ``LSCPVHead`` (CPV, bbox) config."""
    feat, point = int(head.get("feat_channels", 256)), int(head.get("point_feat_channels", 256))
    cpv = head.get("type") == "LSCPVHead"
    if cpv:  # the corner pools as the reference's CPV configs build them (lscpvnet_head.py:16-52)
        fixed = {"shared_stacked_convs": 1, "first_kernel_size": 3, "kernel_size": 1}
        other = {k: head[k] for k, v in fixed.items() if k in head and int(head[k]) != v}
        if other:
            raise ValueError(f"reference config: LSCPVHead with {other} is not supported (built: {fixed})")
    if feat != point:
        raise ValueError(f"reference config: feat_channels ({feat}) != point_feat_channels ({point}): "
                         "the reference's GroupNorm of the point features needs them equal")
    layout = task_branches(head.get("task", "bbox"), int(head.get("num_vectors", 4)),
                           int(head.get("num_kernel_points", 9)))
    return ReferenceHead(layout, int(head["num_classes"]), int(head["in_channels"]), feat,
                         int(head.get("stacked_convs", 4)), _groups(head.get("norm_cfg")) or 32,
                         deformable_towers=head.get("conv_module_type", "norm") == "dcn",
                         offset_scaling=offset_scaling, gradient_mul=float(head.get("gradient_mul", 0.1)),
                         strides=tuple(head.get("point_strides", (8, 16, 32, 64, 128))), cpv=cpv,
                         cpv_corner_dim=int(head.get("corner_dim", 64)))


class NeckAndHead(nn.Module):
    """FPN + reference head on C3..C5 features (the parts the oracles cover)."""

    def __init__(self, fpn: FPN, head: ReferenceHead):
        super().__init__()
        self.fpn = fpn
        self.head = head

    def forward(self, feats: list[Tensor]) -> dict[str, list[Tensor]]:
        return self.head(self.fpn(feats))


def _neck_key_map(fpn: FPN) -> dict[str, str]:
    """Reference neck key suffix -> ours: ``lateral_convs.i`` / ``fpn_convs.i`` (3 = P6, 4 = P7)."""
    ours = [f"lateral.{i}" for i in range(3)] + [f"output.{i}" for i in range(3)] + ["p6", "p7"]
    theirs = [f"lateral_convs.{i}" for i in range(3)] + [f"fpn_convs.{i}" for i in range(5)]
    out = {}
    for t, o in zip(theirs, ours):
        # mmdet ConvModule names its parts conv / gn; ours ConvNorm conv / norm, a bare Conv2d nothing
        if isinstance(fpn.get_submodule(o), nn.Conv2d):
            out[f"{t}.conv."] = f"{o}."
        else:
            out[f"{t}.conv."] = f"{o}.conv."
            out[f"{t}.gn."] = f"{o}.norm."
    return out


def _tower_key_map(theirs: str, ours: str, num_convs: int) -> dict[str, str]:
    out = {}
    for i in range(num_convs):
        out[f"{theirs}.{i}.conv."] = f"{ours}.{i}.conv."  # DCNv2 weight/bias/conv_offset, or the conv
        out[f"{theirs}.{i}.bn."] = f"{ours}.{i}.norm."  # DCNConvModule's GroupNorm is named bn
        out[f"{theirs}.{i}.gn."] = f"{ours}.{i}.norm."  # ConvModule ('norm' towers) names it gn
    return out


def _head_key_map(head: ReferenceHead) -> dict[str, str]:
    """Reference ``LSHead`` attribute prefixes -> ours (``lsnet_head.py:93-258``)."""
    n = len(head.cls_tower)
    out = _tower_key_map("cls_convs", "cls_tower", n)
    out.update({"cls_GN.": "cls_fusion.norm.", "cls_af_dcn_conv.0.": "cls_fusion.fuse.",
                "cls_feat_conv.": "cls_fusion.anchor_conv.", "pts_cls_conv.": "cls_fusion.sample.",
                "pts_cls_out.": "cls_out."})
    for name in head.branches:
        b = f"branches.{name}"
        out.update(_tower_key_map(f"{name}_convs", f"{b}.tower", n))
        out.update({f"{name}_GN.": f"{b}.fusion.norm.", f"{name}_af_dcn_conv.0.": f"{b}.fusion.fuse.",
                    f"{name}_feat_conv.": f"{b}.fusion.anchor_conv.",
                    f"pts_{name}_refine_conv.": f"{b}.fusion.sample.",
                    f"pts_{name}_init_conv.": f"{b}.init_conv.", f"pts_{name}_init_out.": f"{b}.init_out.",
                    f"pts_{name}_refine_out.": f"{b}.refine_out."})
    if head.cpv is not None:
        out.update(_cpv_key_map())
    return out


def _cpv_key_map() -> dict[str, str]:
    """``LSCPVHead``'s CPV attributes -> :class:`lsnet.modeling.cpv.ReferenceCPV`
    (``lscpvnet_head.py:98-179``; the corner pools ``ops/corner_pool/corner_pool.py:119-186``)."""
    out = _tower_key_map("shared_convs", "cpv.shared", 1)
    out.update({"reppoints_sem_out.": "cpv.foreground_out.", "reppoints_sem_embedding.conv.": "cpv.foreground_embed.0.",
                "reppoints_sem_embedding.gn.": "cpv.foreground_embed.1."})
    for corner in ("tl", "br"):
        ours = f"cpv.pool_{corner}"
        # mmcv ConvModule: conv / gn; the pack's bare convs and GroupNorms by their own names
        out.update({f"hem_{corner}.p1_conv1.conv.": f"{ours}.branch1.0.", f"hem_{corner}.p1_conv1.gn.": f"{ours}.branch1.1.",
                    f"hem_{corner}.p2_conv1.conv.": f"{ours}.branch2.0.", f"hem_{corner}.p2_conv1.gn.": f"{ours}.branch2.1.",
                    f"hem_{corner}.p_conv1.": f"{ours}.merge.0.", f"hem_{corner}.p_gn1.": f"{ours}.merge.1.",
                    f"hem_{corner}.conv1.": f"{ours}.skip.0.", f"hem_{corner}.gn1.": f"{ours}.skip.1.",
                    f"hem_{corner}.conv2.conv.": f"{ours}.out.0.", f"hem_{corner}.conv2.gn.": f"{ours}.out.1.",
                    f"reppoints_hem_{corner}_score_out.": f"cpv.heat_{corner}.",
                    f"reppoints_hem_{corner}_offset_out.": f"cpv.offset_{corner}."})
    return out


def convert_state_dict(state: dict[str, Tensor], model: nn.Module, prefixes: dict[str, str],
                       source: str = "reference state_dict",
                       rename: Callable[[str], str | None] | None = None) -> dict[str, Tensor]:
    """Rename the reference's keys to ``model``'s and check both sides.

    ``prefixes`` maps each reference module prefix (``"neck."``) to our module's (``"fpn."``); the
    submodule maps come from :func:`_neck_key_map` / :func:`_head_key_map`. Raises
    :class:`ReferenceKeyError` naming unknown (unused) reference keys and our missing ones, and on a
    shape mismatch. ``rename``: our key for a reference key outside ``prefixes`` (the backbone of a
    whole detector, :mod:`lsnet.interop.convert`); ``None`` = unknown, ``""`` = skip it (a counter).
    """
    maps: list[tuple[str, str]] = []
    for theirs, ours in prefixes.items():
        sub = model.get_submodule(ours.rstrip("."))
        table = _neck_key_map(sub) if isinstance(sub, FPN) else _head_key_map(sub)
        maps += [(theirs + t, ours + o) for t, o in table.items()]
    maps.sort(key=lambda kv: -len(kv[0]))  # longest prefix first
    expected = model.state_dict()
    converted, unknown = {}, []
    for key, value in state.items():
        hit = next((o + key[len(t):] for t, o in maps if key.startswith(t)), None)
        if hit is None and rename is not None:
            hit = rename(key)
            if hit == "":
                continue
        if hit is None or hit not in expected:
            unknown.append(key)
            continue
        if tuple(value.shape) != tuple(expected[hit].shape):
            raise ReferenceKeyError(f"{source}: {key} has shape {tuple(value.shape)}, the model's {hit} "
                                    f"{tuple(expected[hit].shape)}")
        converted[hit] = value
    missing = sorted(set(expected) - set(converted))
    if unknown or missing:
        raise ReferenceKeyError(f"{source}: {len(unknown)} unknown key(s) {unknown[:8]}, "
                                f"{len(missing)} missing {missing[:8]}")
    return converted


def decode_config(test_cfg: dict[str, Any]) -> DecodeConfig:
    nms = test_cfg.get("nms", {}) or {}
    if nms.get("type", "nms") != "nms":
        raise ValueError(f"reference test_cfg: only greedy nms is supported, got {nms}")
    return DecodeConfig(nms_pre=int(test_cfg.get("nms_pre", -1)), score_thr=float(test_cfg.get("score_thr", 0.05)),
                        iou_thr=float(nms.get("iou_thr", 0.5)), max_per_img=int(test_cfg.get("max_per_img", 100)))


def _landmark_key(oracle: dict[str, Any], task: str) -> str:
    """The detections' landmark key: the oracle's own (whatever is not bboxes / labels), else by task."""
    dets = oracle.get("detections") or []
    if dets:
        other = [k for k in dets[0] if k not in ("bboxes", "labels")]
        if len(other) == 1:
            return other[0]
    return {"bbox": "extremes", "segm": "polygons"}.get(task, "keypoints")


def reference_outputs(oracle: dict) -> dict:
    """Our neck + head on an oracle's inputs, in the reference's layout.

    ``oracle`` (``torch.load(path, weights_only=True)``) holds ``config`` (``neck``, ``bbox_head``,
    ``test_cfg``), ``state_dict`` (reference key names), ``inputs`` (``C3``..``C5``), ``img_metas``
    (``img_shape`` per image) and ``outputs``. Returns ``{"outputs": {key: [per level]}, "detections":
    [per image {"bboxes" (n, 5), <landmarks> (n, 2N), "labels" (n,)}]}`` with the oracle's keys.
    """
    cfg = oracle["config"]
    fpn = neck_from_config(cfg["neck"])
    head = head_from_config(cfg["bbox_head"])
    model = NeckAndHead(fpn, head)
    state = convert_state_dict(oracle["state_dict"], model, {"neck.": "fpn.", "bbox_head.": "head."})
    model.load_state_dict(state, strict=True)
    model.eval()
    feats = [oracle["inputs"][k].float() for k in ("C3", "C4", "C5")]
    with torch.no_grad():
        outputs = model(feats)
        sizes = [tuple(m["img_shape"][:2]) for m in oracle["img_metas"]]
        dets = reference_detections(outputs, head.layout, head.strides, sizes, decode_config(cfg.get("test_cfg", {})))
    wanted = list(oracle.get("outputs", outputs).keys())
    missing = [k for k in wanted if k not in outputs]
    if missing:
        raise KeyError(f"oracle outputs {missing} are not produced by task {head.layout}")
    lm_key = _landmark_key(oracle, cfg["bbox_head"].get("task", "bbox"))
    return {"outputs": {k: outputs[k] for k in wanted},
            "detections": [{"bboxes": d["bboxes"], lm_key: d["landmarks"], "labels": d["labels"]} for d in dets]}
