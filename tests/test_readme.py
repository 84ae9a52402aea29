"""The README as a test (issue 23, item 7): its examples work as written after `make demo`.

The examples are the lines of fenced blocks whose info string is ``sh example`` (or ``bash example``):
only blocks marked so are read (other blocks -- a cluster's commands, `make` targets -- are prose).
Each line (``\\`` continuations joined, ``#`` comments dropped) is checked in a fresh checkout: a temporary
directory with the repository's ``configs/`` and ``jobs/`` and the outputs of a small ``make demo``
(``pipelines.demo.prepare_data``, the demo's own layout and shard names, 4 + 2 images, without Ray),
run from there as a user would:

- ``lsnet synth`` and ``lsnet preprocess`` run for real, at tiny size (4 images; preprocess with
  ``--executor local``, no Ray);
- the commands that start Ray (train, tune, ablation, jobs submit, bench, ...) each take 20 s to minutes,
  more than this test's budget, so they run up to the point where they would start Ray: the command's own
  argument parser, the config with its ``--set`` overrides (key names and value ranges), the data checks
  of ``lsnet train`` (shards, manifest, workers, classes), the search space against the shards (the
  contour counts of the points search), the ablation table and scale, the job spec and the input paths
  of its job (pipelines/jobs/preflight.py), the benchmark spec; a checkpoint or shard folder an earlier
  example writes counts as there.

So a renamed path, config key, option, table or search value in the README fails ``make test``. The
commands themselves are tested in depth by their own tests.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
EXAMPLE_INFO = ({"sh", "example"}, {"bash", "example"})


def readme_examples(text: str) -> list[tuple[int, str]]:
    """``(line number, command)`` of every example line of the marked blocks."""
    examples: list[tuple[int, str]] = []
    fence = re.compile(r"^(```+|~~~+)\s*(.*)$")
    in_block, marked, pending, start = None, False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        match = fence.match(line.strip())
        if match and in_block is None:
            in_block, marked = match.group(1), set(match.group(2).split()) in EXAMPLE_INFO
            continue
        if match and in_block is not None and line.strip().startswith(in_block) and not match.group(2):
            in_block = None
            continue
        if in_block is None or not marked:
            continue
        body = line.rstrip()
        if not pending:
            start = number
        if body.endswith("\\"):
            pending += body[:-1] + " "
            continue
        command = " ".join(shlex.split(pending + body, comments=True))
        pending = ""
        if command:
            examples.append((start, command))
    return examples


def _parse(argv: list[str]) -> tuple[str, argparse.Namespace]:
    from pipelines.cli import COMMANDS

    name = argv[0]
    if name not in COMMANDS:
        raise AssertionError(f"lsnet has no command {name!r}")
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"lsnet {name}")
    module.add_arguments(parser)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return name, parser.parse_args(argv[1:])
    except SystemExit:
        raise AssertionError(err.getvalue().strip().splitlines()[-1]) from None


def _train_config(args: argparse.Namespace):
    from pipelines.config import load_config

    overrides = list(args.overrides)
    if getattr(args, "num_workers", None) is not None:
        overrides.append(f"run.num_workers={args.num_workers}")
    return load_config(args.config, overrides)


def _exists(path: str | Path, produced: set[Path]) -> bool:
    path = Path(path).resolve()
    return path.exists() or path in produced


class Checker:
    """Checks one example line in the fresh checkout (the current directory)."""

    def __init__(self, root: Path):
        self.root = root
        self.produced: set[Path] = set()

    def __call__(self, command: str) -> None:
        argv = shlex.split(command, comments=True)
        if argv[0] != "lsnet":
            return  # not ours to run (make, mlflow, kubectl)
        argv = argv[1:]
        if argv[:1] == ["synth"] and "--num-images" in argv:
            argv[argv.index("--num-images") + 1] = "4"  # tiny size
        if argv[:1] == ["preprocess"]:
            argv += ["--executor", "local", "--num-cpus", "1"]  # no Ray
        name, args = _parse(argv)
        getattr(self, f"check_{name}", self.check_parsed)(argv, args)

    def check_parsed(self, argv, args) -> None:
        """Commands without inputs of their own (runs list ...): their arguments parse."""

    def _run(self, argv) -> None:
        from pipelines.cli import main

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main(list(argv))
        assert code == 0, err.getvalue().strip()[-500:]

    def check_synth(self, argv, args) -> None:
        self._run(argv)

    def check_preprocess(self, argv, args) -> None:
        self._run(argv)

    def check_train(self, argv, args) -> None:
        from pipelines.train.driver import check_data

        cfg = _train_config(args)
        check_data(cfg)  # shards there, manifest, enough images for the workers, class count
        name = args.name or "run"
        self.produced |= {(Path(cfg.run.storage_path) / name / f).resolve() for f in ("model_final.pt", "model_best.pt")}

    def check_tune(self, argv, args) -> None:
        from pipelines.train.driver import check_data
        from pipelines.tune.space import load_space, validate_space

        cfg = _train_config(args)
        check_data(cfg)
        validate_space(cfg, load_space(args.space))  # every searched value, point counts in the shards

    def check_test(self, argv, args) -> None:
        from lsnet.data.shards import load_manifest

        assert _exists(args.checkpoint, self.produced), f"checkpoint {args.checkpoint}: not there, and no example writes it"
        if args.shards:
            load_manifest(args.shards)

    def check_predict(self, argv, args) -> None:
        for pattern in args.images:  # as the shell expands them
            assert glob.glob(pattern), f"{pattern}: no such image"
        assert _exists(args.checkpoint, self.produced), f"--checkpoint {args.checkpoint}: not there"

    def check_ablation(self, argv, args) -> None:
        from pipelines.ablations.spec import load_ablation_spec

        for table in args.tables:
            load_ablation_spec(table).scale(args.scale)

    def check_jobs(self, argv, args) -> None:
        from pipelines.jobs.spec import load_job_spec, resolve_spec_path

        if args.action in ("submit", "schedule"):
            spec = load_job_spec(resolve_spec_path(args.spec))
            if args.action == "submit" and args.address is None:
                from pipelines.jobs.preflight import check_local_inputs

                extra = [x for item in args.overrides for x in ("--set", item)] + list(args.extra_args)
                check_local_inputs(spec, extra)  # what `submit` checks before it starts a head

    def check_bench(self, argv, args) -> None:
        from pipelines.bench.runner import find_spec

        find_spec(args.name)


@pytest.fixture(scope="session")
def fresh_checkout(tmp_path_factory) -> Path:
    """A checkout after a small `make demo`: the repository's configs and specs, the demo's data and shards
    (its own layout and names, 4 train + 2 val images at 128 px, preprocessed without Ray)."""
    from pipelines.demo import prepare_data

    root = tmp_path_factory.mktemp("readme_checkout")
    for name in ("configs", "jobs"):
        (root / name).symlink_to(REPO_ROOT / name)
    prepare_data(root / "results" / "demo", "synthetic", "bbox", num_train=4, num_val=2, image_size=128, num_cpus=1,
                 executor="local")
    return root


def test_the_extraction_reads_only_marked_blocks():
    text = "\n".join([  # noqa: FLY002 -- one README line per item
        "```bash", "lsnet train not-an-example.yaml", "```",
        "```sh example", "lsnet synth data/x \\", "    --num-images 2   # two", "", "# a comment", "lsnet runs list", "```",
        "~~~", "lsnet nope", "~~~",
        "```bash example", "lsnet bench losses", "```",
        "```sh examples", "lsnet never", "```"])
    assert readme_examples(text) == [(5, "lsnet synth data/x --num-images 2"), (9, "lsnet runs list"),
                                     (15, "lsnet bench losses")]


def test_the_readme_has_its_examples():
    commands = [c for _, c in readme_examples(README.read_text())]
    used = {shlex.split(c)[1] for c in commands}
    assert {"synth", "preprocess", "train", "tune", "jobs", "ablation"} <= used, used
    assert any("configs/spaces/segm_points_alpha.yaml" in c for c in commands)  # the points search


def test_readme_examples_work_after_make_demo(fresh_checkout, monkeypatch):
    monkeypatch.chdir(fresh_checkout)
    monkeypatch.setattr("pipelines.jobs.preflight.REPO_ROOT", fresh_checkout)  # a job of a private head runs here
    check = Checker(fresh_checkout)
    for number, command in readme_examples(README.read_text()):
        try:
            check(command)
        except Exception as err:  # noqa: BLE001 -- any failure is the README's line that broke
            pytest.fail(f"README.md:{number}: {command}\n  -> {type(err).__name__}: {err}")
