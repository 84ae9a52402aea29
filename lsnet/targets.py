"""Landmark targets from COCO annotations (paper §3.2, docs/design.md §2–§3).

One call per image, :func:`compute_image_targets`, turns the image's COCO annotations into a record of
numpy arrays -- the row stored in the shards -- holding, for every kept object, its box, extreme
points (bbox task), contours with several point counts (segm task) and keypoints (pose task).
:func:`record_to_targets` then picks one task out of a record as :class:`LandmarkTargets`.

Conventions (every function in this module and in :mod:`lsnet.transforms` follows them):

* **Continuous pixel coordinates**, as COCO: pixel ``(col, row)`` covers ``[col, col+1) x
  [row, row+1)``, the image spans ``[0, W] x [0, H]``. A horizontal flip is ``x' = W - x``.
* **Clockwise** means clockwise *as seen on the screen*, i.e. with ``y`` pointing down: a contour
  goes top -> right -> bottom -> left. Equivalently its shoelace sum
  ``sum(x_i * y_{i+1} - x_{i+1} * y_i)`` computed on the raw ``(x, y)`` values is positive.
* **Coordinate grid.** Every coordinate this module writes is rounded to a multiple of
  :data:`lsnet.outline.COORD_GRID` (1/256 px). On that grid, with ``|x| < 2**15`` and an integer ``W``, ``W - x``
  is exact in float32, so a horizontal flip is an exact involution (flip twice == identity, bit for
  bit). The rounding moves points by at most 0.002 px.
* Points are clipped to the image, the box is COCO's ``bbox`` clipped to the image (COCO boxes are
  the extent of the polygons, so extreme points lie on the box edges).

Extreme points (ExtremeNet's rule, as the authors' ``gen_coco_lsvr.py``) and contour points (uniform
arc-length resampling, multi-part bridges) are the outline geometry of :mod:`lsnet.outline`, which
follows the same conventions.

Crowd annotations are kept with ``iscrowd = True`` and box-derived placeholder points (extreme =
edge midpoints, contour = the box outline resampled as above, no keypoints): the assigners only use
their boxes, to ignore samples inside them.

Keypoints: the 17 COCO keypoints with their ``v`` flag (0 = not labelled, 1 = labelled but occluded,
2 = visible); unlabelled ones are stored at (0, 0) as in COCO. ``kps_box`` is the box of the
labelled (v > 0) keypoints -- a zero-size box when only one is labelled -- and equals ``box`` when
none is labelled.

Validation: :func:`compute_image_targets` never raises for a bad annotation; it returns a
:class:`Rejection` with the reason instead: ``missing bbox``, ``malformed bbox``, ``non-finite
coordinates in ...``, ``degenerate box (w<=0 or h<=0)``, ``box outside the image`` (empty after
clipping), ``unknown category_id``, ``no valid polygon`` (no part with >= 3 distinct vertices and
non-zero area, or no segmentation), ``malformed polygon``, ``empty mask``, ``RLE size ... does not
match the image size``, ``undecodable RLE``, ``malformed keypoints``. It raises only for programmer
errors (a non-positive image size, an invalid :class:`TargetConfig`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from .outline import (
    _clean_ring,
    box_ring,
    contour_points,
    extreme_points_from_mask,
    extreme_points_from_rings,
    ring_signed_area,
    snap_to_grid,
)
from .structures import TASK_NUM_POINTS, LandmarkTargets

NUM_KEYPOINTS: int = 17


@dataclass
class TargetConfig:
    """How landmark targets are computed from COCO annotations (see the module docstring)."""

    #: Width of the extreme band as a fraction of the box side (docs/design.md §2: 2 %).
    extreme_tolerance: float = 0.02
    #: Extreme-point vertex run (module docstring): "extremenet" walks the vertex list padded by one
    #: vertex at each end, as ExtremeNet and the authors' script do; "closed" walks round the ring.
    extreme_walk: Literal["extremenet", "closed"] = "extremenet"
    #: Contour point counts to compute; each gives a record column ``contour_{N}`` (paper §4.4).
    contour_points: tuple[int, ...] = (18, 36, 72)
    #: Multi-part objects: "per_part" splits the N points among the parts, "largest" keeps one part.
    multipart: Literal["per_part", "largest"] = "per_part"
    #: Parts with a smaller area (px²) are dropped from contours, unless every part is that small.
    min_part_area: float = 5.0
    #: "per_part": a part must receive at least this many points, else it is dropped.
    min_points_per_part: int = 3

    def __post_init__(self) -> None:
        if not 0 <= self.extreme_tolerance < 0.5:
            raise ValueError(f"extreme_tolerance must be in [0, 0.5), got {self.extreme_tolerance}")
        if not self.contour_points or any(int(n) < 3 for n in self.contour_points):
            raise ValueError(f"contour_points must be point counts >= 3, got {self.contour_points}")
        self.contour_points = tuple(int(n) for n in self.contour_points)
        if self.extreme_walk not in ("extremenet", "closed"):
            raise ValueError(f"extreme_walk must be 'extremenet' or 'closed', got {self.extreme_walk!r}")
        if self.multipart not in ("per_part", "largest"):
            raise ValueError(f"multipart must be 'per_part' or 'largest', got {self.multipart!r}")
        if self.min_points_per_part < 2:
            raise ValueError("min_points_per_part must be >= 2")


@dataclass
class Rejection:
    """An annotation that gives no targets, and why (counted in the shard manifest)."""

    ann_id: int | None
    image_id: int | None
    reason: str


class _Reject(Exception):
    """Internal: an annotation is unusable; turned into a :class:`Rejection`."""


# --------------------------------------------------------------------------------------------------
# Parsing one COCO annotation.


def _finite_array(values: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise _Reject(f"malformed {what}") from None
    if not np.all(np.isfinite(arr)):
        raise _Reject(f"non-finite coordinates in {what}")
    return arr


def _decode_rle(seg: dict, height: int, width: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    size = seg.get("size")
    counts = seg.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2) or counts is None:
        raise _Reject("malformed RLE segmentation (needs 'size' [h, w] and 'counts')")
    if [int(size[0]), int(size[1])] != [height, width]:
        raise _Reject(f"RLE size {list(size)} does not match the image size [{height}, {width}]")
    try:
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
        return mask_utils.decode(rle).astype(bool)
    except Exception as err:  # noqa: BLE001 -- pycocotools raises assorted errors for corrupt counts
        raise _Reject(f"undecodable RLE segmentation ({type(err).__name__})") from None


def _mask_rings(mask: np.ndarray) -> list[np.ndarray]:
    """Outer borders of the mask's connected components, through border-pixel centres."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    rings = []
    for c in contours:
        ring = _clean_ring(c.reshape(-1, 2).astype(np.float64) + 0.5)
        if len(ring) >= 3 and abs(ring_signed_area(ring)) > 0:
            rings.append(ring)
    return rings


