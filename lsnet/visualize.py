"""Prediction overlays: boxes with class names and scores, translucent contour polygons, pose skeletons.

Pure drawing on a copy of an RGB uint8 image with PIL; coordinates are in that image's pixels
(use :func:`lsnet.evaluation.rescale_detections` first for detections made on a resized image).
"""
from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lsnet.structures import COCO_SKELETON, Detections


def class_color(label: int) -> tuple[int, int, int]:
    """A distinct, stable colour per class (hues spaced by the golden ratio)."""
    hue = (label * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _label_text(label: int, score: float, class_names: Sequence[str] | None) -> str:
    name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
    return f"{name} {score:.2f}"


def draw_detections(
    image: np.ndarray,
    dets: Detections,
    task: str,
    class_names: Sequence[str] | None = None,
    score_thr: float = 0.3,
    alpha: float = 0.4,
    keypoint_thr: float = 0.2,
    line_width: int = 2,
) -> np.ndarray:
    """Draw detections with ``score >= score_thr`` on a copy of ``image`` (H, W, 3) RGB uint8.

    - every task: the box outline in the class colour and ``"name score"`` on a filled tag;
    - ``bbox``: the four predicted extreme points as dots (LSNet's landmarks);
    - ``segm``: the contour polygon filled with opacity ``alpha`` and outlined;
    - ``pose``: keypoints with ``point_scores >= keypoint_thr`` (all when no scores) as dots and the
      COCO skeleton between pairs of such keypoints.

    Returns a new RGB uint8 array; pixels away from every drawn detection are unchanged.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    if task not in ("bbox", "segm", "pose"):
        raise ValueError(f"unknown task {task!r}")
    keep = (dets.scores.detach().cpu() >= score_thr).nonzero().flatten().tolist()
    base = Image.fromarray(image).convert("RGBA")
    if not keep:
        return image.copy()
    # Lowest score first so the most confident detections end up on top.
    keep.sort(key=lambda i: float(dets.scores[i]))
    boxes = dets.boxes.detach().cpu().float().numpy()
    points = dets.points.detach().cpu().float().numpy()
    labels = dets.labels.detach().cpu().tolist()
    scores = dets.scores.detach().cpu().tolist()
    point_scores = None if dets.point_scores is None else dets.point_scores.detach().cpu().float().numpy()

    if task == "segm":  # translucent fills on their own layer, composited once
        fill = Image.new("RGBA", base.size, (0, 0, 0, 0))
        fill_draw = ImageDraw.Draw(fill)
        for i in keep:
            fill_draw.polygon([tuple(p) for p in points[i].tolist()], fill=class_color(labels[i]) + (int(255 * alpha),))
        base = Image.alpha_composite(base, fill)

    draw = ImageDraw.Draw(base)
    font = ImageFont.load_default()
    radius = max(1, line_width)
    for i in keep:
        color = class_color(labels[i])
        x1, y1, x2, y2 = boxes[i].tolist()
        draw.rectangle([x1, y1, x2, y2], outline=color, width=line_width)
        if task == "segm":
            pts = [tuple(p) for p in points[i].tolist()]
            draw.line(pts + pts[:1], fill=color, width=1)
        elif task == "bbox":
            for px, py in points[i].tolist():
                draw.ellipse([px - radius, py - radius, px + radius, py + radius], fill=color)
        elif task == "pose":
            visible = np.ones(len(points[i]), bool) if point_scores is None else point_scores[i] >= keypoint_thr
            for a, b in COCO_SKELETON:
                if a < len(visible) and b < len(visible) and visible[a] and visible[b]:
                    draw.line([tuple(points[i][a]), tuple(points[i][b])], fill=color, width=line_width)
            for k, (px, py) in enumerate(points[i].tolist()):
                if visible[k]:
                    draw.ellipse([px - radius - 1, py - radius - 1, px + radius + 1, py + radius + 1],
                                 fill=(255, 255, 255), outline=color)
        text = _label_text(labels[i], scores[i], class_names)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 4 if y1 - th - 4 >= 0 else y1  # above the box, or inside when at the top edge
        draw.rectangle([x1, ty, x1 + tw + 4, ty + th + 4], fill=color)
        draw.text((x1 + 2 - left, ty + 2 - top), text, fill=(0, 0, 0), font=font)
    return np.asarray(base.convert("RGB"))


def save_png(path: str | Path, image: np.ndarray) -> Path:
    """Write an RGB uint8 array as PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(path, format="PNG")
    return path
