"""The Arrow shard format written by ``lsnet preprocess`` and its map-style reader.

A shard directory holds::

    manifest.json                      schema version, source JSON SHA-256, config, categories in
                                       label order, per-shard rows/bytes/SHA-256, rejected records
    gt.json                            COCO ground truth of the kept images (original coordinates)
    shard-00000-of-00004.arrow         Arrow IPC *file* format, one record batch per image
    shard-00000-of-00004.arrow.done    sidecar written after the shard (resume bookkeeping)

Row schema (one row per image; ``M`` = objects kept in the image, coordinates in the pixel frame of
the *stored* (possibly down-scaled) image)::

    image_id int64, file_name string, orig_height/orig_width int32 (COCO size),
    height/width int32 (stored size), scale_x/scale_y float64 (stored = orig * scale),
    image binary (JPEG), num_objects int32,
    ann_id list<int64>, category_id list<int64>, label list<int64>, area list<float32>,
    iscrowd list<bool>, box list<float32> (M*4), extreme list<float32> (M*4*2),
    contour_{N} list<float32> (M*N*2) for each N, keypoints list<float32> (M*17*2),
    keypoint_vis list<int8> (M*17), kps_box list<float32> (M*4)

The list columns are the arrays of :func:`lsnet.targets.compute_image_targets` flattened; their
trailing shapes are in the schema metadata (``lsnet.shapes``) and in the manifest. One record batch
per image makes ``reader.get_batch(row)`` an O(1), zero-copy random access on a memory map.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import posixpath
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch
from pyarrow import ipc
from torch.utils.data import Dataset, Sampler

from lsnet.data.augment import AugmentConfig, augment_sample, collate_batch, decode_jpeg  # noqa: F401
from lsnet.errors import LsnetError
from lsnet.structures import TASK_NUM_POINTS, ImageMeta, LandmarkTargets
from lsnet.targets import record_to_targets

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
GT_NAME = "gt.json"
SIDECAR_SUFFIX = ".done"

#: Per-image columns that are not targets.
META_FIELDS: tuple[tuple[str, pa.DataType], ...] = (
    ("image_id", pa.int64()),
    ("file_name", pa.string()),
    ("orig_height", pa.int32()),
    ("orig_width", pa.int32()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("scale_x", pa.float64()),
    ("scale_y", pa.float64()),
    ("image", pa.binary()),
    ("num_objects", pa.int32()),
)

#: Shards start with the META_FIELDS columns, in this order.
_IMAGE_COLUMN = [name for name, _ in META_FIELDS].index("image")
#: The numeric META_FIELDS, which the reader caches per open local shard (see _ShardReaders).
_NUMERIC_META = ("image_id", "orig_height", "orig_width", "height", "width", "scale_x", "scale_y", "num_objects")


class ShardError(LsnetError, RuntimeError):
    """A shard directory is missing, inconsistent or corrupted (the message names the file)."""


def record_columns(contour_points: tuple[int, ...]) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Target columns of a record: name -> (numpy dtype, trailing shape after the object axis M)."""
    cols: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
        "ann_id": (np.dtype(np.int64), ()),
        "category_id": (np.dtype(np.int64), ()),
        "label": (np.dtype(np.int64), ()),
        "box": (np.dtype(np.float32), (4,)),
        "area": (np.dtype(np.float32), ()),
        "iscrowd": (np.dtype(bool), ()),
        "extreme": (np.dtype(np.float32), (4, 2)),
    }
    for n in contour_points:
        cols[f"contour_{n}"] = (np.dtype(np.float32), (int(n), 2))
    cols["keypoints"] = (np.dtype(np.float32), (17, 2))
    cols["keypoint_vis"] = (np.dtype(np.int8), (17,))
    cols["kps_box"] = (np.dtype(np.float32), (4,))
    return cols


