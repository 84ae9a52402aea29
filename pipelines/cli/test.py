"""``lsnet test``: COCO metrics of a checkpoint on shards or a COCO JSON + images (lsnet.checkpoint_eval)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lsnet.checkpoint_eval import TTA, evaluate_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint of lsnet train (model_best.pt, model_final.pt, state.pt)")
    parser.add_argument("--shards", default=None, help="a shard directory of lsnet preprocess (uses its gt.json)")
    parser.add_argument("--ann", default=None, help="COCO annotation JSON (with --images)")
    parser.add_argument("--images", default=None, help="the image folder of --ann")
    parser.add_argument("--config", default=None, help="experiment/model YAML (default: stored in the checkpoint)")
    parser.add_argument("--tta", choices=sorted(TTA), default="config",
                        help="test-time augmentation (default: the config's model.test; atss: the paper's multi-scale test)")
    parser.add_argument("--out", default=None, help="write the COCO results (predictions) JSON here")
    parser.add_argument("--metrics-out", default=None, help="write metrics + per-category AP as JSON here")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--short-side", type=int, default=None, help="test resize (default: the checkpoint's)")
    parser.add_argument("--max-size", type=int, default=None, help="test resize (default: the checkpoint's)")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    from lsnet.evaluation import format_metrics, format_per_category
    from lsnet.predict import describe_resize

    result, loaded = evaluate_checkpoint(args.checkpoint, shards=args.shards, ann=args.ann, images=args.images,
                                     config=args.config, tta=args.tta, batch_size=args.batch_size,
                                     device=args.device, short_side=args.short_side, max_size=args.max_size)
    print(describe_resize(loaded))
    print(format_metrics(result.metrics))
    for iou_type, rows in result.per_category.items():
        print(f"\nper-category {iou_type} AP")
        print(format_per_category(rows))
    for path, payload in ((args.out, result.results),
                          (args.metrics_out, {"metrics": result.metrics, "per_category": result.per_category})):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(payload))
            print(f"wrote {path}")
    return 0
