"""How much mask quality do N contour points keep? (paper §4.4)

The paper quantises the ground-truth masks of COCO val to 18 / 36 / 72-point polygons, rasterises
them and evaluates them as predictions against the ground truth: mask AP 89.0 / 97.4 / 99.2 -- an
upper bound for a detector that outputs N contour points, needing no training.

Multi-part objects (about 1 in 10 COCO instances) make "N points" ambiguous. :func:`mask_study`
reports three protocols side by side (:data:`PROTOCOLS`):

* ``per_part`` -- N points on *every* part (each part resampled on its own, clockwise, from its first
  vertex; parts of area <= 5 px² dropped unless all are; the mask is the union of the parts'
  polygons). This is the protocol of the paper's 89.0 / 97.4 / 99.2: its footnote quantises each part
  separately, and the authors' sampler resamples each polygon part on its own (on tiny_coco it gives
  90.7 / 98.2 / 99.7, this function 90.4 / 98.2 / 99.6). It bounds no model that outputs N points
  per object: a 3-part object gets 3N points.
* ``total`` -- N points per object *in total*, the parts joined by zero-width bridges
  (``TargetConfig(multipart="per_part")``, :mod:`lsnet.targets`), read as one polygon: exactly what
  our segm model is trained on and outputs.
* ``largest`` -- N points on the largest part only (``multipart="largest"``): what the reference
  trains on (it keeps one part per object).

Besides, a PolarMask-style representation for comparison: ``R`` rays at equal angles from the mask's mass centre, each ending
at the farthest crossing of the ray with the object outline (0 length if the ray misses it). Every
non-crowd ground-truth object becomes one prediction with score 1; crowd objects stay in the ground
truth as ignore regions, as in COCO evaluation.
"""
from __future__ import annotations

import collections
import contextlib
import io
from pathlib import Path
from typing import Any

import numpy as np

from .outline import ring_signed_area, sample_ring
from .targets import TargetConfig, _mask_rings, _polygon_rings, compute_image_targets


def polar_points(rings: list[np.ndarray], centre: np.ndarray, num_rays: int) -> np.ndarray:
    """PolarMask-style points (R, 2): per ray angle ``2πk/R`` (k = 0 points along +x, angles grow
    clockwise on screen), the farthest crossing of the ray from ``centre`` with the outline edges.

    A ray that crosses no edge gets length 0 (the point is the centre).
    """
    a = np.concatenate(rings)
    b = np.concatenate([np.roll(r, -1, axis=0) for r in rings])
    angles = 2 * np.pi * np.arange(num_rays) / num_rays
    u = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # (R, 2)
    e = b - a  # (E, 2)
    w = a - centre  # (E, 2)
    # centre + t u = a + s e  ->  t u - s e = w ; solve the 2x2 system per (ray, edge) with Cramer's rule
    def cross(p: np.ndarray, q: np.ndarray) -> np.ndarray:
        return p[..., 0] * q[..., 1] - p[..., 1] * q[..., 0]

    denom = cross(u[:, None, :], -e[None, :, :])  # (R, E)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = cross(w[None, :, :], -e[None, :, :]) / denom
        s = cross(u[:, None, :], w[None, :, :]) / denom
    hit = (np.abs(denom) > 1e-12) & (t >= 0) & (s >= 0) & (s <= 1)
    length = np.where(hit, t, 0.0).max(axis=1)
    return centre + length[:, None] * u


def _polygons_rle(polygons: list[np.ndarray], height: int, width: int) -> dict:
    """The union of polygons (each (K, 2)) rasterised as one COCO RLE."""
    from pycocotools import mask as mask_utils

    rles = mask_utils.frPyObjects([p.astype(np.float64).reshape(-1).tolist() for p in polygons], height, width)
    return mask_utils.merge(rles)


