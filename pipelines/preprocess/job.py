"""The preprocessing job on the driver: :func:`preprocess` runs the stages of :mod:`pipelines.preprocess`
(check the records, plan the shards, skip the complete ones, map the images with Ray Data, write the
shards, ``gt.json`` and ``manifest.json``)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from lsnet import storage
from lsnet.data.shards import (
    GT_NAME,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SIDECAR_SUFFIX,
    record_columns,
    resolve_filesystem,
    shard_file_name,
)
from lsnet.progress import Progress
from lsnet.targets import TargetConfig
from pipelines.preprocess.images import process_batch
from pipelines.preprocess.plan import input_row, plan_hash, plan_shards
from pipelines.preprocess.records import (
    CheckedRecords,
    check_categories,
    check_records,
    is_int,
    load_coco_json,
    summarize_rejections,
)
from pipelines.preprocess.settings import DEFAULT_MAX_REJECT_FRACTION, PreprocessConfig, PreprocessError
from pipelines.preprocess.writer import ShardInProgress, crash_hook, shard_is_complete

# --------------------------------------------------------------------------------------------------
# Stage 1: parse and check on the driver


# --------------------------------------------------------------------------------------------------
# Stage 2: plan shards


# --------------------------------------------------------------------------------------------------
# Stage 4: per-image work (runs in Ray Data tasks)



# --------------------------------------------------------------------------------------------------
# Stage 5: writing


# --------------------------------------------------------------------------------------------------
# The job


def _log(msg: str, verbose: bool) -> None:
    if verbose:
        print(f"[preprocess] {msg}", flush=True)


def preprocess(ann: str | Path, images: str | Path, out: str | Path, max_size: int = 1333,
               jpeg_quality: int = 90, shard_size_mb: float = 256.0,
               contour_points: tuple[int, ...] = (18, 36, 72), num_cpus: int | None = None,
               target_config: TargetConfig | None = None, max_rows_per_shard: int | None = None,
               address: str | None = None, executor: str = "ray", verbose: bool = True,
               jpeg_subsampling: str = "4:2:0", keep_original_jpeg: bool = False,
               max_reject_fraction: float = DEFAULT_MAX_REJECT_FRACTION) -> dict:
    """Preprocess one COCO annotation file into shards under ``out``; returns the manifest dict.

    A job that cannot produce a useful dataset fails with :class:`PreprocessError`: an image root
    that does not exist (before any work), or more than ``max_reject_fraction`` of the images
    rejected (or none kept) -- then after writing the manifest, whose ``rejected`` list says why.

    ``images`` and ``out`` are local directories or ``pyarrow.fs`` URIs (``s3://bucket/key``, reached with
    the standard AWS variables). ``num_cpus`` caps the parallel image
    tasks (and sizes the local Ray started when none is running). Re-running with the same inputs
    redoes only missing/corrupted shards and ends with byte-identical output. ``executor="local"``
    runs the same per-image function serially in this process (no Ray; identical output).
    """
    if executor not in ("ray", "local"):
        raise ValueError(f"executor must be 'ray' or 'local', got {executor!r}")
    started = time.perf_counter()
    target = target_config or TargetConfig(contour_points=tuple(contour_points))
    cfg = PreprocessConfig(max_size=max_size, jpeg_quality=jpeg_quality, jpeg_subsampling=jpeg_subsampling,
                           keep_original_jpeg=keep_original_jpeg, shard_size_mb=shard_size_mb,
                           max_rows_per_shard=max_rows_per_shard, target=target)
    if not 0.0 <= max_reject_fraction <= 1.0:
        raise PreprocessError(f"--max-reject-fraction must be in [0, 1], got {max_reject_fraction}")
    ann, images = str(ann), str(images)
    data, raw = load_coco_json(ann)
    check_image_root(images)
    source_sha = hashlib.sha256(raw).hexdigest()
    categories = check_categories(data["categories"], ann)
    category_to_label = {c["id"]: k for k, c in enumerate(categories)}
    plan = check_records(data)
    planned = _planned_shards(plan, cfg)
    count = len(planned)
    out_dir = str(out)
    storage.make_dirs(out_dir)
    _log(f"{ann}: {len(data['images'])} images, {len(data['annotations'])} annotations, "
         f"{len(categories)} categories -> {count} shard(s) planned", verbose)
    done = _complete_shards(out_dir, planned)
    todo = [(k, rows, phash) for k, rows, phash in planned if k not in done]
    if done:
        _log(f"resuming: {len(done)} shard(s) complete and verified, {len(todo)} to do", verbose)
    if todo:
        _process_and_write(todo, count, images, category_to_label, cfg, out_dir, num_cpus, address, executor,
                           verbose, done)
    infos = [done[k] for k in range(count)]
    manifest = _write_outputs(out_dir, ann, images, source_sha, cfg, categories, data, plan, infos)
    elapsed = time.perf_counter() - started
    _log(f"wrote {manifest['num_images']} images, {manifest['num_objects']} objects in {count} shard(s) "
         f"to {out_dir} in {elapsed:.1f}s", verbose)
    _log(summarize_rejections(manifest["rejected"]), verbose)
    check_reject_fraction(manifest, max_reject_fraction, storage.join(out_dir, MANIFEST_NAME))
    return manifest


def _planned_shards(plan: CheckedRecords, cfg: PreprocessConfig) -> list[tuple[int, list[dict], str]]:
    """``(index, input rows, plan hash)`` of every shard of the plan."""
    shards = plan_shards(plan.images, cfg)
    planned = []
    for k, imgs in enumerate(shards):
        rows = [input_row(im, k) for im in imgs]
        planned.append((k, rows, plan_hash(rows, k, len(shards), cfg)))
    return planned


def _complete_shards(out_dir: str, planned: list[tuple[int, list[dict], str]]) -> dict[int, dict]:
    """The shards already complete in ``out_dir`` (same plan hash, same bytes), by index; leftovers of a
    killed run and shards of another plan are removed."""
    count = len(planned)
    names = {shard_file_name(k, count) for k in range(count)}
    for name, is_dir in storage.list_dir(out_dir):
        stale_shard = name.startswith("shard-") and name.split(SIDECAR_SUFFIX)[0] not in names
        if not is_dir and ((name.startswith(".") and ".tmp-" in name) or stale_shard):
            storage.delete_file(storage.join(out_dir, name))
    done: dict[int, dict] = {}
    for k, _rows, phash in planned:
        info = shard_is_complete(storage.join(out_dir, shard_file_name(k, count)), phash)
        if info is not None:
            done[k] = info
    return done


def check_image_root(images: str) -> None:
    """Raise :class:`PreprocessError` when the image root (local directory or URI) is not a directory."""
    try:
        fs, root = resolve_filesystem(images)
        info = fs.get_file_info(root)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise PreprocessError(f"--images {images}: cannot open the image root: {err}") from None
    if info.type == pafs.FileType.NotFound:
        raise PreprocessError(f"--images {images}: the image root does not exist")
    if info.type != pafs.FileType.Directory:
        raise PreprocessError(f"--images {images}: the image root is not a directory")


def check_reject_fraction(manifest: dict, max_fraction: float, manifest_path: str | Path) -> None:
    """Fail a job that kept no image, or rejected more than ``max_fraction`` of its source images."""
    total = manifest["source"]["num_images"]
    kept = manifest["num_images"]
    rejected = total - kept
    fraction = rejected / total if total else 1.0
    if kept == 0 or fraction > max_fraction:
        raise PreprocessError(
            f"{rejected} of {total} images rejected ({fraction:.0%} > --max-reject-fraction {max_fraction:g}): "
            f"{summarize_rejections(manifest['rejected'])[len('rejected: '):]} -- see {manifest_path}")


def images_per_task(num_images: int, num_cpus: int) -> int:
    """Images per Ray Data task: about four tasks per CPU (so the CPUs stay balanced to the end),
    4 to 64 images each. Every task costs the driver ~10 ms of scheduling and a worker ~20 ms of
    set-up (measured on the 2-core development machine: tiny_coco with 2-image tasks ran at 50
    images/s on 1 CPU, with 6-image tasks at 74; 1000 images on 2 CPUs scaled 1.60-1.73x over 1 CPU
    with 32-image tasks, 1.72-1.76x with 64+). A worker holds one task's images: 64-image tasks
    raised its peak RSS by ~100 MiB over 13-image ones. The shard bytes do not depend on it. The env
    LSNET_PREPROCESS_IMAGES_PER_TASK overrides."""
    if os.environ.get("LSNET_PREPROCESS_IMAGES_PER_TASK"):
        return max(1, int(os.environ["LSNET_PREPROCESS_IMAGES_PER_TASK"]))
    return max(4, min(64, math.ceil(num_images / (4 * max(1, num_cpus)))))


def _processed_tables(items: list[dict], image_root: str, category_to_label: dict[int, int],
                      cfg: PreprocessConfig, num_cpus: int | None, address: str | None, executor: str):
    """Processed rows (pyarrow tables) of ``items``, in order: Ray Data, or in-process (``"local"``)."""
    kwargs = {"image_root": image_root, "category_to_label": category_to_label, "cfg": cfg}
    if executor == "local":  # serial, same function: for debugging and Ray-free tests
        per_block = images_per_task(len(items), 1)
        for lo in range(0, len(items), per_block):
            yield process_batch(pa.Table.from_pylist(items[lo:lo + per_block]), **kwargs)
        return
    import ray

    from pipelines.ray_local import start_ray

    # --address / RAY_ADDRESS (set by `ray job submit`): that cluster; else a private local Ray on
    # 127.0.0.1 (--num-cpus CPUs, default all) that ends with this command.
    start_ray(address=address, num_cpus=num_cpus, include_dashboard=False)
    per_block = images_per_task(len(items), num_cpus or int(ray.cluster_resources().get("CPU", 1)))
    ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / per_block))
    ds.context.execution_options.preserve_order = True  # shard rows must arrive in plan order
    # One map operator: Ray Data's per-operator reservation (half the CPUs by default) would only
    # cap it -- measured on 2 CPUs it ran one task at a time.
    ds.context.op_resource_reservation_enabled = False
    # Ray Data's own bars are terminal animations (ANSI codes in a log file); _process_and_write
    # prints lsnet.progress lines instead.
    ds.context.enable_progress_bars = False
    ds = ds.map_batches(process_batch, batch_format="pyarrow", batch_size=per_block, fn_kwargs=kwargs,
                        concurrency=num_cpus or None)
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def _process_and_write(todo, count, image_root, category_to_label, cfg, out_dir, num_cpus, address,
                       executor, verbose, done) -> None:
    crash_after, crash_mode = crash_hook()
    items = [row for _, rows, _ in todo for row in rows]
    hashes = {k: phash for k, _, phash in todo}
    order = [k for k, _, _ in todo]  # shards to (re)do, in plan order: rows arrive in this order
    current: ShardInProgress | None = None
    written = 0

    def finish(shard: ShardInProgress) -> None:
        nonlocal written
        crash_now = crash_after is not None and written + 1 == crash_after
        info = shard.finish(crash_before_rename=crash_now and crash_mode == "before_rename")
        done[shard.index] = info
        written += 1
        _log(f"shard {shard.index + 1}/{count} written: {info['rows']} images, {info['bytes'] / 1e6:.1f} MB, "
             f"{len(info['rejected'])} rejected records", verbose)
        if crash_now:
            os._exit(75)

    def finish_next() -> None:
        """Finish the first shard to do (possibly with no rows: all of them rejected)."""
        nonlocal current
        k = order.pop(0)
        finish(current if current is not None and current.index == k
               else ShardInProgress(out_dir, k, count, hashes[k], cfg))
        current = None

    def shard(k: int) -> ShardInProgress:
        """Shard ``k``'s writer, after finishing every earlier shard (rows arrive in plan order, so
        those have all their rows)."""
        nonlocal current
        while order[0] < k:
            finish_next()
        if current is None:
            current = ShardInProgress(out_dir, k, count, hashes[k], cfg)
        return current

    if items:
        bar = Progress(len(items), "preprocess", "images", enabled=verbose)
        for table in _processed_tables(items, image_root, category_to_label, cfg, num_cpus, address, executor):
            bar.update(table.num_rows)
            shard_col = table["shard"].to_numpy()
            starts = (np.flatnonzero(np.diff(shard_col)) + 1).tolist()
            for lo, hi in zip([0, *starts], [*starts, len(shard_col)]):
                shard(int(shard_col[lo])).add(table.slice(lo, hi - lo))
        bar.close()
    while order:
        finish_next()


def _write_outputs(out_dir: str, ann: str, images: str, source_sha: str, cfg: PreprocessConfig,
                   categories: list[dict], data: dict, plan: CheckedRecords, infos: list[dict]) -> dict:
    kept_images = {i for info in infos for i in info["image_ids"]}
    kept_anns = {a for info in infos for a in info["ann_ids"]}
    gt = {key: data[key] for key in ("info", "licenses") if key in data}
    gt["images"] = [im for im in data["images"] if isinstance(im, dict) and is_int(im.get("id"))
                    and im["id"] in kept_images]
    seen: set[int] = set()
    unique_images = []
    for im in gt["images"]:  # a duplicate id was rejected; keep the first entry only
        if im["id"] not in seen:
            seen.add(im["id"])
            unique_images.append(im)
    gt["images"] = unique_images
    seen_anns: set[int] = set()
    gt_anns = []
    for a in data["annotations"]:
        if isinstance(a, dict) and is_int(a.get("id")) and a["id"] in kept_anns and a["id"] not in seen_anns:
            seen_anns.add(a["id"])
            gt_anns.append(a)
    gt["annotations"] = gt_anns
    gt["categories"] = categories
    gt_bytes = json.dumps(gt, separators=(",", ":")).encode()
    storage.write_bytes(storage.join(out_dir, GT_NAME), gt_bytes, fsync=True)
    rejected = plan.rejected + [r for info in infos for r in info["rejected"]]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_by": "lsnet preprocess",
        "source": {"annotations": ann, "sha256": source_sha, "images": images,
                   "num_images": len(data["images"]), "num_annotations": len(data["annotations"])},
        "config": cfg.to_json(),
        "categories": [{"id": c["id"], "name": c["name"], "label": k,
                        **{key: c[key] for key in ("supercategory", "keypoints", "skeleton") if key in c}}
                       for k, c in enumerate(categories)],
        "columns": {n: {"dtype": str(dt), "shape": ["M", *s]}
                    for n, (dt, s) in record_columns(cfg.target.contour_points).items()},
        "num_images": sum(info["rows"] for info in infos),
        "num_objects": sum(len(info["ann_ids"]) for info in infos),
        "shards": [{"file": info["file"], "rows": info["rows"], "bytes": info["bytes"], "sha256": info["sha256"],
                    "first_image_id": info["image_ids"][0] if info["image_ids"] else None,
                    "last_image_id": info["image_ids"][-1] if info["image_ids"] else None,
                    "num_objects": info["num_objects"]} for info in infos],
        "gt": {"file": GT_NAME, "sha256": hashlib.sha256(gt_bytes).hexdigest()},
        "rejected_summary": dict(sorted(Counter(f"{r['kind']}:{r['code']}" for r in rejected).items())),
        "rejected": rejected,
    }
    storage.write_bytes(storage.join(out_dir, MANIFEST_NAME), json.dumps(manifest, indent=1).encode(), fsync=True)
    return manifest


# --------------------------------------------------------------------------------------------------
# CLI


