"""A seeded synthetic COCO-format dataset: ``lsnet synth OUT --num-images 8 --image-size 256 256``.

What it exercises (issue 4, docs/design.md §1):

- several classes of varied scale drawn as **solid, distinct colours on a textured background**, so a
  small model can overfit them quickly (the overfit tests and ``make demo`` train on it);
- **concave, non-star-shaped** objects (C, U and L shapes) where a polar (ray-from-centre) contour
  fails, and a **multi-part** class (two separate blobs in one annotation);
- 'person' **stick figures** with the 17 COCO keypoints and visibility flags (mostly v=2, some v=1
  "labelled but occluded", some v=0 "not labelled" stored as ``0, 0, 0``), written both to
  ``instances_*.json`` (with a silhouette polygon) and ``person_keypoints_*.json``;
- COCO category ids that are **not contiguous** (1, 3, 7, ...), to exercise the id -> label mapping.

Every object is rendered by filling exactly the polygons stored in its annotation and objects never
overlap, so each polygon is the exact outline of what is visible. Images are independent of each
other: image ``i`` depends only on ``(seed, i)``, so the first ``k`` images are the same whatever
``num_images`` is.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lsnet.data.shapes import (
    background_image,
    boxes_overlap,
    person_keypoints,
    person_polygons,
    polygon_area,
    polygon_mask,
    polygons_bbox,
    polygons_to_coco,
    rotate_polygons,
    shape_polygons,
)
from lsnet.errors import InputError
from lsnet.structures import COCO_KEYPOINT_NAMES, COCO_SKELETON

#: Categories with deliberately non-contiguous ids. Colours are saturated and far apart so that the
#: class is visible from any single pixel of the object.
CATEGORIES: tuple[dict, ...] = (
    {"id": 1, "name": "person", "supercategory": "person", "color": (250, 250, 250)},
    {"id": 3, "name": "square", "supercategory": "shape", "color": (230, 30, 30)},
    {"id": 7, "name": "disk", "supercategory": "shape", "color": (30, 200, 40)},
    {"id": 10, "name": "triangle", "supercategory": "shape", "color": (40, 60, 235)},
    {"id": 13, "name": "c_shape", "supercategory": "concave", "color": (245, 220, 20)},
    {"id": 18, "name": "u_shape", "supercategory": "concave", "color": (220, 30, 220)},
    {"id": 22, "name": "l_shape", "supercategory": "concave", "color": (20, 220, 230)},
    {"id": 31, "name": "twin", "supercategory": "multipart", "color": (250, 140, 0)},
)
PERSON_CATEGORY_ID = 1
#: First image id of the first split written into a directory (later splits continue after it).
DEFAULT_FIRST_IMAGE_ID = 1000
SHAPE_NAMES = tuple(c["name"] for c in CATEGORIES if c["id"] != PERSON_CATEGORY_ID)
_BY_NAME = {c["name"]: c for c in CATEGORIES}


@dataclass
class SyntheticDataset:
    """Where :func:`write_synthetic_coco` put things."""

    root: Path
    image_dir: Path
    instances_json: Path
    keypoints_json: Path
    num_images: int
    num_annotations: int


# ----------------------------------------------------------------------------------------------
# Shapes: each returns a list of polygons (each (K, 2) float, x/y), centred on (0, 0), size ~ 1.
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Persons
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _make_image(seed: int, index: int, image_hw: tuple[int, int], objects_per_image: tuple[int, int],
                person_prob: float, occluded_prob: float, unlabelled_prob: float):
    """Render image ``index``; returns (uint8 HWC array, list of (category, polygons, keypoints|None))."""
    rng = np.random.default_rng([seed, index])
    h, w = image_hw
    img = background_image(rng, h, w)
    placed_boxes: list[tuple[float, float, float, float]] = []
    objects = []
    short = min(h, w)
    num = int(rng.integers(objects_per_image[0], objects_per_image[1] + 1))
    for _ in range(num):
        is_person = rng.random() < person_prob
        for _attempt in range(30):
            if is_person:
                height = rng.uniform(0.45, 0.9) * h
                kp = person_keypoints(rng, height)
                lo = kp.min(0) - 0.08 * height
                hi = kp.max(0) + 0.08 * height
                off = np.array([rng.uniform(-lo[0], w - hi[0]) if hi[0] - lo[0] < w else -1e9,
                                rng.uniform(-lo[1] + 1, h - hi[1]) if hi[1] - lo[1] < h else -1e9])
                if off.min() < -1e8:
                    continue
                box = (off[0] + lo[0], off[1] + lo[1], off[0] + hi[0], off[1] + hi[1])
                if any(boxes_overlap(box, b, 3) for b in placed_boxes):
                    continue
                polys = person_polygons(kp, height, (h, w), off)
                if not polys:
                    continue
                objects.append(("person", polys, kp + off))
                placed_boxes.append(box)
                break
            name = SHAPE_NAMES[int(rng.integers(len(SHAPE_NAMES)))]
            size = rng.uniform(0.14, 0.5) * short
            polys = rotate_polygons(shape_polygons(name, rng), rng.uniform(0, 2 * math.pi))
            polys = [p * size for p in polys]
            allp = np.concatenate(polys)
            lo, hi = allp.min(0), allp.max(0)
            if hi[0] - lo[0] >= w - 4 or hi[1] - lo[1] >= h - 4:
                continue
            off = np.array([rng.uniform(2 - lo[0], w - 2 - hi[0]), rng.uniform(2 - lo[1], h - 2 - hi[1])])
            box = (off[0] + lo[0], off[1] + lo[1], off[0] + hi[0], off[1] + hi[1])
            if any(boxes_overlap(box, b, 3) for b in placed_boxes):
                continue
            objects.append((name, [p + off for p in polys], None))
            placed_boxes.append(box)
            break
    # Paint each object through pycocotools' rasteriser of its *stored* (rounded) polygons: the
    # visible pixels are then exactly the mask COCO evaluation derives from the annotation.
    pixels = img
    objects = [(name, [np.round(p, 2) for p in polys], kp) for name, polys, kp in objects]
    for name, polys, _kp in objects:
        colour = np.array(_BY_NAME[name]["color"], dtype=np.float64)
        colour = np.clip(colour + rng.uniform(-15, 15, size=3), 0, 255).astype(np.uint8)
        pixels[polygon_mask(polys, h, w)] = colour
    annotations = []
    for name, polys, kp in objects:
        vis = None
        if kp is not None:
            u = rng.random(17)
            vis = np.where(u < unlabelled_prob, 0, np.where(u < unlabelled_prob + occluded_prob, 1, 2))
            if (vis > 0).sum() == 0:
                vis[0] = 2
        annotations.append((name, polys, kp, vis))
    return pixels, annotations


def write_synthetic_coco(
    out_dir: str | Path,
    num_images: int = 8,
    image_size: tuple[int, int] | int = (256, 256),
    seed: int = 0,
    split: str = "train",
    objects_per_image: tuple[int, int] = (2, 5),
    person_prob: float = 0.3,
    occluded_prob: float = 0.1,
    unlabelled_prob: float = 0.1,
    size_jitter: float = 0.0,
    jpeg_quality: int = 95,
    first_image_id: int | None = None,
    overwrite: bool = False,
) -> SyntheticDataset:
    """Write ``num_images`` seeded JPEGs and their COCO JSONs under ``out_dir``.

    Several splits can share ``out_dir`` (``split="val"`` after ``split="train"``): image ids (and
    so file names) never collide with another split's. ``first_image_id=None`` starts at 1000, or
    after the largest id of the splits already in ``out_dir/annotations``; an explicit id that
    overlaps another split is an :class:`InputError`. Existing images or JSONs of this split are
    never replaced unless ``overwrite`` (another split's never).

    Layout: ``images/{image_id:012d}.jpg``, ``annotations/instances_{split}.json`` (every object,
    polygons) and ``annotations/person_keypoints_{split}.json`` (the persons, same annotation ids,
    17 keypoints each). ``image_size`` is ``(height, width)``; with ``size_jitter > 0`` each image's
    sides are scaled by an independent factor in ``[1 - j, 1 + j]`` (varied aspect ratios).
    Identical arguments give byte-identical files.
    """
    out = Path(out_dir)
    image_dir = out / "images"
    ann_dir = out / "annotations"
    first_image_id = _check_targets(image_dir, ann_dir, split, num_images, first_image_id, overwrite)
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    base_h, base_w = (image_size, image_size) if isinstance(image_size, int) else image_size
    images, anns, kp_anns = [], [], []
    ann_id = 1
    for index in range(num_images):
        size_rng = np.random.default_rng([seed, index, 1])
        jit = size_rng.uniform(1 - size_jitter, 1 + size_jitter, size=2) if size_jitter > 0 else (1.0, 1.0)
        h, w = round(base_h * float(jit[0])), round(base_w * float(jit[1]))
        image_id = first_image_id + index
        pixels, objects = _make_image(seed, index, (h, w), objects_per_image, person_prob,
                                      occluded_prob, unlabelled_prob)
        file_name = f"{image_id:012d}.jpg"
        # 4:4:4 chroma (no subsampling) keeps the colour edges on the polygon outline crisp.
        Image.fromarray(pixels).save(image_dir / file_name, format="JPEG", quality=jpeg_quality, subsampling=0)
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w, "license": 0})
        for name, polys, kp, vis in objects:
            ann = {
                "id": ann_id,
                "image_id": image_id,
                "category_id": _BY_NAME[name]["id"],
                "segmentation": polygons_to_coco(polys),
                "area": round(polygon_area(polys, h, w), 2),
                "bbox": polygons_bbox(polys),
                "iscrowd": 0,
            }
            anns.append(ann)
            if kp is not None:
                flat = []
                for (x, y), v in zip(kp, vis):
                    flat += [0, 0, 0] if v == 0 else [round(float(x), 2), round(float(y), 2), int(v)]
                kp_anns.append({**ann, "keypoints": flat, "num_keypoints": int((vis > 0).sum())})
            ann_id += 1
    info = {"description": f"lsnet synthetic dataset (seed={seed})", "version": "1.0", "year": 2024}
    licenses = [{"id": 0, "name": "CC0 (generated)", "url": ""}]
    categories = [{k: v for k, v in c.items() if k != "color"} for c in CATEGORIES]
    person_cat = {**categories[0], "keypoints": list(COCO_KEYPOINT_NAMES),
                  "skeleton": [[a + 1, b + 1] for a, b in COCO_SKELETON]}
    instances = {"info": info, "licenses": licenses, "images": images, "annotations": anns,
                 "categories": categories}
    keypoints = {"info": info, "licenses": licenses, "images": images, "annotations": kp_anns,
                 "categories": [person_cat]}
    instances_json = ann_dir / f"instances_{split}.json"
    keypoints_json = ann_dir / f"person_keypoints_{split}.json"
    instances_json.write_text(json.dumps(instances))
    keypoints_json.write_text(json.dumps(keypoints))
    return SyntheticDataset(out, image_dir, instances_json, keypoints_json, num_images, len(anns))


def _other_splits_ids(ann_dir: Path, split: str) -> dict[int, Path]:
    """Image id -> the annotation JSON (of another split in ``ann_dir``) that uses it."""
    own = {f"instances_{split}.json", f"person_keypoints_{split}.json"}
    used: dict[int, Path] = {}
    for path in sorted(ann_dir.glob("*.json")) if ann_dir.is_dir() else []:
        if path.name in own:
            continue
        try:
            images = json.loads(path.read_text()).get("images", [])
        except (json.JSONDecodeError, OSError, AttributeError) as err:
            raise InputError(f"{path}: cannot read the image ids of this split: {err}") from None
        for im in images:
            if isinstance(im, dict) and isinstance(im.get("id"), int):
                used.setdefault(im["id"], path)
    return used


def _check_targets(image_dir: Path, ann_dir: Path, split: str, num_images: int, first_image_id: int | None,
                   overwrite: bool) -> int:
    """The first image id to use; raises :class:`InputError` rather than overwrite another split's
    images, or (without ``overwrite``) this split's."""
    used = _other_splits_ids(ann_dir, split)
    own_json = ann_dir / f"instances_{split}.json"
    if first_image_id is None and own_json.exists():  # rewriting this split: keep its ids
        try:
            first_image_id = min(im["id"] for im in json.loads(own_json.read_text())["images"])
        except (json.JSONDecodeError, OSError, KeyError, TypeError, ValueError):
            first_image_id = None
    if first_image_id is None:
        first_image_id = max(DEFAULT_FIRST_IMAGE_ID, max(used, default=0) + 1)
    ids = range(first_image_id, first_image_id + num_images)
    clash = [i for i in ids if i in used]
    if clash:
        raise InputError(f"image ids {clash[0]}..{clash[-1]} of split {split!r} are already used by "
                         f"{used[clash[0]]}: choose another --first-id (or leave it unset)")
    if not overwrite:
        existing = [image_dir / f"{i:012d}.jpg" for i in ids if (image_dir / f"{i:012d}.jpg").exists()]
        existing += [p for p in (ann_dir / f"instances_{split}.json", ann_dir / f"person_keypoints_{split}.json")
                     if p.exists()]
        if existing:
            raise InputError(f"{existing[0]} exists ({len(existing)} file(s) of split {split!r} would be "
                             f"replaced): pass --overwrite, another --split or another directory")
    return first_image_id


# ----------------------------------------------------------------------------------------------
# CLI: lsnet synth
# ----------------------------------------------------------------------------------------------