def _polygon_rings(seg: list, height: int, width: int) -> list[np.ndarray]:
    """Valid rings (>= 3 distinct vertices, non-zero area) of a COCO polygon list, clipped to the image."""
    rings = []
    for part in seg:
        arr = _finite_array(part, "polygon")
        if arr.ndim != 1 or arr.size % 2:
            raise _Reject("malformed polygon (needs a flat list of x, y pairs)")
        ring = _clean_ring(_clip_points(arr.reshape(-1, 2), height, width))
        if len(ring) >= 3 and abs(ring_signed_area(ring)) > 0:
            rings.append(ring)
    return rings


def _parse_box(ann: dict, height: int, width: int) -> np.ndarray:
    if "bbox" not in ann:
        raise _Reject("missing bbox")
    bbox = _finite_array(ann["bbox"], "bbox")
    if bbox.shape != (4,):
        raise _Reject(f"malformed bbox {ann['bbox']!r} (needs [x, y, w, h])")
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        raise _Reject("degenerate box (w<=0 or h<=0)")
    box = np.array([max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)])
    if box[2] <= box[0] or box[3] <= box[1]:
        raise _Reject("box outside the image")
    return box


def _parse_keypoints(ann: dict, height: int, width: int, box: np.ndarray):
    points = np.zeros((NUM_KEYPOINTS, 2))
    vis = np.zeros(NUM_KEYPOINTS, dtype=np.int8)
    raw = ann.get("keypoints")
    if raw is None or (isinstance(raw, list) and len(raw) == 0):
        return points, vis, box.copy()
    arr = _finite_array(raw, "keypoints")
    if arr.shape != (NUM_KEYPOINTS * 3,):
        raise _Reject(f"malformed keypoints (needs {NUM_KEYPOINTS * 3} numbers, got {arr.size})")
    arr = arr.reshape(NUM_KEYPOINTS, 3)
    v = arr[:, 2]
    if not np.all(np.isin(v, (0, 1, 2))):
        raise _Reject("malformed keypoints (visibility flags must be 0, 1 or 2)")
    labelled = v > 0
    vis = v.astype(np.int8)
    points[labelled] = _clip_points(arr[labelled, :2], height, width)
    if not labelled.any():
        return points, vis, box.copy()
    lp = points[labelled]
    kps_box = np.array([lp[:, 0].min(), lp[:, 1].min(), lp[:, 0].max(), lp[:, 1].max()])
    return points, vis, kps_box


