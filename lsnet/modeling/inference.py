"""From head outputs to detections: decoding, thresholds, NMS and test-time augmentation.

Per image (paper §4, mmdet test settings of the reference):

1. Per FPN level, class scores ``sigmoid(logits)`` above ``score_thr`` (0.05); the
   ``pre_nms_topk`` (1000) best (point, class) pairs of the level are kept.
2. Their refined vectors decode to landmarks with the max rule of Appendix A
   (:func:`lsnet.coding.decode_offsets`); landmarks are clipped to the image's valid region.
3. The box of a detection is the min/max of its landmarks: exact for the 4 extreme points, the
   polygon's box for contours, and for pose the box of the 17 predicted keypoints -- or, with the
   pose box branch (``model.pose_box_vectors``, on for obj-box), the box of its 4 box landmarks.
   With CPV (``model.cpv``) the boxes of P4–P7 detections are then moved to the corners their
   heatmaps verify (:func:`lsnet.modeling.cpv.refine_boxes_with_corners`).
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
                      with_point_scores: bool = False, num_box_points: int = 0,
                      box_refiner=None) -> Detections:
    """Steps 1–3 of the module docstring for one image (before NMS).

    Args:
        cls_logits: (P, C); vectors: (P, N, 4) refined vectors; anchors: (P, 2).
        num_points_per_level: level sizes splitting ``P``.
        image_size: (h, w) valid region.
        num_box_points: the last this many landmarks are the pose box branch's: the box is theirs,
            and they are not part of the detection's points.
        box_refiner: ``f(boxes (K, 4), point indices (K,)) -> boxes`` applied to the boxes (CPV,
            :func:`cpv_box_refiner`).
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
    if box_refiner is not None:
        boxes = box_refiner(boxes, idx)
    point_scores = scores[:, None].expand(-1, points.shape[1]).clone() if with_point_scores else None
    return Detections(boxes, scores, labels, points, point_scores)


def cpv_box_refiner(out: HeadOutputs, i: int, image_size: tuple[float, float], cfg: ModelConfig):
    """The CPV box refinement (:func:`lsnet.modeling.cpv.refine_boxes_with_corners`) of image ``i`` of
    ``out`` as a ``box_refiner`` of :func:`select_candidates`; None without CPV (``model.cpv``) or
    with ``model.test.cpv_refine`` off."""
    if not (cfg.cpv and cfg.test.cpv_refine) or out.corner_logits is None:
        return None
    from lsnet.modeling.cpv import refine_boxes_with_corners

    heat = out.corner_logits[i].split(out.num_points_per_level)
    offsets = out.corner_offsets[i].split(out.num_points_per_level)
    heat = [m.T.reshape(2, h, w) for m, (h, w) in zip(heat, out.level_sizes)]
    offsets = [m.T.reshape(4, h, w) for m, (h, w) in zip(offsets, out.level_sizes)]
    ends = torch.tensor(out.num_points_per_level, device=out.corner_logits.device).cumsum(0)

    def refine(boxes: Tensor, idx: Tensor) -> Tensor:
        levels = torch.bucketize(idx, ends, right=True)
        return refine_boxes_with_corners(boxes, levels, heat, offsets, out.strides, image_size)

    return refine


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


def output_vectors(vectors: Tensor, cfg: ModelConfig) -> Tensor:
    """The vectors that decode into detections: (..., N', 4) -> without the centre vectors that
    ``model.center_vector`` adds after the landmarks (and after the pose box branch's 4 points)."""
    if not cfg.center_vector:
        return vectors
    n = cfg.num_points
    parts = [vectors[..., :n, :]]
    if cfg.num_box_points:
        parts.append(vectors[..., n + 1: n + 1 + cfg.num_box_points, :])
    return torch.cat(parts, dim=-2)


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
        dets = select_candidates(out.cls_logits[i], output_vectors(out.vec_refine[i], cfg), out.anchors, out.num_points_per_level,
                                 sizes[i], test.score_thr, test.pre_nms_topk, cfg.task == "pose", cfg.num_box_points,
                                 cpv_box_refiner(out, i, sizes[i], cfg))
        results.append(nms_detections(dets, test.nms_iou, test.max_dets))
    return results


def _flip_valid_regions(images: Tensor, sizes: list[tuple[int, int]]) -> Tensor:
    """Mirror each image inside its valid region (padding stays on the right/bottom)."""
    out = images.clone()
    for i, (h, w) in enumerate(sizes):
        out[i, :, :h, :w] = images[i, :, :h, :w].flip(-1)
    return out


