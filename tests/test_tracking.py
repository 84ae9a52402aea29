"""MLflow tracking through the local journal: embedded SQLite store, a real server that goes down
mid-run and comes back, and ``lsnet mlflow-sync`` for what is still buffered at the end."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipelines.tracking import store as tracking
from pipelines.tracking.journal import Journal, sync_run_dir
from pipelines.tracking.tracker import RunTracker, shard_dataset

pytestmark = pytest.mark.filterwarnings("ignore")

MLFLOW_BIN = Path(sys.executable).with_name("mlflow")


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite backend in a temp dir."""

    def __init__(self, root: Path, port: int):
        self.root, self.port = root, port
        self.uri = f"http://127.0.0.1:{port}"
        self.proc = None

    def start(self, timeout_s: float = 120.0) -> None:
        cmd = [
            str(MLFLOW_BIN), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
            "--artifacts-destination", str(self.root / "server_artifacts"),
        ]
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 - owned by the server process
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("mlflow server did not come up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server's own process group (workers included)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "server", _free_port())
    server.root.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def default_store(tmp_path, monkeypatch) -> Path:
    """This test's stand-in for the checkout's shared ``results/mlflow.db``."""
    store = tmp_path / "results" / "mlflow.db"
    monkeypatch.setattr(tracking, "default_store_path", lambda: store)
    return store


def test_new_stores_are_copies_of_one_migrated_template(tmp_path, monkeypatch):
    """The first new store builds the template (MLflow's migrations); later ones copy it and are
    complete, independent MLflow stores."""
    import mlflow

    from pipelines.tracking.store import prepare_sqlite_store

    monkeypatch.setenv("LSNET_CACHE_DIR", str(tmp_path / "cache"))
    template = tmp_path / "cache" / f"mlflow-{mlflow.__version__}-empty.db"
    first, second = tmp_path / "a" / "mlflow.db", tmp_path / "b" / "mlflow.db"
    prepare_sqlite_store(f"sqlite:///{first}")
    assert template.is_file() and first.read_bytes() == template.read_bytes()
    prepare_sqlite_store(f"sqlite:///{second}")
    assert second.read_bytes() == template.read_bytes()
    ids = []
    for path in (first, second):
        client = _client(f"sqlite:///{path}")
        run = client.create_run(client.create_experiment("e"))
        client.log_metric(run.info.run_id, "m", 2.5)
        ids.append(run.info.run_id)
    assert _client(f"sqlite:///{second}").get_run(ids[1]).data.metrics == {"m": 2.5}
    assert _client(f"sqlite:///{first}").search_runs(["1"])[0].info.run_id == ids[0]  # not the other's
    assert template.read_bytes() != first.read_bytes()  # the template itself is never written to
    prepare_sqlite_store(f"sqlite:///{first}")  # an existing store is left alone
    assert _client(f"sqlite:///{first}").get_run(ids[0]).data.metrics == {"m": 2.5}


def test_embedded_sqlite_store_default(tmp_path, monkeypatch, default_store):
    """Default URI is the checkout's shared store (before: a store per run directory, so the UI could
    never compare two runs); params/metrics/tags/artifacts land in it, artifacts beside it; the
    experiment is a model-training one (MLflow 3 otherwise files it under GenAI)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    tracker = RunTracker(run_dir, experiment_name="unit", background=False, verbose=False)
    assert tracker.tracking_uri == f"sqlite:///{default_store}"
    tracker.log_params({"model.num_classes": 3, "train.lr": 0.01, "name": "tiny"})
    for step in range(5):
        tracker.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.01}, step=step)
    tracker.log_metrics({"loss": 123.0}, step=2)  # same (key, step) again: dropped
    tracker.log_metrics({"weird": float("nan")}, step=0)
    tracker.set_tags({"config_name": "tiny_bbox"})
    (tmp_path / "table.txt").write_text("cat AP\n")
    tracker.log_artifact(tmp_path / "table.txt", "eval")
    tracker.log_text("a: 1\n", "config/resolved.yaml")
    assert tracker.close() is True
    assert tracker.journal.pending() == 0

    client = _client(tracker.tracking_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"model.num_classes": "3", "train.lr": "0.01", "name": "tiny"}
    assert run.data.tags["config_name"] == "tiny_bbox"
    assert _history(client, tracker.run_id, "loss") == [(s, 1.0 / (s + 1)) for s in range(5)]
    assert str(client.get_metric_history(tracker.run_id, "weird")[0].value) == "nan"
    artifacts = {a.path for a in client.list_artifacts(tracker.run_id, "eval")}
    assert artifacts == {"eval/table.txt"}
    local = Path(client.download_artifacts(tracker.run_id, "config/resolved.yaml", str(tmp_path)))
    assert local.read_text() == "a: 1\n"
    # artifacts live beside the store, per experiment, not in ./mlruns of the cwd
    assert (default_store.parent / "mlartifacts" / "unit" / tracker.run_id / "artifacts" / "eval" / "table.txt").is_file()
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert not (run_dir / "mlflow.db").exists()
    # staged copies are removed once uploaded
    assert not any((run_dir / "mlflow_journal" / "files").rglob("*.txt"))


def test_reopen_continues_same_run_without_duplicates(tmp_path, monkeypatch):
    """A Ray Train restart reopens the run dir: same MLflow run, replayed steps are not duplicated."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    first = RunTracker(run_dir, background=False, verbose=False)
    for step in range(4):
        first.log_metrics({"loss": float(step)}, step)
    first.flush()
    run_id = first.run_id
    # "crash": no close(); the restarted worker replays steps 2..3 then continues
    second = RunTracker(run_dir, background=False, verbose=False)
    for step in range(2, 6):
        second.log_metrics({"loss": float(step)}, step)
    second.close()
    assert second.run_id == run_id
    client = _client(second.tracking_uri)
    assert _history(client, run_id, "loss") == [(s, float(s)) for s in range(6)]
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1


def test_an_ended_run_reopened_is_running_until_closed_again(tmp_path):
    """``lsnet ablation run --resume`` reopens its FAILED parent run: RUNNING again, then the new end."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker(tmp_path / "run", uri, background=False, verbose=False)
    tracker.close("FAILED")
    client = _client(uri)
    assert client.get_run(tracker.run_id).info.status == "FAILED"
    again = RunTracker(tmp_path / "run", background=False, verbose=False)
    assert again.journal.end_status() == "FAILED"
    again.reopen()
    assert again.journal.end_status() is None and again.flush()
    assert client.get_run(again.run_id).info.status == "RUNNING" and again.run_id == tracker.run_id
    again.close("FINISHED")
    assert again.journal.end_status() == "FINISHED" and client.get_run(again.run_id).info.status == "FINISHED"


def test_lost_acknowledgement_is_replayed_without_duplicates(tmp_path, monkeypatch):
    """Crash after an upload but before state.json: the records are sent again, and the store
    ignores the exact duplicates; a run created without its id being saved is found by its tag."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    tracker = RunTracker(run_dir, background=False, verbose=False)
    tracker.log_params({"a": 1})
    for step in range(3):
        tracker.log_metrics({"loss": step + 0.5, "lr": 0.1}, step)
    assert tracker.flush()
    run_id = tracker.run_id
    tracker.journal.save_state(synced_seq=0, run_id=None)  # forget every acknowledgement
    assert sync_run_dir(run_dir)[1] == 0
    journal = Journal(run_dir)
    assert journal.state["run_id"] == run_id
    client = _client(tracker.tracking_uri)
    assert _history(client, run_id, "loss") == [(0, 0.5), (1, 1.5), (2, 2.5)]
    assert _history(client, run_id, "lr") == [(0, 0.1), (1, 0.1), (2, 0.1)]


def test_rejected_record_does_not_block_the_rest(tmp_path, monkeypatch):
    """A param re-logged with another value (e.g. a re-run with a changed config) is refused by
    MLflow forever: it is set aside in rejected.jsonl and everything after it still goes up."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    tracker = RunTracker(run_dir, background=False, verbose=False)
    tracker.log_params({"train.epochs": 2})
    assert tracker.flush()
    tracker.log_params({"train.epochs": 4})
    tracker.log_metrics({"loss": 1.5}, step=7)
    assert tracker.close() is True
    client = _client(tracker.tracking_uri)
    assert client.get_run(tracker.run_id).data.params == {"train.epochs": "2"}
    assert _history(client, tracker.run_id, "loss") == [(7, 1.5)]
    rejected = [json.loads(line) for line in (run_dir / "mlflow_journal" / "rejected.jsonl").read_text().splitlines()]
    assert [r["record"]["params"] for r in rejected] == [{"train.epochs": "4"}]


def test_torn_last_journal_line_is_ignored(tmp_path):
    journal = Journal(tmp_path)
    journal.append("tags", tags={"a": "1"})
    with journal.path.open("a") as fh:
        fh.write('{"seq": 2, "kind": "met')  # crash mid-write
    assert [r["seq"] for r in Journal(tmp_path).records()] == [1]
    journal.path.write_text('{"seq": 1}\nnot json\n{"seq": 3, "kind": "tags", "tags": {}}\n')
    with pytest.raises(ValueError, match="journal.jsonl:2: corrupt"):
        Journal(tmp_path).records()


@pytest.mark.slow
def test_server_outage_mid_run_loses_nothing(tmp_path, mlflow_server):
    """Log to a real server, stop it mid-run, keep logging, restart it: every metric exactly once."""
    run_dir = tmp_path / "run"
    tracker = RunTracker(run_dir, tracking_uri=mlflow_server.uri, experiment_name="outage",
                         background=False, verbose=False)
    tracker.log_params({"lr": 0.01})
    expected = {}
    for step in range(10):
        tracker.log_metrics({"loss": 10.0 - step, "lr": 0.01 * step}, step)
        expected[step] = 10.0 - step
        if step % 3 == 0:
            assert tracker.flush() is True
    assert tracker.flush() is True
    run_id = tracker.run_id

    mlflow_server.stop()
    start = time.monotonic()
    for step in range(10, 20):
        tracker.log_metrics({"loss": 10.0 - step, "lr": 0.01 * step}, step)
        expected[step] = 10.0 - step
        assert tracker.flush() is False  # server down: buffered, training goes on
    (tmp_path / "ckpt.pt").write_bytes(b"\x00weights")
    tracker.log_artifact(tmp_path / "ckpt.pt", "checkpoints")
    (tmp_path / "ckpt.pt").unlink()  # rotated away (as Ray does): the staged copy must be uploaded
    tracker.set_tags({"phase": "during-outage"})
    assert tracker.server_ok is False
    assert tracker.journal.pending() >= 12
    # connection refused with no retries is fast: 10 failed flushes take seconds, not minutes
    assert time.monotonic() - start < 60

    mlflow_server.start()
    for step in range(20, 25):
        tracker.log_metrics({"loss": 10.0 - step, "lr": 0.01 * step}, step)
        expected[step] = 10.0 - step
    assert tracker.close() is True
    assert tracker.run_id == run_id

    client = _client(mlflow_server.uri)
    assert _history(client, run_id, "loss") == sorted(expected.items())
    assert len(client.get_metric_history(run_id, "lr")) == 25
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["phase"] == "during-outage"
    local = Path(client.download_artifacts(run_id, "checkpoints/ckpt.pt", str(tmp_path)))
    assert local.read_bytes() == b"\x00weights"
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.slow
def test_background_uploader_and_sync_cli(tmp_path):
    """Server down for the whole run: the background uploader keeps failing quietly, close() says
    what is pending, and `lsnet mlflow-sync RUN_DIR` uploads it once a server is up."""
    server = MlflowServer(tmp_path / "server", _free_port())
    server.root.mkdir()
    run_dir = tmp_path / "runs" / "r1"
    tracker = RunTracker(run_dir, tracking_uri=server.uri, experiment_name="later",
                         flush_interval_s=0.05, retry_interval_s=0.05, verbose=False)
    tracker.log_params({"x": "y"})
    for step in range(30):
        tracker.log_metrics({"loss": step * 0.5}, step)
    time.sleep(0.3)  # the uploader has tried (and failed) several times meanwhile
    assert tracker.close(final_flush_timeout_s=5) is False
    state = json.loads((run_dir / "mlflow_journal" / "state.json").read_text())
    assert not state.get("run_id")  # the run could never be created on the server

    server.start()
    try:
        from pipelines.cli import main

        assert main(["mlflow-sync", str(tmp_path / "runs")]) == 0
        assert main(["mlflow-sync", str(run_dir)]) == 0  # nothing left: a no-op, no duplicates
        run_id = Journal(run_dir).state["run_id"]
        client = _client(server.uri)
        assert _history(client, run_id, "loss") == [(s, s * 0.5) for s in range(30)]
        assert client.get_run(run_id).info.status == "FINISHED"
        assert client.get_run(run_id).data.params == {"x": "y"}
    finally:
        server.stop()


def test_sync_cli_errors(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["mlflow-sync", str(tmp_path)]) == 1
    assert "not a tracked run directory" in capsys.readouterr().out


def test_resolve_tracking_uri(tmp_path, monkeypatch, default_store):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert tracking.resolve_tracking_uri() == "http://127.0.0.1:9"
    assert tracking.resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"  # config beats environment
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.resolve_tracking_uri() == f"sqlite:///{default_store}"
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri("my.db") == f"sqlite:///{tmp_path / 'my.db'}"  # absolute for workers
    assert "--host 127.0.0.1" in tracking.ui_command(tracking.resolve_tracking_uri())
    assert tracking.run_url("sqlite:///x.db", "3", "abc") == \
        "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert tracking.REPO_ROOT == Path(__file__).resolve().parents[1]  # the default is <checkout>/results/mlflow.db


CONCURRENT_WRITER = """
import sys, time
import mlflow.tracking
from pipelines.tracking.tracker import RunTracker
run_dir, uri, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))  # both processes create the store and the experiment at once
tracker = RunTracker(run_dir, uri, "shared", background=False, verbose=False)
for step in range(20):
    tracker.log_metrics({"loss": step / 10}, step)
    tracker.flush()
