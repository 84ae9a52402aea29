"""`lsnet jobs` without a cluster and its errors (issue 23, items 2 and 5), with a fake job server:
the job of a private head runs in the checkout and logs to the submitter's MLflow store, its input
paths are checked before any head starts, its status and log are kept after the head is gone, and
`status` / `list` are readable. The real-head versions of these paths are in tests/test_jobs.py."""
from __future__ import annotations

import datetime as dt
import json
import types
from pathlib import Path

import pytest
import yaml

from pipelines.paths import REPO_ROOT

T0 = int(dt.datetime(2026, 12, 7, 9, 50, 1, tzinfo=dt.UTC).timestamp() * 1000)


class FakeHead:
    """Stands in for LocalRayHead: counts starts (a failed preflight must start none)."""

    started = 0

    def __init__(self, num_cpus=None):
        self.address, self.headers = "http://127.0.0.1:1", {}

    def __enter__(self):
        FakeHead.started += 1
        return self

    def __exit__(self, *exc):
        return None


class FakeClient:
    def __init__(self, status="SUCCEEDED"):
        self.status, self.submitted = status, {}

    def submit_job(self, **kwargs):
        self.submitted = kwargs
        return kwargs["submission_id"]

    def get_job_status(self, sid):
        return types.SimpleNamespace(value=self.status)

    def get_job_info(self, sid):
        return types.SimpleNamespace(submission_id=sid, job_id=None, status=types.SimpleNamespace(value=self.status),
                                     message="Job finished successfully.", entrypoint=self.submitted["entrypoint"],
                                     start_time=T0, end_time=T0 + 189_000, metadata=self.submitted["metadata"],
                                     driver_exit_code=0)

    def get_job_logs(self, sid):
        return "line 1\nline 2\n[epoch 1/1] done\n"

    async def tail_job_logs(self, sid):
        yield self.get_job_logs(sid)


@pytest.fixture
def local_jobs(tmp_path, monkeypatch):
    """A fake head and client, job records in tmp_path/records, the submitter's store $MLFLOW_TRACKING_URI."""
    client = FakeClient()
    FakeHead.started = 0
    monkeypatch.setattr("pipelines.jobs.head.LocalRayHead", FakeHead)
    monkeypatch.setattr("pipelines.jobs.client.make_client", lambda address, headers=None: client)
    monkeypatch.setenv("LSNET_JOB_RECORDS", str(tmp_path / "records"))
    for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    store = tmp_path / "store" / "mlflow.db"
    store.parent.mkdir()
    store.touch()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    return client, store


def _spec(tmp_path, **fields) -> Path:
    data = {"name": "tiny", "command": "train", "config": "configs/tiny_bbox.yaml", **fields}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _shards(tmp_path) -> list[str]:
    for split in ("train", "val"):
        (tmp_path / split).mkdir(exist_ok=True)
    return ["--set", f"data.train_shards={tmp_path / 'train'}", "--set", f"data.val_shards={tmp_path / 'val'}"]


