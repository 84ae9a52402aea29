"""Ray Data streaming reader over the shards (for clusters where the shards live on object storage).

The map-style reader (:class:`lsnet.data.shards.ShardDataset` + :class:`~lsnet.data.shards.ShardSampler`
+ torch DataLoader) and this one produce **the same samples for the same seed**: both decode and
augment sample ``i`` with ``ShardDataset.__getitem__``, whose randomness depends only on
``(seed, epoch, i)``; here the per-sample work runs in Ray Data tasks (off the training process),
and the rows stream in the sampler's order (``preserve_order``). Hence, for one consumer,
``iter_ray_batches(build_ray_dataset(...), batch_size=B)`` yields exactly the batches of
``DataLoader(dataset, batch_size=B, sampler=ShardSampler(...), collate_fn=collate_batch)``.

With Ray Train, pass the dataset of an epoch as ``datasets={"train": ds}`` and in the worker
``iter_ray_batches(ray.train.get_dataset_shard("train"), batch_size=B)``: Ray splits the stream
across the workers, every sample reaching exactly one worker per epoch (Ray decides which, so the
*grouping* into batches differs from the map-style reader's; the samples are identical). For the
same grouping as the map-style reader on every rank, build one dataset per rank with ``rank`` /
``world_size`` instead (each rank then reads its own ``ShardSampler`` share).
"""
from __future__ import annotations

import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsnet.data.augment import collate_batch
from lsnet.data.shards import ShardDataset, ShardSampler, load_manifest, verify_shards
from lsnet.structures import Batch, ImageMeta, LandmarkTargets

_DATASETS: dict[tuple, ShardDataset] = {}


def _dataset(key: tuple) -> ShardDataset:
    """One ShardDataset per Ray worker process and configuration (shards are opened lazily)."""
    if key not in _DATASETS:
        kwargs = dict(key)
        _DATASETS[key] = ShardDataset(verify="none", **kwargs)
    return _DATASETS[key]


def _load_samples(batch: dict[str, np.ndarray], dataset_key: tuple, epoch: int) -> dict[str, np.ndarray]:
    """Ray Data UDF: indices -> pickled (image uint8, targets, meta) of each sample."""
    ds = _dataset(dataset_key)
    ds.set_epoch(epoch)
    payloads = []
    for index in batch["index"].tolist():
        image, t, meta = ds[int(index)]
        payloads.append(pickle.dumps({
            "image": image.numpy(), "boxes": t.boxes.numpy(), "labels": t.labels.numpy(),
            "points": t.points.numpy(), "visible": t.visible.numpy(), "iscrowd": t.iscrowd.numpy(),
            "meta": (meta.image_id, meta.orig_size, meta.size, meta.scale, meta.flipped),
        }, protocol=pickle.HIGHEST_PROTOCOL))
    return {"index": batch["index"], "payload": np.array(payloads, dtype=object)}


def build_ray_dataset(shard_dir: str | Path, *, task: str = "bbox", num_points: int | None = None,
                      pose_box: str = "kps", train: bool = True,
                      scale_range: tuple[int, int] | None = (800, 800), max_size: int = 1333,
                      flip_prob: float = 0.5, test_short_side: int | None = None, skip_empty: bool = False,
                      seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                      shuffle: bool = True, drop_last: bool = False, verify: str = "sha256",
                      samples_per_task: int = 8, concurrency: int | None = None):
    """A ``ray.data.Dataset`` of one epoch's samples (rows ``index``, ``payload``) in sampler order.

    Arguments mirror :class:`ShardDataset` and :class:`ShardSampler`; the shards are verified once
    here (``verify``), not in every task. Decode + augmentation run in Ray tasks of
    ``samples_per_task`` samples.
    """
    import ray

    manifest = load_manifest(shard_dir)
    if verify != "none":
        verify_shards(shard_dir, manifest, full=verify == "sha256")
    options = {"shard_dir": str(shard_dir), "task": task, "num_points": num_points, "pose_box": pose_box,
               "train": train, "scale_range": tuple(scale_range) if scale_range else None, "max_size": max_size,
               "flip_prob": flip_prob, "seed": seed, "skip_empty": skip_empty, "test_short_side": test_short_side}
    key = tuple(sorted(options.items()))
    num_samples = len(_dataset(key))
    sampler = ShardSampler(num_samples, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle,
                           drop_last=drop_last)
    sampler.set_epoch(epoch)
    indices = sampler.indices()
    ds = ray.data.from_items([{"index": i} for i in indices],
                             override_num_blocks=max(1, -(-len(indices) // samples_per_task)))
    ds.context.execution_options.preserve_order = True  # batches must follow the sampler order
    ds.context.op_resource_reservation_enabled = False  # one map operator: let it use every CPU
    return ds.map_batches(_load_samples, batch_format="numpy", batch_size=samples_per_task,
                          fn_kwargs={"dataset_key": key, "epoch": epoch}, concurrency=concurrency)


def rows_to_batch(rows: dict[str, Any]) -> Batch:
    """A numpy batch of :func:`build_ray_dataset` rows -> :class:`Batch` (float, normalised, padded)."""
    items = []
    for payload in rows["payload"]:
        d = pickle.loads(payload)
        image_id, orig_size, size, scale, flipped = d["meta"]
        targets = LandmarkTargets(boxes=torch.from_numpy(d["boxes"]), labels=torch.from_numpy(d["labels"]),
                                  points=torch.from_numpy(d["points"]), visible=torch.from_numpy(d["visible"]),
                                  iscrowd=torch.from_numpy(d["iscrowd"]))
        meta = ImageMeta(image_id=image_id, orig_size=tuple(orig_size), size=tuple(size), scale=tuple(scale),
                         flipped=flipped)
        items.append((torch.from_numpy(d["image"]), targets, meta))
    return collate_batch(items)


def iter_ray_batches(source, batch_size: int, drop_last: bool = False, prefetch_batches: int = 2) -> Iterator[Batch]:
    """Batches from a dataset of :func:`build_ray_dataset` or a ``ray.train.get_dataset_shard`` iterator."""
    for rows in source.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last,
                                    prefetch_batches=prefetch_batches):
        yield rows_to_batch(rows)


def batches_equal(a: Iterable[Batch], b: Iterable[Batch]) -> bool:
    """Exact equality of two batch sequences (images, every target tensor, metas)."""
    a, b = list(a), list(b)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.images.shape != y.images.shape or not torch.equal(x.images, y.images) or x.metas != y.metas:
            return False
        for s, t in zip(x.targets, y.targets):
            if any(not torch.equal(getattr(s, f), getattr(t, f))
                   for f in ("boxes", "labels", "points", "visible", "iscrowd")):
                return False
    return True