assert tracker.close(), tracker.last_error
print(tracker.run_id)
"""


def test_two_processes_share_one_new_store(tmp_path):
    """Two runs started together on a store that does not exist yet: one database (built once), one
    experiment, two complete runs -- each upload that meets SQLite's lock is retried from the journal."""
    uri = f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    start = time.time() + 5  # both interpreters have imported MLflow by then (~3 s here, both at once)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, str(tmp_path / f"run{i}"), uri, str(start)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in (0, 1)]
    outs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outs
    run_ids = [out.strip().splitlines()[-1] for out, _ in outs]
    client = _client(uri)
    (experiment,) = client.search_experiments(filter_string="name = 'shared'")
    assert {r.info.run_id for r in client.search_runs([experiment.experiment_id])} == set(run_ids)
    for run_id in run_ids:
        assert _history(client, run_id, "loss") == [(s, s / 10) for s in range(20)]
        assert client.get_run(run_id).info.status == "FINISHED"


def _tiny_model():
    from lsnet.modeling import ModelConfig, build_model

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return build_model(ModelConfig(task="bbox", num_classes=3, backbone="resnet18", fpn_channels=32,
                                   head_channels=32, head_convs=1, norm_groups=8)).eval()


def test_final_model_and_datasets_are_logged_and_load_back_by_run_id(tmp_path):
    """The run's model is an MLflow PyTorch model: ``mlflow.pytorch.load_model("runs:/<id>/model")``
    returns a module with the same outputs, with the config and class names beside it; the shard sets
    are the run's dataset inputs. Logged while the tracking server is unreachable, everything goes up
    with ``lsnet mlflow-sync`` later (here to an embedded store)."""
    import mlflow
    import mlflow.pytorch
    import torch

    from lsnet.data.shards import MANIFEST_NAME, SCHEMA_VERSION
    from pipelines.provenance import manifest_hash

    shards = tmp_path / "shards_train"  # only the manifest is read
    shards.mkdir()
    (shards / MANIFEST_NAME).write_text(json.dumps({
        "schema_version": SCHEMA_VERSION, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "shards": [{"file": "shard-00000.arrow", "rows": 2}, {"file": "shard-00001.arrow", "rows": 3}]}))
    model = _tiny_model()
    (tmp_path / "config.yaml").write_text("model: {task: bbox}\n")
    (tmp_path / "classes.json").write_text('{"class_names": ["a", "b", "c"]}')

    down = f"http://127.0.0.1:{_free_port()}"  # nothing listens there: the whole run is logged offline
    tracker = RunTracker(tmp_path / "run", down, "models", background=False, verbose=False)
    tracker.log_datasets([shard_dataset(shards, "train")])
    tracker.log_datasets([shard_dataset(shards, "train")])  # a restarted worker: not twice
    assert tracker.log_model(model, step=4, extra_files=[tmp_path / "config.yaml", tmp_path / "classes.json"],
                             metadata={"class_names": ["a", "b", "c"], "task": "bbox"}, params={"task": "bbox"},
                             model_type="lsnet-bbox")
    assert tracker.close() is False and tracker.run_id is None
    (staged,) = (tmp_path / "run" / "mlflow_journal" / "files").glob("*/model")
    shutil.copytree(staged, tmp_path / "staged_copy")
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    assert sync_run_dir(tmp_path / "run", uri)[1] == 0
    tracker = RunTracker(tmp_path / "run", background=False, verbose=False)
    client = _client(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    (dataset_input,) = run.inputs.dataset_inputs
    sha = manifest_hash(str(shards))
    assert (dataset_input.dataset.name, dataset_input.dataset.digest) == ("shards_train", sha[:36])
    assert json.loads(dataset_input.dataset.source) == {"uri": str(shards.resolve())}
    assert json.loads(dataset_input.dataset.profile)["manifest_sha256"] == sha
    assert json.loads(dataset_input.dataset.profile)["num_rows"] == 5
    assert [(t.key, t.value) for t in dataset_input.tags] == [("mlflow.data.context", "train")]
    (output,) = run.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert (logged.name, logged.source_run_id, logged.status.to_proto()) == ("model", tracker.run_id, 2)  # READY

    mlflow.set_tracking_uri(uri)  # conftest resets it after the test
    loaded = mlflow.pytorch.load_model(f"runs:/{tracker.run_id}/model").eval()
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model.forward_raw(image), loaded.forward_raw(image)
    for name in ("cls_logits", "vec_init", "vec_refine"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    info = mlflow.models.get_model_info(f"runs:/{tracker.run_id}/model")
    assert info.metadata["class_names"] == ["a", "b", "c"] and info.run_id == tracker.run_id
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{tracker.run_id}/model", dst_path=str(tmp_path / "dl")))
    assert (local / "extra_files" / "classes.json").read_text() == '{"class_names": ["a", "b", "c"]}'
    assert (local / "extra_files" / "config.yaml").is_file() and (local / "code" / "lsnet" / "modeling").is_dir()

    assert not staged.exists()  # removed once acknowledged
    # a crash after the upload, before the acknowledgement: the replay logs no second model
    shutil.copytree(tmp_path / "staged_copy", staged)
    tracker.journal.save_state(synced_seq=0)
    assert sync_run_dir(tmp_path / "run")[1] == 0
    assert len(client.get_run(tracker.run_id).outputs.model_outputs) == 1
    assert len(client.search_logged_models([run.info.experiment_id])) == 1


def test_a_model_that_cannot_be_saved_is_a_recorded_warning(tmp_path, capsys):
    """Logging the model never fails a finished run: the reason is printed and kept as a run tag."""
    import threading

    tracker = RunTracker(tmp_path / "run", background=False, verbose=False)
    assert tracker.log_model(threading.Lock()) is False  # not picklable
    assert "the final model was not logged as an MLflow model" in capsys.readouterr().out
    assert tracker.close() is True
    tags = _client(tracker.tracking_uri).get_run(tracker.run_id).data.tags
    assert "lsnet.model_log_error" in tags


def test_an_existing_experiment_becomes_a_model_training_one(tmp_path):
    """An experiment made before (or by plain MLflow) gets the kind tag; one with a kind keeps it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare_sqlite_store(uri)
    client = _client(uri)
    old = client.create_experiment("old")
    mine = client.create_experiment("genai", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("old", "genai"):
        tracker = RunTracker(tmp_path / name, uri, name, background=False, verbose=False)
        assert tracker.close() is True
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(mine).tags["mlflow.experimentKind"] == "genai_development"