def test_private_head_job_runs_in_the_checkout_and_logs_to_the_submitters_store(local_jobs, tmp_path, capsys):
    from pipelines.cli import main

    client, store = local_jobs
    spec = _spec(tmp_path, args=_shards(tmp_path), runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    assert main(["jobs", "submit", str(spec), "--follow"]) == 0
    out = capsys.readouterr().out
    env = client.submitted["runtime_env"]
    # no upload into the head's temp dir: the code, the relative paths and the default store are the checkout's
    assert "working_dir" not in env and "excludes" not in env
    assert client.submitted["entrypoint"].startswith(f"cd {REPO_ROOT} && python -m pipelines.cli train ")
    assert env["env_vars"]["PYTHONPATH"].split(":")[0] == str(REPO_ROOT)
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == f"sqlite:///{store}"  # resolved once, by the submitter
    assert env["env_vars"]["OMP_NUM_THREADS"] == "1"
    # the printed MLflow command opens that store, which exists after the command
    assert f"mlflow ui --backend-store-uri sqlite:///{store} " in out
    assert "stops when this command ends" in out and "[epoch 1/1] done" in out
    # its record outlives the head: status / logs / list without --address read it
    sid = client.submitted["submission_id"]
    record = json.loads((tmp_path / "records" / f"{sid}.json").read_text())
    assert record["status"] == "SUCCEEDED" and record["tracking_uri"] == f"sqlite:///{store}"
    assert main(["jobs", "status", sid]) == 0
    status = capsys.readouterr().out
    rows = dict(line.split(None, 1) if not line.startswith(("submission id", "exit code", "MLflow store"))
                else line.rsplit("  ", 1) for line in status.splitlines())
    assert rows["started"].strip() == "2026-12-07T09:50:01Z" and rows["ended"].strip() == "2026-12-07T09:53:10Z"
    assert rows["duration"].strip() == "3 min 09 s" and rows["status"].strip() == "SUCCEEDED"
    assert main(["jobs", "logs", sid, "--tail", "1"]) == 0
    assert capsys.readouterr().out == "[epoch 1/1] done\n"
    assert main(["jobs", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["SUBMISSION", "ID", "STATUS"] and lines[2].split()[:3] == [sid, "SUCCEEDED", "tiny"]


def test_the_specs_own_store_wins(local_jobs, tmp_path, capsys):
    from pipelines.cli import main

    client, _ = local_jobs
    named = tmp_path / "named.db"
    spec = _spec(tmp_path, args=_shards(tmp_path), runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": str(named)}})
    assert main(["jobs", "submit", str(spec)]) == 0
    # the spec's store, as the submitter resolved it (a bare .db path: an absolute SQLite URI)
    assert client.submitted["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] == f"sqlite:///{named}"
    assert "the job's MLflow runs" not in capsys.readouterr().out  # that store was never created: no command


def test_the_default_store_is_the_checkouts(local_jobs, tmp_path, monkeypatch):
    from pipelines.cli import main
    from pipelines.tracking.store import default_tracking_uri

    client, _ = local_jobs
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert main(["jobs", "submit", str(_spec(tmp_path, args=_shards(tmp_path)))]) == 0
    assert client.submitted["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] == default_tracking_uri()


def test_a_spec_with_another_working_dir_is_uploaded(local_jobs, tmp_path):
    from pipelines.jobs.client import local_runtime_env
    from pipelines.jobs.spec import load_job_spec

    code = tmp_path / "code"
    code.mkdir()
    spec = load_job_spec(_spec(tmp_path, runtime_env={"working_dir": str(code)}))
    env, prefix = local_runtime_env(spec, {"MLFLOW_TRACKING_URI": "sqlite:////x.db"})
    assert prefix == "" and env["working_dir"] == str(code) and env["env_vars"]["MLFLOW_TRACKING_URI"] == "sqlite:////x.db"


@pytest.mark.parametrize("args, message", [
    ([], ("data.train_shards results/demo/shards/synthetic_instances_train_128 does not exist on this machine (no "
          "--address: the job runs here, in ")),
    ([], "; run `make demo` first, or pass --set data.train_shards=PATH)"),
    (["--set", "data.train_shards=/nonexistent/train"], "data.train_shards /nonexistent/train does not exist"),
    (["--num-wrokers", "2"], "args: unrecognized arguments: --num-wrokers 2"),
    (["--set", "train.epochz=2"], "train.epochz"),
])
def test_missing_inputs_fail_before_a_head_starts(local_jobs, tmp_path, monkeypatch, capsys, args, message):
    from pipelines.cli import main

    monkeypatch.setattr("pipelines.jobs.preflight.REPO_ROOT", tmp_path)  # a checkout without the demo's outputs
    spec = _spec(tmp_path, args=args)
    assert main(["jobs", "submit", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lsnet jobs submit: error: {spec}: ") and err.count("\n") == 1 and message in err, err
    assert FakeHead.started == 0


def test_a_later_set_overrides_the_specs_path(local_jobs, tmp_path, monkeypatch):
    """Spec paths are overridable: `submit --set data.train_shards=...` is what the job reads and checks."""
    from pipelines.cli import main

    client, _ = local_jobs
    spec = _spec(tmp_path, args=["--set", "data.train_shards=/nonexistent/train", "--set",
                                 "data.val_shards=/nonexistent/val"])
    assert main(["jobs", "submit", str(spec), *_shards(tmp_path)]) == 0
    assert client.submitted["entrypoint"].endswith(f"data.val_shards={tmp_path / 'val'}")


def test_preprocess_inputs_are_checked(local_jobs, tmp_path, capsys):
    from pipelines.cli import main

    path = tmp_path / "prep.yaml"
    path.write_text(yaml.safe_dump({"name": "prep", "command": "preprocess", "args": [
        "--ann", str(tmp_path / "missing.json"), "--images", str(tmp_path), "--out", str(tmp_path / "out")]}))
    assert main(["jobs", "submit", str(path)]) == 2
    assert f"--ann {tmp_path / 'missing.json'} does not exist" in capsys.readouterr().err


def test_status_of_an_unknown_local_job_and_stop_without_address(local_jobs, capsys):
    from pipelines.cli import main

    assert main(["jobs", "status", "raysubmit_nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lsnet jobs status: error: no record of raysubmit_nope in ") and err.count("\n") == 1
    assert main(["jobs", "stop", "raysubmit_nope"]) == 2
    assert "lsnet jobs stop: error: no cluster address" in capsys.readouterr().err


def test_duration_and_time_formats(monkeypatch):
    import time

    from pipelines.cli.jobs import _duration, _iso

    monkeypatch.setenv("TZ", "America/New_York")  # UTC whatever the machine's zone
    time.tzset()
    try:
        assert _iso(T0) == "2026-12-07T09:50:01Z" and _iso(None) == "-"
    finally:
        monkeypatch.undo()
        time.tzset()
    assert _duration(T0, T0 + 42_400) == "42 s"
    assert _duration(T0, T0 + 189_000) == "3 min 09 s"
    assert _duration(T0, T0 + 3_720_000) == "1 h 02 min"
    assert _duration(T0, None).endswith("(running)")


def test_server_errors_are_one_line(monkeypatch):
    """A head that wants a token, one that is down, a refused request: one line each, the token one
    saying how to set it (Ray raises AuthenticationError with a paragraph)."""
    from ray.exceptions import AuthenticationError

    from lsnet.errors import ServiceError
    from pipelines.jobs.client import JobAuthError, server_errors

    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    for raised, kind, words in [
        (AuthenticationError("Authentication required: Unauthorized: Missing authentication token\n\nToken ..."),
         JobAuthError, "wants a Ray auth token (token authentication is on): export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN="),
        (ConnectionError("Failed to connect to Ray at address: http://h:1."), ServiceError, "cannot reach the Ray job server at http://h:1"),
        (RuntimeError("Request failed with status code 404: Job raysubmit_x does not exist."), ServiceError,
         "Job raysubmit_x does not exist"),
    ]:
        with pytest.raises(kind) as info, server_errors("http://h:1"):
            raise raised
        assert "\n" not in str(info.value) and words in str(info.value), str(info.value)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong")
    with pytest.raises(JobAuthError, match="refused the auth token given"), server_errors("http://h:1"):
        raise AuthenticationError("Authentication failed: Unauthorized: Invalid authentication token")