def _edge_midpoints(box: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    return np.array([[cx, y1], [x1, cy], [cx, y2], [x2, cy]])


def _object_targets(ann: dict, height: int, width: int, config: TargetConfig) -> dict[str, Any]:
    """Targets of one annotation (float64), or raise :class:`_Reject`."""
    box = _parse_box(ann, height, width)
    iscrowd = bool(ann.get("iscrowd", 0))
    seg = ann.get("segmentation")
    extreme = contours = None
    if iscrowd:
        # Crowd regions only tell the assigners where to ignore samples: box-derived placeholders.
        extreme = _edge_midpoints(box)
        rings = [box_ring(box)]
    elif isinstance(seg, dict):
        mask = _decode_rle(seg, height, width)
        if not mask.any():
            raise _Reject("empty mask")
        extreme = extreme_points_from_mask(mask, config.extreme_tolerance)
        # A mask of only 1-px-thin strokes has no area-enclosing border through pixel centres.
        rings = _mask_rings(mask) or [box_ring(box)]
    elif isinstance(seg, list) and len(seg) > 0:
        rings = _polygon_rings(seg, height, width)
        if not rings:
            raise _Reject("no valid polygon (every part has < 3 distinct points or zero area)")
        extreme = extreme_points_from_rings(rings, config.extreme_tolerance, config.extreme_walk)
    else:
        raise _Reject("no valid polygon (missing or empty segmentation)")
    contours = {
        n: contour_points(rings, n, box, config.multipart, config.min_part_area, config.min_points_per_part)
        for n in config.contour_points
    }
    if iscrowd:
        keypoints, kps_vis, kps_box = np.zeros((NUM_KEYPOINTS, 2)), np.zeros(NUM_KEYPOINTS, np.int8), box.copy()
    else:
        keypoints, kps_vis, kps_box = _parse_keypoints(ann, height, width, box)
    area = ann.get("area")
    if area is None or not np.isfinite(_finite_array(area, "area")):
        area = (box[2] - box[0]) * (box[3] - box[1])
    return {"box": box, "area": float(area), "iscrowd": iscrowd, "extreme": extreme, "contours": contours,
            "keypoints": keypoints, "keypoint_vis": kps_vis, "kps_box": kps_box}


def _clip_points(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """A copy of points (..., 2) ``x, y`` clipped to the image ``[0, W] x [0, H]``."""
    out = points.copy()
    out[..., 0] = np.clip(out[..., 0], 0, width)
    out[..., 1] = np.clip(out[..., 1], 0, height)
    return out


def empty_record(config: TargetConfig) -> dict[str, np.ndarray]:
    """A record with zero objects (all columns present, first dimension 0)."""
    record = {
        "ann_id": np.zeros(0, np.int64), "category_id": np.zeros(0, np.int64), "label": np.zeros(0, np.int64),
        "box": np.zeros((0, 4), np.float32), "area": np.zeros(0, np.float32), "iscrowd": np.zeros(0, bool),
        "extreme": np.zeros((0, 4, 2), np.float32),
    }
    for n in config.contour_points:
        record[f"contour_{n}"] = np.zeros((0, n, 2), np.float32)
    record.update({"keypoints": np.zeros((0, NUM_KEYPOINTS, 2), np.float32),
                   "keypoint_vis": np.zeros((0, NUM_KEYPOINTS), np.int8), "kps_box": np.zeros((0, 4), np.float32)})
    return record


def compute_image_targets(anns: list[dict], image_height: int, image_width: int,
                          category_to_label: dict[int, int], config: TargetConfig | None = None,
                          ) -> tuple[dict[str, np.ndarray], list[Rejection]]:
    """Landmark targets of every usable annotation of one image.

    Args:
        anns: the image's COCO annotation dicts (``id``, ``image_id``, ``category_id``, ``bbox``,
            ``segmentation`` polygon list or RLE, ``iscrowd``, ``area``, optional ``keypoints``).
        image_height, image_width: image size in pixels.
        category_to_label: COCO ``category_id`` -> contiguous label ``0..C-1``.
        config: :class:`TargetConfig` (defaults if None).
    Returns:
        ``(record, rejections)``: ``record`` maps column names to arrays over the M kept objects
        (``ann_id`` (M,) int64, ``category_id`` (M,) int64, ``label`` (M,) int64, ``box`` (M,4)
        float32 xyxy, ``area`` (M,) float32, ``iscrowd`` (M,) bool, ``extreme`` (M,4,2) float32,
        ``contour_{N}`` (M,N,2) float32 per N, ``keypoints`` (M,17,2) float32, ``keypoint_vis``
        (M,17) int8, ``kps_box`` (M,4) float32); ``rejections`` lists the annotations left out.
        Never raises for a bad annotation.
    """
    config = config or TargetConfig()
    if image_height <= 0 or image_width <= 0:
        raise ValueError(f"image size must be positive, got {image_height}x{image_width}")
    kept: list[tuple[dict, dict]] = []
    rejections: list[Rejection] = []
    for ann in anns:
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        try:
            if not isinstance(ann, dict):
                raise _Reject(f"annotation is a {type(ann).__name__}, not a mapping")
            if ann.get("category_id") not in category_to_label:
                raise _Reject(f"unknown category_id {ann.get('category_id')!r}")
            kept.append((ann, _object_targets(ann, image_height, image_width, config)))
        except _Reject as err:
            rejections.append(Rejection(ann_id, image_id, str(err)))
        except Exception as err:  # noqa: BLE001 -- a bad annotation must never stop preprocessing
            rejections.append(Rejection(ann_id, image_id, f"unexpected {type(err).__name__}: {err}"))
    if not kept:
        return empty_record(config), rejections

    def column(key: str) -> np.ndarray:
        return np.stack([t[key] for _, t in kept])

    def coords(values: np.ndarray) -> np.ndarray:
        return snap_to_grid(_clip_points(values, image_height, image_width)).astype(np.float32)

    record = {
        "ann_id": np.array([int(a.get("id", -1)) for a, _ in kept], np.int64),
        "category_id": np.array([int(a["category_id"]) for a, _ in kept], np.int64),
        "label": np.array([int(category_to_label[a["category_id"]]) for a, _ in kept], np.int64),
        "box": snap_to_grid(column("box")).astype(np.float32),
        "area": np.array([t["area"] for _, t in kept], np.float32),
        "iscrowd": np.array([t["iscrowd"] for _, t in kept], bool),
        "extreme": coords(column("extreme")),
    }
    for n in config.contour_points:
        record[f"contour_{n}"] = coords(np.stack([t["contours"][n] for _, t in kept]))
    record["keypoints"] = coords(column("keypoints"))
    record["keypoint_vis"] = column("keypoint_vis").astype(np.int8)
    record["kps_box"] = snap_to_grid(column("kps_box")).astype(np.float32)
    return record, rejections


_X_COLUMNS_XY = ("extreme", "keypoints")


def scale_record(record: dict[str, np.ndarray], sx: float, sy: float) -> dict[str, np.ndarray]:
    """A copy of ``record`` with every coordinate scaled (after resizing the image by ``sx``, ``sy``).

    Boxes and points are multiplied (x by ``sx``, y by ``sy``) and snapped to :data:`COORD_GRID`;
    ``area`` is multiplied by ``sx * sy``; other columns are copied unchanged.
    """
    if not (sx > 0 and sy > 0 and math.isfinite(sx) and math.isfinite(sy)):
        raise ValueError(f"scale factors must be positive and finite, got {sx}, {sy}")
    out = {}
    for key, value in record.items():
        if key in ("box", "kps_box"):
            out[key] = snap_to_grid(value.astype(np.float64) * np.array([sx, sy, sx, sy])).astype(np.float32)
        elif key in _X_COLUMNS_XY or key.startswith("contour_"):
            out[key] = snap_to_grid(value.astype(np.float64) * np.array([sx, sy])).astype(np.float32)
        elif key == "area":
            out[key] = (value.astype(np.float64) * (sx * sy)).astype(np.float32)
        else:
            out[key] = value.copy() if isinstance(value, np.ndarray) else value
    return out


def record_to_targets(record: dict[str, np.ndarray], task: str, num_points: int | None = None,
                      pose_box: str = "kps") -> LandmarkTargets:
    """The :class:`LandmarkTargets` of one task from a record (see :func:`compute_image_targets`).

    - ``bbox``: points = extreme points (N=4), all visible, boxes = object boxes.
    - ``segm``: points = ``contour_{num_points}`` (default 36), all visible.
    - ``pose``: points = keypoints (N=17), visible = ``v > 0``; boxes = ``kps_box`` (``pose_box="kps"``)
      or the object box (``"obj"``). ``"kps"`` drops persons without labelled keypoints (crowd
      regions stay); ``"obj"`` keeps them as positives with every landmark invisible.
    """
    if task not in TASK_NUM_POINTS:
        raise ValueError(f"unknown task {task!r} (expected one of {sorted(TASK_NUM_POINTS)})")
    boxes = record["box"]
    keep = np.ones(len(boxes), dtype=bool)
    if task == "bbox":
        if num_points not in (None, 4):
            raise ValueError(f"bbox targets have 4 extreme points, got num_points={num_points}")
        points = record["extreme"]
        visible = np.ones(points.shape[:2], dtype=bool)
    elif task == "segm":
        n = num_points or TASK_NUM_POINTS["segm"]
        key = f"contour_{n}"
        if key not in record:
            have = sorted(k for k in record if k.startswith("contour_"))
            raise KeyError(f"record has no {key} (has {have}); add {n} to TargetConfig.contour_points")
        points = record[key]
        visible = np.ones(points.shape[:2], dtype=bool)
    else:
        if num_points not in (None, NUM_KEYPOINTS):
            raise ValueError(f"pose targets have {NUM_KEYPOINTS} keypoints, got num_points={num_points}")
        if pose_box not in ("kps", "obj"):
            raise ValueError(f"pose_box must be 'kps' or 'obj', got {pose_box!r}")
        points = record["keypoints"]
        visible = record["keypoint_vis"] > 0
        if pose_box == "kps":
            # kps-box: a person without labelled keypoints has no keypoint box -> not a sample
            keep = visible.any(axis=1) | record["iscrowd"]
            boxes = np.where(record["iscrowd"][:, None], record["box"], record["kps_box"])
        # obj-box keeps every person (paper §4.5, App. B): one without labelled keypoints stays a
        # positive, assigned by its object box, all landmarks invisible (no keypoint loss)
    return LandmarkTargets(
        boxes=torch.from_numpy(np.ascontiguousarray(boxes[keep], dtype=np.float32)),
        labels=torch.from_numpy(np.ascontiguousarray(record["label"][keep], dtype=np.int64)),
        points=torch.from_numpy(np.ascontiguousarray(points[keep], dtype=np.float32)),
        visible=torch.from_numpy(np.ascontiguousarray(visible[keep], dtype=bool)),
        iscrowd=torch.from_numpy(np.ascontiguousarray(record["iscrowd"][keep], dtype=bool)),
    )


# The centre vector (model.center_vector), as the reference (Duankaiwen/LSNet, paths under code/):
#   bbox: tools/gen_coco_lsvr.py:108-110 appends the COCO box centre as a 5th "extreme point"
#         (mmdet/models/dense_heads/lsnet_head.py:1689-1690 does the same when a record has none);
#   segm: lsnet_head.py:1741-1754, the centre of the box of the regressed polygon (also its penalty box);
#   pose: lsnet_head.py:1773-1774 (obj-box: the person box), 1791-1815 (kps-box: the box of the
#         labelled keypoints). Its loss ignores visibility: mmdet/models/losses/cross_iou_loss.py:92-94.


def centre_landmarks(targets: LandmarkTargets, task: str) -> torch.Tensor:
    """(M, 2) the centre each object's last vector points to when ``model.center_vector`` is on.

    As the reference: the centre of the box the object is regressed against --

    - ``bbox``: of the object box (the reference appends the COCO box centre to the 4 extreme
      points when it converts the annotations);
    - ``segm``: of the box spanned by the N contour points (the reference's polygon box, which is
      also the box of its CIoU-style penalty), not of the COCO box;
    - ``pose``: of ``targets.boxes``, i.e. the person box for obj-box and the box of the labelled
      keypoints for kps-box (:func:`record_to_targets` puts the right one there).
    """
    if task not in TASK_NUM_POINTS:
        raise ValueError(f"unknown task {task!r} (expected one of {sorted(TASK_NUM_POINTS)})")
    if task == "segm":
        box = torch.cat([targets.points.amin(dim=1), targets.points.amax(dim=1)], dim=1)
    else:
        box = targets.boxes
    return (box[:, :2] + box[:, 2:]) / 2


def with_centre_landmark(targets: LandmarkTargets, task: str) -> LandmarkTargets:
    """``targets`` with the centre (:func:`centre_landmarks`) appended as landmark ``N``, always visible.

    The layout of the vectors a ``model.center_vector`` head predicts: the N landmarks, then the
    centre, last (V = N + 1). The centre carries a loss for every positive, also for a person whose
    keypoints are all unlabelled: the reference masks only the keypoint pairs by visibility
    (``mmdet/models/losses/cross_iou_loss.py:92-94``). Boxes, labels and crowd flags are unchanged.
    Call it after augmentation (flips permute the N landmarks; the centre needs no permutation).
    """
    centre = centre_landmarks(targets, task).to(targets.points.dtype)
    always = torch.ones(targets.visible.shape[0], 1, dtype=torch.bool, device=targets.visible.device)
    return LandmarkTargets(targets.boxes, targets.labels, torch.cat([targets.points, centre[:, None]], dim=1),
                           torch.cat([targets.visible, always], dim=1), targets.iscrowd)
