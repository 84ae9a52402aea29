"""``lsnet demo``: the main job end to end on embedded defaults (pipelines.demo)."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.demo import run_demo
from pipelines.paths import REPO_ROOT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=str(REPO_ROOT / "results" / "demo"), help="where data, shards and runs go")
    parser.add_argument("--dataset", choices=("synthetic", "tiny_coco"), default="synthetic",
                        help="synthetic (default, self-contained) or the 50 real images of data/tiny_coco "
                             "(lsnet data fetch tiny-coco)")
    parser.add_argument("--task", choices=("bbox", "segm", "pose"), default="bbox")
    parser.add_argument("--head", choices=("reference", "compact"), default="reference",
                        help="reference (default): the authors' head and neck (docs/reference_network.md); "
                             "compact: the lighter head (docs/model.md)")
    parser.add_argument("--num-train", type=int, default=64, help="synthetic training images")
    parser.add_argument("--num-val", type=int, default=16, help="synthetic validation images")
    parser.add_argument("--image-size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--epochs", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2, help="Ray Train workers")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override (repeatable), e.g. --set train.lr_per_16_images=0.04")
    parser.add_argument("--verbose", action="store_true", help="show all Ray worker output")


def run(args: argparse.Namespace) -> int:
    run_demo(Path(args.out), dataset=args.dataset, task=args.task, num_train=args.num_train,
             num_val=args.num_val, image_size=args.image_size, epochs=args.epochs,
             num_workers=args.num_workers, overrides=args.overrides, verbose=args.verbose,
             head=args.head)
    return 0
