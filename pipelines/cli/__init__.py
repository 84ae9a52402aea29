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

``--tracking-uri URI`` points the command at an MLflow store (a tracking server ``http://HOST:PORT``, or
``sqlite:///...`` / a ``.db`` file): given before the command (``lsnet --tracking-uri URI train ...``) or
after it for the commands that track (:data:`TRACKING_COMMANDS`), it wins over a config's ``tracking.uri``
and ``$MLFLOW_TRACKING_URI``. The dispatcher resolves it once, hands it to the command as
``args.tracking_uri`` and exports it as ``MLFLOW_TRACKING_URI`` for the processes the command starts.
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


#: commands given a ``--tracking-uri`` option by the dispatcher (ablation, runs and mlflow-sync have their own)
TRACKING_COMMANDS = ("train", "tune")


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: lsnet [--tracking-uri URI] [--debug] COMMAND [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "lsnet COMMAND --help shows a command's options.",
              ("--tracking-uri URI: the MLflow store of every run (e.g. http://127.0.0.1:5000 from lsnet "
               "tracking-server; default $MLFLOW_TRACKING_URI, else results/mlflow.db)")]
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


def _set_tracking_uri(args: argparse.Namespace, global_uri: str | None) -> None:
    """The one tracking URI of this command (its own ``--tracking-uri``, else the global one), resolved once
    (a ``.db`` path made absolute): on ``args.tracking_uri`` and in ``MLFLOW_TRACKING_URI`` (read by every
    later step and process that is not handed the value)."""
    uri = getattr(args, "tracking_uri", None) or global_uri
    if uri:
        from pipelines.tracking.store import resolve_tracking_uri

        uri = resolve_tracking_uri(uri)
        os.environ["MLFLOW_TRACKING_URI"] = uri
    args.tracking_uri = uri


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled(argv)
    global_uri = None
    while argv[:1] == ["--debug"] or (argv and argv[0].split("=", 1)[0] == "--tracking-uri"):
        option, argv = argv[0], argv[1:]
        if option.startswith("--tracking-uri="):
            global_uri = option.split("=", 1)[1]
        elif option == "--tracking-uri":
            if not argv:
                print("lsnet: --tracking-uri needs a URI\n\n" + _usage(), file=sys.stderr)
                return 2
            global_uri, argv = argv[0], argv[1:]
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
    if name in TRACKING_COMMANDS:
        parser.add_argument("--tracking-uri", default=None, metavar="URI",
                            help="MLflow store of the run: a tracking server http://HOST:PORT (lsnet tracking-server), "
                                 "sqlite:///... or a .db file; wins over tracking.uri and $MLFLOW_TRACKING_URI")
    args = parser.parse_args(rest)
    _set_tracking_uri(args, global_uri)
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