def shard_schema(contour_points: tuple[int, ...]) -> pa.Schema:
    cols = record_columns(contour_points)
    fields = [pa.field(n, t, nullable=False) for n, t in META_FIELDS]
    fields += [pa.field(n, pa.list_(pa.from_numpy_dtype(dt)), nullable=False) for n, (dt, _) in cols.items()]
    meta = {
        "lsnet.schema_version": str(SCHEMA_VERSION),
        "lsnet.shapes": json.dumps({n: list(s) for n, (_, s) in cols.items()}),
    }
    return pa.schema(fields, metadata=meta)


def rows_to_table(rows: list[dict[str, Any]], contour_points: tuple[int, ...],
                  extra_fields: tuple[tuple[str, pa.DataType], ...] = ()) -> pa.Table:
    """Rows (dicts with the META_FIELDS keys + a record's arrays) -> a table with :func:`shard_schema`.

    ``extra_fields`` are appended (nullable) for bookkeeping columns that are not written to shards.
    """
    schema = shard_schema(contour_points)
    cols = record_columns(contour_points)
    arrays = []
    for name, typ in META_FIELDS:
        arrays.append(pa.array([r[name] for r in rows], type=typ))
    for name, (dtype, shape) in cols.items():
        parts = [np.ascontiguousarray(r[name], dtype=dtype).reshape(-1) for r in rows]
        lengths = np.array([p.size for p in parts], dtype=np.int64)
        offsets = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = np.concatenate(parts) if parts else np.zeros(0, dtype)
        arrays.append(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values)))
    fields = list(schema)
    for name, typ in extra_fields:
        arrays.append(pa.array([r.get(name) for r in rows], type=typ))
        fields.append(pa.field(name, typ))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=schema.metadata))


def record_from_batch(batch: pa.RecordBatch, row: int = 0,
                      columns: dict[str, tuple[np.dtype, tuple[int, ...]]] | None = None,
                      num_objects: int | None = None) -> dict[str, np.ndarray]:
    """The record (as :func:`lsnet.targets.compute_image_targets` returns it) of one row of a batch."""
    if columns is None:
        shapes = json.loads(batch.schema.metadata[b"lsnet.shapes"])
        columns = {n: (None, tuple(s)) for n, s in shapes.items()}
    m = int(batch.column("num_objects")[row].as_py()) if num_objects is None else int(num_objects)
    record = {}
    for name, (_dtype, shape) in columns.items():
        values = batch.column(name)[row].values  # this row's slice of the flat values (zero-copy)
        record[name] = values.to_numpy(zero_copy_only=False).reshape((m, *shape))
    return record


def shard_file_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.arrow"


def sha256_bytes_of(path: str | Path, fs: pafs.FileSystem | None = None, chunk: int = 8 << 20) -> tuple[str, int]:
    """(SHA-256 hex digest, size in bytes) of a file, local or on a pyarrow filesystem."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") if fs is None else fs.open_input_stream(str(path)) as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def resolve_filesystem(path_or_uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or any ``pyarrow.fs`` URI (``file://``, ``s3://``, ...)."""
    text = str(path_or_uri)
    if "://" in text:
        fs, path = pafs.FileSystem.from_uri(text)
        return fs, path.rstrip("/") or "/"
    return pafs.LocalFileSystem(), os.path.abspath(text)


def load_manifest(shard_dir: str | Path) -> dict[str, Any]:
    fs, root = resolve_filesystem(shard_dir)
    path = posixpath.join(root, MANIFEST_NAME)
    try:
        with fs.open_input_stream(path) as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise ShardError(f"{path}: no manifest -- not a shard directory written by `lsnet preprocess`") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}: malformed manifest at line {err.lineno}, column {err.colno}: {err.msg}") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ShardError(f"{path}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION}); "
                         "re-run `lsnet preprocess`")
    return manifest


