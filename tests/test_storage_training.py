"""Training with everything on object storage (issue 20, part 1): shards, checkpoints, weights, the run's
records and its tracking journal at ``run.storage_path=s3://bucket/runs``, nothing a later step needs on the
driver's disk.

``lsnet train`` runs as a user runs it (its own process, its own local Ray, the AWS variables in its
environment): a worker killed mid-run resumes from the newest complete checkpoint in the bucket, and the
run resubmitted under the same name -- by a driver with an empty disk -- continues it (same MLflow run),
this time reading the stored shards through the Ray Data reader (the first run used the map-style one).
``lsnet tune`` and ``lsnet ablation run`` on the bucket (with ``--resume`` from an empty driver disk) are
opt-in (``LSNET_CLUSTER_TESTS=1``): minutes each here.

Tiny model (ResNet-18, 64 channels), 128-px images, 8 training images, 2 workers, 2 steps per epoch.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import servers
import torch

from lsnet import storage

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]
#: minutes each on this 2-core machine: opt-in (tests/servers.py)
cluster_opt_in = pytest.mark.skipif(not servers.cluster_tests_enabled(),
                                    reason=f"opt-in: {servers.CLUSTER_TESTS_ENV}=1")


@pytest.fixture(scope="module")
def stored_shards(bucket, tmp_path_factory):
    """Synthetic train (8 images) and val (4) shards written straight to the bucket."""
    from lsnet.data.synthetic import write_synthetic_coco
    from pipelines.preprocess import preprocess

    root = tmp_path_factory.mktemp("stored_shards")
    train = write_synthetic_coco(root / "synth_train", num_images=8, image_size=(128, 128), seed=0)
    val = write_synthetic_coco(root / "synth_val", num_images=4, image_size=(128, 128), seed=1, split="val",
                               first_image_id=5000)
    for data, split in ((train, "train"), (val, "val")):
        preprocess(data.instances_json, data.image_dir, bucket.uri("shards", split), max_size=128,
                   contour_points=(18,), executor="local", verbose=False)
    return bucket.uri("shards")


def train_overrides(shards: str, storage_path: str, tracking_uri: str, *extra: str) -> list[str]:
    """The settings of tests/test_train_pipeline.py's tiny run, with the given shards/storage/tracking."""
    return [f"data.train_shards={shards}/train", f"data.val_shards={shards}/val",
            f"run.storage_path={storage_path}", "train.epochs=2", "train.lr_steps=[1]", "train.eval_every=2",
            "train.log_every=1", "train.warmup_iters=2", "eval.num_overlays=1", "data.verify=size",
            "tracking.flush_interval_s=0.5", f"tracking.uri={tracking_uri}", "model.test.score_thr=0.0",
            "model.loss.atss_on=anchors", *extra]


