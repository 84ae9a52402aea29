"""The ``lsnet`` command: a thin dispatcher over command modules.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int | None``;
only the module of the command being run is imported, so ``lsnet predict`` never imports Ray.
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("lsnet.data.synthetic", "write a seeded synthetic COCO-format dataset"),
    "preprocess": ("pipelines.preprocess", "COCO JSON + images -> Arrow shards with landmark targets (Ray Data)"),
    "train": ("pipelines.train", "train an LSNet with Ray Train, tracked in MLflow"),
    "predict": ("lsnet.predict", "run a trained model on images: COCO JSON + PNG overlays"),
    "evaluate": ("lsnet.evaluation", "COCO metrics of a results JSON against a ground-truth JSON"),
    "tune": ("pipelines.tune.cli", "search config values with Ray Tune: one MLflow parent run, a child per trial"),
    "runs": ("pipelines.runs", "list and compare MLflow runs (e.g. the trials of a search)"),
    "mlflow-sync": ("pipelines.tracking", "upload runs buffered locally while the tracking server was down"),
    "demo": ("pipelines.demo", "the main job end to end on embedded defaults"),
    "bench": ("pipelines.bench_cmd", "run a benchmark spec from jobs/bench and write results/bench/NAME.json"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: lsnet COMMAND [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "lsnet COMMAND --help shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
