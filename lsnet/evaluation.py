"""COCO evaluation of LSNet predictions: boxes, masks (from contour polygons) and keypoints.

Two steps, both usable on their own:

1. :func:`detections_to_coco` turns the model's :class:`~lsnet.structures.Detections` (pixel frame of
   the resized image the model saw) into COCO result records in *original* image pixels.
2. :func:`evaluate_coco` runs the COCO protocol (pycocotools, the reference; optionally the
   C++ ``faster-coco-eval`` package) and returns the 12 box/mask numbers and the 10 keypoint numbers
   under flat names (``bbox_AP``, ``segm_APs``, ``kp_AR75`` ...), plus a per-category AP table through
   :func:`evaluate_coco_detailed`.

Also the ``lsnet evaluate`` command (``add_arguments`` / ``run``).
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lsnet.errors import InputError
from lsnet.structures import Detections, ImageMeta

#: COCO iou types and the prefix of their metric names.
IOU_TYPE_PREFIX: dict[str, str] = {"bbox": "bbox", "segm": "segm", "keypoints": "kp"}

#: Order of ``COCOeval.stats`` for bbox / segm (pycocotools ``summarize``).
DETECTION_METRICS: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)
#: Order of ``COCOeval.stats`` for keypoints (no small objects: persons < 32² px carry no keypoints).
KEYPOINT_METRICS: tuple[str, ...] = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")

#: Which COCO iou types evaluate each LSNet task by default.
TASK_IOU_TYPES: dict[str, tuple[str, ...]] = {
    "bbox": ("bbox",),
    "segm": ("bbox", "segm"),
    "pose": ("keypoints",),
}

#: The metric that ranks checkpoints for each task (best-checkpoint selection).
TASK_MAIN_METRIC: dict[str, str] = {"bbox": "bbox_AP", "segm": "segm_AP", "pose": "kp_AP"}


def metric_names(iou_type: str) -> list[str]:
    """The flat metric names :func:`evaluate_coco` returns for one iou type, in COCO order."""
    names = KEYPOINT_METRICS if iou_type == "keypoints" else DETECTION_METRICS
    return [f"{IOU_TYPE_PREFIX[iou_type]}_{name}" for name in names]


# --------------------------------------------------------------------------------------------------
# Detections -> COCO result records
# --------------------------------------------------------------------------------------------------


def rescale_detections(dets: Detections, meta: ImageMeta, clip: bool = True) -> Detections:
    """Map detections from the resized frame back to original image pixels: ``x / sx``, ``y / sy``.

    ``meta.scale = (sx, sy)`` with ``current = original * scale`` (ImageMeta). Boxes are clipped to
    the original image when ``clip``; landmark points are not clipped (a keypoint or contour point may
    legitimately lie a little outside, and the mask rasteriser crops anyway).

    ``meta.flipped`` is *not* undone here: detections handed to evaluation are in the unflipped frame
    of the image (flip test-time augmentation merges its mirrored pass back before returning), and
    the flag only records what the TTA did.
    """
    sx, sy = float(meta.scale[0]), float(meta.scale[1])
    factor = torch.tensor([sx, sy], dtype=torch.float32)
    boxes = dets.boxes.detach().float().cpu() / factor.repeat(2)
    points = dets.points.detach().float().cpu() / factor
    if clip:
        h, w = meta.orig_size
        boxes = torch.stack(
            [boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)],
            dim=1,
        ) if len(boxes) else boxes
    point_scores = None if dets.point_scores is None else dets.point_scores.detach().float().cpu()
    return Detections(boxes, dets.scores.detach().float().cpu(), dets.labels.detach().cpu(), points, point_scores)


def polygon_to_rle(polygon: np.ndarray, height: int, width: int) -> dict:
    """Rasterise one polygon ``(N, 2)`` (x, y; N >= 3) to a compressed COCO RLE of ``height x width``.

    ``counts`` is decoded to ``str`` so the record is JSON-serialisable.
    """
    polygon = np.asarray(polygon, dtype=np.float64)
    if polygon.ndim != 2 or polygon.shape[1] != 2 or polygon.shape[0] < 3:
        raise ValueError(f"a polygon needs shape (N>=3, 2), got {polygon.shape}")
    # pycocotools takes a list of flat [x0, y0, x1, y1, ...] polygons (a 4-number list would be read
    # as a box, hence N >= 3) and returns one RLE per polygon; merge = their union.
    rles = mask_utils.frPyObjects([polygon.reshape(-1).tolist()], int(height), int(width))
    rle = mask_utils.merge(rles)
    rle["counts"] = rle["counts"].decode("ascii") if isinstance(rle["counts"], bytes) else rle["counts"]
    return rle


def _xyxy_to_xywh(box: Sequence[float]) -> list[float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return [x1, y1, x2 - x1, y2 - y1]


def detections_to_coco(
    dets: Sequence[Detections],
    metas: Sequence[ImageMeta],
    category_ids: Sequence[int],
    task: str,
) -> list[dict]:
    """COCO result records for a batch of images, in original image pixels.

    - every record: ``image_id`` (meta.image_id), ``category_id`` (``category_ids[label]``, i.e. the
      COCO id of contiguous label ``label``), ``bbox`` ``[x, y, w, h]``, ``score``.
    - ``task == "segm"``: ``segmentation`` = the contour polygon rasterised to an RLE at
      ``meta.orig_size`` (the box stays in the record for bbox evaluation; :func:`evaluate_coco`
      drops it for mask evaluation so that mask area, not box area, decides small/medium/large).
    - ``task == "pose"``: ``keypoints`` = ``[x, y, s] * N`` with ``s`` the per-keypoint score
      (the detection score when the model gives none); ``score`` is the detection score.
    """
    if task not in TASK_IOU_TYPES:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASK_IOU_TYPES)}")
    if len(dets) != len(metas):
        raise ValueError(f"{len(dets)} detections for {len(metas)} image metas")
    results: list[dict] = []
    for det, meta in zip(dets, metas):
        det = rescale_detections(det, meta)
        h, w = meta.orig_size
        labels = det.labels.tolist()
        for k, label in enumerate(labels):
            if not 0 <= label < len(category_ids):
                raise ValueError(f"image {meta.image_id}: label {label} outside 0..{len(category_ids) - 1}")
            record: dict[str, Any] = {
                "image_id": int(meta.image_id),
                "category_id": int(category_ids[label]),
                "bbox": _xyxy_to_xywh(det.boxes[k].tolist()),
                "score": float(det.scores[k]),
            }
            if task == "segm":
                record["segmentation"] = polygon_to_rle(det.points[k].numpy(), h, w)
            elif task == "pose":
                pts = det.points[k]
                s = det.point_scores[k] if det.point_scores is not None else det.scores[k].expand(len(pts))
                record["keypoints"] = torch.cat([pts, s[:, None]], dim=1).reshape(-1).tolist()
            results.append(record)
    return results


# --------------------------------------------------------------------------------------------------
# COCO evaluation
# --------------------------------------------------------------------------------------------------


@dataclass
class CocoEvaluation:
    """Everything one :func:`evaluate_coco_detailed` call produced.

    ``metrics``: flat names -> float (-1 where COCO has nothing to average, as pycocotools).
    ``per_category``: iou type -> rows ``{"category_id", "name", "AP", "AP50", "AP75", "num_gt"}``.
    """

    metrics: dict[str, float]
    per_category: dict[str, list[dict]] = field(default_factory=dict)
    backend: str = "pycocotools"
    #: result records dropped because their category_id is not in the ground truth (ignore_unknown).
    num_ignored: int = 0


def _load_json(path: str | Path, what: str) -> Any:
    """A JSON file at a local path or a storage URI (``s3://...``: the ground truth of stored shards)."""
    from lsnet import storage

    if not storage.is_uri(path):
        path = Path(path)
    try:
        return json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise InputError(f"{what} file {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{what} file {path} is a directory, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{what} file {path} is not valid JSON (truncated?): {err}") from None


def _gt_coco(gt: str | Path | dict | COCO, coco_cls) -> COCO:
    """A ``coco_cls`` index of the ground truth.

    A COCO object of the backend's class is used as is (evaluating it converts its segmentation
    polygons to RLE and sets 'ignore' flags in place, as pycocotools always does; reusing one object
    across evaluations saves re-indexing a large ground truth). A dict, or a COCO object of the other
    backend, is deep-copied so the caller's data never changes; a path is read fresh.
    """
    if isinstance(gt, coco_cls):
        return gt
    if isinstance(gt, (str, Path)):
        data, where = _load_json(gt, "ground-truth"), f"ground truth {gt}"
    elif isinstance(gt, dict):
        data, where = copy.deepcopy(gt), "ground truth"
    elif hasattr(gt, "dataset"):  # the other backend's COCO object
        data, where = copy.deepcopy(gt.dataset), "ground truth"
    else:
        raise TypeError(f"gt must be a path, a dict or a COCO object, got {type(gt).__name__}")
    if not isinstance(data, dict):
        raise InputError(f"{where} is not a COCO mapping (top level is a {type(data).__name__})")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise InputError(f"{where} has no {key!r} list")
    coco = coco_cls()
    coco.dataset = data
    coco.createIndex()
    return coco


def _backend(backend: str):
    """(COCO class, COCOeval class, backend name) for ``backend``."""
    if backend == "pycocotools":
        return COCO, COCOeval, "pycocotools"
    if backend == "faster":
        try:
            from faster_coco_eval import COCO as FasterCOCO
            from faster_coco_eval import COCOeval_faster
        except ImportError:  # optional: fall back to the reference implementation
            return COCO, COCOeval, "pycocotools"
        return FasterCOCO, COCOeval_faster, "faster-coco-eval"
    raise ValueError(f"unknown evaluation backend {backend!r}; expected 'pycocotools' or 'faster'")


def _results_for(results: list[dict], iou_type: str) -> list[dict]:
    """Shallow copies of the records (``loadRes`` adds keys in place), shaped for ``iou_type``."""
    needed = {"bbox": "bbox", "segm": "segmentation", "keypoints": "keypoints"}[iou_type]
    out = []
    for i, record in enumerate(results):
        if needed not in record:
            raise InputError(f"result record {i} (image_id {record.get('image_id')}) has no {needed!r}, "
                             f"so it cannot be evaluated as {iou_type!r}")
        record = dict(record)
        if iou_type == "segm":
            # With a 'bbox' present, loadRes would take the box area as the object's area, which
            # would change what counts as small/medium/large for masks.
            record.pop("bbox", None)
        out.append(record)
    return out


def _per_category(evaluator, gt_coco, iou_type: str) -> list[dict]:
    """Per-category AP / AP50 / AP75 (area 'all', largest maxDets) from the accumulated precision."""
    precision = evaluator.eval["precision"]  # (T iou thrs, R recall thrs, K cats, A areas, M maxDets)
    iou_thrs = np.asarray(evaluator.params.iouThrs)
    cats = {c["id"]: c for c in gt_coco.dataset["categories"]}
    rows = []
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]

        def mean_valid(values):
            valid = values[values > -1]
            return float(np.mean(valid)) if valid.size else -1.0

        num_gt = len(gt_coco.getAnnIds(catIds=[cat_id], iscrowd=False))
        rows.append({
            "category_id": int(cat_id),
            "name": str(cats.get(cat_id, {}).get("name", cat_id)),
            "AP": mean_valid(p),
            "AP50": mean_valid(p[np.isclose(iou_thrs, 0.5)]),
            "AP75": mean_valid(p[np.isclose(iou_thrs, 0.75)]),
            "num_gt": int(num_gt),
        })
    return rows


