"""``lsnet preprocess``: COCO JSON + images -> Arrow shards with landmark targets (Ray Data) (pipelines.preprocess)."""
from __future__ import annotations

import argparse

from pipelines.preprocess import preprocess
from pipelines.preprocess.settings import DEFAULT_MAX_REJECT_FRACTION, JPEG_SUBSAMPLING


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ann", required=True, help="COCO annotation JSON (instances_* or person_keypoints_*)")
    parser.add_argument("--images", required=True, help="image root: a local directory or a pyarrow.fs URI (s3://...)")
    parser.add_argument("--out", required=True, help="output directory for shards + manifest.json + gt.json")
    parser.add_argument("--max-size", type=int, default=1333, help="long side of stored images is at most this")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="quality of the stored (re-encoded) JPEGs")
    parser.add_argument("--jpeg-subsampling", choices=sorted(JPEG_SUBSAMPLING), default="4:2:0",
                        help="chroma subsampling of the stored JPEGs (4:2:0 decodes fastest)")
    parser.add_argument("--keep-original-jpeg", action="store_true",
                        help="store RGB JPEGs that need no resize as they are (no generation loss, slower reads)")
    parser.add_argument("--shard-size-mb", type=float, default=256.0, help="target (planned) shard size")
    parser.add_argument("--contour-points", type=int, nargs="+", default=[18, 36, 72],
                        help="contour point counts N to store (segm targets)")
    parser.add_argument("--num-cpus", type=int, default=None, help="parallel image tasks (default: all CPUs)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: local Ray or RAY_ADDRESS)")
    parser.add_argument("--executor", choices=("ray", "local"), default="ray",
                        help="'local' runs serially without Ray (debugging); the output is identical")
    parser.add_argument("--max-reject-fraction", type=float, default=DEFAULT_MAX_REJECT_FRACTION,
                        help="fail (exit 2, after writing manifest.json with the reasons) when more than this "
                             "fraction of the images is rejected (default %(default)s); a job that keeps no "
                             "image always fails")


def run(args: argparse.Namespace) -> int:
    preprocess(args.ann, args.images, args.out, max_size=args.max_size, jpeg_quality=args.jpeg_quality,
               jpeg_subsampling=args.jpeg_subsampling, keep_original_jpeg=args.keep_original_jpeg,
               shard_size_mb=args.shard_size_mb, contour_points=tuple(args.contour_points),
               num_cpus=args.num_cpus, address=args.address, executor=args.executor,
               max_reject_fraction=args.max_reject_fraction)
    return 0
