"""What MLflow shows of a search is what the search report says (issue 23, items 1 and 3, and the
``--metric`` check of item 5), on tiny synthetic shards.

- an ASHA search whose trials all reach ``max_t`` (grace period = epochs: its only rung is the last
  epoch): every child run ends with the report's status, with every epoch's metrics and its curves; the
  parent's counts match; the parent's description is the result table; children are named by their
  values; ``lsnet runs compare/plot`` use the search's own metric and label trials by their values;
- the ``lsnet tune`` driver SIGTERM-ed while a trial trains: it exits, and no run is left RUNNING (the
  running trial and the parent end KILLED);
- ``--metric`` that the config's task does not report: one line, exit 2, nothing created;
- the description and labels from hand-made records.

Tiny model (ResNet-18, 64 channels), 64-px images, 8 training / 4 validation images, 1 worker per trial.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines.config import load_config

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shards(search_shards):
    return search_shards


BASE_OVERRIDES = ["data.scale_range=[64,64]", "data.max_size=64", "data.test_scale=64", "train.epochs=2",
                  "train.lr_steps=[]", "train.eval_every=1", "train.warmup_iters=2", "train.log_every=1",
                  "eval.num_overlays=0", "run.num_workers=1", "run.max_failures=1",
                  "tracking.flush_interval_s=0.5", "tracking.log_weights=model"]


def base_args(root: Path, storage: str, *extra: str) -> list[str]:
    return [f"data.train_shards={root / 'shards' / 'train'}", f"data.val_shards={root / 'shards' / 'val'}",
            f"run.storage_path={root / storage}", f"tracking.uri=sqlite:///{root / storage / 'mlflow.db'}",
            *BASE_OVERRIDES, *extra]


def mlflow_runs(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(experiments, max_results=100)


def test_asha_trials_that_reach_max_t_end_in_mlflow_as_the_report_says(shards, monkeypatch, capsys, tmp_path):
    """One at a time: lr 0.08, lr 1e-12 (its loss stays high: below ASHA's cutoff at the only rung, the
    last epoch -- it used to be stopped there while saving and its run left RUNNING or FAILED), and
    training shards that do not exist (FAILED with its error)."""
    from pipelines.cli import main
    from pipelines.tune.records import SearchSettings
    from pipelines.tune.report import MLFLOW_STATUS
    from pipelines.tune.trials import run_trials

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    variants = [{"train.lr_per_16_images": 0.08}, {"train.lr_per_16_images": 1e-12},
                {"data.train_shards": str(shards / "shards" / "nope")}]
    settings = SearchSettings(name="maxt", metric="loss", mode="min", scheduler="asha", grace_period=2,
                              reduction_factor=2, max_concurrent=1)
    cfg = load_config(REPO_ROOT / "configs" / "tiny_bbox.yaml", base_args(shards, "maxt"))
    out = run_trials(cfg, variants, settings, verbose=True)
    printed = capsys.readouterr().out
    by_values = {json.dumps(r.values): r for r in out.trials}
    good, zero_lr, broken = (by_values[json.dumps(v)] for v in variants)
    assert [(r.status, r.epochs_run) for r in (good, zero_lr)] == [("FINISHED", 2), ("FINISHED", 2)]
    assert broken.status == "FAILED" and "nope/manifest.json: no manifest" in broken.error

    client, runs = mlflow_runs(out.tracking_uri)
    assert len(runs) == 4 and not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    by_id = {r.info.run_id: r for r in runs}
    for record in out.trials:  # every child: the report's status, every epoch's metrics
        run = by_id[record.mlflow_run_id]
        assert run.info.status == MLFLOW_STATUS[record.status], (record.trial_id, record.status)
        assert run.data.tags["mlflow.parentRunId"] == out.parent_run_id
        assert [m.value for m in sorted(client.get_metric_history(run.info.run_id, "epoch"),
                                        key=lambda m: m.step)] == [float(e + 1) for e in range(record.epochs_run)]
    for record in (good, zero_lr):  # saved to the end: curves and the MLflow model (rank 0's last step)
        run = by_id[record.mlflow_run_id]
        assert len(client.get_metric_history(run.info.run_id, "bbox_AP")) == 2
        assert len(client.get_run(run.info.run_id).outputs.model_outputs) == 1, record.trial_id
        assert {"curves/loss.png", "curves/bbox_AP.png"} <= {a.path for a in client.list_artifacts(
            run.info.run_id, "curves")}
    assert by_id[good.mlflow_run_id].info.run_name == "lr_per_16_images=0.08"
    assert by_id[zero_lr.mlflow_run_id].info.run_name == "lr_per_16_images=1e-12"
    failed = by_id[broken.mlflow_run_id]
    assert failed.info.run_name == "train_shards=" + str(shards / "shards" / "nope")
    assert "nope/manifest.json: no manifest" in failed.data.tags["lsnet.error"]
    assert "nope/manifest.json: no manifest" in failed.data.tags["mlflow.note.content"]

    parent = by_id[out.parent_run_id]
    assert parent.info.status == "FINISHED"
    assert (parent.data.metrics["trials_finished"], parent.data.metrics["trials_early_stopped"],
            parent.data.metrics["trials_failed"]) == (2, 0, 1)
    note = parent.data.tags["mlflow.note.content"]
    table = [line for line in note.splitlines() if line.startswith("| ")]
    assert table[0] == "| run | lr_per_16_images | train_shards | status | epochs | final loss | best loss |"
    # best first (min mode): the trained lr beats the near-zero one; the failed trial last
    assert [row.split(" | ")[0] for row in table[1:]] == [
        f"| [lr_per_16_images=0.08](#/experiments/{out.experiment_id}/runs/{good.mlflow_run_id})",
        f"| [lr_per_16_images=1e-12](#/experiments/{out.experiment_id}/runs/{zero_lr.mlflow_run_id})",
        (f"| [train_shards={shards / 'shards' / 'nope'}](#/experiments/{out.experiment_id}/runs/"
         f"{broken.mlflow_run_id})")]
    assert note.startswith(f"**Winner: [lr_per_16_images=0.08](#/experiments/{out.experiment_id}/runs/"
                           f"{good.mlflow_run_id})** -- best loss **{good.best_metric:.4f}**")
    assert "3 trials: 2 finished, 0 stopped early, 1 failed." in note
    compare = printed.split("the trials side by side (parallel coordinates over the searched values): ")[1].split()[0]
    assert compare.startswith("http://127.0.0.1:5000/#/compare-runs?runs=%5B%22")
    from urllib.parse import parse_qs, unquote

    query = parse_qs(compare.split("?", 1)[1])
    assert sorted(json.loads(unquote(query["runs"][0]))) == sorted(r.mlflow_run_id for r in out.trials)
    assert json.loads(unquote(query["experiments"][0])) == [out.experiment_id]

    # lsnet runs compare / plot: the search's own metric (loss, min) and the trials by their values
    db = str(shards / "maxt" / "mlflow.db")
    assert main(["runs", "compare", out.parent_run_id, "--tracking-uri", db, "--sort", "--csv"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0].endswith(",status,final loss,best loss,duration")
    assert rows[1].startswith("lr_per_16_images=0.08,") and rows[2].startswith("lr_per_16_images=1e-12,")
    png = tmp_path / "curves.png"
    assert main(["runs", "plot", out.parent_run_id, "--tracking-uri", db, "--out", str(png)]) == 0
    assert capsys.readouterr().out.startswith(f"{png}: loss per epoch of 2 runs")
    from pipelines.runs import run_labels, runs_behind, searched_keys_of

    children, parents = runs_behind(client, [out.parent_run_id])
    assert sorted(run_labels(children, searched_keys_of(parents)).values()) == [
        "lr_per_16_images=0.08", "lr_per_16_images=1e-12", f"train_shards={shards / 'shards' / 'nope'}"]


def _journal_run_started(run_dir: Path) -> bool:
    """The trial's MLflow run exists and its first epoch is logged."""
    try:
        state = json.loads((run_dir / "mlflow_journal" / "state.json").read_text())
        return bool(state.get("run_id")) and bool((run_dir / "epochs.jsonl").read_text().strip())
    except (OSError, ValueError):
        return False


