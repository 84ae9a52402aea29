"""The ``lsnet`` command: a thin dispatcher over command modules.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int | None``;
only the module of the command being run is imported, so ``lsnet predict`` never imports Ray.

User errors are reported here, once for all commands: an :class:`lsnet.errors.LsnetError` (config,
shard, input, preprocessing errors ...) or a filesystem ``OSError`` (``--out`` is a file, read-only,
a file is missing) prints one line ``lsnet CMD: error: <message>`` and exits with status 2.
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
    "synth": ("lsnet.data.synthetic", "write a seeded synthetic COCO-format dataset"),
    "preprocess": ("pipelines.preprocess", "COCO JSON + images -> Arrow shards with landmark targets (Ray Data)"),
    "train": ("pipelines.train", "train an LSNet with Ray Train, tracked in MLflow"),
    "predict": ("lsnet.predict", "run a trained model on images: COCO JSON + PNG overlays"),
    "evaluate": ("lsnet.evaluation", "COCO metrics of a results JSON against a ground-truth JSON"),
    "tune": ("pipelines.tune.cli", "search config values with Ray Tune: one MLflow parent run, a child per trial"),
    "runs": ("pipelines.runs", "list and compare MLflow runs (e.g. the trials of a search)"),
    "test": ("lsnet.checkpoint_eval", "COCO metrics of a checkpoint on shards or a COCO JSON + images"),
    "browse": ("pipelines.browse", "draw ground truth and landmark targets onto images (check data before training)"),
    "mlflow-sync": ("pipelines.tracking", "upload runs buffered locally while the tracking server was down"),
    "demo": ("pipelines.demo", "the main job end to end on embedded defaults"),
    "bench": ("pipelines.bench.cli", "run a benchmark spec from jobs/bench and write results/bench/NAME.json"),
    "jobs": ("pipelines.jobs.cli", "submit job specs (jobs/*.yaml) to a Ray cluster; status, logs, schedules"),
    "ablation": ("pipelines.ablations.cli", "reproduce a paper ablation table (jobs/ablations/*.yaml)"),
    "convert": ("lsnet.interop.convert", "convert a checkpoint trained with the authors' code (reference) to lsnet"),
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
    try:
        return int(module.run(args) or 0)
    except (LsnetError, OSError) as err:
        if debug:
            raise
        print(f"lsnet {name}: error: {describe_error(err)}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"lsnet {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