def lsnet_cli(args: list[str], cwd: Path, timeout_s: float = 500) -> subprocess.CompletedProcess:
    """``lsnet ARGS`` in a fresh process started in ``cwd`` (its HOME and scratch directory there too:
    nothing of an earlier driver's disk is at hand)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HOME": str(cwd), "LSNET_SCRATCH_DIR": str(cwd)}
    env.pop("RAY_ADDRESS", None)
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout_s, check=False)


def lsnet_train(name: str, overrides: list[str], cwd: Path, timeout_s: float = 400) -> subprocess.CompletedProcess:
    """``lsnet train configs/tiny_bbox.yaml --name NAME --set ...`` from an empty driver disk (:func:`lsnet_cli`)."""
    args = ["train", str(REPO_ROOT / "configs" / "tiny_bbox.yaml"), "--name", name]
    for item in overrides:
        args += ["--set", item]
    return lsnet_cli(args, cwd, timeout_s)


def _stored_weights(uri: str) -> dict[str, torch.Tensor]:
    import io

    return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)["model"]


@pytest.mark.long
def test_a_run_on_the_bucket_resumes_after_a_kill_and_when_resubmitted(bucket, stored_shards, tmp_path):
    from mlflow.tracking import MlflowClient

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = bucket.uri("runs")
    run = storage.join(runs, "s3run")
    first = lsnet_train("s3run", train_overrides(stored_shards, runs, tracking_uri, "run.fail_at_step=3",
                                                 "run.fail_rank=1", "run.max_failures=2"), tmp_path / "driver1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    keys = bucket.objects("runs/s3run/")
    names = {k.removeprefix("runs/s3run/") for k in keys}
    # the fault fired (its marker is in the bucket), and the restarted workers resumed from the epoch-1
    # checkpoint, which they read from the bucket
    assert "fault_injected.marker" in names
    for rank in (0, 1):
        info = json.loads(storage.read_text(storage.join(run, "workers", f"rank{rank}.json")))
        assert info["resumed_from"] == {"epoch": 1, "step": 2}
    # checkpoints (with every rank's RNG state), weights and the run's records are in the bucket
    assert {"checkpoint_epoch_0002/state.pt", "checkpoint_epoch_0002/rng_rank1.pt", "model_final.pt",
            "model_best.pt", "config.yaml", "epochs.jsonl", "mlflow_journal/state.json"} <= names
    final = _stored_weights(storage.join(run, "model_final.pt"))
    state = _stored_weights(storage.join(run, "checkpoint_epoch_0002", "state.pt"))
    assert all(torch.equal(final[k], state[k]) for k in final)
    journal = json.loads(storage.read_text(storage.join(run, "mlflow_journal", "state.json")))
    client = MlflowClient(tracking_uri)
    assert client.get_run(journal["run_id"]).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(journal["run_id"], "loss")) == [1, 2, 3, 4]
    assert "run directory: " + run in first.stdout

    # resubmitted under the same name with one more epoch, from another directory and HOME (an empty
    # driver disk), with one worker reading through Ray Data (whose tasks need the second CPU): it
    # continues from the bucket's newest complete checkpoint
    second = lsnet_train("s3run", train_overrides(stored_shards, runs, tracking_uri, "train.epochs=3",
                                                  "data.reader=ray_data", "run.num_workers=1"),
                         tmp_path / "driver2")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    assert f"[resume] newest complete checkpoint: {run}/checkpoint_epoch_0002" in second.stdout
    info = json.loads(storage.read_text(storage.join(run, "workers", "rank0.json")))
    assert info["resumed_from"] == {"epoch": 2, "step": 4}
    final = json.loads(second.stdout[second.stdout.rindex("{"):])
    assert final["epoch"] == 3 and final["global_step"] == 8  # + 8 images / 1 worker / batch 2
    # the same MLflow run continued (its journal came from the bucket), each step logged once
    assert json.loads(storage.read_text(storage.join(run, "mlflow_journal", "state.json")))["run_id"] == journal["run_id"]
    assert sorted(m.step for m in client.get_metric_history(journal["run_id"], "loss")) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert client.get_run(journal["run_id"]).info.status == "FINISHED"
    epochs = [json.loads(line)["epoch"] for line in storage.read_text(storage.join(run, "epochs.jsonl")).splitlines()]
    assert epochs[-1] == 3 and set(epochs) == {1, 2, 3}


@cluster_opt_in
def test_a_search_on_the_bucket_and_its_resume_from_an_empty_driver_disk(bucket, stored_shards, tmp_path):
    """``lsnet tune`` with ``run.storage_path=s3://...``: Tune's state, the search's own records and every
    trial's run live in the bucket; ``--resume`` from another directory and HOME finds the search there
    (its settings, its parent MLflow run) and, every trial being done, re-runs none."""
    import yaml
    from mlflow.tracking import MlflowClient

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = tmp_path / "alpha.yaml"
    space.write_text(yaml.safe_dump({"space": {"model.loss.alpha": {"grid": [0.0, 0.3]}},
                                     "scheduler": {"name": "fifo"}}))
    overrides = train_overrides(stored_shards, bucket.uri("searches"), tracking_uri, "train.epochs=1",
                                "train.eval_every=1", "run.num_workers=1", "eval.num_overlays=0")

    def tune(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
        args = ["tune", str(REPO_ROOT / "configs" / "tiny_bbox.yaml"), "--space", str(space), "--name", "s3search",
                "--max-concurrent", "2", *extra]
        for item in overrides:
            args += ["--set", item]
        return lsnet_cli(args, cwd)

    first = tune(tmp_path / "driver1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    names = {k.removeprefix("searches/s3search/") for k in bucket.objects("searches/s3search/")}
    assert {"search.json", "parent/mlflow_journal/state.json", "base_config.yaml"} <= names
    trial_runs = {n.split("/")[1] for n in names if n.startswith("trials/")}
    assert len(trial_runs) == 2
    for trial in trial_runs:
        assert {f"trials/{trial}/checkpoint_epoch_0001/state.pt", f"trials/{trial}/model_final.pt",
                f"trials/{trial}/mlflow_journal/state.json"} <= names
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = json.loads(storage.read_text(bucket.uri("searches", "s3search", "parent", "mlflow_journal",
                                                     "state.json")))["run_id"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(runs) == 3 and len(children) == 2
    assert {r.info.status for r in runs} == {"FINISHED"}

    started = {t: storage.read_text(bucket.uri("searches", "s3search", "trials", t, "workers", "rank0.json"))
               for t in trial_runs}
    again = tune(tmp_path / "driver2", "--resume")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 3  # the same parent run, no trial re-run
    assert started == {t: storage.read_text(bucket.uri("searches", "s3search", "trials", t, "workers", "rank0.json"))
                       for t in trial_runs}  # no worker of a trial started again


@cluster_opt_in
def test_an_ablation_table_on_the_bucket(bucket, tmp_path):
    """``lsnet ablation run --out s3://...``: the prepared shards, the runs and the rendered table are in the
    bucket; ``--resume`` from an empty driver disk reads the table's runs there (and, the run having
    finished, says there is nothing to resume)."""
    out = bucket.uri("ablations")
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def ablation(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
        return lsnet_cli(["ablation", "run", "table2", "--scale", "tiny", "--out", out, "--tracking-uri", tracking_uri,
                          "--variants", "cross_iou_extreme", "--set", "train.epochs=1", "--set", "train.lr_steps=[]",
                          "--set", "train.eval_every=1", *extra], cwd)

    first = ablation(tmp_path / "driver1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    keys = bucket.objects("ablations/")
    runs = {k.split("/")[2] for k in keys if k.startswith("ablations/runs/")}
    assert len(runs) == 1
    (run,) = runs
    assert f"ablations/runs/{run}/ablation.json" in keys
    assert f"ablations/runs/{run}/parent/mlflow_journal/state.json" in keys
    assert any(k.startswith(f"ablations/runs/{run}/trials/") and k.endswith("checkpoint_epoch_0001/state.pt")
               for k in keys)
    assert any(k.startswith("ablations/data/") and k.endswith("/manifest.json") for k in keys)
    assert any(k.startswith("ablations/table2-tiny/") and k.endswith(".md") for k in keys), keys

    again = ablation(tmp_path / "driver2", "--resume")
    assert again.returncode == 2 and f"the newest, {run}, finished" in again.stderr, again.stderr[-3000:]