def _evaluate_segm(coco_gt, detections: list[dict]) -> dict[str, float]:
    from pycocotools.cocoeval import COCOeval

    if not detections:
        return {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_dt = coco_gt.loadRes(detections)
        ev = COCOeval(coco_gt, coco_dt, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"AP": float(ev.stats[0]), "AP50": float(ev.stats[1]), "AP75": float(ev.stats[2])}


#: The multi-part protocols (module docstring).
PROTOCOLS = ("per_part", "total", "largest")


def per_part_polygons(rings: list[np.ndarray], num_points: int, min_part_area: float = 5.0) -> list[np.ndarray]:
    """Protocol ``per_part``: each part (closed ring) resampled to ``num_points`` on its own.

    As the authors' sampler: each part made clockwise and sampled at uniform arc-length steps from its
    first vertex (their roll to the point nearest the top-centre reorders the points, not the polygon).
    Parts with area <= ``min_part_area`` px² are dropped unless every part is that small (then the
    largest one is kept).
    """
    areas = np.array([abs(ring_signed_area(r)) for r in rings])
    keep = [r for r, a in zip(rings, areas) if a > min_part_area] or [rings[int(np.argmax(areas))]]
    out = []
    for ring in keep:
        ring = ring if ring_signed_area(ring) > 0 else ring[::-1]
        perimeter = float(np.hypot(*(np.roll(ring, -1, axis=0) - ring).T).sum())
        out.append(sample_ring(ring, np.arange(num_points) * (perimeter / num_points)))
    return out


def mask_study(coco_json_path: str | Path, num_points: tuple[int, ...] | list[int] = (18, 36, 72),
               polar_rays: int | None = 36, protocols: tuple[str, ...] | list[str] = PROTOCOLS,
               include_gt: bool = False) -> dict[str, Any]:
    """Mask AP of ground-truth masks quantised to N-point contours and to a polar representation.

    Args:
        coco_json_path: a COCO instances JSON (polygons and/or RLE).
        num_points: contour point counts N to study.
        polar_rays: number of PolarMask rays (None to skip).
        protocols: which multi-part protocols (:data:`PROTOCOLS`) to evaluate.
        include_gt: also evaluate the ground-truth polygons themselves (sanity check: AP = 1).
    Returns:
        ``{"num_instances": int, "num_multipart": int, "num_images": int, "results": {name: {"AP",
        "AP50", "AP75", "mean_iou"}}}`` with names ``{protocol}_{N}``, ``polar_{R}`` (and ``gt``);
        ``mean_iou`` is the mean mask IoU between each quantised object and its ground truth.
    """
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad:
        raise ValueError(f"unknown mask-study protocol(s) {bad}; choose from {PROTOCOLS}")
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(coco_json_path))
    cat_to_label = {c: i for i, c in enumerate(sorted(coco_gt.getCatIds()))}
    configs = {"total": TargetConfig(contour_points=tuple(num_points), multipart="per_part"),
               "largest": TargetConfig(contour_points=tuple(num_points), multipart="largest")}
    predictions: dict[str, list[dict]] = collections.defaultdict(list)
    ious: dict[str, list[float]] = collections.defaultdict(list)
    num_instances = num_multipart = 0
    for image_id in sorted(coco_gt.getImgIds()):
        info = coco_gt.loadImgs(image_id)[0]
        h, w = int(info["height"]), int(info["width"])
        anns = [a for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=image_id)) if not a.get("iscrowd", 0)]
        # "total" also gives the kept objects' rows (every protocol keeps the same objects)
        records = {p: compute_image_targets(anns, h, w, cat_to_label, configs[p])[0]
                   for p in ("total", "largest") if p == "total" or p in protocols}
        record = records["total"]
        by_id = {a["id"]: a for a in anns}
        for row, ann_id in enumerate(record["ann_id"].tolist()):
            ann = by_id[ann_id]
            gt_rle = coco_gt.annToRLE(ann)
            num_instances += 1
            seg = ann["segmentation"]
            mask = None
            if isinstance(seg, list):
                rings = _polygon_rings(seg, h, w)
            else:
                mask = mask_utils.decode(gt_rle).astype(bool)
                rings = _mask_rings(mask)
            num_multipart += int(len(rings) > 1)
            shapes: dict[str, dict] = {}
            for protocol in protocols:
                for n in num_points:
                    if protocol == "per_part":
                        polys = per_part_polygons(rings, n) if rings else [record[f"contour_{n}"][row]]
                        shapes[f"per_part_{n}"] = _polygons_rle(polys, h, w)
                    else:
                        shapes[f"{protocol}_{n}"] = _polygons_rle([records[protocol][f"contour_{n}"][row]], h, w)
            if polar_rays:
                if mask is None:
                    mask = mask_utils.decode(gt_rle).astype(bool)
                ys, xs = np.nonzero(mask)
                centre = np.array([xs.mean() + 0.5, ys.mean() + 0.5])
                shapes[f"polar_{polar_rays}"] = _polygons_rle([polar_points(rings, centre, polar_rays)], h, w)
            if include_gt:
                shapes["gt"] = gt_rle
            for name, rle in shapes.items():
                ious[name].append(float(mask_utils.iou([rle], [gt_rle], [0])[0, 0]))
                rle = dict(rle)
                rle["counts"] = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
                predictions[name].append({"image_id": image_id, "category_id": ann["category_id"],
                                          "segmentation": rle, "score": 1.0})
    results = {}
    for name, dets in predictions.items():
        results[name] = {**_evaluate_segm(coco_gt, dets), "mean_iou": float(np.mean(ious[name]))}
    return {"num_images": len(coco_gt.getImgIds()), "num_instances": num_instances,
            "num_multipart": num_multipart, "results": results}
