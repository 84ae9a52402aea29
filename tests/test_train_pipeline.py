"""Distributed training on Ray Train, end to end on synthetic shards (issue 5).

- a 2-worker CPU run: losses/lr/throughput per step and COCO metrics per evaluation appear in MLflow
  under the documented names, with params, tags and artifacts;
- a worker killed mid-run (``os._exit`` after a given step, once): Ray restarts the worker group from
  the latest checkpoint and the final weights equal the uninterrupted run's exactly;
- two simulated nodes (``ray.cluster_utils.Cluster``, in a subprocess with its own Ray), one worker on
  each, reading through Ray Data: the same weights again;
- config errors from ``lsnet train``.

Tiny model (ResNet-18, 64 channels), 128-px images, 8 training images, 2 epochs of 2 steps per worker.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipelines.config import load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

STEP_METRICS = {"loss", "loss_cls", "loss_vec_init", "loss_vec_refine", "lr", "images_per_s"}
BBOX_METRICS = {f"bbox_{k}" for k in ("AP", "AP50", "AP75", "APs", "APm", "APl",
                                      "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_session):
    """Synthetic train (8 images) and val (4 images) sets, 128 px, preprocessed with Ray Data."""
    from lsnet.data.synthetic import write_synthetic_coco
    from pipelines.preprocess import preprocess

    root = tmp_path_factory.mktemp("train_pipeline")
    train = write_synthetic_coco(root / "synth_train", num_images=8, image_size=(128, 128), seed=0)
    val = write_synthetic_coco(root / "synth_val", num_images=4, image_size=(128, 128), seed=1,
                               split="val", first_image_id=5000)
    preprocess(train.instances_json, train.image_dir, root / "shards" / "train", max_size=128,
               contour_points=(18,), verbose=False)
    preprocess(val.instances_json, val.image_dir, root / "shards" / "val", max_size=128,
               contour_points=(18,), verbose=False)
    return root


def tiny_config(root: Path, *extra: str):
    return load_config(REPO_ROOT / "configs" / "tiny_bbox.yaml", [
        f"data.train_shards={root / 'shards' / 'train'}", f"data.val_shards={root / 'shards' / 'val'}",
        f"run.storage_path={root / 'runs'}", "train.epochs=2", "train.lr_steps=[1]", "train.eval_every=2",
        "train.log_every=1", "train.warmup_iters=2", "eval.num_overlays=2", "data.verify=sha256",
        "tracking.flush_interval_s=0.5", f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        # score threshold 0: a 4-step model scores below the default 0.05 everywhere, and an AP of 0
        # would not tell a right evaluation from a broken one
        "model.test.score_thr=0.0",
        # stage 2 on the anchor squares: after 4 steps the stage-1 boxes that atss_on=init assigns on are
        # still noise, and AP would stay 0
        "model.loss.atss_on=anchors", *extra,
    ])


@pytest.fixture(scope="module")
def uninterrupted(shards, monkeypatch_module):
    from pipelines.train.driver import run_training

    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    return run_training(tiny_config(shards), run_name="uninterrupted", verbose=False)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _evaluate_locally(run_dir: Path) -> dict[str, float]:
    """COCO metrics of the run's model_final.pt on all of its validation shards, in this process."""
    import contextlib
    import io

    from lsnet.engine import evaluate
    from lsnet.modeling import build_model
    from pipelines.train.parts import _build_loaders

    cfg = load_config(run_dir / "config.yaml")
    _, _, _, val_ds, val_loader = _build_loaders(cfg, 0, 1, False)
    model = build_model(cfg.model)
    model.load_state_dict(_weights(run_dir / "model_final.pt"))
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluate(model, val_loader, val_ds.gt_path, val_ds.category_ids, cfg.model.task)


