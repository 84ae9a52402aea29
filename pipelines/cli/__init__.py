"""The ``lsnet`` command: a thin dispatcher over command modules.

Each command ``lsnet NAME`` lives in its own module, ``pipelines/cli/NAME.py`` (``mlflow-sync``:
``mlflow_sync.py``), exposing ``add_arguments(parser)`` and ``run(args) -> int | None``; only the module of
the command being run is imported, so ``lsnet predict`` never imports Ray.

User errors are reported here, once for all commands: an :class:`lsnet.errors.LsnetError` (config,
shard, input, preprocessing errors ...) or a filesystem ``OSError`` (``--out`` is a file, read-only,
a file is missing) prints one line ``lsnet CMD: error: <message>`` and exits with the error's
``exit_status`` (2; 1 for a :class:`lsnet.errors.ServiceError`, a service that did not answer).
``--debug`` (any command) or ``LSNET_DEBUG=1`` re-raises instead, showing the traceback.
Ctrl-C prints ``lsnet CMD: interrupted`` and exits 130.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from lsnet.errors import LsnetError, one_line

#: Exit status of a user error (bad input, config, data), as argparse uses for bad arguments.
USER_ERROR = 2

#: command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("pipelines.cli.synth", "write a seeded synthetic COCO-format dataset"),
    "data": ("pipelines.cli.data", "fetch a real COCO subset (tiny-coco, coco-mini) into data/, verified by SHA-256"),
    "preprocess": ("pipelines.cli.preprocess", "COCO JSON + images -> Arrow shards with landmark targets (Ray Data)"),
    "train": ("pipelines.cli.train", "train an LSNet with Ray Train, tracked in MLflow"),
    "predict": ("pipelines.cli.predict", "run a trained model on images: COCO JSON + PNG overlays"),
    "evaluate": ("pipelines.cli.evaluate", "COCO metrics of a results JSON against a ground-truth JSON"),
    "tune": ("pipelines.cli.tune", "search config values with Ray Tune: one MLflow parent run, a child per trial"),
    "runs": ("pipelines.cli.runs", "list and compare MLflow runs (e.g. the trials of a search)"),
    "test": ("pipelines.cli.test", "COCO metrics of a checkpoint on shards or a COCO JSON + images"),
    "browse": ("pipelines.cli.browse", "draw ground truth and landmark targets onto images (check data before training)"),
    "mlflow-sync": ("pipelines.cli.mlflow_sync", "upload runs buffered locally while the tracking server was down"),
    "tracking-server": ("pipelines.cli.tracking_server", "an MLflow tracking server on PostgreSQL with proxied artifacts, on 127.0.0.1"),
    "demo": ("pipelines.cli.demo", "the main job end to end on embedded defaults"),
    "bench": ("pipelines.cli.bench", "run a benchmark spec from jobs/bench and write results/bench/NAME.json"),
    "jobs": ("pipelines.cli.jobs", "submit job specs (jobs/*.yaml) to a Ray cluster; status, logs, schedules"),
    "ablation": ("pipelines.cli.ablation", "reproduce a paper ablation table (jobs/ablations/*.yaml)"),
    "convert": ("pipelines.cli.convert", "convert a checkpoint trained with the authors' code (reference) to lsnet"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: lsnet COMMAND [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "lsnet COMMAND --help shows a command's options."]
    return "\n".join(lines)


def debug_enabled(argv: list[str] = ()) -> bool:
    """``--debug`` on the command line or ``LSNET_DEBUG`` set to a true value."""
    env = os.environ.get("LSNET_DEBUG", "").strip().lower()
    return "--debug" in argv or env not in ("", "0", "false", "no")


def describe_error(err: BaseException) -> str:
    """The one-line message of a user error (an ``OSError`` as ``PATH: reason``)."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        reason = err.strerror
        if isinstance(err, FileExistsError):
            reason = "exists and is not a directory" if not os.path.isdir(err.filename) else reason
        target = f" -> {err.filename2}" if err.filename2 else ""
        return one_line(f"{err.filename}{target}: {reason}")
    return one_line(err) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    argv = argv[1:] if argv[:1] == ["--debug"] else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lsnet: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"lsnet {name}", description=help_)
    module.add_arguments(parser)
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: LSNET_DEBUG=1)")
    args = parser.parse_args(rest)
    # a command with actions (lsnet ablation run|render, jobs submit|..., data fetch) names the action
    action = getattr(args, "action", None)
    label = f"lsnet {name} {action}" if isinstance(action, str) else f"lsnet {name}"
    try:
        return int(module.run(args) or 0)
    except (LsnetError, OSError) as err:
        if debug:
            raise
        print(f"{label}: error: {describe_error(err)}", file=sys.stderr)
        return err.exit_status if isinstance(err, LsnetError) else USER_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{label}: interrupted", file=sys.stderr)
        return 130

