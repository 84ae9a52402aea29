"""``lsnet evaluate``: COCO metrics of a results JSON against a ground-truth JSON (lsnet.evaluation)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lsnet.evaluation import IOU_TYPE_PREFIX, evaluate_coco_detailed, format_metrics, format_per_category


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gt", required=True, help="ground-truth COCO JSON (instances_* or person_keypoints_*)")
    parser.add_argument("--results", required=True, help="COCO results JSON (a list of detections)")
    parser.add_argument("--iou-types", nargs="+", default=["bbox"], choices=list(IOU_TYPE_PREFIX),
                        help="which COCO evaluations to run (default: bbox)")
    parser.add_argument("--per-category", action="store_true", help="also print per-category AP")
    parser.add_argument("--backend", default="pycocotools", choices=["pycocotools", "faster"],
                        help="pycocotools (reference) or faster-coco-eval if installed")
    parser.add_argument("--out", default=None, help="write the metrics (and per-category table) as JSON here")
    parser.add_argument("--verbose", action="store_true", help="show pycocotools' own output")
    parser.add_argument("--ignore-unknown", action="store_true",
                        help="drop results whose category_id is not in the ground truth (default: error)")


def run(args: argparse.Namespace) -> int:
    evaluation = evaluate_coco_detailed(args.gt, args.results, args.iou_types, quiet=not args.verbose,
                                        backend=args.backend, ignore_unknown=args.ignore_unknown)
    if evaluation.num_ignored:
        print(f"warning: ignored {evaluation.num_ignored} result records whose category_id is not in the "
              f"ground truth", file=sys.stderr)
    print(format_metrics(evaluation.metrics))
    if args.per_category:
        for iou_type, rows in evaluation.per_category.items():
            print(f"\nper-category {iou_type} AP")
            print(format_per_category(rows))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"metrics": evaluation.metrics, "per_category": evaluation.per_category,
                   "backend": evaluation.backend}
        out.write_text(json.dumps(payload, indent=2))
        print(f"wrote {out}")
    return 0