def test_sigterm_of_the_driver_leaves_no_run_running(shards, ray_session):
    """``lsnet tune`` (on the session's Ray) SIGTERM-ed after its first trial's first epoch: it exits 130
    saying how to resume, the trial's run and the parent end KILLED, the trial that had not started has
    no run, nothing is RUNNING."""
    space = shards / "sigterm.yaml"
    space.write_text(yaml.safe_dump({"space": {"model.loss.alpha": {"grid": [0.0, 0.3]}},
                                     "scheduler": {"name": "fifo"}}))
    sets = [x for kv in base_args(shards, "sigterm", "train.epochs=6") for x in ("--set", kv)]
    address = ray_session.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = shards / "sigterm_driver.log"
    with log_path.open("w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", "tune", str(REPO_ROOT / "configs" / "tiny_bbox.yaml"),
             "--space", str(space), *sets, "--max-concurrent", "1", "--name", "term", "--address", address],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    search_dir = shards / "sigterm" / "term"
    try:
        deadline = time.monotonic() + 600
        while not any(_journal_run_started(d) for d in (search_dir / "trials").glob("term-*")):
            assert driver.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the first trial did not start"
            time.sleep(0.5)
        driver.send_signal(signal.SIGTERM)
        returncode = driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    log = log_path.read_text()
    assert returncode == 130, log[-3000:]
    assert "--name term --resume" in log

    _, runs = mlflow_runs(f"sqlite:///{search_dir.parent / 'mlflow.db'}")
    assert {r.info.status for r in runs} == {"KILLED"}, [(r.info.run_name, r.info.status) for r in runs]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 1  # the second trial never started
    assert children[0].info.run_name == "alpha=0" and "Interrupted" in parents[0].data.tags["mlflow.note.content"]


