"""``lsnet predict``: run a trained model on images: COCO JSON + PNG overlays (lsnet.predict)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from lsnet.predict import describe_resize, load_model, predict_files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files (jpg/png/...)")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by lsnet train / lsnet.engine")
    parser.add_argument("--config", default=None,
                        help="experiment or model YAML (default: the model config stored in the checkpoint)")
    parser.add_argument("--out", required=True, help="output folder for predictions.json and overlay PNGs")
    parser.add_argument("--score-thr", type=float, default=0.3, help="minimum score drawn on the overlays")
    parser.add_argument("--flip-tta", action="store_true", help="horizontal-flip test-time augmentation")
    parser.add_argument("--short-side", type=int, default=None, help="test resize: shorter side (default: config)")
    parser.add_argument("--max-size", type=int, default=None, help="test resize: longer side at most (default: config)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(args.checkpoint, args.config, device, args.short_side, args.max_size)
    print(describe_resize(loaded), file=sys.stderr if loaded.resize_source == "default" else sys.stdout)
    records = predict_files(loaded, args.images, args.out, args.score_thr, args.flip_tta, args.batch_size, device,
                            progress=True)
    shown = sum(r["score"] >= args.score_thr for r in records)
    print(f"{len(args.images)} images, {len(records)} detections ({shown} with score >= {args.score_thr}) "
          f"-> {Path(args.out) / 'predictions.json'} and {len(args.images)} overlay PNGs in {args.out}")
    return 0
