"""Stage 4, in Ray Data tasks: read each image through ``pyarrow.fs``, decode once, resize, re-encode as a
training-friendly JPEG and compute its landmark targets (:func:`process_batch`)."""
from __future__ import annotations

import io
import json
import posixpath

import pyarrow as pa
import pyarrow.fs as pafs

from lsnet.data.shards import (
    resolve_filesystem,
    rows_to_table,
)
from lsnet.targets import compute_image_targets, empty_record, scale_record
from pipelines.preprocess.plan import stored_size
from pipelines.preprocess.records import rejection
from pipelines.preprocess.settings import EXTRA_FIELDS, JPEG_SUBSAMPLING, PreprocessConfig

_FS_CACHE: dict[str, tuple[pafs.FileSystem, str]] = {}


def _image_fs(root: str) -> tuple[pafs.FileSystem, str]:
    if root not in _FS_CACHE:
        _FS_CACHE[root] = resolve_filesystem(root)
    return _FS_CACHE[root]


class _ImageRejected(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code, self.reason = code, reason


def _read_and_resize(fs, path: str, height: int, width: int, cfg: PreprocessConfig) -> tuple[bytes, int, int, float, float]:
    from PIL import Image, UnidentifiedImageError

    try:
        with fs.open_input_stream(path) as f:
            data = f.read()
    except FileNotFoundError:
        raise _ImageRejected("missing_file", f"image file not found: {path}") from None
    except OSError as err:
        raise _ImageRejected("unreadable_file", f"cannot read {path}: {err}") from None
    try:
        im = Image.open(io.BytesIO(data))
        fmt = im.format
        w0, h0 = im.size
        if (h0, w0) != (height, width):
            raise _ImageRejected("size_mismatch", f"{path} is {h0}x{w0} (HxW) but the JSON says {height}x{width}")
        nh, nw, sx, sy = stored_size(h0, w0, cfg.max_size)
        resized = (nh, nw) != (h0, w0)
        if resized and fmt == "JPEG":
            im.draft("RGB", (nw, nh))  # DCT-domain down-scaling: faster decode, still >= target size
        im.load()  # decodes and validates the whole file (a truncated JPEG raises here)
        if cfg.keep_original_jpeg and fmt == "JPEG" and im.mode == "RGB" and not resized:
            return data, nh, nw, sx, sy
        im = im.convert("RGB")
        if resized:
            im = im.resize((nw, nh), Image.Resampling.BILINEAR)
        out = io.BytesIO()
        im.save(out, format="JPEG", quality=cfg.jpeg_quality, subsampling=JPEG_SUBSAMPLING[cfg.jpeg_subsampling])
        return out.getvalue(), nh, nw, sx, sy
    except _ImageRejected:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise _ImageRejected("decode_error", f"cannot decode {path}: {type(err).__name__}: {err}") from None


def process_batch(batch: pa.Table, image_root: str, category_to_label: dict[int, int],
                  cfg: PreprocessConfig) -> pa.Table:
    """Ray Data UDF: input rows (image entry + annotations JSON) -> shard rows + rejection columns."""
    fs, root = _image_fs(image_root)
    cps = cfg.target.contour_points
    rows = []
    for r in batch.to_pylist():
        path = posixpath.join(root, r["file_name"])
        anns = json.loads(r["anns_json"])
        out = {"image_id": r["image_id"], "file_name": r["file_name"], "orig_height": r["height"],
               "orig_width": r["width"], "shard": r["shard"], "reject_code": None, "reject_reason": None}
        try:
            data, nh, nw, sx, sy = _read_and_resize(fs, path, r["height"], r["width"], cfg)
            try:
                record, rejections = compute_image_targets(anns, r["height"], r["width"], category_to_label,
                                                           cfg.target)
                if (sx, sy) != (1.0, 1.0):
                    record = scale_record(record, sx, sy)
            except Exception as err:  # noqa: BLE001 -- a bug on one image must not kill the job
                raise _ImageRejected("target_error", f"computing targets failed: {type(err).__name__}: {err}") from None
            ann_rej = [rejection("annotation", "invalid_annotation", x.reason, image_id=x.image_id, ann_id=x.ann_id)
                       for x in rejections]
            out.update(height=nh, width=nw, scale_x=sx, scale_y=sy, image=data,
                       num_objects=len(record["ann_id"]), **record)
        except _ImageRejected as err:
            ann_rej = [rejection("annotation", "image_rejected", f"its image {r['image_id']} was rejected: {err.reason}",
                                  image_id=r["image_id"], ann_id=a.get("id")) for a in anns]
            out.update(height=0, width=0, scale_x=0.0, scale_y=0.0, image=b"", num_objects=0,
                       reject_code=err.code, reject_reason=err.reason, **empty_record(cfg.target))
        out["ann_rejections"] = json.dumps(ann_rej)
        rows.append(out)
    return rows_to_table(rows, cps, extra_fields=EXTRA_FIELDS)