#: ATSS's multi-scale test, which the paper's † rows follow ("we refer to ATSS"; the reference
#: config's commented-out test block): these shorter sides (longer side <= 3000), each also
#: flipped, and per scale the range of box sizes (sqrt of the area, in that scale's own frame) it
#: is trusted with: small scales keep large boxes, large scales small ones.
ATSS_TEST_SHORT_SIDES = (400, 500, 600, 640, 700, 900, 1000, 1100, 1200, 1300, 1400, 1800)
ATSS_SCALE_RANGES = ((96, 10000), (96, 10000), (64, 10000), (64, 10000), (64, 10000), (0, 10000),
                     (0, 10000), (0, 256), (0, 256), (0, 192), (0, 192), (0, 96))
#: detections kept after the multi-scale vote in the reference (``mmdet/models/detectors/lsnet.py:355-365``)
ATSS_VOTE_MAX_DETS = 1000


def atss_test_scales(short_side: int = 800) -> list[float]:
    """ATSS's test sizes as resize factors of an image already resized to ``short_side`` (at the
    paper's 800 x 1333 test size, 1800 / 800 = 2.25 gives a longer side of 3000, ATSS's cap)."""
    return [s / short_side for s in ATSS_TEST_SHORT_SIDES]


def in_scale_range(boxes: Tensor, low: float, high: float) -> Tensor:
    """(K,) bool: ``low² <= area <= high²`` (the reference's inclusive bounds, area without +1)."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return (area >= low * low) & (area <= high * high)


def _iou_one_to_many(box: Tensor, boxes: Tensor) -> Tensor:
    lt = torch.maximum(box[:2], boxes[:, :2])
    rb = torch.minimum(box[2:], boxes[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area = (box[2:] - box[:2]).prod()
    areas = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1)
    return inter / (area + areas - inter).clamp(min=1e-6)


def vote_detections(dets: Detections, vote_iou: float = 0.66, max_dets: int = 100,
                    min_soft_score: float = 0.05) -> Detections:
    """ATSS's soft box voting (its ``soft-vote`` merge of multi-scale results), per class.

    Repeatedly, the best remaining detection of a class and every remaining one with IoU >=
    ``vote_iou`` to it form a group, which leaves the pool. A group of one is kept as it is. A larger
    group gives (a) one detection whose box -- and landmarks -- are the score-weighted mean of the
    group's, with the group's best score, and (b) each member again, with its own box and its score
    decayed to ``score · (1 − IoU)`` if that is still >= ``min_soft_score`` (the best member, IoU 1,
    never). Finally the ``max_dets`` best by score.

    Departures from the reference (``bboxes_vote``): a class with a single detection is kept (the
    reference returns nothing for it); ``max_dets`` keeps the best by a stable sort, where the
    reference keeps every score >= the 1000th (ties may exceed it). ``predict_with_tta`` passes
    ``model.test.vote_max_dets`` (1000 in the ``_mstest`` configs, as the reference).
    """
    out_idx, out_scores, out_boxes, out_points = [], [], [], []
    for label in dets.labels.unique().tolist():
        idx = torch.nonzero(dets.labels == label).squeeze(1)
        idx = idx[dets.scores[idx].argsort(descending=True, stable=True)]
        while idx.numel():
            iou = _iou_one_to_many(dets.boxes[idx[0]], dets.boxes[idx])
            iou[0] = 1.0
            member = iou >= vote_iou
            group, group_iou = idx[member], iou[member]
            idx = idx[~member]
            if group.numel() == 1:
                out_idx.append(group)
                out_scores.append(dets.scores[group])
                out_boxes.append(dets.boxes[group])
                out_points.append(dets.points[group])
                continue
            w = dets.scores[group]
            out_idx.append(group[:1])
            out_scores.append(w.max().reshape(1))
            out_boxes.append(((dets.boxes[group] * w[:, None]).sum(0) / w.sum())[None])
            out_points.append(((dets.points[group] * w[:, None, None]).sum(0) / w.sum())[None])
            soft = w * (1 - group_iou)
            keep = soft >= min_soft_score
            out_idx.append(group[keep])
            out_scores.append(soft[keep])
            out_boxes.append(dets.boxes[group[keep]])
            out_points.append(dets.points[group[keep]])
    if not out_idx:
        return dets
    idx, scores = torch.cat(out_idx), torch.cat(out_scores)
    order = scores.argsort(descending=True, stable=True)[:max_dets]
    ps = None if dets.point_scores is None else scores[order, None].expand(-1, dets.points.shape[1]).clone()
    return Detections(torch.cat(out_boxes)[order], scores[order], dets.labels[idx[order]],
                      torch.cat(out_points)[order], ps)


@torch.no_grad()
def predict_with_tta(model, images: Tensor, metas=None, flip: bool | None = None,
                     scales: tuple[float, ...] | list[float] | None = None,
                     scale_ranges: list | tuple | None = None, merge: str | None = None,
                     vote_max_dets: int | None = None) -> list[Detections]:
    """Detections with horizontal-flip and multi-scale test-time augmentation.

    Every (scale, flip) pass yields per-image candidates (score threshold and per-level top-k as in
    :func:`select_candidates`; with ``merge="vote"`` also the pass's own NMS and ``max_dets``, as
    the reference's per-pass post-processing); with ``scale_ranges`` a pass keeps only the
    detections whose box area *in its resized frame* lies in its range (:func:`in_scale_range`).
    They are mapped back to the frame of ``images`` (unflipped with
    :func:`lsnet.transforms.hflip_points`, which also swaps left/right landmarks, then divided by
    the scale) and merged: ``"nms"`` = one class-aware NMS per image, ``"vote"`` =
    :func:`vote_detections` (ATSS). One unflipped scale 1 pass gives exactly
    ``model(images, image_sizes=...)`` with either merge.

    Args:
        model: an :class:`lsnet.modeling.LSNet` (put it in eval mode first).
        images: (B, 3, H, W) normalised, zero-padded batch.
        metas: B × ImageMeta or (h, w) valid regions; None = the whole tensor.
        flip, scales, scale_ranges, merge, vote_max_dets: as :class:`lsnet.modeling.config.TestConfig`, whose
            values (``model.cfg.test``) are used for those left None (no scales: ``(1.0,)``).
    """
    from lsnet.transforms import hflip_boxes, hflip_points

    cfg: ModelConfig = model.cfg
    test = cfg.test
    flip = test.flip if flip is None else flip
    if scales is None:
        scales, default_ranges = test.scales or (1.0,), test.scale_ranges
    else:
        default_ranges = None
    scale_ranges = default_ranges if scale_ranges is None else scale_ranges
    merge = test.merge if merge is None else merge
    if vote_max_dets is None:
        vote_max_dets = test.max_dets if test.vote_max_dets is None else test.vote_max_dets
    if merge not in ("nms", "vote"):
        raise ValueError(f"merge must be 'nms' or 'vote', got {merge!r}")
    if scale_ranges is not None and len(scale_ranges) != len(scales):
        raise ValueError(f"{len(scale_ranges)} scale ranges for {len(scales)} scales")
    b, _, height, width = images.shape
    sizes = _resolve_sizes(metas, b, (height, width))
    candidates: list[list[Detections]] = [[] for _ in range(b)]
    for k, scale in enumerate(scales):
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
                d = select_candidates(out.cls_logits[i], output_vectors(out.vec_refine[i], cfg), out.anchors, out.num_points_per_level,
                                      scaled_sizes[i], test.score_thr, test.pre_nms_topk, cfg.task == "pose",
                                      cfg.num_box_points, cpv_box_refiner(out, i, scaled_sizes[i], cfg))
                if merge == "vote":
                    d = nms_detections(d, test.nms_iou, test.max_dets)
                if scale_ranges is not None:
                    d = _select(d, in_scale_range(d.boxes, *scale_ranges[k]))
                points = d.points
                if flipped:
                    points = hflip_points(points, scaled_sizes[i][1], cfg.task)
                points = clip_points(points / points.new_tensor([sx, sy]), sizes[i])
                if cfg.num_box_points or (cfg.cpv and test.cpv_refine):  # a box of its own: mapped back like the points
                    boxes = hflip_boxes(d.boxes, scaled_sizes[i][1]) if flipped else d.boxes
                    corners = boxes.reshape(-1, 2, 2) / boxes.new_tensor([sx, sy])
                    boxes = clip_points(corners, sizes[i]).reshape(-1, 4)
                else:
                    boxes = boxes_from_points(points)
                candidates[i].append(Detections(boxes, d.scores, d.labels, points, d.point_scores))
    if merge == "vote":
        return [vote_detections(cat_detections(c), test.vote_iou, vote_max_dets) for c in candidates]
    return [nms_detections(cat_detections(c), test.nms_iou, test.max_dets) for c in candidates]


def _select(dets: Detections, keep: Tensor) -> Detections:
    ps = None if dets.point_scores is None else dets.point_scores[keep]
    return Detections(dets.boxes[keep], dets.scores[keep], dets.labels[keep], dets.points[keep], ps)
