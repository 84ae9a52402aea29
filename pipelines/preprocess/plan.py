"""Stage 2: the kept images split into shards by a byte budget (a pure function of the inputs and the
config, so every shard is too), and each shard's plan hash, which resuming compares."""
from __future__ import annotations

import hashlib
import json

from lsnet.data.shards import (
    SCHEMA_VERSION,
)
from pipelines.preprocess.settings import BYTES_PER_PIXEL_ESTIMATE, ROW_OVERHEAD_BYTES, PreprocessConfig


def stored_size(height: int, width: int, max_size: int) -> tuple[int, int, float, float]:
    """(h, w, sx, sy) of the stored image: long side <= max_size, aspect kept, never up-scaled."""
    scale = min(1.0, max_size / max(height, width))
    if scale >= 1.0:
        return height, width, 1.0, 1.0
    nh, nw = max(1, round(height * scale)), max(1, round(width * scale))
    return nh, nw, nw / width, nh / height


def plan_shards(images: list[dict], cfg: PreprocessConfig) -> list[list[dict]]:
    """Split images (sorted by id) into consecutive shards by the estimated byte budget."""
    budget = cfg.shard_size_mb * 1024 * 1024
    shards: list[list[dict]] = []
    current: list[dict] = []
    used = 0.0
    for img in images:
        nh, nw, _, _ = stored_size(img["height"], img["width"], cfg.max_size)
        est = BYTES_PER_PIXEL_ESTIMATE * nh * nw + ROW_OVERHEAD_BYTES
        full = current and (used + est > budget or
                            (cfg.max_rows_per_shard is not None and len(current) >= cfg.max_rows_per_shard))
        if full:
            shards.append(current)
            current, used = [], 0.0
        current.append(img)
        used += est
    if current:
        shards.append(current)
    return shards


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)


def input_row(img: dict, shard: int) -> dict:
    return {"image_id": img["id"], "file_name": img["file_name"], "height": img["height"],
            "width": img["width"], "anns_json": _canonical(img["anns"]), "shard": shard}


def plan_hash(rows: list[dict], index: int, count: int, cfg: PreprocessConfig) -> str:
    h = hashlib.sha256()
    h.update(_canonical({"schema": SCHEMA_VERSION, "config": cfg.to_json(), "index": index, "count": count}).encode())
    for r in rows:
        h.update(_canonical({k: r[k] for k in ("image_id", "file_name", "height", "width")}).encode())
        h.update(r["anns_json"].encode())
    return h.hexdigest()
