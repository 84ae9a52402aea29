"""``lsnet train CONFIG``: train an LSNet with Ray Train, tracked in MLflow (pipelines.train.driver)."""
from __future__ import annotations

import argparse
import json

from lsnet.errors import InputError
from pipelines.config import load_config
from pipelines.train.driver import run_training


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment config YAML (configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=2 (repeatable)")
    parser.add_argument("--num-workers", type=int, default=None, help="Ray Train workers (run.num_workers)")
    parser.add_argument("--gpus", action="store_true", help="one GPU per worker (run.use_gpu=true)")
    parser.add_argument("--cpus", action="store_true", help="train on CPU (run.use_gpu=false)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster: 'auto' (the running cluster), 'ray://HOST:10001', or unset (local)")
    parser.add_argument("--name", default=None, help="run name (default: <config>-<UTC time>)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.num_workers is not None:
        overrides.append(f"run.num_workers={args.num_workers}")
    if args.gpus and args.cpus:
        raise InputError("--gpus and --cpus exclude each other")
    if args.gpus:
        overrides.append("run.use_gpu=true")
    if args.cpus:
        overrides += ["run.use_gpu=false", "run.resources_per_worker=null"]
    if getattr(args, "tracking_uri", None):  # lsnet [--tracking-uri URI] train ...: the command line wins over the config file
        overrides.append(f"tracking.uri={args.tracking_uri}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    outcome = run_training(cfg, address=args.address, run_name=args.name)
    print(json.dumps({k: v for k, v in outcome.metrics.items() if isinstance(v, (int, float, str))}, indent=1))
    return 0