def test_two_worker_run_logs_to_mlflow(uninterrupted):
    from mlflow.tracking import MlflowClient

    out = uninterrupted
    run_dir = out.run_dir
    assert out.tracking_uri == f"sqlite:///{run_dir.parent.parent / 'mlflow.db'}"  # one store for all runs
    assert out.metrics["epoch"] == 2 and out.metrics["global_step"] == 4  # 8 images / 2 workers / batch 2
    workers = [json.loads((run_dir / "workers" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [w["world_size"] for w in workers] == [2, 2] and workers[0]["pid"] != workers[1]["pid"]
    assert workers[0]["resumed_from"] is None

    client = MlflowClient(out.tracking_uri)
    run = client.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    metrics = set(run.data.metrics)
    assert STEP_METRICS <= metrics and BBOX_METRICS <= metrics
    for key in STEP_METRICS:  # one value per optimiser step, each step once
        assert [m.step for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)] \
            == [1, 2, 3, 4], key
    ap = client.get_metric_history(run.info.run_id, "bbox_AP")
    assert [m.step for m in ap] == [4]
    # The logged numbers are over every validation image (each worker predicts half, rank 0 gathers):
    # the same final weights evaluated here in one process give the same numbers.
    logged = {k: client.get_metric_history(run.info.run_id, k)[-1].value for k in ("bbox_AP", "bbox_AR100")}
    local = _evaluate_locally(run_dir)
    for key, value in logged.items():
        assert value == pytest.approx(local[key], abs=1e-9), (key, value, local[key])
    # measured on this run (CPU, score threshold 0): AP 0.0034, AR100 0.0375 -- small but not 0
    assert logged["bbox_AP"] > 0.001 and logged["bbox_AR100"] > 0.015, logged
    lr = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "lr")}
    # global batch 4 -> 0.08 * 4 / 16 = 0.02; warmup 2 steps from 0.1x, x0.1 after epoch 1 (step 2)
    assert lr[1] == pytest.approx(0.02 * (0.1 + 0.9 * 1 / 2))
    assert lr[3] == pytest.approx(0.002) and lr[4] == pytest.approx(0.002)
    params = run.data.params
    assert params["model.backbone"] == "resnet18" and params["train.epochs"] == "2"
    assert params["run.num_workers"] == "2" and params["name"] == "tiny_bbox"
    tags = run.data.tags
    for tag in ("git_commit", "config_name", "dataset_manifest_sha256", "ray_job_id"):
        assert tags.get(tag), tag
    assert tags["config_name"] == "tiny_bbox" and len(tags["dataset_manifest_sha256"]) == 64
    # what the MLflow UI shows (item 17): a model-training experiment, creator and source, the shard sets
    # as dataset inputs, and the final weights as the run's MLflow model
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.user"] and tags["mlflow.source.name"] == "lsnet train"
    assert tags["mlflow.source.git.commit"] == tags["git_commit"].removesuffix("-dirty")
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert {k: d.name for k, d in inputs.items()} == {"train": "train", "val": "val"}
    assert inputs["train"].digest == tags["dataset_manifest_sha256"][:36]
    (output,) = run.outputs.model_outputs
    model_info = client.get_logged_model(output.model_id)
    assert model_info.source_run_id == run.info.run_id and output.step == 4
    assert model_info.tags["mlflow.source.name"] == "lsnet train"  # the UI's "Logged from"
    import mlflow.pytorch

    mlflow.set_tracking_uri(out.tracking_uri)  # reset by conftest after the test
    logged = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model").state_dict()
    final = _weights(run_dir / "model_final.pt")
    assert logged.keys() == final.keys() and all(torch.equal(logged[k], final[k]) for k in final)

    def files(path=None):
        out = []
        for item in client.list_artifacts(run.info.run_id, path):
            out += files(item.path) if item.is_dir else [item.path]
        return out

    artifacts = set(files())
    assert {"config/config.yaml", "checkpoints/model_final.pt", "checkpoints/model_best.pt",
            "eval/per_category_bbox_epoch0002.txt"} <= artifacts
    assert len([a for a in artifacts if a.startswith("overlays/epoch_0002/") and a.endswith(".png")]) == 2
    # Ray kept the latest checkpoint (which is also the only evaluated, hence best, one)
    ckpts = sorted(p.name for p in run_dir.glob("checkpoint_epoch_*"))
    assert ckpts[-1] == "checkpoint_epoch_0002" and len(ckpts) <= 2
    state = torch.load(run_dir / "checkpoint_epoch_0002" / "state.pt", weights_only=True)
    assert state["train_state"]["global_step"] == 4
    assert (run_dir / "checkpoint_epoch_0002" / "rng_rank1.pt").exists()
    # the final weights file is the last checkpoint's model
    final = _weights(run_dir / "model_final.pt")
    assert all(torch.equal(final[k], state["model"][k]) for k in final)
    # every weights file carries the test-time data settings (lsnet predict uses them by default)
    for path in (run_dir / "model_final.pt", run_dir / "model_best.pt", run_dir / "checkpoint_epoch_0002" / "state.pt"):
        extra = torch.load(path, weights_only=True)["extra"]
        assert extra["data_config"] == {"test_scale": 128, "max_size": 128, "flip_test": False}, path


