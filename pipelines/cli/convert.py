"""``lsnet convert reference CKPT.pth --config CFG --out OUT.pt``: a checkpoint trained with the authors'
code becomes one of ours (:mod:`lsnet.interop.convert`)."""
from __future__ import annotations

import argparse

from lsnet.interop.convert import convert_reference_checkpoint


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", choices=["reference"], help="whose checkpoint: 'reference' = the authors' code")
    parser.add_argument("checkpoint", help="the .pth checkpoint written by the authors' code (mmdetection)")
    parser.add_argument("--config", required=True, help="our YAML config of the same model (model.head: reference)")
    parser.add_argument("--out", required=True, help="the lsnet checkpoint to write")


def run(args: argparse.Namespace) -> int:
    path = convert_reference_checkpoint(args.checkpoint, args.config, args.out)
    print(f"wrote {path}")
    return 0
