"""``lsnet browse``: draw the ground truth and the landmark targets the model trains on (mmdetection's
``browse_dataset``), to check data before training.

    lsnet browse shards/train --out browse/ [--task segm] [--limit 20] [--train]
    lsnet browse --ann instances_train2017.json --images train2017/ --out browse/ [--task pose]

Each image is drawn exactly as the training reader yields it (``lsnet.data.ShardDataset``: the stored
JPEG, resized; ``--train`` adds the training augmentation): boxes with class names, and the landmark
targets of the task -- the 4 extreme points (bbox), the N contour points as a filled polygon (segm) or
the 17 keypoints with the skeleton (pose), unlabelled keypoints omitted. ``--ann/--images`` first
preprocesses the first ``--limit`` images into a temporary shard directory (in-process, no Ray), so
what is drawn is what ``lsnet preprocess`` would store.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from lsnet.errors import InputError
from lsnet.progress import Progress


def targets_as_detections(targets):
    """LandmarkTargets -> Detections (score 1, keypoint visibility as point scores) for drawing."""
    from lsnet.structures import Detections

    m = targets.boxes.shape[0]
    return Detections(targets.boxes.float(), torch.ones(m), targets.labels.long(), targets.points.float(),
                      targets.visible.float())


def browse_shards(shard_dir: str | Path, out: str | Path, task: str = "bbox", limit: int = 20,
                  train: bool = False, seed: int = 0) -> list[Path]:
    """Write one PNG per image (the first ``limit``) under ``out``; returns the paths."""
    from lsnet.data.shards import ShardDataset
    from lsnet.visualize import draw_detections, save_png

    ds = ShardDataset(shard_dir, task=task, train=train, scale_range=None, seed=seed, verify="size")
    names = [c["name"] for c in ds.categories]
    count = min(limit, len(ds))
    if count == 0:
        raise InputError(f"{shard_dir}: no images to draw")
    out = Path(out)
    paths = []
    with Progress(count, "browse", "images") as bar:
        for index in range(count):
            image, targets, meta = ds[index]
            hwc = image.permute(1, 2, 0).clamp(0, 255).to(torch.uint8).cpu().numpy()
            drawn = draw_detections(np.ascontiguousarray(hwc), targets_as_detections(targets), task, names,
                                    score_thr=0.0, keypoint_thr=0.5)
            paths.append(save_png(out / f"{meta.image_id}.png", drawn))
            bar.update()
    return paths


def browse_coco(ann: str | Path, images: str | Path, out: str | Path, task: str = "bbox", limit: int = 20,
                train: bool = False) -> list[Path]:
    """Preprocess the first ``limit`` images of a COCO JSON into a temporary shard directory, then draw."""
    from pipelines.preprocess import load_coco_json, preprocess

    data, _ = load_coco_json(str(ann))
    keep = {im["id"] for im in data["images"][:limit] if isinstance(im, dict)}
    subset = dict(data, images=[im for im in data["images"] if isinstance(im, dict) and im.get("id") in keep],
                  annotations=[a for a in data["annotations"] if isinstance(a, dict) and a.get("image_id") in keep])
    with tempfile.TemporaryDirectory(prefix="lsnet-browse-") as tmp:
        subset_path = Path(tmp) / "subset.json"
        subset_path.write_text(json.dumps(subset))
        preprocess(subset_path, images, Path(tmp) / "shards", contour_points=(18, 36, 72), executor="local",
                   verbose=False, max_reject_fraction=1.0)
        return browse_shards(Path(tmp) / "shards", out, task=task, limit=limit, train=train)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="?", default=None, help="a shard directory of lsnet preprocess")
    parser.add_argument("--ann", default=None, help="COCO annotation JSON (with --images) instead of shards")
    parser.add_argument("--images", default=None, help="the image folder of --ann")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    parser.add_argument("--task", choices=("bbox", "segm", "pose"), default="bbox",
                        help="which landmark targets to draw (extreme points / contour / keypoints)")
    parser.add_argument("--limit", type=int, default=20, help="draw the first N images (default 20)")
    parser.add_argument("--train", action="store_true", help="apply the training augmentation (flip)")


def run(args: argparse.Namespace) -> int:
    if (args.shards is None) == (args.ann is None) or (args.ann is not None and args.images is None):
        raise InputError("give either SHARDS or --ann JSON --images DIR")
    if args.shards is not None:
        paths = browse_shards(args.shards, args.out, args.task, args.limit, args.train)
    else:
        paths = browse_coco(args.ann, args.images, args.out, args.task, args.limit, args.train)
    print(f"wrote {len(paths)} images with their {args.task} targets to {args.out}")
    return 0
