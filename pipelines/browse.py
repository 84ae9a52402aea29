"""``lsnet browse``: draw the ground truth and the landmark targets the model trains on (mmdetection's
``browse_dataset``), to check data before training.

    lsnet browse shards/train --out browse/ [--task segm] [--limit 20] [--train]
    lsnet browse --ann instances_train2017.json --images train2017/ --out browse/ [--task pose]

Each image is drawn exactly as the training reader yields it (``lsnet.data.ShardDataset``: the stored
JPEG, resized; ``--train`` adds the training augmentation): boxes with class names, and the landmark
targets of the task -- the 4 extreme points (bbox), the N contour points as a filled polygon (segm) or
the 17 keypoints with the skeleton (pose), unlabelled keypoints omitted. ``--anchors`` adds the sample
assignment the loss uses (``lsnet.modeling.detector.assign_samples``, run on the anchor points the model
has for the padded image): every stage-2 (ATSS) positive as a dot, every stage-1 positive (one per
object) as a square, coloured by FPN level P3..P7 (legend in a strip under the image); the model
settings come from ``--config`` (default: the task's defaults). With ``loss.atss_on: init`` (the default)
stage 2 is assigned during training on the model's own stage-1 boxes, which a data browser has not got:
the drawing then shows ATSS on the fixed anchor squares (``atss_on: anchors``). ``--ann/--images`` first
preprocesses the first ``--limit`` images into a temporary shard directory (in-process, no Ray), so
what is drawn is what ``lsnet preprocess`` would store.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lsnet.errors import InputError
from lsnet.progress import Progress


def targets_as_detections(targets):
    """LandmarkTargets -> Detections (score 1, keypoint visibility as point scores) for drawing."""
    from lsnet.structures import Detections

    m = targets.boxes.shape[0]
    return Detections(targets.boxes.float(), torch.ones(m), targets.labels.long(), targets.points.float(),
                      targets.visible.float())


#: Colours of the FPN levels P3..P7 in ``--anchors`` drawings. Each has a 255 component, which no class
#: colour (``lsnet.visualize.class_color``: value 0.95) has, and none is white (pose keypoints).
LEVEL_COLORS = ((255, 0, 0), (255, 160, 0), (0, 255, 0), (0, 160, 255), (255, 0, 255))
STAGE1_HALF_SIDE = 5  # the stage-1 square: 11 px, around the point (off every other level's points)
LEGEND_HEIGHT = 14


@dataclass
class AnchorAssignment:
    """The samples of one image: ``points`` (P, 2) anchor points, ``levels`` (P,) FPN level index
    (0 = P3), ``stage1`` / ``stage2`` (P,) labels (object index, -1 background, -2 ignored)."""
    points: torch.Tensor
    levels: torch.Tensor
    stage1: torch.Tensor
    stage2: torch.Tensor


def anchor_assignment(targets, image_hw: tuple[int, int], model_cfg) -> AnchorAssignment:
    """What the loss assigns for this image: the image is padded as the training batch pads it, the
    model's anchor points for that size are found (``anchor_layout``) and ``assign_samples`` labels
    them -- the same functions ``compute_losses`` calls."""
    import math

    from lsnet.modeling.detector import anchor_layout, assign_samples
    from lsnet.structures import SIZE_DIVISOR

    if model_cfg.loss.atss_on != "anchors":
        # atss_on=init assigns stage 2 on the model's own stage-1 boxes, which only a trained model has;
        # without one, the drawing shows the anchor-square assignment (the same ATSS on fixed squares).
        model_cfg = dataclasses.replace(model_cfg, loss=dataclasses.replace(model_cfg.loss, atss_on="anchors"))
    h, w = (int(math.ceil(x / SIZE_DIVISOR) * SIZE_DIVISOR) for x in image_hw)
    points, npl, strides = anchor_layout(model_cfg, h, w)
    stage1, stage2 = assign_samples(points, npl, strides, targets, model_cfg)
    levels = torch.repeat_interleave(torch.arange(len(npl)), torch.tensor(npl))
    return AnchorAssignment(points, levels, stage1, stage2)


def draw_anchor_assignment(image: np.ndarray, assignment: AnchorAssignment) -> np.ndarray:
    """Dots at the stage-2 positives, squares around the stage-1 positives, in their level's colour,
    on a copy of ``image``; a legend strip of ``LEGEND_HEIGHT`` px is added below the image."""
    from PIL import Image, ImageDraw, ImageFont

    h, w = image.shape[:2]
    canvas = Image.new("RGB", (w, h + LEGEND_HEIGHT), (0, 0, 0))
    canvas.paste(Image.fromarray(image), (0, 0))
    draw = ImageDraw.Draw(canvas)
    pts, levels = assignment.points.tolist(), assignment.levels.tolist()
    for i in torch.nonzero(assignment.stage1 >= 0).flatten().tolist():
        x, y, r = pts[i][0], pts[i][1], STAGE1_HALF_SIDE
        draw.rectangle([x - r, y - r, x + r, y + r], outline=LEVEL_COLORS[levels[i]], width=1)
    for i in torch.nonzero(assignment.stage2 >= 0).flatten().tolist():
        x, y = pts[i]
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=LEVEL_COLORS[levels[i]])
    font = ImageFont.load_default()
    x = 2
    for level, color in enumerate(LEVEL_COLORS[: int(assignment.levels.max()) + 1 if len(levels) else 0]):
        draw.rectangle([x, h + 3, x + 7, h + 10], fill=color)
        draw.text((x + 10, h + 1), f"P{level + 3}", fill=(255, 255, 255), font=font)
        x += 32
    return np.asarray(canvas)


def browse_shards(shard_dir: str | Path, out: str | Path, task: str = "bbox", limit: int = 20,
                  train: bool = False, seed: int = 0, anchors: bool = False, model_cfg=None) -> list[Path]:
    """Write one PNG per image (the first ``limit``) under ``out``; returns the paths. ``anchors``: add
    the sample assignment of ``model_cfg`` (default: the task's ModelConfig), see the module doc."""
    from lsnet.data.shards import ShardDataset
    from lsnet.modeling import ModelConfig
    from lsnet.visualize import draw_detections, save_png

    ds = ShardDataset(shard_dir, task=task, train=train, scale_range=None, seed=seed, verify="size")
    names = [c["name"] for c in ds.categories]
    if anchors and model_cfg is None:
        model_cfg = ModelConfig(task=task, num_classes=len(names))
    count = min(limit, len(ds))
    if count == 0:
        raise InputError(f"{shard_dir}: no images to draw")
    out = Path(out)
    paths = []
    with Progress(count, "browse", "images") as bar:
        for index in range(count):
            image, targets, meta = ds[index]
            hwc = image.permute(1, 2, 0).clamp(0, 255).to(torch.uint8).cpu().numpy()
            drawn = draw_detections(np.ascontiguousarray(hwc), targets_as_detections(targets), task, names,
                                    score_thr=0.0, keypoint_thr=0.5)
            if anchors:
                drawn = draw_anchor_assignment(drawn, anchor_assignment(targets, hwc.shape[:2], model_cfg))
            paths.append(save_png(out / f"{meta.image_id}.png", drawn))
            bar.update()
    return paths


def browse_coco(ann: str | Path, images: str | Path, out: str | Path, task: str = "bbox", limit: int = 20,
                train: bool = False, anchors: bool = False, model_cfg=None) -> list[Path]:
    """Preprocess the first ``limit`` images of a COCO JSON into a temporary shard directory, then draw."""
    from pipelines.preprocess import preprocess
    from pipelines.preprocess.records import load_coco_json

    data, _ = load_coco_json(str(ann))
    keep = {im["id"] for im in data["images"][:limit] if isinstance(im, dict)}
    subset = dict(data, images=[im for im in data["images"] if isinstance(im, dict) and im.get("id") in keep],
                  annotations=[a for a in data["annotations"] if isinstance(a, dict) and a.get("image_id") in keep])
    with tempfile.TemporaryDirectory(prefix="lsnet-browse-") as tmp:
        subset_path = Path(tmp) / "subset.json"
        subset_path.write_text(json.dumps(subset))
        preprocess(subset_path, images, Path(tmp) / "shards", contour_points=(18, 36, 72), executor="local",
                   verbose=False, max_reject_fraction=1.0)
        return browse_shards(Path(tmp) / "shards", out, task=task, limit=limit, train=train, anchors=anchors,
                             model_cfg=model_cfg)


