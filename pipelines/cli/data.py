"""``lsnet data fetch``: a real COCO subset (tiny-coco, coco-mini) into ``data/``, verified by SHA-256
(:mod:`lsnet.data.fetch`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lsnet.data.fetch import DATASETS, MAX_FAILURE_LINES, default_dir, fetch_dataset, load_manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("fetch", help="download (or copy from a mirror) a real COCO subset, verified by SHA-256")
    p.add_argument("dataset", choices=sorted(DATASETS),
                   help="tiny-coco: 50 train2017 images; coco-mini: 80 train2017 + 78 val2017 images")
    p.add_argument("--to", default=None, metavar="DIR", help="dataset directory (default: data/tiny_coco or data/coco_mini "
                                              "in the checkout)")
    p.add_argument("--from", dest="source", default=None, metavar="URL_OR_DIR",
                   help="a mirror with the same layout (annotations/, train2017/, val2017/): a base URL or a "
                        "local directory (default: the official COCO image URLs)")
    p.add_argument("--workers", type=int, default=8, help="parallel downloads")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a download fails")


def run(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.dataset)
    target = Path(args.to) if args.to else default_dir(args.dataset)
    origin = args.source or "the official COCO image URLs"
    print(f"lsnet data fetch {args.dataset}: {len(manifest.images)} images from {origin} -> {target}", flush=True)
    report = fetch_dataset(manifest, target, source=args.source, workers=args.workers, timeout_s=args.timeout,
                           progress=lambda line: print(f"  {line}", flush=True))
    for line in report.failed[:MAX_FAILURE_LINES]:
        print(f"lsnet data fetch: {line}", file=sys.stderr)
    if len(report.failed) > MAX_FAILURE_LINES:  # e.g. no network: the same reason for every image
        print(f"lsnet data fetch: ... and {len(report.failed) - MAX_FAILURE_LINES} more", file=sys.stderr)
    total = len(manifest.images) + len(manifest.annotations)
    if not report.ok:
        print(f"lsnet data fetch: {len(report.failed)} of {total} files failed ({len(report.fetched)} fetched, "
              f"{len(report.kept)} already there); run the command again to retry them", file=sys.stderr)
        return 1
    print(f"{target}: all {total} files verified ({len(report.fetched)} fetched, {len(report.kept)} already there)")
    return 0
