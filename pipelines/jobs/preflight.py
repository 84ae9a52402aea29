"""Checks of a job spec's input paths before a job starts on a private local head.

Without ``--address`` the job runs on this machine, in this checkout (see
:func:`pipelines.jobs.client.local_runtime_env`), so every input path it names can be checked here,
in a second, instead of failing in the job after Ray started: the spec's arguments (plus the ``--set``
overrides given to ``submit``) are parsed with the command's own parser (an unknown option fails here
too), the experiment config is loaded with its overrides, and each input path is looked up relative
to the checkout. The first missing one is one line naming the spec file, the key and the path.
URIs (``s3://...``) are not checked: the job reads them wherever it runs.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from pipelines.jobs.spec import JobSpec, JobSpecError
from pipelines.paths import REPO_ROOT


def _parse(spec: JobSpec, extra_args: list[str]) -> argparse.Namespace:
    from pipelines.cli import COMMANDS

    module = importlib.import_module(COMMANDS[spec.command][0])
    parser = argparse.ArgumentParser(prog=f"lsnet {spec.command}", add_help=False)
    module.add_arguments(parser)

    def refuse(message: str):  # argparse would print usage and exit: one line naming the spec instead
        raise JobSpecError(f"{spec.path or spec.name}: args: {message}")

    parser.error = refuse
    return parser.parse_args(spec.lsnet_argv[1:] + list(extra_args))


def _local(value) -> Path | None:
    """The path ``value`` names on this machine (relative: to the checkout), None for a URI / unset."""
    if not value or not isinstance(value, str) or "://" in value:
        return None
    path = Path(value)
    return path if path.is_absolute() else REPO_ROOT / path


def input_paths(spec: JobSpec, extra_args: list[str] | None = None) -> list[tuple[str, str]]:
    """``(key, path)`` of every input the job reads, as the job will see them."""
    args = _parse(spec, list(extra_args or []))
    found: list[tuple[str, str]] = []
    if spec.command in ("train", "tune"):
        from lsnet.errors import LsnetError
        from pipelines.config import load_config

        try:
            cfg = load_config(args.config, list(args.overrides))
        except LsnetError as err:  # a bad override: the config's own one-line message
            raise JobSpecError(f"{spec.path or spec.name}: {err}") from None
        found += [("data.train_shards", cfg.data.train_shards), ("data.val_shards", cfg.data.val_shards),
                  ("data.val_ann", cfg.data.val_ann), ("train.init_from", cfg.train.init_from)]
        pretrained = cfg.model.pretrained  # also a torchvision weights enum name or "timm": only a file
        if isinstance(pretrained, str) and ("/" in pretrained or pretrained.endswith((".pth", ".pt"))):
            found.append(("model.pretrained", pretrained))
        if spec.command == "tune":
            found.append(("--space", args.space))
    elif spec.command == "preprocess":
        found += [("--ann", args.ann), ("--images", args.images)]
    elif spec.command in ("test", "predict"):
        found += [(name, getattr(args, attr, None)) for name, attr in
                  (("checkpoint", "checkpoint"), ("--shards", "shards"), ("--ann", "ann"), ("--images", "images"))]
    return [(key, value) for key, value in found if _local(value) is not None]


def check_local_inputs(spec: JobSpec, extra_args: list[str] | None = None) -> None:
    """Raise :class:`JobSpecError` for the first input path of the job that does not exist here."""
    for key, value in input_paths(spec, extra_args):
        path = _local(value)
        if not path.exists():
            make = "run `make demo` first" if Path(value).parts[:2] == ("results", "demo") else "make it first"
            hint = f"--set {key}=PATH" if "." in key else f"a spec whose {key} exists"
            raise JobSpecError(f"{spec.path or spec.name}: {key} {value} does not exist on this machine (no "
                               f"--address: the job runs here, in {REPO_ROOT}; {make}, or pass {hint})")