def evaluate_coco_detailed(
    gt: str | Path | dict | COCO,
    results: list[dict] | str | Path,
    iou_types: Iterable[str] = ("bbox",),
    image_ids: Iterable[int] | None = None,
    quiet: bool = True,
    backend: str = "pycocotools",
    ignore_unknown: bool = False,
) -> CocoEvaluation:
    """COCO metrics and per-category AP. See :func:`evaluate_coco` for the arguments.

    A result whose ``category_id`` is not a ground-truth category can never match, so it would pull
    AP towards 0 without a word: it is an :class:`InputError` (which ids, how many records), unless
    ``ignore_unknown`` drops those records (counted in ``num_ignored``).
    """
    iou_types = [iou_types] if isinstance(iou_types, str) else list(iou_types)
    for iou_type in iou_types:
        if iou_type not in IOU_TYPE_PREFIX:
            raise ValueError(f"unknown iou type {iou_type!r}; expected some of {list(IOU_TYPE_PREFIX)}")
    if isinstance(results, (str, Path)):
        results = _load_json(results, "results")
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise InputError("results must be a list of COCO result records (JSON objects)")

    coco_cls, eval_cls, backend_name = _backend(backend)
    sink = io.StringIO()
    redirect = contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext()
    metrics: dict[str, float] = {}
    per_category: dict[str, list[dict]] = {}
    with redirect:
        gt_coco = _gt_coco(gt, coco_cls)
        known_ids = set(gt_coco.getImgIds())
        unknown = sorted({r.get("image_id") for r in results} - known_ids, key=str)
        if unknown:
            raise InputError(f"{len(unknown)} result image ids are not in the ground truth, e.g. {unknown[:5]}")
        known_cats = set(gt_coco.getCatIds())
        stray = [r for r in results if r.get("category_id") not in known_cats]
        if stray and not ignore_unknown:
            ids = sorted({r.get("category_id") for r in stray}, key=str)
            raise InputError(f"{len(stray)} of {len(results)} result records have a category_id that is not in "
                             f"the ground truth ({ids[:5]}{' ...' if len(ids) > 5 else ''}; ground truth: "
                             f"{sorted(known_cats)[:10]}...); pass --ignore-unknown to drop them")
        if stray:
            results = [r for r in results if r.get("category_id") in known_cats]
        for iou_type in iou_types:
            records = _results_for(results, iou_type)
            if records:
                dt_coco = gt_coco.loadRes(records)
            else:
                # pycocotools' loadRes indexes results[0]; an empty detection set is still evaluable
                # (every ground truth is a miss: AP 0 where there is ground truth, -1 elsewhere).
                dt_coco = coco_cls()
                dt_coco.dataset = {"images": list(gt_coco.dataset["images"]), "annotations": [],
                                   "categories": copy.deepcopy(gt_coco.dataset["categories"])}
                dt_coco.createIndex()
            if backend_name == "faster-coco-eval":
                evaluator = eval_cls(gt_coco, dt_coco, iou_type, print_function=print)
            else:
                evaluator = eval_cls(gt_coco, dt_coco, iou_type)
            if iou_type == "keypoints":
                # Keypoints are evaluated on the categories that define keypoints (COCO: person),
                # which is pycocotools' default on a person_keypoints file; faster-coco-eval defaults
                # to the categories that have images instead, so both are pinned here.
                kp_cats = sorted(c["id"] for c in gt_coco.dataset["categories"] if c.get("keypoints"))
                if kp_cats:
                    evaluator.params.catIds = kp_cats
            if image_ids is not None:
                evaluator.params.imgIds = sorted({int(i) for i in image_ids})
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            names = metric_names(iou_type)
            stats = list(evaluator.stats)[: len(names)]
            metrics.update({name: float(value) for name, value in zip(names, stats)})
            per_category[iou_type] = _per_category(evaluator, gt_coco, iou_type)
    return CocoEvaluation(metrics=metrics, per_category=per_category, backend=backend_name,
                          num_ignored=len(stray))