def test_metric_the_task_does_not_report_is_refused_before_anything_starts(tmp_path, capsys):
    from pipelines.cli import main

    space = tmp_path / "alpha.yaml"
    space.write_text(yaml.safe_dump({"space": {"model.loss.alpha": {"grid": [0.0]}}}))
    store = tmp_path / "mlflow.db"
    sets = ["--set", f"run.storage_path={tmp_path / 'runs'}", "--set", f"tracking.uri=sqlite:///{store}"]
    assert main(["tune", str(REPO_ROOT / "configs" / "tiny_bbox.yaml"), "--space", str(space), *sets,
                 "--metric", "segm_AP"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lsnet tune: error: --metric segm_AP: a bbox config (model.task=bbox) does not report it")
    assert "bbox_AP, bbox_AP50" in err and "\n" not in err
    assert not (tmp_path / "runs").exists() and not store.exists()  # no search, no run
    # the same metric on a segm config is fine as far as this check goes
    from pipelines.tune.records import check_metric, searchable_metrics

    segm = load_config(REPO_ROOT / "configs" / "tiny_segm.yaml")
    check_metric(segm, "segm_AP")
    assert {"bbox_AP", "segm_APl", "loss"} <= set(searchable_metrics(segm))
    assert "bbox_AP" not in searchable_metrics(load_config(REPO_ROOT / "configs" / "tiny_pose.yaml"))


def test_description_and_labels_from_records():
    from pipelines.tune.records import SearchSettings, TrialRecord, short_names
    from pipelines.tune.report import search_description, trial_labels

    def rec(tid, alpha, status, best, run_id, error=None):
        return TrialRecord(tid, tid, Path(tid), {"model.loss.alpha": alpha}, status, 2 if status != "EARLY_STOPPED"
                           else 1, best, best, error=error, mlflow_run_id=run_id)

    records = [rec("t_00000", 0.0, "FINISHED", 0.2, "r0"), rec("t_00001", 0.1, "EARLY_STOPPED", 0.1, "r1"),
               rec("t_00002", 0.2, "FAILED", None, "r2", "ValueError: boom"), rec("t_00003", 0.2, "FINISHED", 0.3, "r3")]
    labels = trial_labels(records)
    assert labels == {"t_00000": "alpha=0", "t_00001": "alpha=0.1", "t_00002": "alpha=0.2 #00002",
                      "t_00003": "alpha=0.2 #00003"}
    settings = SearchSettings("s", "segm_AP", scheduler="asha", grace_period=1, reduction_factor=2)
    note = search_description(records, records[3], settings, "7", {"model.loss.alpha": "grid [0.0, 0.1, 0.2]"})
    lines = note.splitlines()
    assert lines[0] == ("**Winner: [alpha=0.2 #00003](#/experiments/7/runs/r3)** -- best segm_AP **0.3000** "
                        "(trial t_00003, finished). [Compare the 4 trials](#/compare-runs?runs="
                        "%5B%22r3%22%2C%22r0%22%2C%22r1%22%2C%22r2%22%5D&experiments=%5B%227%22%5D)")
    assert lines[2] == "| run | alpha | status | epochs | final segm_AP | best segm_AP |"
    assert lines[4:8] == ["| [alpha=0.2 #00003](#/experiments/7/runs/r3) | 0.2 | finished | 2 | 0.3000 | 0.3000 |",
                          "| [alpha=0](#/experiments/7/runs/r0) | 0 | finished | 2 | 0.2000 | 0.2000 |",
                          "| [alpha=0.1](#/experiments/7/runs/r1) | 0.1 | stopped early | 1 | 0.1000 | 0.1000 |",
                          "| [alpha=0.2 #00002](#/experiments/7/runs/r2) | 0.2 | **failed** | 2 |  |  |"]
    assert lines[9] == ("4 trials: 2 finished, 1 stopped early, 1 failed. Metric segm_AP (max), random search, "
                        "scheduler asha (grace period 1, reduction factor 2). Searched: `model.loss.alpha` "
                        "grid [0.0, 0.1, 0.2].")
    assert lines[11] == "Failed: alpha=0.2 #00002: `ValueError: boom`"
    # many trials: the best rows stay, within MLflow's tag limit
    many = [rec(f"t_{i:05d}", i / 1000, "FINISHED", i / 1000, f"run{i:030d}") for i in range(300)]
    long_note = search_description(many, many[-1], settings, "7")
    assert len(long_note) <= 7800 and "more rows in the artifact results/results.md" in long_note
    assert "[Compare the best 40 trials]" in long_note and long_note.count("%22run") == 40
    assert "| [alpha=0.299]" in long_note.splitlines()[4]
    assert short_names(["model.loss.alpha", "x.alpha", "model.num_points"]) == {
        "model.loss.alpha": "loss.alpha", "x.alpha": "x.alpha", "model.num_points": "num_points"}


def test_interrupted_trials_are_found_in_the_saved_experiment_state(tmp_path):
    """After Ctrl-C Tune saves its state, then marks the trials it stops TERMINATED in memory: the saved
    state says which had not ended (KILLED in the report)."""
    import types

    import pandas as pd

    from pipelines.tune.records import SearchSettings
    from pipelines.tune.report import trial_records, tune_statuses

    def state(statuses: dict[str, str]) -> str:
        return json.dumps({"trial_data": [[json.dumps({"trial_id": t, "status": s}), "{}"]
                                          for t, s in statuses.items()], "runner_data": {}, "stats": {}})

    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text(state({"a": "RUNNING", "b": "RUNNING"}))
    time.sleep(0.05)
    (tmp_path / "experiment_state-2026-01-01_00-00-09.json").write_text(
        state({"a": "TERMINATED", "b": "RUNNING", "c": "PENDING", "d": "ERROR"}))
    in_memory = types.SimpleNamespace(trials=[types.SimpleNamespace(trial_id=t, status="TERMINATED") for t in "abcd"])
    grid = types.SimpleNamespace(experiment_path=str(tmp_path), _experiment_analysis=in_memory)
    statuses = tune_statuses(grid)
    assert statuses == {"a": "TERMINATED", "b": "RUNNING", "c": "PENDING", "d": "ERROR"}

    def result(tid, epochs):
        return types.SimpleNamespace(path=str(tmp_path / tid), config={"overrides": {"model.loss.alpha": 0.1}},
                                     metrics_dataframe=pd.DataFrame([{"epoch": e + 1, "loss": 1.0} for e in range(epochs)]),
                                     metrics=None, error=None)

    cfg = load_config(REPO_ROOT / "configs" / "tiny_bbox.yaml", ["train.epochs=2", "train.lr_steps=[]"])
    results = [result("a", 1), result("b", 1), result("c", 0), result("d", 2)]
    records = trial_records(results, cfg, SearchSettings("s", "loss", mode="min"), tmp_path, statuses, interrupted=True)
    assert [(r.trial_id, r.status) for r in records] == [("a", "EARLY_STOPPED"), ("b", "KILLED"), ("c", "KILLED"),
                                                         ("d", "FINISHED")]
    records = trial_records(results, cfg, SearchSettings("s", "loss", mode="min"), tmp_path, statuses)
    assert [r.status for r in records] == ["EARLY_STOPPED", "EARLY_STOPPED", "EARLY_STOPPED", "FINISHED"]
    assert tune_statuses(types.SimpleNamespace(experiment_path=str(tmp_path / "none"), _experiment_analysis=in_memory)) \
        == dict.fromkeys("abcd", "TERMINATED")


@pytest.mark.parametrize("grace_period", [1, 2])
def test_asha_never_stops_a_trial_at_its_last_epoch(grace_period):
    """Ray's ASHA has a rung at max_t itself: a trial below its cutoff was stopped right after reporting
    its last epoch (while it was still saving). Ours lets it finish and still stops at earlier rungs."""
    import types

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from pipelines.tune.scheduler import LastEpochASHA

    def decisions(scheduler_class) -> list[str]:
        scheduler = scheduler_class(time_attr="epoch", metric="loss", mode="min", max_t=2, grace_period=grace_period,
                                    reduction_factor=2, stop_last_trials=False)
        good, bad = types.SimpleNamespace(trial_id="good"), types.SimpleNamespace(trial_id="bad")
        for trial in (good, bad):
            scheduler.on_trial_add(None, trial)
        out = []
        for trial, epoch, loss in ((good, 1, 2.9), (good, 2, 2.7), (bad, 1, 2.8), (bad, 2, 3.1)):
            out.append(scheduler.on_trial_result(None, trial, {"epoch": epoch, "loss": loss}))
        return out

    from pipelines.tune.records import SearchSettings
    from pipelines.tune.trials import _scheduler

    assert type(_scheduler(SearchSettings("s", "loss", mode="min", grace_period=grace_period), 2)) is LastEpochASHA
    c, stop = TrialScheduler.CONTINUE, TrialScheduler.STOP
    assert decisions(ASHAScheduler)[-1] == stop  # Ray's: the last epoch's report stops a finished trial
    assert decisions(LastEpochASHA) == [c, c, c, c]
    # an earlier rung still stops a weak trial (grace period 1: the rung at epoch 1)
    scheduler = LastEpochASHA(time_attr="epoch", metric="loss", mode="min", max_t=3, grace_period=1,
                              reduction_factor=2, stop_last_trials=False)
    a, b = types.SimpleNamespace(trial_id="a"), types.SimpleNamespace(trial_id="b")
    for trial in (a, b):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, a, {"epoch": 1, "loss": 1.0}) == c
    assert scheduler.on_trial_result(None, b, {"epoch": 1, "loss": 2.0}) == stop


def _trial_journal(tmp_path: Path, name: str, store: str, epochs: int, end: str | None):
    """A trial's run directory as its workers left it: ``epochs`` epochs logged and uploaded, the run
    ended ``end`` (None: the workers were killed before they ended it)."""
    from pipelines.tracking.tracker import RunTracker

    run_dir = tmp_path / "trials" / name
    run_dir.mkdir(parents=True)
    tracker = RunTracker(run_dir, store, "lsnet-tiny", name, background=False, verbose=False)
    records = []
    for epoch in range(1, epochs + 1):
        tracker.log_metrics({"epoch": epoch, "epoch_loss": 3.0 - epoch / 10, "bbox_AP": epoch / 100}, step=epoch * 4)
        records.append({"epoch": epoch, "loss": 3.0 - epoch / 10, "loss_cls": 1.0, "bbox_AP": epoch / 100})
    (run_dir / "epochs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "workers").mkdir()  # the worker is gone: a pid no process has
    (run_dir / "workers" / "rank0.json").write_text(json.dumps({"pid": 2**22 + 7, "hostname": "elsewhere"}))
    tracker.flush()
    if end is not None:
        tracker.close(end, final_flush_timeout_s=5)
    return run_dir


@pytest.mark.parametrize("left, status, mlflow_status", [
    (None, "FINISHED", "FINISHED"),          # killed while saving after its last epoch: the report's FINISHED
    ("FAILED", "EARLY_STOPPED", "FINISHED"),  # Tune stopped it; its driver saw the workers die and said FAILED
    (None, "KILLED", "KILLED"),               # the search was interrupted
    ("FINISHED", "FINISHED", "FINISHED"),     # ended by itself: left as it is
])
def test_child_run_ends_with_the_report_status(tmp_path, left, status, mlflow_status):
    from pipelines.tracking.journal import Journal
    from pipelines.tune.records import TrialRecord
    from pipelines.tune.report import close_child_run

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    epochs = 1 if status == "EARLY_STOPPED" else 2
    run_dir = _trial_journal(tmp_path, "s-t_00000", store, epochs, left)
    cfg = load_config(REPO_ROOT / "configs" / "tiny_bbox.yaml", ["train.epochs=2", "train.lr_steps=[]"])
    record = TrialRecord("t_00000", "s-t_00000", run_dir, {"model.loss.alpha": 0.1}, status, epochs, 0.02, 0.02)
    close_child_run(record, cfg, store, {"lsnet.search": "s"})
    client, runs = mlflow_runs(store)
    (run,) = runs
    assert run.info.run_id == record.mlflow_run_id and run.info.status == mlflow_status
    assert [m.value for m in sorted(client.get_metric_history(run.info.run_id, "epoch"), key=lambda m: m.step)] == \
        [float(e) for e in range(1, epochs + 1)]
    assert Journal(run_dir).end_status() == mlflow_status and Journal(run_dir).pending() == 0
    curves = {a.path for a in client.list_artifacts(run.info.run_id, "curves")}
    if status == "EARLY_STOPPED":
        assert run.data.tags["lsnet.early_stopped"] == "true" and run.data.tags["lsnet.stopped_after_epoch"] == "1"
        assert curves == {"curves/loss.png", "curves/bbox_AP.png"}  # drawn by the driver: rank 0 never did
    if status == "KILLED":
        assert "--resume" in run.data.tags["mlflow.note.content"] and curves == {"curves/loss.png", "curves/bbox_AP.png"}
    if status == "FINISHED":
        assert "lsnet.early_stopped" not in run.data.tags and "mlflow.note.content" not in run.data.tags
