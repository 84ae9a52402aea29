"""Which anchor point learns which object: the two sample assigners of LSNet (paper §3.2, Fig. 2).

Stage 1 (initial vectors) has exactly one positive per object — the anchor point nearest the object
centre on the FPN level chosen by the object's size (:func:`assign_centroid`). Stage 2 (refined
vectors and the class) takes its positives from ATSS, Zhang et al. CVPR 2020 (:func:`assign_atss`).

Every assigner returns a LongTensor ``(P,)`` over all anchor points of one image (levels
concatenated in order):

- ``>= 0``: positive, the index of the matched ground-truth object (row of ``gt_boxes``),
- ``-1`` (:data:`NEGATIVE`): background,
- ``-2`` (:data:`IGNORED`): no loss at all (e.g. inside a crowd region).

Crowd / ignore objects (``gt_ignore``) never produce positives. For pose, whether objects are
matched by their object box ('obj-box') or by the box of their labelled keypoints ('kps-box') is the
caller's choice of ``gt_boxes`` (``LandmarkTargets.boxes``).

All functions are vectorised over points and objects (one Python loop over FPN levels at most) and
run on whatever device ``points`` lives on.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

#: Label of a background point.
NEGATIVE: int = -1
#: Label of a point that carries no loss.
IGNORED: int = -2

#: A point counts as inside a box only if it is at least this far (pixels) from every edge; the same
#: margin as the ATSS reference implementations, so that points exactly on an edge are outside.
INSIDE_EPS: float = 0.01


def anchor_points(
    feature_sizes: Sequence[tuple[int, int]],
    strides: Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[Tensor]:
    """Anchor points of every FPN level, in the pixel frame of the input image.

    The point of cell ``(i, j)`` (row ``i``, column ``j``) on a level of stride ``s`` is the cell
    centre ``((j + 0.5) * s, (i + 0.5) * s)``; points are listed row-major (``index = i * W + j``),
    the order of ``feature.flatten(2)``. (The reference code, via mmdet's ``PointGenerator``, puts
    the point at the cell's top-left corner ``(j * s, i * s)``; cell centres are the convention of
    torchvision's FCOS and keep flipped images symmetric.)

    Args:
        feature_sizes: per level ``(H, W)`` of the feature map.
        strides: per level stride in pixels.
    Returns:
        list of (H*W, 2) tensors ``x, y``.
    """
    if len(feature_sizes) != len(strides):
        raise ValueError(f"anchor_points: {len(feature_sizes)} feature sizes but {len(strides)} strides")
    out = []
    for (h, w), s in zip(feature_sizes, strides):
        xs = (torch.arange(int(w), device=device, dtype=dtype) + 0.5) * s
        ys = (torch.arange(int(h), device=device, dtype=dtype) + 0.5) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        out.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
    return out


def _check_inputs(points: Tensor, num_points_per_level: Sequence[int], strides: Sequence[int],
                  gt_boxes: Tensor, gt_ignore: Tensor, who: str) -> tuple[Tensor, Tensor]:
    if points.dim() != 2 or points.shape[1] != 2:
        raise ValueError(f"{who}: points must be (P, 2), got {tuple(points.shape)}")
    if len(num_points_per_level) != len(strides):
        raise ValueError(f"{who}: {len(num_points_per_level)} levels in num_points_per_level "
                         f"but {len(strides)} strides")
    if sum(int(n) for n in num_points_per_level) != points.shape[0]:
        raise ValueError(f"{who}: num_points_per_level sums to {sum(num_points_per_level)} "
                         f"but there are {points.shape[0]} points")
    if gt_boxes.dim() != 2 or gt_boxes.shape[1] != 4:
        raise ValueError(f"{who}: gt_boxes must be (M, 4), got {tuple(gt_boxes.shape)}")
    if gt_ignore.shape != (gt_boxes.shape[0],):
        raise ValueError(f"{who}: gt_ignore must be ({gt_boxes.shape[0]},), got {tuple(gt_ignore.shape)}")
    return gt_boxes.to(device=points.device, dtype=points.dtype), gt_ignore.to(device=points.device, dtype=torch.bool)


def _level_ranges(num_points_per_level: Sequence[int]) -> list[tuple[int, int]]:
    starts = [0]
    for n in num_points_per_level:
        starts.append(starts[-1] + int(n))
    return list(itertools.pairwise(starts))


def _points_inside(points: Tensor, boxes: Tensor, eps: float) -> Tensor:
    """Whether points (..., 2) lie inside boxes (..., 4) (shapes broadcast) with a margin ``eps``
    from every edge (``eps < 0`` includes the edges). Returns the broadcast (...) bool."""
    x, y = points[..., 0], points[..., 1]
    return (x - boxes[..., 0] > eps) & (y - boxes[..., 1] > eps) & (boxes[..., 2] - x > eps) & (boxes[..., 3] - y > eps)


def _mark_ignored(labels: Tensor, points: Tensor, ignore_boxes: Tensor) -> Tensor:
    """Points inside (edges included) any ignore box that are not positive become :data:`IGNORED`."""
    if ignore_boxes.shape[0] == 0 or points.shape[0] == 0:
        return labels
    inside_any = _points_inside(points[:, None], ignore_boxes, eps=-INSIDE_EPS).any(dim=1)  # (P, G) -> (P,)
    return torch.where(inside_any & (labels < 0), torch.full_like(labels, IGNORED), labels)


def _resolve_conflicts(num_points: int, point_index: Tensor, gt_index: Tensor, score: Tensor,
                       higher_is_better: bool) -> Tensor:
    """Give each point the single best (point, object) pair among the proposed ones.

    Args:
        point_index, gt_index, score: (K,) proposed pairs and their quality.
    Returns:
        (P,) int64, the winning object index per point or -1. Ties go to the lowest object index.
    """
    labels = torch.full((num_points,), NEGATIVE, dtype=torch.int64, device=point_index.device)
    if point_index.numel() == 0:
        return labels
    fill = -math.inf if higher_is_better else math.inf
    best = torch.full((num_points,), fill, dtype=score.dtype, device=score.device)
    best.scatter_reduce_(0, point_index, score, reduce="amax" if higher_is_better else "amin")
    winner = score == best[point_index]
    big = torch.iinfo(torch.int64).max
    chosen = torch.full((num_points,), big, dtype=torch.int64, device=point_index.device)
    chosen.scatter_reduce_(0, point_index[winner], gt_index[winner], reduce="amin")
    return torch.where(chosen == big, labels, chosen)


def box_pyramid_level(gt_boxes: Tensor, strides: Sequence[int], scale: float = 4) -> Tensor:
    """FPN level (index into ``strides``) of each object for the stage-1 assigner.

    The object's level exponent is ``floor(log2(sqrt(w * h) / scale))`` =
    ``floor((log2(w / scale) + log2(h / scale)) / 2)`` — the rule of mmdet's ``PointAssigner`` and the
    reference's ``CentroidAssigner`` (``point_base_scale = 4``), which truncate with ``int()``; for
    exponents that survive the clamp below truncation and floor agree. The object goes to the level
    whose stride is ``2**exponent``, clamped to the available levels: with strides 8…128 a box of
    geometric-mean side < 64 px goes to stride 8, [64, 128) to 16, …, ≥ 512 to 128.

    Args:
        gt_boxes: (M, 4) ``x1, y1, x2, y2``.
        strides: strictly increasing powers of two.
        scale: the base scale (side, in units of the stride) of an object on its own level.
    Returns:
        (M,) int64 level indices in ``[0, len(strides))``.
    """
    if len(strides) == 0:
        raise ValueError("box_pyramid_level: no strides")
    exps = []
    for s in strides:
        e = math.log2(s)
        if s <= 0 or e != int(e):
            raise ValueError(f"box_pyramid_level: strides must be powers of two, got {list(strides)}")
        exps.append(int(e))
    if any(b <= a for a, b in itertools.pairwise(exps)):
        raise ValueError(f"box_pyramid_level: strides must be strictly increasing, got {list(strides)}")
    wh = (gt_boxes[:, 2:] - gt_boxes[:, :2]).clamp(min=1e-6)
    exponent = torch.floor((torch.log2(wh[:, 0] / scale) + torch.log2(wh[:, 1] / scale)) / 2)
    level_exps = torch.tensor(exps, dtype=exponent.dtype, device=gt_boxes.device)
    # Largest level whose exponent is <= the object's (levels may have gaps), clamped to [0, L-1].
    idx = torch.searchsorted(level_exps, exponent.contiguous(), right=True) - 1
    return idx.clamp(0, len(strides) - 1).to(torch.int64)


def assign_centroid(
    points: Tensor,
    num_points_per_level: Sequence[int],
    strides: Sequence[int],
    gt_boxes: Tensor,
    gt_ignore: Tensor,
    scale: float = 4,
) -> Tensor:
    """Stage-1 assigner: one positive per object (paper §3.2, reference ``CentroidAssigner`` with
    ``scale=4, pos_num=1, iou_type='center'``).

    1. The object's level is :func:`box_pyramid_level` (size-based, log2 rule).
    2. On that level the positive is the point nearest the box centre, distance measured in units of
       the box size, ``‖(p − c) / (w, h)‖`` as in the reference (the same ranking as plain Euclidean
       distance for square boxes). Exact ties go to the lowest point index (row-major).
    3. If several objects pick the same point, the object whose centre is nearer (same normalised
       distance; ties: lowest object index) keeps it and the others get **no** positive — as in the
       reference (mmdet ``PointAssigner``), which does not fall back to a second-nearest point.
    4. Ignore (crowd) objects take no part in 1–3; points inside an ignore box (edges included)
       that are not positive get :data:`IGNORED`. (The reference drops crowd boxes entirely, so
       their points are plain background there.)

    Args:
        points: (P, 2) anchor points ``x, y`` of all levels, concatenated (see :func:`anchor_points`).
        num_points_per_level: number of points of each level, summing to ``P``.
        strides: stride of each level (powers of two, increasing).
        gt_boxes: (M, 4) ``x1, y1, x2, y2``.
        gt_ignore: (M,) bool, True for crowd / ignore regions.
        scale: base scale of :func:`box_pyramid_level`.
    Returns:
        (P,) int64 labels (object index, -1 background, -2 ignored).
    """
    gt_boxes, gt_ignore = _check_inputs(points, num_points_per_level, strides, gt_boxes, gt_ignore,
                                        "assign_centroid")
    num_points = points.shape[0]
    labels = torch.full((num_points,), NEGATIVE, dtype=torch.int64, device=points.device)
    if num_points == 0 or gt_boxes.shape[0] == 0:
        return labels

    active = torch.nonzero(~gt_ignore).squeeze(1)
    boxes = gt_boxes[active]
    levels = box_pyramid_level(boxes, strides, scale)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-6)

    best_point = torch.full((boxes.shape[0],), -1, dtype=torch.int64, device=points.device)
    best_dist = torch.full((boxes.shape[0],), math.inf, dtype=points.dtype, device=points.device)
    for level, (start, end) in enumerate(_level_ranges(num_points_per_level)):
        on_level = torch.nonzero(levels == level).squeeze(1)
        if end == start or on_level.numel() == 0:
            continue
        # (P_l, M_l) squared normalised distances; min returns the first (lowest-index) minimum.
        dx = (points[start:end, 0:1] - centres[on_level, 0]) / wh[on_level, 0]
        dy = (points[start:end, 1:2] - centres[on_level, 1]) / wh[on_level, 1]
        dist2, idx = (dx * dx + dy * dy).min(dim=0)
        best_point[on_level] = idx + start
        best_dist[on_level] = dist2.sqrt()

    has_point = best_point >= 0
    labels = _resolve_conflicts(num_points, best_point[has_point], active[has_point], best_dist[has_point],
                                higher_is_better=False)
    return _mark_ignored(labels, points, gt_boxes[gt_ignore])


def _pairwise_iou_aligned(a: Tensor, b: Tensor) -> Tensor:
    """IoU of boxes ``a[..., :]`` and ``b[..., :]`` element by element (broadcast), (..., 4) -> (...)."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(dim=-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(dim=-1)
    union = area_a + area_b - inter
    # Degenerate (zero-area) pairs have IoU 0 instead of 0/0.
    return inter / union.clamp(min=torch.finfo(union.dtype).tiny)


def atss_candidates(
    points: Tensor,
    num_points_per_level: Sequence[int],
    strides: Sequence[int],
    gt_boxes: Tensor,
    topk: int = 9,
    anchor_scale: float = 8.0,
    anchor_boxes: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The ATSS candidate set and IoU threshold of every object (exposed for tests and debugging).

    Per object and per level the ``min(topk, P_l)`` points nearest (Euclidean) the box centre are
    candidates; exact distance ties go to the lower point index (so CPU and CUDA agree).
    The threshold is ``mean + std`` of the candidates' IoU with the object, ``std`` with Bessel's
    correction (``torch.std``, as in the ATSS and mmdet code); a single candidate gives ``std = 0``.

    Returns:
        candidate_index (K, M) int64 point indices, K = Σ_l min(topk, P_l), levels in order and
        increasing point index within a level;
        candidate_iou (K, M); threshold (M,).
    """
    num_gt = gt_boxes.shape[0]
    boxes = _anchor_boxes(points, num_points_per_level, strides, anchor_scale, anchor_boxes)
    centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    cand = []
    for start, end in _level_ranges(num_points_per_level):
        k = min(topk, end - start)
        if k <= 0:
            continue
        # (M, P_l): objects as rows so that the selection below runs along contiguous memory.
        dx = points[start:end, 0] - centres[:, 0:1]
        dy = points[start:end, 1] - centres[:, 1:2]
        cand.append(_k_smallest_lowest_index(dx * dx + dy * dy, k).T + start)
    if not cand:
        empty = torch.zeros(0, num_gt, dtype=torch.int64, device=points.device)
        return empty, empty.to(points.dtype), torch.full((num_gt,), math.inf, device=points.device)
    candidate_index = torch.cat(cand, dim=0)  # (K, M)
    candidate_iou = _pairwise_iou_aligned(boxes[candidate_index], gt_boxes[None])
    mean = candidate_iou.mean(dim=0)
    std = candidate_iou.std(dim=0) if candidate_iou.shape[0] > 1 else torch.zeros_like(mean)
    return candidate_index, candidate_iou, mean + std


def _k_smallest_lowest_index(values: Tensor, k: int) -> Tensor:
    """(M, N) -> (M, k) column indices of the ``k`` smallest values of each row, in increasing
    order, exact ties broken towards the lower index (what a stable sort gives, without sorting;
    ``torch.topk`` alone leaves the choice among ties unspecified, so CPU and CUDA could differ)."""
    kth = torch.topk(values, k, dim=1, largest=False).values[:, -1:]  # (M, 1) the k-th smallest
    below = values < kth
    at = values == kth
    # Of the values equal to the k-th smallest, keep the first (k - #below) by index.
    keep = below | (at & (at.cumsum(dim=1) <= k - below.sum(dim=1, keepdim=True)))
    cols = torch.arange(values.shape[1], device=values.device)
    key = torch.where(keep, cols, values.shape[1])  # exactly k distinct small keys per row
    return torch.topk(key, k, dim=1, largest=False).indices


def _anchor_boxes(points: Tensor, num_points_per_level: Sequence[int], strides: Sequence[int],
                  anchor_scale: float, anchor_boxes: Tensor | None) -> Tensor:
    if anchor_boxes is not None:
        if anchor_boxes.shape != (points.shape[0], 4):
            raise ValueError(f"assign_atss: anchor_boxes must be ({points.shape[0]}, 4), "
                             f"got {tuple(anchor_boxes.shape)}")
        return anchor_boxes.to(points)
    half = torch.cat([
        torch.full((int(n),), anchor_scale * s / 2, dtype=points.dtype, device=points.device)
        for n, s in zip(num_points_per_level, strides)
    ]) if len(strides) else points.new_zeros(0)
    return torch.cat([points - half[:, None], points + half[:, None]], dim=1)


def assign_atss(
    points: Tensor,
    num_points_per_level: Sequence[int],
    strides: Sequence[int],
    gt_boxes: Tensor,
    gt_ignore: Tensor,
    topk: int = 9,
    anchor_scale: float = 8.0,
    anchor_boxes: Tensor | None = None,
) -> Tensor:
    """Stage-2 assigner: Adaptive Training Sample Selection (Zhang et al. 2020; paper §3.2, topk 9).

    1. Each point carries an anchor box: the square of side ``anchor_scale * stride`` centred on it
       (ATSS's single anchor per location, octave scale 8). ``anchor_boxes`` (P, 4) replaces these
       squares — the reference's refine stage passes the detached stage-1 predicted boxes there.
    2. Candidates and the per-object IoU threshold ``mean + std``: :func:`atss_candidates`.
    3. A candidate is positive if its IoU ≥ threshold **and** its point lies strictly inside the
       object box (more than :data:`INSIDE_EPS` from every edge). The point, not the anchor-box centre, is
       used for distances and the inside test — they coincide for the default squares; with
       predicted ``anchor_boxes`` mmdet uses the box centres instead.
    4. A point positive for several objects goes to the one with the highest IoU (ties: lowest
       object index).
    5. Ignore (crowd) objects are never candidates; points lying inside an ignore box (edges
       included) that are not positive get :data:`IGNORED`. (We chose the point-inside rule rather
       than mmdet's anchor-box IoF > thr so both stages ignore the same points; the reference runs
       with ignoring disabled, i.e. crowd regions are background.)

    Objects whose candidates all fail 3 (e.g. a tiny box between points) simply have no positive.

    Args:
        points: (P, 2); num_points_per_level; strides: as in :func:`assign_centroid`.
        gt_boxes: (M, 4); gt_ignore: (M,) bool.
        topk: candidates per level per object.
        anchor_scale: anchor-box side in units of the level stride.
        anchor_boxes: optional (P, 4) boxes to use instead of the squares.
    Returns:
        (P,) int64 labels (object index, -1 background, -2 ignored).
    """
    gt_boxes, gt_ignore = _check_inputs(points, num_points_per_level, strides, gt_boxes, gt_ignore,
                                        "assign_atss")
    num_points = points.shape[0]
    labels = torch.full((num_points,), NEGATIVE, dtype=torch.int64, device=points.device)
    if num_points == 0 or gt_boxes.shape[0] == 0:
        return labels

    active = torch.nonzero(~gt_ignore).squeeze(1)
    if active.numel() > 0:
        boxes = gt_boxes[active]
        cand_index, cand_iou, threshold = atss_candidates(points, num_points_per_level, strides, boxes,
                                                          topk, anchor_scale, anchor_boxes)
        # (K, M) centre-inside test, evaluated only for the candidates.
        inside = _points_inside(points[cand_index], boxes, eps=INSIDE_EPS)
        positive = (cand_iou >= threshold[None]) & inside
        gt_of_cand = active[None].expand_as(cand_index)
        labels = _resolve_conflicts(num_points, cand_index[positive], gt_of_cand[positive], cand_iou[positive],
                                    higher_is_better=True)
    return _mark_ignored(labels, points, gt_boxes[gt_ignore])
