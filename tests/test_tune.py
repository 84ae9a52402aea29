"""Ray Tune searches with MLflow parent/child runs (issue 9), on tiny synthetic shards.

- a 4-trial search, 1 worker per trial, 2 at once: exactly 1 parent + 4 child runs in MLflow, each
  child with its searched value as param and tag and per-epoch metrics; the parent's best = the best
  child's;
- ASHA stops a trial with a learning rate of 0 after its first epoch (tagged early-stopped) while a
  trial that raises ends FAILED with its error, and the search still reports the others;
- the tune driver killed (SIGKILL) after the first trial finished: ``--resume`` completes the search
  without re-running that trial, under the same parent run;
- validation errors before any trial starts.

Tiny model (ResNet-18, 64 channels), 64-px images, 8 training / 4 validation images, 2 epochs of 4
steps, 1 worker per trial.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lsnet.config import ConfigError
from pipelines.config import load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


@pytest.fixture(scope="module")
def shards(search_shards):
    return search_shards


# run.max_failures=1: Ray Train's placement-group cleaner can take a live controller for dead when the
# state API lags on a loaded machine and remove its workers; one restart from the checkpoint absorbs it.
BASE_OVERRIDES = ["data.scale_range=[64,64]", "data.max_size=64", "data.test_scale=64", "train.epochs=2",
                  "train.lr_steps=[]", "train.eval_every=1", "train.warmup_iters=2", "train.log_every=1",
                  "eval.num_overlays=0", "run.num_workers=1", "run.max_failures=1",
                  "tracking.flush_interval_s=0.5"]


def base_args(root: Path, storage: str) -> list[str]:
    """One MLflow store per storage folder, beside its searches: ``<root>/<storage>/mlflow.db``."""
    return [f"data.train_shards={root / 'shards' / 'train'}", f"data.val_shards={root / 'shards' / 'val'}",
            f"run.storage_path={root / storage}", f"tracking.uri=sqlite:///{root / storage / 'mlflow.db'}",
            *BASE_OVERRIDES]


def base_config(root: Path, storage: str, config: str = "tiny_bbox.yaml", *extra: str):
    return load_config(REPO_ROOT / "configs" / config, [*base_args(root, storage), *extra])


def write_space(path: Path, space: dict, **options) -> Path:
    path.write_text(yaml.safe_dump({"space": space, **options}))
    return path


def mlflow_runs(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments, max_results=100)


@pytest.fixture(scope="module")
def two_trials(shards):
    """``lsnet tune`` of 2 alpha values, both at once; returns the search directory."""
    from pipelines.cli import main

    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    space = write_space(shards / "alpha.yaml", {"model.loss.alpha": {"grid": [0.0, 0.3]}},
                        scheduler={"name": "fifo"})
    sets = [x for kv in base_args(shards, "search2") for x in ("--set", kv)]
    try:
        assert main(["tune", str(REPO_ROOT / "configs" / "tiny_bbox.yaml"), "--space", str(space), *sets,
                     "--max-concurrent", "2", "--name", "two"]) == 0
    finally:
        mp.undo()
    return shards / "search2" / "two"


def test_two_trial_search_both_at_once(two_trials):
    search_dir = two_trials
    client, runs = mlflow_runs(f"sqlite:///{search_dir.parent / 'mlflow.db'}")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.params["max_concurrent"] == "2"
    assert parent.data.tags["mlflow.source.name"] == "lsnet tune" and len(parent.data.tags["git_commit"]) >= 40
    assert parent.data.params["space.model.loss.alpha"] == "grid [0.0, 0.3]"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sorted(float(c.data.params["model.loss.alpha"]) for c in children) == [0.0, 0.3]
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["model.loss.alpha"] == child.data.params["model.loss.alpha"]
        assert child.data.params["run.num_workers"] == "1"
        epochs = client.get_metric_history(child.info.run_id, "epoch")
        assert sorted(m.value for m in epochs) == [1.0, 2.0]
        assert len(client.get_metric_history(child.info.run_id, "bbox_AP")) == 2  # evaluated every epoch
        assert child.data.tags["mlflow.source.name"] == "lsnet tune" and child.data.tags["mlflow.user"]
        assert {"curves/loss.png", "curves/bbox_AP.png"} <= {a.path for a in client.list_artifacts(
            child.info.run_id, "curves")}
    # two trials ran at the same time (1 CPU each on the 2-CPU cluster)
    spans = sorted((c.info.start_time, c.info.end_time) for c in children)
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans))

    best_ap = {c.info.run_id: max(m.value for m in client.get_metric_history(c.info.run_id, "bbox_AP"))
               for c in children}
    best_child = next(c for c in children if c.info.run_id == parent.data.params["best.mlflow_run_id"])
    assert best_ap[best_child.info.run_id] == max(best_ap.values())
    assert parent.data.params["best.model.loss.alpha"] == best_child.data.params["model.loss.alpha"]
    best_cfg = yaml.safe_load((search_dir / "parent" / "report" / "best_config.yaml").read_text())
    assert best_cfg["model"]["loss"]["alpha"] == float(best_child.data.params["model.loss.alpha"])
    artifacts = {a.path for d in ("best", "results", "plots") for a in client.list_artifacts(parent.info.run_id, d)}
    assert {"best/best_config.yaml", "results/results.csv", "results/results.md",
            "plots/bbox_AP_vs_model.loss.alpha.png", "plots/bbox_AP_vs_epoch.png"} <= artifacts
    rows = (search_dir / "parent" / "report" / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("trial,model.loss.alpha,status,epochs")


def test_runs_compare_and_list(two_trials, capsys):
    from pipelines.cli import main

    db = str(two_trials.parent / "mlflow.db")
    parent = json.loads((two_trials / "parent" / "mlflow_journal" / "state.json").read_text())["run_id"]
    assert main(["runs", "compare", parent, "--tracking-uri", db, "--sort", "--csv"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    # only the searched param differs between the trials; best first
    assert rows[0] == "run,model.loss.alpha,status,final bbox_AP,best bbox_AP,duration" and len(rows) == 3
    best = [float(r.split(",")[4]) for r in rows[1:]]
    assert best == sorted(best, reverse=True)
    assert sorted(r.split(",")[1] for r in rows[1:]) == ["0.0", "0.3"]
    assert main(["runs", "compare", "lsnet-tiny", "--tracking-uri", db, "--metric", "loss", "--mode", "min"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "experiment lsnet-tiny: 3 runs" and "final loss" in table[1]
    assert main(["runs", "list", "--tracking-uri", db]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert len(listing) == 2 + 3 and [line.split()[4] for line in listing[2:]].count(parent[:8]) == 2
    assert main(["runs", "compare", "nope", "--tracking-uri", db]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err


@pytest.mark.long
def test_asha_stops_zero_lr_and_failed_trial_is_recorded(shards, monkeypatch):
    """Variants run one at a time in order: lr 0.08, lr 1e-12 (loss stays at its initial level: stopped
    at the epoch-1 rung by ASHA on the loss; the config refuses lr 0), training shards that do not exist
    (raises inside the trial, retried once)."""
    from pipelines.tune.records import SearchSettings
    from pipelines.tune.trials import run_trials

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    variants = [{"train.lr_per_16_images": 0.08}, {"train.lr_per_16_images": 1e-12},
                {"data.train_shards": str(shards / "shards" / "nope")}]
    settings = SearchSettings(name="asha", metric="loss", mode="min", scheduler="asha", grace_period=1,
                              reduction_factor=2, max_concurrent=1, max_failures=1)
    out = run_trials(base_config(shards, "asha"), variants, settings, verbose=False)
    by_values = {json.dumps(r.values): r for r in out.trials}
    good, zero_lr, broken = (by_values[json.dumps(v)] for v in variants)
    assert (good.status, good.epochs_run) == ("FINISHED", 2)
    assert (zero_lr.status, zero_lr.epochs_run) == ("EARLY_STOPPED", 1)
    assert broken.status == "FAILED" and "nope/manifest.json: no manifest" in broken.error
    assert out.best is good

    _, runs = mlflow_runs(out.tracking_uri)
    by_id = {r.info.run_id: r for r in runs}
    assert len(runs) == 4  # parent + 3 trials
    stopped = by_id[zero_lr.mlflow_run_id]
    assert stopped.info.status == "FINISHED" and stopped.data.tags["lsnet.early_stopped"] == "true"
    failed = by_id[broken.mlflow_run_id]
    assert failed.info.status == "FAILED" and "nope/manifest.json: no manifest" in failed.data.tags["lsnet.error"]
    assert failed.data.tags["mlflow.parentRunId"] == out.parent_run_id
    assert by_id[good.mlflow_run_id].info.status == "FINISHED"
    parent = by_id[out.parent_run_id].data
    assert parent.metrics["trials_failed"] == 1 and parent.metrics["trials_early_stopped"] == 1


def _tune_cmd(shards: Path, space: Path, *extra: str) -> list[str]:
    sets = [x for kv in base_args(shards, "killed") for x in ("--set", kv)]
    return [sys.executable, "-m", "pipelines.cli", "tune", str(REPO_ROOT / "configs" / "tiny_bbox.yaml"),
            "--space", str(space), *sets, "--scheduler", "fifo", "--max-concurrent", "1", "--name", "resumed",
            *extra]


RAY_START_TIMEOUT = "The current node timed out during startup"


@pytest.mark.long
def test_killed_driver_resumes_without_rerunning_finished_trials(shards):
    space = write_space(shards / "resume.yaml", {"model.loss.alpha": {"grid": [0.0, 0.2]}})
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RAY_ADDRESS": "local"}
    env.pop("MLFLOW_TRACKING_URI", None)
    search_dir = shards / "killed" / "resumed"
    log_path = shards / "killed_driver.log"

    def start_driver() -> subprocess.Popen:
        log = log_path.open("w")
        return subprocess.Popen(_tune_cmd(shards, space), cwd=REPO_ROOT, env=env, stdout=log, stderr=log,
                                start_new_session=True)  # its own process group: its Ray dies with it

    driver = start_driver()

    def first_trial_done() -> Path | None:
        """The trial Tune has recorded as TERMINATED in its saved experiment state."""
        for state in search_dir.glob("experiment_state-*.json"):
            try:
                trials = json.loads(state.read_text())["trial_data"]
            except (json.JSONDecodeError, KeyError, OSError):
                continue
            for trial_json, _ in trials:
                trial = json.loads(trial_json)
                if trial.get("status") == "TERMINATED":
                    return search_dir / "trials" / f"resumed-{trial['trial_id']}"
        return None

    deadline = time.monotonic() + 600
    restarts = 0
    while (done := first_trial_done()) is None:
        if driver.poll() is not None and RAY_START_TIMEOUT in log_path.read_text() and restarts < 2:
            shutil.rmtree(search_dir, ignore_errors=True)  # Ray never came up: start over
            driver, restarts = start_driver(), restarts + 1
        assert driver.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, "the first trial did not finish"
        time.sleep(1)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    epochs_before = (done / "epochs.jsonl").read_text()
    parent_before = json.loads((search_dir / "parent" / "mlflow_journal" / "state.json").read_text())["run_id"]

    for _ in range(3):
        resumed = subprocess.run(_tune_cmd(shards, space, "--resume"), cwd=REPO_ROOT, env=env,
                                 capture_output=True, text=True, timeout=900, check=False)
        if RAY_START_TIMEOUT not in resumed.stderr:
            break
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert (done / "epochs.jsonl").read_text() == epochs_before  # not trained again
    trial_dirs = sorted((search_dir / "trials").iterdir())
    assert len(trial_dirs) == 2 and all((d / "model_final.pt").exists() for d in trial_dirs)
    _, runs = mlflow_runs(f"sqlite:///{search_dir.parent / 'mlflow.db'}")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [parent_before] and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_before]
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}


@pytest.mark.parametrize("space, message", [
    ({"model.loss.alfa": {"grid": [0.1]}}, "unknown config key model.loss.alfa"),
    ({"model.loss.alpha": {"grid": ["high"]}}, "model.loss.alpha: expected float, got 'high'"),
    ({"model.num_points": {"uniform": [18, 36]}}, "model.num_points: 18.0 matches none of int"),
    ({"model.num_points": {"grid": [18, 36]}}, "model.num_points: 36 is not in the shards"),
    ({"model.loss.alpha": {"between": [0, 1]}}, "model.loss.alpha: expected one of {grid"),
])
def test_space_errors_name_file_and_key(shards, tmp_path, capsys, space, message):
    from pipelines.cli import main

    path = write_space(tmp_path / "bad.yaml", space)
    sets = [x for kv in base_args(shards, "invalid") for x in ("--set", kv)]
    assert main(["tune", str(REPO_ROOT / "configs" / "tiny_segm.yaml"), "--space", str(path), *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lsnet tune: error: {path}: ") and message in err and "\n" not in err
    assert not (shards / "invalid").exists()  # nothing started


def test_search_that_cannot_fit_one_trial_fails_at_once(shards, ray_session):
    from pipelines.tune.records import SearchSettings
    from pipelines.tune.space import SearchSpace
    from pipelines.tune.trials import run_trials

    cfg = base_config(shards, "too_big", "tiny_bbox.yaml", "run.num_workers=3")
    with pytest.raises(ConfigError, match=r"one trial needs 3 CPU, .* but the Ray cluster has 2 CPU"):
        run_trials(cfg, SearchSpace({"model.loss.alpha": ("grid", [0.0])}), SearchSettings("big", "bbox_AP"),
                   verbose=False)


def test_concurrent_trials_from_cluster_resources():
    from pipelines.tune.trials import concurrent_trials, trial_resources

    cfg = load_config(REPO_ROOT / "configs" / "tiny_bbox.yaml", ["run.num_workers=2"])  # {CPU: 1} per worker
    need = trial_resources(cfg)
    assert need["CPU"] == 2.0 and need["memory"] > 0
    assert concurrent_trials(need, {"CPU": 9.0, "memory": 2.0**34}, None) == 4
    assert concurrent_trials(need, {"CPU": 9.0, "memory": 2.0**34}, 2) == 2
    assert concurrent_trials(need, {"CPU": 9.0, "memory": 2.0**34}, 8) == 4  # never more than fit
    gpu = load_config(REPO_ROOT / "configs" / "tiny_bbox.yaml", ["run.use_gpu=true", "run.resources_per_worker=null"])
    assert trial_resources(gpu)["GPU"] == 2.0 and "CPU" not in trial_resources(gpu)
    with pytest.raises(ConfigError, match="needs 2 GPU"):
        concurrent_trials(trial_resources(gpu), {"CPU": 16.0, "GPU": 1.0, "memory": 2.0**34}, None)


def test_report_helpers():
    from pipelines.tune.records import TrialRecord
    from pipelines.tune.report import best_trial, error_line, metric_history, results_markdown

    rows = [{"epoch": 1, "AP": 0.1}, {"epoch": 2}, {"epoch": 2, "AP": 0.3}, {"epoch": 2, "AP": 0.25},
            {"epoch": 3, "AP": float("nan")}]
    assert metric_history(rows, "AP") == [(1, 0.1), (2, 0.25)]  # last report of an epoch wins, NaN dropped
    assert error_line(RuntimeError("Traceback\n  File x\nConfigError: 0 images\n")) == "ConfigError: 0 images"

    def rec(tid, status, best):
        return TrialRecord(tid, tid, Path(tid), {"k": 1}, status, 2, best, best)

    records = [rec("a", "FINISHED", 0.2), rec("b", "FAILED", 0.9), rec("c", "EARLY_STOPPED", 0.3),
               rec("d", "FINISHED", None)]
    assert best_trial(records, "max").trial_id == "c" and best_trial(records, "min").trial_id == "a"
    table = results_markdown(records, "AP").splitlines()
    assert table[0] == "| trial | k | status | epochs | final AP | best AP |"
    assert table[2] == "| a | 1 | FINISHED | 2 | 0.2000 | 0.2000 |" and len(table) == 6


def test_optuna_missing_is_a_clear_error(monkeypatch):
    import builtins

    from pipelines.tune.records import SearchSettings
    from pipelines.tune.space import SearchSpace
    from pipelines.tune.trials import check_search

    real_import = builtins.__import__

    def no_optuna(name, *args, **kwargs):
        if name == "optuna" or name.startswith("ray.tune.search.optuna"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optuna)
    space = SearchSpace({"model.loss.alpha": ("uniform", [0.0, 0.3])})
    with pytest.raises(ConfigError, match=r"pip install '\.\[tune\]'"):
        check_search(SearchSettings("s", "bbox_AP", search="optuna"), space)
    monkeypatch.undo()
    grid = SearchSpace({"model.loss.alpha": ("uniform", [0.0, 0.3])}, source="s.yaml")
    with pytest.raises(ConfigError, match="s.yaml: model.loss.alpha: --search grid needs grid/choice"):
        check_search(SearchSettings("s", "bbox_AP", search="grid"), grid)


@pytest.mark.parametrize("space_file", sorted((REPO_ROOT / "configs" / "spaces").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_spaces_validate(space_file, tmp_path):
    """Every space in configs/spaces/ is valid for the tiny segm config on shards with 18/36/72 points."""
    from lsnet.data.shards import SCHEMA_VERSION
    from pipelines.tune.space import load_space, validate_space

    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    (shard_dir / "manifest.json").write_text(json.dumps(
        {"schema_version": SCHEMA_VERSION, "config": {"target": {"contour_points": [18, 36, 72]}}}))
    cfg = load_config(REPO_ROOT / "configs" / "tiny_segm.yaml", [f"data.train_shards={shard_dir}",
                                                                  "data.val_shards=null"])
    space = load_space(space_file)
    validate_space(cfg, space)
    assert space.params and all(kind in ("grid", "choice", "uniform", "loguniform", "randint")
                                for kind, _ in space.params.values())
    if "model.num_points" in space.params:  # and a count the shards lack is caught
        (shard_dir / "manifest.json").write_text(json.dumps(
            {"schema_version": SCHEMA_VERSION, "config": {"target": {"contour_points": [18, 36]}}}))
        with pytest.raises(ConfigError, match=r"model.num_points: 72 is not in the shards"):
            validate_space(cfg, space)
