"""Stage 1, on the driver, fail fast: read and hash the COCO JSON, check the categories and every image
entry, group the annotations per image; a bad entry is rejected with a reason, never dropped silently."""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass

from lsnet.data.shards import (
    resolve_filesystem,
)
from pipelines.preprocess.settings import PreprocessError


def rejection(kind: str, code: str, reason: str, image_id=None, ann_id=None, file_name=None) -> dict:
    out = {"kind": kind, "code": code, "image_id": image_id, "ann_id": ann_id, "reason": reason}
    if file_name is not None:
        out["file_name"] = file_name
    return out


def load_coco_json(path: str) -> tuple[dict, bytes]:
    """``(dataset dict, raw bytes)``; malformed JSON raises :class:`PreprocessError` with line/column."""
    fs, p = resolve_filesystem(path)
    try:
        with fs.open_input_stream(p) as f:
            raw = f.read()
    except (FileNotFoundError, OSError) as err:
        raise PreprocessError(f"{path}: cannot read the annotation file: {err}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as err:
        raise PreprocessError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno} "
                              f"(char {err.pos}): {err.msg}") from None
    except UnicodeDecodeError as err:
        raise PreprocessError(f"{path}: not UTF-8 text: {err}") from None
    if not isinstance(data, dict):
        raise PreprocessError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise PreprocessError(f"{path}: '{key}' must be a list (COCO format), got {type(data.get(key)).__name__}")
    return data, raw


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_categories(categories: list, path: str) -> list[dict]:
    """Categories sorted by id (= label order); a broken list fails fast (it concerns every record)."""
    seen = set()
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or not is_int(c.get("id")) or not isinstance(c.get("name"), str):
            raise PreprocessError(f"{path}: categories[{i}] needs an integer 'id' and a string 'name', got {c!r}")
        if c["id"] in seen:
            raise PreprocessError(f"{path}: duplicate category id {c['id']}")
        seen.add(c["id"])
    if not categories:
        raise PreprocessError(f"{path}: no categories")
    return sorted(categories, key=lambda c: c["id"])


def unsafe_file_name(name: str) -> str | None:
    """Why ``name`` may not be joined to the image root, or None if it is a plain relative path."""
    if "\x00" in name:
        return "contains a NUL byte"
    if "\\" in name:
        return "contains a backslash"
    if "://" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "is absolute"
    if any(part == ".." for part in name.split("/")):
        return "escapes the image root (path traversal '..')"
    return None


def _check_size(v) -> int | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if not math.isfinite(v) or v <= 0 or v != int(v):
        return None
    return int(v)


@dataclass
class CheckedRecords:
    images: list[dict]  # kept image entries, sorted by id, with "anns" list
    rejected: list[dict]


def check_records(data: dict) -> CheckedRecords:
    """Valid images (sorted by id) with their annotations, and the rejected images/annotations."""
    rejected: list[dict] = []
    images: dict[int, dict] = {}
    bad_images: dict[int, str] = {}
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict):
            rejected.append(rejection("image", "invalid_entry", f"images[{i}] is a {type(img).__name__}, not an object"))
            continue
        image_id, name = img.get("id"), img.get("file_name")
        if not is_int(image_id):
            rejected.append(rejection("image", "invalid_id", f"images[{i}] has a non-integer id {image_id!r}",
                                       file_name=name if isinstance(name, str) else None))
            continue
        reason, code = None, None
        if image_id in images or image_id in bad_images:
            code, reason = "duplicate_id", f"duplicate image id {image_id} (images[{i}])"
        elif not isinstance(name, str) or not name:
            code, reason = "invalid_file_name", f"missing or non-string file_name {name!r}"
        elif (why := unsafe_file_name(name)) is not None:
            code, reason = "path_traversal", f"unsafe file_name {name!r}: {why}"
        else:
            h, w = _check_size(img.get("height")), _check_size(img.get("width"))
            if h is None or w is None:
                code = "invalid_size"
                reason = f"invalid image size height={img.get('height')!r} width={img.get('width')!r} (must be positive integers)"
        if reason is not None:
            rejected.append(rejection("image", code, reason, image_id=image_id,
                                       file_name=name if isinstance(name, str) else None))
            if image_id not in images:
                bad_images.setdefault(image_id, reason)
            continue
        images[image_id] = {"id": image_id, "file_name": name, "height": h, "width": w, "anns": []}
    category_ids = {c["id"] for c in data["categories"] if isinstance(c, dict)}
    seen_anns: set[int] = set()
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            rejected.append(rejection("annotation", "invalid_entry",
                                       f"annotations[{i}] is a {type(ann).__name__}, not an object"))
            continue
        ann_id, image_id = ann.get("id"), ann.get("image_id")
        ref = {"image_id": image_id if is_int(image_id) else None, "ann_id": ann_id if is_int(ann_id) else None}
        if not is_int(ann_id):
            rejected.append(rejection("annotation", "invalid_id", f"annotations[{i}] has a non-integer id {ann_id!r}", **ref))
        elif ann_id in seen_anns:
            rejected.append(rejection("annotation", "duplicate_id", f"duplicate annotation id {ann_id}", **ref))
        elif is_int(image_id) and image_id in bad_images:
            rejected.append(rejection("annotation", "image_rejected",
                                       f"its image {image_id} was rejected: {bad_images[image_id]}", **ref))
        elif not is_int(image_id) or image_id not in images:
            rejected.append(rejection("annotation", "unknown_image", f"unknown image_id {image_id!r}", **ref))
        elif not is_int(ann.get("category_id")) or ann["category_id"] not in category_ids:
            rejected.append(rejection("annotation", "unknown_category",
                                       f"unknown category_id {ann.get('category_id')!r}", **ref))
        else:
            images[image_id]["anns"].append(ann)
        if is_int(ann_id):
            seen_anns.add(ann_id)
    return CheckedRecords(sorted(images.values(), key=lambda im: im["id"]), rejected)


def summarize_rejections(rejected: list[dict]) -> str:
    if not rejected:
        return "rejected: nothing"
    parts = []
    for kind in ("image", "annotation"):
        counts = Counter(r["code"] for r in rejected if r["kind"] == kind)
        if counts:
            detail = ", ".join(f"{code} {n}" for code, n in sorted(counts.items()))
            parts.append(f"{sum(counts.values())} {kind}s ({detail})")
    return "rejected: " + "; ".join(parts) + " -- reasons in manifest.json 'rejected'"
