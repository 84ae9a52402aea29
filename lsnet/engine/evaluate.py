"""Predictions of a model over batches as COCO records and their COCO metrics; a ``gather_fn`` joins the
records of every distributed worker before the metrics."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lsnet.engine.optim import model_device, unwrap_model
from lsnet.evaluation import (
    TASK_IOU_TYPES,
    CocoEvaluation,
    detections_to_coco,
    evaluate_coco_detailed,
)
from lsnet.structures import Batch, Detections, ImageMeta

#: ``predict_fn(model, images, metas) -> list[Detections]`` (e.g. flip test-time augmentation).
PredictFn = Callable[[nn.Module, Tensor, list[ImageMeta]], list[Detections]]


#: ``gather_fn(local_items) -> all workers' items`` (or None on workers that do not compute metrics).
GatherFn = Callable[[list], "list | None"]


def _default_predict(model: nn.Module, images: Tensor, metas: list[ImageMeta]) -> list[Detections]:
    return model(images, image_sizes=[tuple(m.size) for m in metas])


def predict_to_coco(
    model: nn.Module,
    batches: Iterable[Batch],
    category_ids: Sequence[int],
    task: str,
    *,
    device: torch.device | str | None = None,
    amp: bool = False,
    predict_fn: PredictFn | None = None,
) -> list[tuple[int, list[dict]]]:
    """Run the model in eval mode; one ``(image_id, COCO result records)`` item per image seen.

    The DDP wrapper (if any) is bypassed: inference needs no collective, so each worker can predict
    its own share independently.
    """
    net = unwrap_model(model)
    device = torch.device(device) if device is not None else model_device(net)
    predict_fn = predict_fn or _default_predict
    was_training = net.training
    net.eval()
    items: list[tuple[int, list[dict]]] = []
    try:
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=amp and device.type == "cuda"):
            for batch in batches:
                images = batch.images.to(device, non_blocking=True)
                dets = [d.to("cpu") for d in predict_fn(net, images, list(batch.metas))]
                for det, meta in zip(dets, batch.metas):
                    items.append((int(meta.image_id), detections_to_coco([det], [meta], category_ids, task)))
    finally:
        net.train(was_training)
    return items


@dataclass
class EvalResult:
    """Output of :func:`evaluate_detailed` on the worker that computed metrics."""

    metrics: dict[str, float]
    per_category: dict[str, list[dict]]
    results: list[dict]  # COCO result records of every evaluated image (deduplicated)
    image_ids: list[int]


def evaluate_detailed(
    model: nn.Module,
    batches: Iterable[Batch],
    gt: Any,
    category_ids: Sequence[int],
    task: str,
    *,
    iou_types: Sequence[str] | None = None,
    gather_fn: GatherFn | None = None,
    device: torch.device | str | None = None,
    amp: bool = False,
    predict_fn: PredictFn | None = None,
    backend: str = "pycocotools",
) -> EvalResult | None:
    """Predict on ``batches``, optionally gather across workers, and compute COCO metrics.

    ``gather_fn`` receives this worker's list of ``(image_id, records)`` items and returns the items
    of all workers (e.g. ``torch.distributed.all_gather_object`` + concatenation), or ``None`` on a
    worker that should not compute metrics (then this returns ``None``). An image seen more than
    once (a distributed sampler pads the last round with repeats) counts once. Metrics are computed
    over exactly the images seen (``image_ids``), so evaluating a subset of the ground truth is fine.
    """
    items = predict_to_coco(model, batches, category_ids, task, device=device, amp=amp, predict_fn=predict_fn)
    if gather_fn is not None:
        items = gather_fn(items)
        if items is None:
            return None
    seen: set[int] = set()
    results: list[dict] = []
    image_ids: list[int] = []
    for image_id, records in items:
        if image_id in seen:
            continue
        seen.add(image_id)
        image_ids.append(image_id)
        results.extend(records)
    if iou_types is None:
        iou_types = TASK_IOU_TYPES[task]
        # pose with the box branch predicts person boxes of its own: evaluate them too (as the reference)
        if task == "pose" and getattr(getattr(unwrap_model(model), "cfg", None), "pose_box_vectors", False):
            iou_types = ("bbox", *iou_types)
    coco: CocoEvaluation = evaluate_coco_detailed(gt, results, iou_types, image_ids=image_ids, backend=backend)
    return EvalResult(coco.metrics, coco.per_category, results, image_ids)


def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    gt: Any,
    category_ids: Sequence[int],
    task: str,
    *,
    iou_types: Sequence[str] | None = None,
    gather_fn: GatherFn | None = None,
    device: torch.device | str | None = None,
    amp: bool = False,
    predict_fn: PredictFn | None = None,
    backend: str = "pycocotools",
) -> dict[str, float]:
    """COCO metrics of ``model`` on ``batches`` (see :func:`evaluate_detailed`); ``{}`` on workers
    whose ``gather_fn`` returned ``None``. Default iou types per task: bbox -> bbox; segm -> bbox +
    segm; pose -> keypoints."""
    out = evaluate_detailed(model, batches, gt, category_ids, task, iou_types=iou_types, gather_fn=gather_fn,
                            device=device, amp=amp, predict_fn=predict_fn, backend=backend)
    return {} if out is None else out.metrics