def evaluate_coco(
    gt: str | Path | dict | COCO,
    results: list[dict] | str | Path,
    iou_types: Iterable[str] = ("bbox",),
    image_ids: Iterable[int] | None = None,
    quiet: bool = True,
    backend: str = "pycocotools",
) -> dict[str, float]:
    """COCO metrics of ``results`` against ``gt``.

    Args:
        gt: ground truth as a JSON path, a COCO dict (not modified) or a ``COCO`` object (reused as
            is, so repeated evaluations do not re-index it).
        results: COCO result records (e.g. from :func:`detections_to_coco`) or a results JSON path.
            Records are not modified. An empty list is fine: AP 0 where there is ground truth.
        iou_types: any of ``"bbox"``, ``"segm"``, ``"keypoints"``.
        image_ids: evaluate on these images only (default: every image of the ground truth, as
            pycocotools). Pass the ids that were actually predicted when evaluating a subset.
        quiet: swallow pycocotools' printing.
        backend: ``"pycocotools"`` (reference, default) or ``"faster"`` (``faster-coco-eval`` when
            installed, else pycocotools); identical numbers to 1e-9 on our checks
            (tests/test_evaluation.py::test_faster_backend_matches_pycocotools).

    Returns:
        ``{prefix}_{name}`` for the 12 bbox/segm numbers (AP, AP50, AP75, APs, APm, APl, AR1, AR10,
        AR100, ARs, ARm, ARl) and the 10 keypoint numbers (kp_AP, kp_AP50, kp_AP75, kp_APm, kp_APl,
        kp_AR, kp_AR50, kp_AR75, kp_ARm, kp_ARl); -1 where COCO has nothing to average.
    """
    return evaluate_coco_detailed(gt, results, iou_types, image_ids, quiet, backend).metrics