def verify_shards(shard_dir: str | Path, manifest: dict[str, Any] | None = None, full: bool = True) -> None:
    """Check every shard of a directory against its manifest; raise :class:`ShardError` naming the bad one.

    ``full=True`` recomputes SHA-256 of every shard (reads all bytes); ``False`` only checks sizes.
    """
    manifest = manifest or load_manifest(shard_dir)
    fs, root = resolve_filesystem(shard_dir)
    for shard in manifest["shards"]:
        path = posixpath.join(root, shard["file"])
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise ShardError(f"shard {path} listed in the manifest is missing")
        if info.size != shard["bytes"]:
            raise ShardError(f"shard {path} is corrupted: {info.size} bytes, the manifest says {shard['bytes']}")
        if full:
            digest, _ = sha256_bytes_of(path, None if isinstance(fs, pafs.LocalFileSystem) else fs)
            if digest != shard["sha256"]:
                raise ShardError(f"shard {path} is corrupted: SHA-256 {digest[:16]}... does not match the "
                                 f"manifest's {shard['sha256'][:16]}...; re-run `lsnet preprocess` to rewrite it")


class _ShardReaders:
    """An LRU of open shard readers: memory stays constant however many shards there are.

    Local shards are memory-mapped (zero-copy random access); URIs are opened as random-access files
    (ranged reads on object stores). Readers are re-opened after a fork (DataLoader workers). For an
    open local shard the numeric per-image columns (:data:`_NUMERIC_META`, a few bytes per row) are
    also held as numpy arrays: reading them per sample through Arrow scalars costs more than the
    whole rest of the row access.
    """

    def __init__(self, fs: pafs.FileSystem, paths: list[str], max_open: int):
        self.fs, self.paths, self.max_open = fs, paths, max_open
        self.local = isinstance(fs, pafs.LocalFileSystem)
        self._open: OrderedDict[int, tuple[Any, ipc.RecordBatchFileReader, dict | None]] = OrderedDict()
        self._pid = os.getpid()

    def get(self, shard: int) -> tuple[ipc.RecordBatchFileReader, dict[str, np.ndarray] | None]:
        """The reader of ``shard`` and, for a local shard, its numeric per-image columns (else None)."""
        if self._pid != os.getpid():  # forked: file handles are not ours to share
            self._open.clear()
            self._pid = os.getpid()
        entry = self._open.get(shard)
        if entry is None:
            path = self.paths[shard]
            try:
                source = pa.memory_map(path, "r") if self.local else self.fs.open_input_file(path)
                reader = ipc.open_file(source)
                numeric = None
                if self.local:  # zero-copy columns of the memory map; one small array each
                    table = reader.read_all().select(list(_NUMERIC_META))
                    numeric = {name: table.column(name).to_numpy() for name in _NUMERIC_META}
                entry = (source, reader, numeric)
            except (OSError, pa.ArrowInvalid) as err:
                raise ShardError(f"shard {path} cannot be opened as Arrow IPC: {err}") from err
            self._open[shard] = entry
            while len(self._open) > self.max_open:
                _, (src, _, _) = self._open.popitem(last=False)
                src.close()
        else:
            self._open.move_to_end(shard)
        return entry[1], entry[2]

    def __getstate__(self):
        return {"fs": self.fs, "paths": self.paths, "max_open": self.max_open}

    def __setstate__(self, state):
        self.__init__(state["fs"], state["paths"], state["max_open"])


