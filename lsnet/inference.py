"""From head outputs to detections: decoding, thresholds, NMS and test-time augmentation.

Per image (paper §4, mmdet test settings of the reference):

1. Per FPN level, class scores ``sigmoid(logits)`` above ``score_thr`` (0.05); the
   ``pre_nms_topk`` (1000) best (point, class) pairs of the level are kept.
2. Their refined vectors decode to landmarks with the max rule of Appendix A
   (:func:`lsnet.coding.decode_offsets`); landmarks are clipped to the image's valid region.
3. The box of a detection is the min/max of its landmarks: exact for the 4 extreme points, the
   polygon's box for contours, and for pose the box of the 17 predicted keypoints -- or, with the
   pose box branch (``model.pose_box_vectors``, on for obj-box), the box of its 4 box landmarks.
4. Class-aware NMS (:func:`torchvision.ops.batched_nms`, IoU 0.6) over all levels, then the
   ``max_dets`` (100) highest scores.

Pose: LSNet predicts no keypoint visibility, so every keypoint's score is the detection's score
(COCO keypoint evaluation ranks by the detection score only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms

from lsnet.coding import decode_offsets
from lsnet.modeling.config import ModelConfig, TestConfig
from lsnet.modeling.head import HeadOutputs
from lsnet.structures import SIZE_DIVISOR, Detections, ImageMeta


def boxes_from_points(points: Tensor) -> Tensor:
    """(K, N, 2) landmarks -> (K, 4) ``x1, y1, x2, y2`` enclosing boxes."""
    if points.shape[0] == 0:
        return points.new_zeros(0, 4)
    return torch.cat([points.amin(dim=1), points.amax(dim=1)], dim=1)


def clip_points(points: Tensor, image_size: tuple[float, float]) -> Tensor:
    """Clip (..., 2) ``x, y`` to ``[0, w] × [0, h]`` of ``image_size = (h, w)``."""
    h, w = image_size
    return torch.stack([points[..., 0].clamp(0, w), points[..., 1].clamp(0, h)], dim=-1)


def select_candidates(cls_logits: Tensor, vectors: Tensor, anchors: Tensor, num_points_per_level: list[int],
                      image_size: tuple[float, float], score_thr: float = 0.05, pre_nms_topk: int = 1000,
                      with_point_scores: bool = False, num_box_points: int = 0) -> Detections:
    """Steps 1–3 of the module docstring for one image (before NMS).

    Args:
        cls_logits: (P, C); vectors: (P, N, 4) refined vectors; anchors: (P, 2).
        num_points_per_level: level sizes splitting ``P``.
        image_size: (h, w) valid region.
        num_box_points: the last this many landmarks are the pose box branch's: the box is theirs,
            and they are not part of the detection's points.
    Returns:
        Detections (K candidates, all levels) in the image's pixel frame.
    """
    num_classes = cls_logits.shape[1]
    keep_points, keep_labels, keep_scores = [], [], []
    start = 0
    for n in num_points_per_level:
        scores = torch.sigmoid(cls_logits[start:start + n]).flatten()  # (n * C,) point-major
        candidates = torch.nonzero(scores > score_thr).squeeze(1)
        if candidates.numel() > pre_nms_topk:
            top = scores[candidates].topk(pre_nms_topk).indices
            candidates = candidates[top]
        keep_points.append(candidates // num_classes + start)
        keep_labels.append(candidates % num_classes)
        keep_scores.append(scores[candidates])
        start += n
    idx = torch.cat(keep_points)
    labels = torch.cat(keep_labels)
    scores = torch.cat(keep_scores)
    points = clip_points(decode_offsets(vectors[idx], anchors[idx]), image_size)
    if num_box_points:  # pose box branch: the box from its own landmarks, not from the keypoints
        boxes = boxes_from_points(points[:, -num_box_points:])
        points = points[:, :-num_box_points]
    else:
        boxes = boxes_from_points(points)
    point_scores = scores[:, None].expand(-1, points.shape[1]).clone() if with_point_scores else None
    return Detections(boxes, scores, labels, points, point_scores)


def nms_detections(dets: Detections, iou_threshold: float = 0.6, max_dets: int = 100) -> Detections:
    """Class-aware NMS and the ``max_dets`` best, sorted by decreasing score."""
    keep = batched_nms(dets.boxes, dets.scores, dets.labels, iou_threshold)[:max_dets]
    ps = None if dets.point_scores is None else dets.point_scores[keep]
    return Detections(dets.boxes[keep], dets.scores[keep], dets.labels[keep], dets.points[keep], ps)


def cat_detections(parts: list[Detections]) -> Detections:
    ps = None if parts[0].point_scores is None else torch.cat([d.point_scores for d in parts])
    return Detections(torch.cat([d.boxes for d in parts]), torch.cat([d.scores for d in parts]),
                      torch.cat([d.labels for d in parts]), torch.cat([d.points for d in parts]), ps)


def _resolve_sizes(image_sizes, batch: int, shape: tuple[int, int]) -> list[tuple[int, int]]:
    if image_sizes is None:
        return [tuple(shape)] * batch
    sizes = [tuple(int(v) for v in (s.size if isinstance(s, ImageMeta) else s)) for s in image_sizes]
    if len(sizes) != batch:
        raise ValueError(f"{len(sizes)} image sizes for a batch of {batch} images")
    return sizes


def postprocess(out: HeadOutputs, image_sizes, cfg: ModelConfig, image_shape: tuple[int, int]) -> list[Detections]:
    """Detections of every image of a batch (module docstring).

    Args:
        out: head outputs (B images).
        image_sizes: B × (h, w) valid regions (or ImageMeta), None = the whole tensor.
        cfg: the model config (task and :class:`TestConfig`).
        image_shape: (H, W) of the batch tensor.
    """
    test: TestConfig = cfg.test
    b = out.cls_logits.shape[0]
    sizes = _resolve_sizes(image_sizes, b, image_shape)
    results = []
    for i in range(b):
        dets = select_candidates(out.cls_logits[i], out.vec_refine[i], out.anchors, out.num_points_per_level,
                                 sizes[i], test.score_thr, test.pre_nms_topk, cfg.task == "pose", cfg.num_box_points)
        results.append(nms_detections(dets, test.nms_iou, test.max_dets))
    return results


def _flip_valid_regions(images: Tensor, sizes: list[tuple[int, int]]) -> Tensor:
    """Mirror each image inside its valid region (padding stays on the right/bottom)."""
    out = images.clone()
    for i, (h, w) in enumerate(sizes):
        out[i, :, :h, :w] = images[i, :, :h, :w].flip(-1)
    return out


@torch.no_grad()
def predict_with_tta(model, images: Tensor, metas=None, flip: bool = False,
                     scales: tuple[float, ...] | list[float] = (1.0,)) -> list[Detections]:
    """Detections with optional horizontal-flip and multi-scale test-time augmentation.

    Every (scale, flip) pass yields per-image candidates (score threshold and per-level top-k as in
    :func:`select_candidates`); they are mapped back to the frame of ``images`` (unflipped with
    :func:`lsnet.transforms.hflip_points`, which also swaps left/right landmarks, then divided by
    the scale) and merged by one class-aware NMS per image. ``flip=False, scales=(1,)`` gives exactly
    ``model(images, image_sizes=...)``.

    Args:
        model: an :class:`lsnet.modeling.LSNet` (put it in eval mode first).
        images: (B, 3, H, W) normalised, zero-padded batch.
        metas: B × ImageMeta or (h, w) valid regions; None = the whole tensor.
        flip: add horizontally flipped passes.
        scales: resize factors of the batch.
    """
    from lsnet.transforms import hflip_boxes, hflip_points

    cfg: ModelConfig = model.cfg
    test = cfg.test
    b, _, height, width = images.shape
    sizes = _resolve_sizes(metas, b, (height, width))
    candidates: list[list[Detections]] = [[] for _ in range(b)]
    for scale in scales:
        if scale == 1.0:
            scaled, sx, sy = images, 1.0, 1.0
        else:
            nh, nw = max(1, round(height * scale)), max(1, round(width * scale))
            scaled = F.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False)
            sx, sy = nw / width, nh / height
            pad_h, pad_w = (-nh) % SIZE_DIVISOR, (-nw) % SIZE_DIVISOR
            scaled = F.pad(scaled, (0, pad_w, 0, pad_h))
        scaled_sizes = [(min(round(h * sy), scaled.shape[2]), min(round(w * sx), scaled.shape[3])) for h, w in sizes]
        for flipped in ((False, True) if flip else (False,)):
            x = _flip_valid_regions(scaled, scaled_sizes) if flipped else scaled
            out = model.forward_raw(x)
            for i in range(b):
                d = select_candidates(out.cls_logits[i], out.vec_refine[i], out.anchors, out.num_points_per_level,
                                      scaled_sizes[i], test.score_thr, test.pre_nms_topk, cfg.task == "pose",
                                      cfg.num_box_points)
                points = d.points
                if flipped:
                    points = hflip_points(points, scaled_sizes[i][1], cfg.task)
                points = clip_points(points / points.new_tensor([sx, sy]), sizes[i])
                if cfg.num_box_points:  # the pose box branch's box, mapped back like the points
                    boxes = hflip_boxes(d.boxes, scaled_sizes[i][1]) if flipped else d.boxes
                    corners = boxes.reshape(-1, 2, 2) / boxes.new_tensor([sx, sy])
                    boxes = clip_points(corners, sizes[i]).reshape(-1, 4)
                else:
                    boxes = boxes_from_points(points)
                candidates[i].append(Detections(boxes, d.scores, d.labels, points, d.point_scores))
    return [nms_detections(cat_detections(c), test.nms_iou, test.max_dets) for c in candidates]