# --------------------------------------------------------------------------------------------------
# Tables and the `lsnet evaluate` command
# --------------------------------------------------------------------------------------------------


def format_metrics(metrics: dict[str, float]) -> str:
    """One line per iou type: ``bbox  AP 0.412  AP50 0.601 ...``."""
    lines = []
    for iou_type, prefix in IOU_TYPE_PREFIX.items():
        names = [n for n in metric_names(iou_type) if n in metrics]
        if not names:
            continue
        width = max(len(n) - len(prefix) - 1 for n in names)
        header = "  ".join(n[len(prefix) + 1:].rjust(max(width, 6)) for n in names)
        values = "  ".join(f"{metrics[n]:.3f}".rjust(max(width, 6)) for n in names)
        lines += [f"{prefix:<5} {header}", f"{'':<5} {values}"]
    return "\n".join(lines)


def format_per_category(rows: list[dict]) -> str:
    """A fixed-width table of per-category AP rows."""
    if not rows:
        return "(no categories)"
    name_w = max(8, max(len(r["name"]) for r in rows))
    lines = [f"{'id':>4}  {'category':<{name_w}}  {'AP':>6}  {'AP50':>6}  {'AP75':>6}  {'#gt':>5}"]
    for r in rows:
        lines.append(f"{r['category_id']:>4}  {r['name']:<{name_w}}  {r['AP']:>6.3f}  {r['AP50']:>6.3f}  "
                     f"{r['AP75']:>6.3f}  {r['num_gt']:>5}")
    return "\n".join(lines)


