"""Stage 5, on the driver: each shard written to a temporary file as its rows arrive, fsynced, renamed (or,
for an output on object storage, uploaded in one PUT), then its sidecar (``.done``: plan hash + SHA-256),
by which a rerun finds it complete."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import ipc

from lsnet import storage
from lsnet.data.shards import (
    SIDECAR_SUFFIX,
    sha256_bytes_of,
    shard_file_name,
    shard_schema,
)
from pipelines.preprocess.records import rejection
from pipelines.preprocess.settings import (
    CRASH_ENV,
    RETRYABLE_REJECTIONS,
    SHARD_WRITE_GROUP_ROWS,
    PreprocessConfig,
)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def crash_hook() -> tuple[int | None, str]:
    value = os.environ.get(CRASH_ENV)
    if not value:
        return None, ""
    n, _, mode = value.partition(":")
    return int(n), mode


class ShardWriter:
    """Writes one shard as its rows arrive: an Arrow IPC file, one record batch per row, under a
    temporary name; :meth:`close` fsyncs, hashes and renames it (a reader never sees half a shard).

    Streaming the rows in (instead of collecting the shard and writing it at the end) keeps the
    driver's memory independent of the shard size and overlaps the writing with the image work.
    The bytes depend only on the rows, not on how they were chunked on the way: rows are copied into
    fresh buffers in fixed groups of ``group_rows`` (by position in the shard) before writing, because
    the IPC writer pads a row's buffers with bytes of its neighbours in the same buffer.

    ``path`` is a local path or a URI (``s3://...``): then the shard is built in a local staging directory
    and uploaded whole when it is complete (an object is never seen half-written).
    """

    def __init__(self, path: str | Path, schema: pa.Schema, group_rows: int | None = None):
        self.path = str(path)
        self.group_rows = group_rows or SHARD_WRITE_GROUP_ROWS
        name = storage.name_of(self.path)
        self._staging = Path(tempfile.mkdtemp(prefix="lsnet-shard-")) if storage.is_uri(self.path) else None
        self.tmp = (self._staging or Path(self.path).parent) / f".{name}.tmp-{os.getpid()}"
        # Buffered: the writer emits several small writes per row (measured 1.5x faster than unbuffered)
        self._sink = pa.BufferedOutputStream(pa.OSFile(str(self.tmp), "wb"), buffer_size=1 << 20)
        self._writer = ipc.new_file(self._sink, schema)
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self._pending.append(table)
            self._pending_rows += table.num_rows
            self.rows += table.num_rows
        while self._pending_rows >= self.group_rows:
            self._flush(self.group_rows)

    def _flush(self, n: int) -> None:
        pending = pa.concat_tables(self._pending)
        group = pending.take(np.arange(n))  # take always allocates: a fresh, contiguous layout
        self._writer.write_table(group, max_chunksize=1)
        rest = pending.slice(n)
        self._pending, self._pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self, crash_before_rename: bool = False) -> tuple[str, int]:
        """Finish the file and rename it into place -> (sha256, bytes)."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._writer.close()
        self._sink.close()
        _fsync_path(self.tmp)
        if crash_before_rename:
            os._exit(75)
        digest, size = sha256_bytes_of(self.tmp)
        if self._staging is None:
            os.replace(self.tmp, self.path)
        else:
            try:
                storage.upload_file(self.tmp, self.path)
            finally:
                shutil.rmtree(self._staging, ignore_errors=True)
        return digest, size


def _sidecar_path(shard_path: str | Path) -> str:
    return f"{shard_path}{SIDECAR_SUFFIX}"


def shard_is_complete(shard_path: str | Path, expected_hash: str) -> dict | None:
    """The sidecar if shard ``shard_path`` (a path or a URI) was completed for this plan and its bytes are
    intact (size, then SHA-256 of the stored bytes)."""
    try:
        info = json.loads(storage.read_text(_sidecar_path(shard_path)))
    except (json.JSONDecodeError, OSError):
        return None
    if info.get("plan_hash") != expected_hash:
        return None
    if any(r.get("code") in RETRYABLE_REJECTIONS for r in info.get("rejected", [])):
        return None  # an image file was missing/unreadable last time: it may be there now (fixed --images)
    if storage.file_size(shard_path) != info.get("bytes"):
        return None
    digest, _ = storage.sha256_of(shard_path)
    return info if digest == info.get("sha256") else None


class ShardInProgress:
    """The rows of one shard arriving in plan order: kept rows go to the file, rejections and the
    sidecar's bookkeeping are collected."""

    def __init__(self, out_dir: str | Path, index: int, count: int, phash: str, cfg: PreprocessConfig):
        self.index, self.phash = index, phash
        self.schema = shard_schema(cfg.target.contour_points)
        self.writer = ShardWriter(storage.join(out_dir, shard_file_name(index, count)), self.schema)
        self.rejected: list[dict] = []
        self.image_ids: list[int] = []
        self.num_objects: list[int] = []
        self.ann_ids: list[int] = []

    def add(self, table: pa.Table) -> None:
        for r in table.select(["image_id", "file_name", "reject_code", "reject_reason", "ann_rejections"]).to_pylist():
            if r["reject_code"] is not None:
                self.rejected.append(rejection("image", r["reject_code"], r["reject_reason"], image_id=r["image_id"],
                                                file_name=r["file_name"]))
            if r["ann_rejections"] != "[]":
                self.rejected += json.loads(r["ann_rejections"])
        table = table.filter(pc.is_null(table["reject_code"]))
        if not table.num_rows:
            return
        table = pa.Table.from_arrays([table[f.name] for f in self.schema], schema=self.schema)
        self.writer.write(table)
        self.image_ids += table["image_id"].to_pylist()
        self.num_objects += table["num_objects"].to_pylist()
        self.ann_ids += table["ann_id"].combine_chunks().flatten().to_numpy(zero_copy_only=False).tolist()

    def finish(self, crash_before_rename: bool) -> dict:
        """Close the file; write the sidecar (the shard is complete once it exists) -> its content."""
        digest, size = self.writer.close(crash_before_rename)
        info = {
            "file": storage.name_of(self.writer.path),
            "plan_hash": self.phash,
            "sha256": digest,
            "bytes": size,
            "rows": self.writer.rows,
            "image_ids": self.image_ids,
            "num_objects": self.num_objects,
            "ann_ids": self.ann_ids,
            "rejected": self.rejected,
        }
        storage.write_bytes(_sidecar_path(self.writer.path), json.dumps(info).encode(), fsync=True)
        return info
