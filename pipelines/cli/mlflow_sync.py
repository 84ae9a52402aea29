"""``lsnet mlflow-sync RUN_DIR...``: upload runs buffered locally while the tracking server was down."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipelines.tracking.journal import Journal, find_run_dirs, sync_run_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="+", help="run directory (or a directory holding several runs)")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="upload to this server instead of the one recorded in the run (replays the whole run)",
    )


def run(args: argparse.Namespace) -> int:
    failures = 0
    run_dirs = [d for root in args.run_dir for d in (find_run_dirs(root) or [Path(root)])]
    for run_dir in run_dirs:
        try:
            uploaded, pending = sync_run_dir(run_dir, args.tracking_uri)
        except Exception as err:  # noqa: BLE001 - report every run dir, not only the first failure
            print(f"{run_dir}: sync failed: {type(err).__name__}: {err}")
            failures += 1
            continue
        state = Journal(run_dir).state
        print(f"{run_dir}: uploaded {uploaded} records to {state['tracking_uri']} (run {state['run_id']}), "
              f"{pending} pending")
        failures += pending > 0
    return 1 if failures else 0