def test_killed_worker_resumes_to_identical_weights(shards, uninterrupted):
    """Worker 1 exits abruptly after step 3 (epoch 2); Ray restarts the group from the epoch-1
    checkpoint; the final weights equal the uninterrupted run's bit for bit (CPU)."""
    from mlflow.tracking import MlflowClient

    from pipelines.train.driver import run_training
    from pipelines.train.rundir import FAULT_MARKER

    out = run_training(tiny_config(shards, "run.fail_at_step=3", "run.fail_rank=1", "run.max_failures=2"),
                       run_name="killed", verbose=False)
    assert (out.run_dir / FAULT_MARKER).exists()  # the fault really fired
    # the restarted workers continued from the epoch-1 checkpoint (not from scratch)
    for rank in (0, 1):
        info = json.loads((out.run_dir / "workers" / f"rank{rank}.json").read_text())
        assert info["resumed_from"] == {"epoch": 1, "step": 2}
    assert out.metrics["global_step"] == 4
    resumed = _weights(out.run_dir / "model_final.pt")
    reference = _weights(uninterrupted.run_dir / "model_final.pt")
    assert resumed.keys() == reference.keys()
    different = [k for k in reference if not torch.equal(resumed[k], reference[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    # ... and the fault changed nothing else: one MLflow run, each step logged once
    client = MlflowClient(out.tracking_uri)
    runs = client.search_runs([client.get_run(out.mlflow_run_id).info.experiment_id],
                              filter_string="attributes.run_name = 'killed'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(out.mlflow_run_id, "loss")) == [1, 2, 3, 4]


MULTINODE_SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from pipelines.config import load_config
    from pipelines.train.driver import run_training

    # 2 CPUs per node: one for the node's training worker, one for Ray Data's read tasks; the custom
    # resource "node_slot" (one per node, one per worker) puts one worker on each node
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"node_slot": 1},
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={"node_slot": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    out = run_training(load_config(sys.argv[1]), run_name="multinode", verbose=False)
    workers = [json.load(open(f"{out.run_dir}/workers/rank{r}.json")) for r in range(2)]
    print("RESULT " + json.dumps({"nodes": nodes, "workers": [w["node_id"] for w in workers],
                                  "step": out.metrics["global_step"], "run_dir": str(out.run_dir)}))
    ray.shutdown()
    cluster.shutdown()
""")


@pytest.mark.long
def test_two_simulated_nodes_with_the_ray_data_reader_train_identically(shards, uninterrupted):
    """Two simulated nodes (one worker each) and data.reader=ray_data, which streams the same per-rank
    samples through Ray Data tasks: the final weights equal the one-node map-style run's bit for bit.
    """
    cfg = tiny_config(shards, "data.reader=ray_data", "run.resources_per_worker={CPU: 1, node_slot: 1}",
                      "tracking.enabled=false", "data.val_shards=null", f"run.storage_path={shards / 'runs_2n'}")
    config_file = shards / "two_nodes.yaml"
    config_file.write_text(cfg.to_yaml())
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", MULTINODE_SCRIPT, str(config_file)], cwd=REPO_ROOT,
                          env=env, check=False, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert len(result["nodes"]) == 2
    # one worker on each node: the two workers report the two different nodes of the cluster
    assert sorted(result["workers"]) == result["nodes"]
    assert result["step"] == 4  # 8 images / 2 workers / batch 2, 2 epochs
    streamed = _weights(Path(result["run_dir"]) / "model_final.pt")
    reference = _weights(uninterrupted.run_dir / "model_final.pt")
    assert streamed.keys() == reference.keys()
    assert all(torch.equal(streamed[k], reference[k]) for k in reference)


def test_cli_config_errors(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["train", str(REPO_ROOT / "configs" / "tiny_bbox.yaml"), "--set", "train.epocs=3"]) == 2
    assert "unknown config key train.epocs" in capsys.readouterr().err
    assert main(["train", str(REPO_ROOT / "configs" / "tiny_bbox.yaml"), "--set", "run.num_workers=two"]) == 2
    assert "run.num_workers" in capsys.readouterr().err
    assert main(["train", str(REPO_ROOT / "configs" / "tiny_bbox.yaml"), "--num-workers", "3",
                 "--set", "train.epochs=5", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "num_workers: 3" in printed and "epochs: 5" in printed


def test_missing_shards_is_a_clear_error(tmp_path, ray_session):
    from lsnet.errors import LsnetError
    from pipelines.train.driver import run_training

    cfg = load_config(REPO_ROOT / "configs" / "tiny_bbox.yaml",
                      [f"data.train_shards={tmp_path / 'nope'}", f"run.storage_path={tmp_path / 'runs'}"])
    with pytest.raises(LsnetError, match="nope.*manifest.json"):
        run_training(cfg, run_name="missing", verbose=False)


def test_demo_smoke(tmp_path, ray_session, capsys, monkeypatch):
    """`lsnet demo` end to end at toy size (the real demo trains for a few minutes)."""
    from pipelines.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # the demo must ignore it
    assert main(["demo", "--out", str(tmp_path), "--num-train", "4", "--num-val", "2", "--epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "bbox_AP" in printed and "--backend-store-uri sqlite:///" in printed and "--host 127.0.0.1" in printed
    run_dir = next((tmp_path / "runs").glob("demo-synthetic-bbox-*"))
    assert len(list((run_dir / "overlays" / "epoch_0001").glob("*.png"))) == 2
    # the demo's own store, beside its data and runs (never the checkout's shared results/mlflow.db)
    assert f"--backend-store-uri sqlite:///{tmp_path.resolve() / 'mlflow.db'}" in printed
    assert (tmp_path / "mlflow.db").exists() and (run_dir / "model_final.pt").exists()
