"""The data of an ablation scale: synthetic images, a COCO JSON + images, or existing shards, prepared
into shards once and cached under ``<out>/data/`` (tables sharing a dataset prepare it once)."""
from __future__ import annotations

import json
from pathlib import Path

from lsnet.config import ConfigError
from pipelines.ablations.spec import AblationSpec, ScaleSpec
from pipelines.paths import REPO_ROOT
from pipelines.text import slug


def check_data_present(spec: AblationSpec, scale: ScaleSpec) -> None:
    """A ``coco`` scale's annotation files and image folders exist; else one line naming the key, and for
    the real subsets of ``data/`` which ``lsnet data fetch`` to run."""
    from lsnet.data.fetch import missing_data_message

    d = scale.data
    if d.source != "coco":
        return
    if d.ann is None or d.images is None:
        raise ConfigError(f"{spec.name}: data.source=coco needs data.ann and data.images")
    for key in ("ann", "images", "val_ann", "val_images"):
        path = getattr(d, key)
        if path is not None and not Path(repo_path(path)).exists():
            raise ConfigError(missing_data_message(path, f"{spec.name}: data.{key}")
                              or f"{spec.name}: data.{key}: {repo_path(path)} not found")


def prepare_dataset(spec: AblationSpec, scale: ScaleSpec, data_root: Path) -> tuple[str, str, str | None]:
    """Shards for the scale: ``(train_shards, val_shards, mask_study_json)``.

    Cached under ``data_root/<task>-<dataset>-<hash of the data spec>/``: tables sharing a dataset (the
    nightly job runs Table 2 and Table 3 on the same one) prepare it once. ``prepared.json`` is written
    last: a folder without it (an interrupted preparation) is rebuilt; a lock file keeps two runs on
    the same machine from building it at once."""
    import dataclasses
    import fcntl
    import hashlib
    import shutil

    d = scale.data
    if d.source == "shards":
        if not d.train_shards:
            raise ConfigError(f"{spec.name}: data.source=shards needs data.train_shards")
        return d.train_shards, d.val_shards or d.train_shards, d.val_ann or d.ann
    check_data_present(spec, scale)
    identity = json.dumps({"task": spec.task, **dataclasses.asdict(d)}, sort_keys=True)
    name = slug(scale.dataset_name).strip("-")[:40]
    root = Path(data_root) / f"{spec.task}-{name}-{hashlib.sha256(identity.encode()).hexdigest()[:10]}"
    done = root / "prepared.json"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return tuple(json.loads(done.read_text())["paths"])
        shutil.rmtree(root, ignore_errors=True)  # ours, and incomplete
        paths = _build_dataset(spec, d, root)
        done.write_text(json.dumps({"dataset": identity, "paths": list(paths)}, indent=1))
        return paths


def _build_dataset(spec: AblationSpec, d, root: Path) -> tuple[str, str, str | None]:
    from pipelines.preprocess import preprocess

    points = tuple(d.contour_points)
    if d.source == "synthetic":
        from pipelines.synthetic import synthetic_shards

        common = {"task": spec.task, "max_size": d.max_size, "contour_points": points,
                  "objects_per_image": tuple(d.objects_per_image), "person_prob": d.person_prob, "overwrite": False}
        train, ann = synthetic_shards(root, d.num_images, d.image_size, shard_dir=root / "shards" / "train",
                                      seed=d.seed, split="train", **common)
        if not d.num_val_images:  # no held-out split: evaluate on the training images (said in the report)
            return str(train), str(train), str(ann)
        # a held-out split: other images (seed + 1), the same distribution; image ids never collide
        val, val_ann = synthetic_shards(root, d.num_val_images, d.image_size, shard_dir=root / "shards" / "val",
                                        seed=d.seed + 1, split="val", **common)
        return str(train), str(val), str(val_ann)
    ann, images, val_ann, val_images = (repo_path(x) for x in (d.ann, d.images, d.val_ann, d.val_images))
    train = root / "shards" / "train"
    preprocess(ann, images, train, max_size=d.max_size, contour_points=points, executor="local", verbose=False)
    if val_ann is None:  # no held-out split: evaluate on the training images (said in the report)
        return str(train), str(train), str(ann)
    val = root / "shards" / "val"
    preprocess(val_ann, val_images, val, max_size=d.max_size, contour_points=points, executor="local",
               verbose=False)
    return str(train), str(val), str(val_ann)


def repo_path(path: str | None) -> str | None:
    if path is None or "://" in path or Path(path).is_absolute():
        return path
    return str((REPO_ROOT / path).resolve())
