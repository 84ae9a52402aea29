"""Geometric transforms of landmark targets: resize, horizontal flip, padding.

All in the continuous pixel frame of :mod:`lsnet.targets` (the image spans ``[0, W] x [0, H]``).

* **Resize** by ``(sx, sy)``: ``x' = sx * x``, ``y' = sy * y``; coordinates are snapped to
  :data:`lsnet.outline.COORD_GRID` (1/256 px) so that later flips stay exact.
* **Horizontal flip** of an image of width ``W``: ``x' = W - x``, and the landmark order is permuted
  so that the flipped landmarks mean the same thing on the flipped image:

  - ``bbox`` (extreme points top, left, bottom, right): left and right swap.
  - ``segm`` (contours, clockwise on screen, sample 0 nearest the box's top-centre): mirroring turns
    clockwise into counter-clockwise, so the cyclic order is reversed *keeping sample 0*:
    ``new[k] = mirror(old[(-k) mod N])``. Sample 0 stays the one nearest the top-centre (the
    top-centre mirrors onto the top-centre), so this equals the contour computed on the mirrored
    annotation, including the multi-part layout of :func:`lsnet.outline.contour_points` (up to
    exact ties of mirror-symmetric shapes).
  - ``pose``: left/right keypoints swap (:data:`COCO_KEYPOINT_FLIP_INDEX`), visibility with them.

  The permutations are involutions and ``W - (W - x) == x`` holds exactly for float32 coordinates on
  the 1/256-px grid, so flipping twice is the identity bit for bit.
* **Padding** at the right/bottom (what the batch collation does) changes no coordinate; padding at
  the left/top by ``(px, py)`` is a translation, :func:`translate_targets`.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .outline import COORD_GRID
from .structures import COCO_KEYPOINT_FLIP_INDEX, EXTREME_FLIP_INDEX, LandmarkTargets


def snap(values: Tensor) -> Tensor:
    """Round to multiples of :data:`COORD_GRID` (exact arithmetic in float32: the grid is 2**-8)."""
    return torch.round(values / COORD_GRID) * COORD_GRID


def flip_permutation(num_points: int, task: str) -> list[int]:
    """Index ``i`` of the landmark that lands at position ``k`` after a horizontal flip: ``new[k] = old[i]``."""
    if task == "bbox":
        if num_points != 4:
            raise ValueError(f"bbox landmarks are 4 extreme points, got N={num_points}")
        return list(EXTREME_FLIP_INDEX)
    if task == "pose":
        if num_points != len(COCO_KEYPOINT_FLIP_INDEX):
            raise ValueError(f"pose landmarks are {len(COCO_KEYPOINT_FLIP_INDEX)} keypoints, got N={num_points}")
        return list(COCO_KEYPOINT_FLIP_INDEX)
    if task == "segm":
        return [0] + list(range(num_points - 1, 0, -1))
    raise ValueError(f"unknown task {task!r} (expected 'bbox', 'segm' or 'pose')")


def hflip_points(points: Tensor, image_width: float, task: str) -> Tensor:
    """Mirror landmark points ``(..., N, 2)`` horizontally and reorder them for ``task``.

    Used on targets and, for flip test-time augmentation, on raw predictions.
    """
    index = torch.as_tensor(flip_permutation(points.shape[-2], task), device=points.device)
    mirrored = torch.stack([image_width - points[..., 0], points[..., 1]], dim=-1)
    return mirrored.index_select(-2, index)


def hflip_boxes(boxes: Tensor, image_width: float) -> Tensor:
    """Mirror boxes ``(..., 4)`` xyxy horizontally: ``x1' = W - x2``, ``x2' = W - x1``."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([image_width - x2, y1, image_width - x1, y2], dim=-1)


def hflip_targets(targets: LandmarkTargets, image_width: float, task: str) -> LandmarkTargets:
    """Targets of the horizontally flipped image (width ``image_width``)."""
    return resize_hflip_targets(targets, None, image_width, task)


def resize_targets(targets: LandmarkTargets, sx: float, sy: float) -> LandmarkTargets:
    """Targets of the image resized by ``(sx, sy)`` (new size = old size × scale), snapped to the grid."""
    return resize_hflip_targets(targets, (sx, sy), None, "")


def resize_hflip_targets(targets: LandmarkTargets, scale: tuple[float, float] | None, flip_width: float | None,
                         task: str) -> LandmarkTargets:
    """Targets of the image resized by ``scale = (sx, sy)`` (if given; snapped to the grid), then
    flipped horizontally at the width ``flip_width`` (if given), in one pass.

    The one implementation behind :func:`resize_targets` and :func:`hflip_targets` (the same
    float32 arithmetic as :func:`snap`, :func:`hflip_boxes` and :func:`hflip_points`, which serve
    predictions on any device). Numpy on the CPU, because per-sample target arrays are tiny and the
    readers call this for every sample: a handful of torch calls would cost more than the arithmetic.
    """
    boxes, points = targets.boxes.numpy(), targets.points.numpy()
    visible = targets.visible.numpy()
    if scale is not None:
        sx, sy = scale
        if not (sx > 0 and sy > 0):
            raise ValueError(f"scale factors must be positive, got {sx}, {sy}")
        grid = np.float32(COORD_GRID)
        boxes = np.round(boxes * np.array([sx, sy, sx, sy], dtype=np.float32) / grid) * grid
        points = np.round(points * np.array([sx, sy], dtype=np.float32) / grid) * grid
    if flip_width is not None:
        width = np.float32(flip_width)
        boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=-1)
        index = flip_permutation(points.shape[-2], task)
        points = np.stack([width - points[..., 0], points[..., 1]], axis=-1)[:, index]
        visible = visible[:, index]
    return LandmarkTargets(
        boxes=torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
        labels=targets.labels.clone(),
        points=torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32)),
        visible=torch.from_numpy(np.ascontiguousarray(visible)),
        iscrowd=targets.iscrowd.clone(),
    )


def translate_targets(targets: LandmarkTargets, dx: float, dy: float) -> LandmarkTargets:
    """Targets shifted by ``(dx, dy)`` pixels (padding at the left/top, or cropping with negative values)."""
    return LandmarkTargets(
        boxes=targets.boxes + targets.boxes.new_tensor([dx, dy, dx, dy]),
        labels=targets.labels.clone(),
        points=targets.points + targets.points.new_tensor([dx, dy]),
        visible=targets.visible.clone(),
        iscrowd=targets.iscrowd.clone(),
    )
