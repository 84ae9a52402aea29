"""The seeded synthetic dataset (:mod:`lsnet.data.synthetic`) preprocessed into Arrow shards, in one step:
what the benchmarks, the GPU smoke run and an ablation's synthetic scale train on."""
from __future__ import annotations

from pathlib import Path


def synthetic_shards(root: str | Path, num_images: int, image_size: int, *, task: str = "bbox",
                     max_size: int | None = None, contour_points: tuple[int, ...] = (18,),
                     shard_dir: str | Path | None = None, **synthetic) -> tuple[Path, Path]:
    """Write ``num_images`` synthetic ``image_size``-px images under ``root/synth`` and preprocess them
    (in this process, no Ray) into ``shard_dir`` (default ``root/shards``); returns ``(shard_dir,
    annotation_json)``.

    ``task``: ``pose`` preprocesses the person-keypoint annotations, others the instances;
    ``max_size``: the shards' longest side (default ``image_size``); ``synthetic``: further keyword
    arguments of :func:`lsnet.data.synthetic.write_synthetic_coco` (``seed``, ``objects_per_image``, ...).
    """
    from lsnet.data.synthetic import write_synthetic_coco
    from pipelines.preprocess import preprocess

    root = Path(root)
    synthetic = {"seed": 0, "overwrite": True, **synthetic}
    ds = write_synthetic_coco(root / "synth", num_images=num_images, image_size=(image_size, image_size), **synthetic)
    ann = ds.keypoints_json if task == "pose" else ds.instances_json
    shards = Path(shard_dir) if shard_dir is not None else root / "shards"
    preprocess(ann, ds.image_dir, shards, max_size=max_size or image_size, contour_points=tuple(contour_points),
               executor="local", verbose=False)
    return shards, ann
