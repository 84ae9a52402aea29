"""``lsnet synth``: write a seeded synthetic COCO-format dataset (lsnet.data.synthetic)."""
from __future__ import annotations

import argparse

from lsnet.data.synthetic import write_synthetic_coco


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output directory (images/ and annotations/ are created in it)")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--image-size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train", help="suffix of the JSON names (instances_SPLIT.json)")
    parser.add_argument("--objects", type=int, nargs=2, default=(2, 5), metavar=("MIN", "MAX"),
                        help="objects per image")
    parser.add_argument("--person-prob", type=float, default=0.3)
    parser.add_argument("--size-jitter", type=float, default=0.0,
                        help="scale each image side by a random factor in [1-j, 1+j]")
    parser.add_argument("--first-id", type=int, default=None,
                        help="id of the first image (default: 1000, or after the ids of the splits already in OUT)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace this split's existing images/JSONs (another split's files never)")


def run(args: argparse.Namespace) -> int:
    ds = write_synthetic_coco(args.out, num_images=args.num_images, image_size=tuple(args.image_size),
                              seed=args.seed, split=args.split, objects_per_image=tuple(args.objects),
                              person_prob=args.person_prob, size_jitter=args.size_jitter,
                              first_image_id=args.first_id, overwrite=args.overwrite)
    print(f"wrote {ds.num_images} images, {ds.num_annotations} objects: {ds.instances_json}, {ds.keypoints_json}")
    return 0
