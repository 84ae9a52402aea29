"""``lsnet tune CONFIG --space SPACE.yaml``: a Ray Tune search over config keys (pipelines.tune)."""
from __future__ import annotations

import argparse
import datetime as _dt
import sys

from lsnet.config import ConfigError
from pipelines.config import load_config
from pipelines.tune.records import SearchSettings
from pipelines.tune.space import load_space
from pipelines.tune.trials import run_trials


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="base experiment config YAML (configs/*.yaml)")
    parser.add_argument("--space", required=True, help="search-space YAML (configs/spaces/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a base config value, e.g. --set train.epochs=4 (repeatable)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="samples of the space (grid keys: each sample crosses all grid values)")
    parser.add_argument("--metric", default=None, help="metric to optimise (default: the task's AP, e.g. segm_AP)")
    parser.add_argument("--mode", choices=("max", "min"), default=None, help="maximise or minimise --metric")
    parser.add_argument("--scheduler", choices=("asha", "fifo"), default=None,
                        help="asha: stop weak trials early on `epoch` (default); fifo: run all to the end")
    parser.add_argument("--grace-period", type=int, default=None, help="ASHA: epochs before a trial can stop")
    parser.add_argument("--reduction-factor", type=float, default=None, help="ASHA: 1/N of trials go on per rung")
    parser.add_argument("--search", choices=("random", "grid", "optuna"), default="random",
                        help="random (default; grid keys crossed), grid (choice lists crossed too), "
                             "optuna (TPE; pip install '.[tune]')")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="trials at once (default: as many as the cluster's CPUs/GPUs hold)")
    parser.add_argument("--max-failures", type=int, default=0, help="retries of a failing trial")
    parser.add_argument("--seed", type=int, default=0, help="seed of the search algorithm")
    parser.add_argument("--name", default=None, help="search name (default: <config>-search-<UTC time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the search --name whose driver stopped (finished trials are kept)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster: 'auto', 'ray://HOST:10001', or unset (local)")


def run(args: argparse.Namespace) -> int:
    if args.resume and not args.name:
        raise ConfigError("--resume needs the --name of the search to continue")
    overrides = list(args.overrides)
    if getattr(args, "tracking_uri", None):  # lsnet [--tracking-uri URI] tune ...: the command line wins over the config file
        overrides.append(f"tracking.uri={args.tracking_uri}")
    cfg = load_config(args.config, overrides)
    space = load_space(args.space)
    opts = space.options
    sched = opts.scheduler
    name = args.name or f"{cfg.name or 'lsnet'}-search-{_dt.datetime.now(_dt.UTC).strftime('%Y%m%d-%H%M%S')}"
    settings = SearchSettings(
        name=name, metric=args.metric or opts.metric or cfg.primary_metric, mode=args.mode or opts.mode,
        scheduler=args.scheduler or sched.name,
        grace_period=args.grace_period if args.grace_period is not None else sched.grace_period,
        reduction_factor=args.reduction_factor if args.reduction_factor is not None else sched.reduction_factor,
        search=args.search, num_samples=args.num_samples or opts.num_samples,
        max_concurrent=args.max_concurrent, max_failures=args.max_failures, seed=args.seed)
    outcome = run_trials(cfg, space, settings, address=args.address, resume=args.resume)
    if outcome.best is None:
        print(f"lsnet tune: no trial produced {outcome.settings.metric}", file=sys.stderr)
        return 1
    return 0