class ShardDataset(Dataset):
    """Map-style dataset over a shard directory: ``dataset[i] -> (image uint8 (3,H,W), LandmarkTargets, ImageMeta)``.

    Args:
        shard_dir: directory (local path or pyarrow.fs URI) written by ``lsnet preprocess``.
        task: "bbox" | "segm" | "pose" -- which landmarks :func:`lsnet.targets.record_to_targets` picks.
        num_points: contour point count for segm (default 36; must be one the shards were built with).
        pose_box: "kps" | "obj", the box used for pose sample assignment (paper §4.3).
        train: random scale + flip (see :class:`lsnet.data.augment.AugmentConfig`) if True, else the
            deterministic test resize.
        scale_range: ``(min, max)`` short side in pixels, or None to keep the stored size.
        max_size: cap on the long side after resizing.
        flip_prob: probability of a horizontal flip in training.
        seed: augmentations depend only on ``(seed, epoch, index)`` (call :meth:`set_epoch`).
        verify: "sha256" (default: hash every shard once, here, on open), "size" or "none".
        skip_empty: leave out images with no object (e.g. for training).
        max_open_shards: how many shards are kept open (memory-mapped) at once.

    The image is returned as uint8, not normalised: :func:`lsnet.data.augment.collate_batch` does
    the float conversion, normalisation and padding once per batch.
    """

    def __init__(self, shard_dir: str | Path, task: str = "bbox", num_points: int | None = None,
                 pose_box: str = "kps", train: bool = False,
                 scale_range: tuple[int, int] | None = (800, 800), max_size: int = 1333,
                 flip_prob: float = 0.5, seed: int = 0, verify: str = "sha256",
                 skip_empty: bool = False, max_open_shards: int = 8, test_short_side: int | None = None):
        if task not in TASK_NUM_POINTS:
            raise ValueError(f"unknown task {task!r}")
        if verify not in ("sha256", "size", "none"):
            raise ValueError(f"verify must be 'sha256', 'size' or 'none', got {verify!r}")
        self.shard_dir = str(shard_dir)
        self.task, self.num_points, self.pose_box = task, num_points, pose_box
        self.train, self.seed = train, seed
        # The epoch lives in shared memory so that DataLoader workers -- persistent ones included,
        # which keep their own copy of the dataset -- see set_epoch() calls made in the main process.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.augment = AugmentConfig(scale_range=tuple(scale_range) if scale_range else None, max_size=max_size,
                                     flip_prob=flip_prob if train else 0.0, test_short_side=test_short_side)
        self.manifest = load_manifest(shard_dir)
        if task == "segm":
            n = num_points or TASK_NUM_POINTS["segm"]
            have = self.manifest["config"]["target"]["contour_points"]
            if n not in have:
                raise ValueError(f"{self.shard_dir}: shards have contours with {have} points, not {n}; "
                                 f"re-run `lsnet preprocess --contour-points ... {n}`")
        if verify != "none":
            verify_shards(shard_dir, self.manifest, full=verify == "sha256")
        fs, root = resolve_filesystem(shard_dir)
        paths = [posixpath.join(root, s["file"]) for s in self.manifest["shards"]]
        self._readers = _ShardReaders(fs, paths, max_open_shards)
        self._columns = record_columns(tuple(self.manifest["config"]["target"]["contour_points"]))
        # __getitem__ converts only what record_to_targets reads for this task (fewer Arrow calls).
        task_columns = {"bbox": ["extreme"], "segm": [f"contour_{num_points or TASK_NUM_POINTS['segm']}"],
                        "pose": ["keypoints", "keypoint_vis", "kps_box"]}[task]
        self._task_columns = {n: self._columns[n] for n in ["box", "label", "iscrowd", *task_columns]}
        # Global index -> (shard, row): cumulative row counts, O(#shards) memory.
        rows = [int(s["rows"]) for s in self.manifest["shards"]]
        if skip_empty:
            # Object counts come from the manifest so no shard has to be scanned here.
            self._index = np.array([(k, r) for k, s in enumerate(self.manifest["shards"])
                                    for r, n in enumerate(s["num_objects"]) if n > 0], dtype=np.int64)
            self._starts = None
        else:
            self._index = None
            self._starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self._len = len(self._index) if skip_empty else int(self._starts[-1])

    # -- metadata for training / evaluation ---------------------------------------------------------
    @property
    def categories(self) -> list[dict]:
        """``[{"id", "name"}]`` in label order: label ``k`` is COCO category ``categories[k]["id"]``."""
        return self.manifest["categories"]

    @property
    def category_ids(self) -> list[int]:
        return [c["id"] for c in self.categories]

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def gt_path(self) -> str:
        return posixpath.join(self.shard_dir, GT_NAME)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Augmentations of sample ``i`` depend on ``(seed, epoch, i)``; call before each epoch, before
        ``iter(loader)`` (works with persistent DataLoader workers: the value is in shared memory)."""
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return self._len

    def locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self._len:
            raise IndexError(f"index {index} out of range for {self._len} samples")
        if self._index is not None:
            shard, row = self._index[index]
            return int(shard), int(row)
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, int(index - self._starts[shard])

    def raw(self, index: int, all_columns: bool = True) -> tuple[pa.Buffer, dict[str, np.ndarray], dict[str, Any]]:
        """(JPEG bytes buffer, record in the stored frame, row metadata) of sample ``index``.

        ``all_columns=False`` returns only the record columns the task needs.
        """
        batch, _ = self._row(index)
        meta = {name: batch.column(i)[0].as_py() for i, (name, _) in enumerate(META_FIELDS) if name != "image"}
        image = batch.column(_IMAGE_COLUMN)[0].as_buffer()
        record = record_from_batch(batch, 0, self._columns if all_columns else self._task_columns)
        return image, record, meta

    def _row(self, index: int) -> tuple[pa.RecordBatch, dict[str, Any] | None]:
        """The one-row record batch of sample ``index`` and, for a local shard, its numeric metadata
        from the per-shard cache (else None)."""
        shard, row = self.locate(index)
        reader, numeric = self._readers.get(shard)
        meta = None if numeric is None else {name: values[row] for name, values in numeric.items()}
        return reader.get_batch(row), meta

    def __getitem__(self, index: int) -> tuple[torch.Tensor, LandmarkTargets, ImageMeta]:
        index = int(index)
        batch, meta = self._row(index)
        if meta is None:
            meta = {name: batch.column(name)[0].as_py() for name in _NUMERIC_META}
        try:
            # strict: behind verify=size (or none) the decoder is the last check of the stored bytes
            image = decode_jpeg(batch.column(_IMAGE_COLUMN)[0].as_buffer(), strict=True)
        except ValueError as err:
            shard, row = self.locate(index)
            raise ShardError(f"shard {self._readers.paths[shard]}, row {row} (image_id {int(meta['image_id'])}): "
                             f"{err}") from err
        record = record_from_batch(batch, 0, self._task_columns, num_objects=meta["num_objects"])
        targets = record_to_targets(record, self.task, self.num_points, self.pose_box)
        image_meta = ImageMeta(
            image_id=int(meta["image_id"]),
            orig_size=(int(meta["orig_height"]), int(meta["orig_width"])),
            size=(int(meta["height"]), int(meta["width"])),
            scale=(float(meta["scale_x"]), float(meta["scale_y"])),
        )
        return augment_sample(image, targets, image_meta, self.augment, task=self.task, train=self.train,
                              seed=self.seed, epoch=self.epoch, index=index)


class ShardSampler(Sampler[int]):
    """Indices of one rank's part of an epoch: every sample exactly once per epoch across ranks.

    The epoch order is a permutation seeded by ``(seed, epoch)`` (identity if ``shuffle=False``),
    and rank ``r`` takes positions ``r, r + world_size, ...`` of it. When ``num_samples`` is not a
    multiple of ``world_size``:

    - ``drop_last=False`` (default): the first ``num_samples % world_size`` ranks get one sample more
      (exactly once, uneven lengths -- the training loop must tolerate one step less on some ranks,
      e.g. by stopping all ranks at ``min_len``); see :meth:`min_len`.
    - ``drop_last=True``: the last ``num_samples % world_size`` positions of the permutation are
      left out of this epoch (each kept sample still exactly once; what is dropped changes per epoch).

    Samples are never duplicated (unlike torch's DistributedSampler padding).
    """

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = False):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.num_samples, self.rank, self.world_size = int(num_samples), rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def epoch_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)

    def indices(self) -> list[int]:
        order = self.epoch_order()
        if self.drop_last:
            order = order[: self.num_samples - self.num_samples % self.world_size]
        return order[self.rank :: self.world_size].tolist()

    def min_len(self) -> int:
        """Length of the shortest rank's share (steps every rank can take in lockstep)."""
        return self.num_samples // self.world_size

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.world_size
        return self.num_samples // self.world_size + (self.rank < self.num_samples % self.world_size)
