"""``lsnet browse``: draw ground truth and landmark targets onto images (pipelines.browse)."""
from __future__ import annotations

import argparse

from lsnet.errors import InputError
from pipelines.browse import browse_coco, browse_shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="?", default=None, help="a shard directory of lsnet preprocess")
    parser.add_argument("--ann", default=None, help="COCO annotation JSON (with --images) instead of shards")
    parser.add_argument("--images", default=None, help="the image folder of --ann")
    parser.add_argument("--out", required=True, help="folder for the PNGs")
    parser.add_argument("--task", choices=("bbox", "segm", "pose"), default="bbox",
                        help="which landmark targets to draw (extreme points / contour / keypoints)")
    parser.add_argument("--limit", type=int, default=20, help="draw the first N images (default 20)")
    parser.add_argument("--train", action="store_true", help="apply the training augmentation (flip)")
    parser.add_argument("--anchors", action="store_true",
                        help="also draw the anchor points the loss assigns to each object (stage 1: squares, "
                             "stage 2 / ATSS: dots), coloured by FPN level; stage 2 on the anchor squares "
                             "(atss_on=init assigns on a trained model's stage-1 boxes)")
    parser.add_argument("--config", default=None,
                        help="experiment config whose model/loss settings --anchors uses (default: the task's)")


def run(args: argparse.Namespace) -> int:
    if (args.shards is None) == (args.ann is None) or (args.ann is not None and args.images is None):
        raise InputError("give either SHARDS or --ann JSON --images DIR")
    model_cfg = None
    if args.config is not None:
        from pipelines.config import load_config

        model_cfg = load_config(args.config).model
        if model_cfg.task != args.task:
            raise InputError(f"--config {args.config} is a {model_cfg.task} model but --task is {args.task}")
    options = {"anchors": args.anchors, "model_cfg": model_cfg}
    if args.shards is not None:
        paths = browse_shards(args.shards, args.out, args.task, args.limit, args.train, **options)
    else:
        paths = browse_coco(args.ann, args.images, args.out, args.task, args.limit, args.train, **options)
    what = "targets and anchor assignment" if args.anchors else "targets"
    print(f"wrote {len(paths)} images with their {args.task} {what} to {args.out}")
    return 0
