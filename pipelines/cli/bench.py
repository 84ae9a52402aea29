"""``lsnet bench NAME [--set key=value ...]``: run ``jobs/bench/NAME.yaml``."""
from __future__ import annotations

import argparse

import yaml

from pipelines.bench.runner import run_benchmark


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="benchmark name: jobs/bench/NAME.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one of the spec's params (value parsed as YAML)")


def run(args: argparse.Namespace) -> int:
    overrides = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    run_benchmark(args.name, overrides)
    return 0
