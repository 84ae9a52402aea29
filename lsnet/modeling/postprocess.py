"""Decoding and NMS of the reference head's outputs (``lsnet_head.py:1439-1668`` and mmdet's
``multiclass_nms``), as the reference's ``get_bboxes(rescale=False)`` does it.

Per image and level: sigmoid scores (H·W, C) in row-major position order; if ``H·W > nms_pre`` the
top ``nms_pre`` positions by their best class score. Points decode from the *refine* vectors: the
signed ``(dx, dy)`` of a point times the stride plus the position ``(w·s, h·s)`` (no half-stride shift).
The box comes from the layout's box branch (its extremes: x of left/right, y of top/bottom; or the
hull of its points); the landmarks from its landmark branch; both are clamped to the image's valid
region. Then every (row, class) with score ``> score_thr`` is a candidate of a class-aware greedy NMS
(IoU ``> iou_thr`` suppresses), and the best ``max_per_img`` are kept, by descending score.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from lsnet.modeling.reference_head import TaskLayout, level_points, signed_points


@dataclass
class DecodeConfig:
    """The reference's ``test_cfg`` (mmdet names)."""

    nms_pre: int = 1000
    score_thr: float = 0.05
    iou_thr: float = 0.6
    max_per_img: int = 100


def vectors_to_points(vectors: Tensor, num_points: int) -> Tensor:
    """(R, 4K) magnitudes -> signed (R, num_points, 2) ``(dx, dy)`` of the first ``num_points``."""
    r = vectors.shape[0]
    dydx = signed_points(vectors.reshape(r, -1, 1, 1)).reshape(r, -1, 2)[:, :num_points]
    return dydx.flip(-1)


def extreme_box(points: Tensor) -> Tensor:
    """Box of points 0..3 = top, left, bottom, right: (R, ≥4, 2) -> (R, 4) x1, y1, x2, y2."""
    return torch.stack([points[:, 1, 0], points[:, 0, 1], points[:, 3, 0], points[:, 2, 1]], dim=1)


def hull_box(points: Tensor) -> Tensor:
    """Min/max box of all points: (R, K, 2) -> (R, 4)."""
    return torch.cat([points.min(dim=1).values, points.max(dim=1).values], dim=1)


def decode_candidates(outputs: dict[str, list[Tensor]], layout: TaskLayout, strides: tuple[int, ...],
                      image: int, image_hw: tuple[float, float], cfg: DecodeConfig) -> dict[str, Tensor]:
    """The pre-NMS candidates of one image: ``bboxes`` (R, 4), ``landmarks`` (R, 2N) (x, y pairs),
    ``scores`` (R, C) and ``index`` (R, 2) ``(level, h·W + w)``."""
    specs = {b.name: b for b in layout.branches}
    box_spec, lm_spec = specs[layout.box_branch], specs[layout.landmark_branch]
    box_key, lm_key = f"{box_spec.name}_refine", f"{lm_spec.name}_refine"
    img_h, img_w = image_hw
    boxes, landmarks, scores, index = [], [], [], []
    for level, logits in enumerate(outputs["cls_scores"]):
        stride = strides[level]
        _, c, h, w = logits.shape
        score = logits[image].permute(1, 2, 0).reshape(-1, c).sigmoid()
        rows = torch.arange(h * w, device=logits.device)
        if 0 < cfg.nms_pre < h * w:
            rows = score.max(dim=1).values.topk(cfg.nms_pre).indices
        score = score[rows]
        origin = level_points(h, w, stride, logits)[rows].unsqueeze(1)

        def points_of(key: str, n: int, level: int = level, rows: Tensor = rows, stride: int = stride,
                      origin: Tensor = origin) -> Tensor:
            vec = outputs[key][level][image].flatten(1).t()[rows]
            return vectors_to_points(vec, n) * stride + origin

        box_pts = points_of(box_key, box_spec.num_landmarks)
        box = extreme_box(box_pts) if box_spec.num_free_points else hull_box(box_pts)
        lm = box_pts if lm_key == box_key else points_of(lm_key, lm_spec.num_landmarks)
        limit = box.new_tensor([img_w, img_h])
        boxes.append(torch.minimum(box.clamp(min=0), limit.repeat(2)))
        landmarks.append(torch.minimum(lm.clamp(min=0), limit).reshape(lm.shape[0], -1))
        scores.append(score)
        index.append(torch.stack([torch.full_like(rows, level), rows], dim=1))
    return {"bboxes": torch.cat(boxes), "landmarks": torch.cat(landmarks), "scores": torch.cat(scores),
            "index": torch.cat(index)}


def multiclass_nms(bboxes: Tensor, landmarks: Tensor, scores: Tensor, cfg: DecodeConfig) -> dict[str, Tensor]:
    """Class-aware NMS of candidates (mmdet ``multiclass_nms``): ``bboxes`` (n, 5) with the score,
    ``landmarks`` (n, 2N), ``labels`` (n,) 0-based, ``rows`` (n,) the candidate row of each."""
    valid = scores > cfg.score_thr
    rows, labels = valid.nonzero(as_tuple=True)
    cand_scores = scores[rows, labels]
    keep = batched_nms(bboxes[rows], cand_scores, labels, cfg.iou_thr)[: cfg.max_per_img]
    return {"bboxes": torch.cat([bboxes[rows[keep]], cand_scores[keep, None]], dim=1),
            "landmarks": landmarks[rows[keep]], "labels": labels[keep], "rows": rows[keep]}


def reference_detections(outputs: dict[str, list[Tensor]], layout: TaskLayout, strides: tuple[int, ...],
                         image_sizes: list[tuple[float, float]], cfg: DecodeConfig) -> list[dict[str, Tensor]]:
    """Per image: the :func:`multiclass_nms` result of its :func:`decode_candidates`."""
    dets = []
    for i, hw in enumerate(image_sizes):
        cand = decode_candidates(outputs, layout, strides, i, hw, cfg)
        d = multiclass_nms(cand["bboxes"], cand["landmarks"], cand["scores"], cfg)
        d["index"] = cand["index"][d["rows"]]
        dets.append(d)
    return dets
