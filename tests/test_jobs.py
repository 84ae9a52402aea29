"""Job specs, `lsnet jobs`, scheduled forms (issue 10).

- every spec under jobs/ validates (job specs, benchmark specs, ablation specs);
- bad specs fail with one clear line (unknown key, bad cron, missing config, bad name);
- the scheduled forms: tests/test_jobs_schedule.py;
- with a REAL Ray head (``ray start --head`` on 127.0.0.1, token auth, private temp dir, stopped in a
  finaliser): a tiny preprocess + train job pair succeeds and its MLflow run carries the submission id;
  a failing entrypoint is FAILED, prints its log tail and exits 1.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.jobs.spec import JobSpecError, load_job_spec

REPO_ROOT = Path(__file__).resolve().parent.parent
JOBS = REPO_ROOT / "jobs"
CRD_DIR = REPO_ROOT / "tests" / "data" / "kuberay"  # vendored: source and version in its README.md
JOB_SPECS = sorted(JOBS.glob("*.yaml"))


@pytest.mark.parametrize("path", JOB_SPECS, ids=lambda p: p.name)
def test_every_job_spec_validates(path):
    spec = load_job_spec(path)
    assert spec.entrypoint().startswith(f"python -m pipelines.cli {spec.command}")


def test_commit_outside_a_checkout_comes_from_the_submitter(tmp_path, monkeypatch):
    """A job's uploaded working dir has no .git: git_commit() answers $LSNET_GIT_COMMIT (set by
    `lsnet jobs submit`), and `unknown` without it; in a checkout git decides, whatever the variable says."""
    from pipelines import provenance as bench

    real = bench.git_commit()
    monkeypatch.setenv(bench.COMMIT_ENV, "abc123")
    assert bench.git_commit() == real != "abc123"
    monkeypatch.setattr(bench, "REPO_ROOT", tmp_path)  # a copy without .git (and not inside a repository)
    assert bench.git_commit() == "abc123"
    monkeypatch.delenv(bench.COMMIT_ENV)
    assert bench.git_commit() == "unknown"


def test_commit_is_dirty_for_changed_code_not_for_published_results(tmp_path, monkeypatch):
    """A run that --publishes a table rewrites tracked files under results/: the next table of the same
    command (and any later run in that checkout) ran the committed code and must not be tagged -dirty."""
    from pipelines import provenance

    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    (tmp_path / "results" / "ablations").mkdir(parents=True)
    (tmp_path / "results" / "ablations" / "table.md").write_text("old\n")
    (tmp_path / "model.py").write_text("x = 1\n")
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)
    (tmp_path / "results" / "ablations" / "table.md").write_text("published\n")
    assert provenance.git_commit() == head
    (tmp_path / "model.py").write_text("x = 2\n")
    assert provenance.git_commit() == head + "-dirty"


@pytest.mark.parametrize("path", sorted((JOBS / "bench").glob("*.yaml")), ids=lambda p: p.name)
def test_bench_specs_still_load(path):
    """jobs/bench/ keeps its own format (`lsnet bench NAME`): name = file stem, runner importable."""
    import importlib

    data = yaml.safe_load(path.read_text())
    assert data["name"] == path.stem and isinstance(data.get("params", {}), dict)
    module, func = data["runner"].split(":")
    assert callable(getattr(importlib.import_module(module), func))


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("body, message", [
    ("name: x\ncommand: train\nconfig: configs/tiny_bbox.yaml\nentrypoint: foo\n", "unknown config key entrypoint"),
    ("name: x\ncommand: train\nconfig: configs/tiny_bbox.yaml\nschedule: '61 * * * *'\n",
     "schedule: '61 * * * *' is not a valid 5-field cron expression"),
    ("name: x\ncommand: train\nconfig: configs/tiny_bbox.yaml\nschedule: '0 3 * *'\n", "schedule:"),
    ("name: x\ncommand: train\nconfig: configs/nope.yaml\n", "config: file not found: configs/nope.yaml"),
    ("name: Bad_Name\ncommand: train\n", "name: 'Bad_Name'"),
    ("name: x\ncommand: fly\n", "command: 'fly' is not an lsnet command"),
    ("name: x\ncommand: train\nruntime_env: {env_vars: {A: 1}}\n", "runtime_env.env_vars.A: expected str"),
    ("name: x\ncommand: train\ncluster: {workers: [{gpus: 2}]}\n", "unknown config key cluster.workers[0].gpus"),
    ("command: train\n", "name"),
    ("[1, 2]\n", "a job spec must be a mapping"),
])
def test_bad_specs_fail_with_one_line(tmp_path, body, message):
    path = _write(tmp_path, body)
    with pytest.raises(JobSpecError) as info:
        load_job_spec(path)
    text = str(info.value)
    assert "\n" not in text and text.startswith(str(path)) and message in text, text


def test_cli_bad_spec_exits_2(tmp_path, capsys):
    from pipelines.cli import main

    path = _write(tmp_path, "name: x\ncommand: train\nschedule: 'every day'\n")
    assert main(["jobs", "submit", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is not a valid 5-field cron expression" in err


# ----------------------------------------------------------------------------------------------
# A real Ray head: `ray start --head` on 127.0.0.1, jobs through the Jobs API
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    """A synthetic set of 4 images of 64 px."""
    from lsnet.data.synthetic import write_synthetic_coco

    root = tmp_path_factory.mktemp("jobs_data")
    train = write_synthetic_coco(root / "synth_train", num_images=4, image_size=(64, 64), seed=0,
                                 objects_per_image=(1, 2))
    return root, train


def _spec_file(tmp_path: Path, name: str, body: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **body}))
    return path


@pytest.mark.slow
def test_no_token_is_rejected(ray_head):
    from ray.job_submission import JobSubmissionClient

    assert ray_head.address.startswith("http://127.0.0.1:")
    with pytest.raises(Exception, match="(?i)auth"):
        JobSubmissionClient(ray_head.address, headers={"Authorization": "Bearer wrong"}).list_jobs()


@pytest.mark.slow
@pytest.mark.long
def test_preprocess_then_train_job_tags_mlflow_run(ray_head, synth_data, tmp_path, monkeypatch, capsys):
    import mlflow

    from pipelines.cli import main

    root, train = synth_data
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", ray_head.address)
    monkeypatch.setattr("pipelines.jobs.client.make_client",
                        lambda address, headers=None: _client(address, ray_head.headers))
    # one preprocess job (the val split is evaluated on the training shards: fewer jobs, same checks)
    spec = _spec_file(tmp_path, "prep-train", {
        "command": "preprocess", "args": ["--ann", str(train.instances_json), "--images", str(train.image_dir),
                                          "--out", str(root / "shards" / "train"), "--max-size", "64",
                                          "--contour-points", "18"],
        "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}})
    assert main(["jobs", "submit", str(spec), "--wait", "--timeout", "600"]) == 0, capsys.readouterr()
    # `jobs status` of a cluster's job: readable rows, ISO times (not Ray's JSON with millisecond stamps)
    prep_id = capsys.readouterr().out.split("submitted prep-train as ", 1)[1].split()[0]
    assert main(["jobs", "status", prep_id]) == 0
    status = capsys.readouterr().out
    assert status.startswith(f"submission id  {prep_id}\nstatus         SUCCEEDED\n") and "{" not in status
    assert re.search(r"^started\s+20\d\d-\d\d-\d\dT\d\d:\d\d:\d\dZ$", status, re.MULTILINE), status
    # the training job WITHOUT --address: a private head runs it in this checkout; its MLflow run goes to
    # the submitter's store ($MLFLOW_TRACKING_URI here), not into the head's temporary directory
    monkeypatch.undo()  # no address, the real make_client (the private head's token)
    monkeypatch.setenv("LSNET_JOB_RECORDS", str(tmp_path / "records"))
    store = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    spec = _spec_file(tmp_path, "train-tiny", {
        "command": "train", "config": "configs/tiny_bbox.yaml",
        "args": ["--address", "auto", "--cpus", "--num-workers", "1",
                 "--set", f"data.train_shards={root / 'shards' / 'train'}",
                 "--set", f"data.val_shards={root / 'shards' / 'train'}",
                 "--set", f"run.storage_path={tmp_path / 'runs'}",
                 "--set", "train.epochs=1", "--set", "train.lr_steps=[1]", "--set", "train.eval_every=1",
                 "--set", "data.scale_range=[64,64]", "--set", "data.max_size=64", "--set", "data.test_scale=64",
                 "--set", "eval.num_overlays=0", "--set", "train.warmup_iters=1"],
        "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}})
    assert main(["jobs", "submit", str(spec), "--follow", "--timeout", "900", "--head-cpus", "2"]) == 0, \
        capsys.readouterr()
    out = capsys.readouterr().out
    submission_id = out.split("submitted train-tiny as ", 1)[1].split()[0]
    assert "[epoch 1/1]" in out and f"job {submission_id}: SUCCEEDED" in out
    assert "Pushing file package" not in out and "Creating a file package" not in out  # no packaging noise
    assert f"mlflow ui --backend-store-uri sqlite:///{store} " in out  # a store that exists after the head
    assert store.is_file()
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    runs = mlflow.search_runs(experiment_names=["lsnet-tiny"],
                              filter_string=f"tags.ray_job_submission_id = '{submission_id}'", output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "bbox_AP" in runs[0].data.metrics
    from pipelines.provenance import git_commit

    assert runs[0].data.tags["git_commit"] == git_commit() != "unknown"
    # status / logs / list of the same job after its head is gone: from its record
    assert main(["jobs", "status", submission_id]) == 0
    assert "SUCCEEDED" in capsys.readouterr().out
    assert main(["jobs", "logs", submission_id, "--tail", "3"]) == 0
    assert main(["jobs", "list"]) == 0
    listing = capsys.readouterr().out
    assert "SUBMISSION ID" in listing and submission_id in listing


@pytest.mark.slow
def test_a_head_that_wants_a_token_says_how_to_set_it(ray_head, monkeypatch, capsys):
    from pipelines.cli import main

    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    assert main(["jobs", "list", "--address", ray_head.address]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"lsnet jobs list: error: the Ray job server at {ray_head.address} wants a Ray auth token")
    assert "export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=" in err
    # set as the message says (in a fresh process: Ray caches the token it found, or not, per process)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_head.token, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "jobs", "list", "--address", ray_head.address],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0].split()[:3] == ["SUBMISSION", "ID", "STATUS"], done.stdout


@pytest.mark.slow
def test_a_head_without_token_auth(tmp_path, capsys):
    """A head started with token auth off (RAY_AUTH_MODE=disabled, an older Ray): jobs list works, with its header."""
    from pipelines.cli import main
    from pipelines.jobs.head import LocalRayHead

    with LocalRayHead(num_cpus=1, auth="disabled", start_timeout_s=300) as head:
        assert head.headers == {}
        assert main(["jobs", "list", "--address", head.address]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["SUBMISSION", "ID", "STATUS", "JOB", "STARTED", "(UTC)", "DURATION",
                                           "ENTRYPOINT"] and f"(no jobs on {head.address})" in out


def _client(address, headers):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=headers)


@pytest.mark.slow
def test_failing_job_is_failed_with_log_tail(ray_head, tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    monkeypatch.setattr("pipelines.jobs.client.make_client",
                        lambda address, headers=None: _client(address, ray_head.headers))
    spec = _spec_file(tmp_path, "broken", {"command": "train", "config": "configs/tiny_bbox.yaml",
                                           "args": ["--set", "data.train_shards=/nonexistent/shards"]})
    code = main(["jobs", "submit", str(spec), "--address", ray_head.address, "--wait", "--timeout", "600"])
    captured = capsys.readouterr()
    assert code == 1
    assert "FAILED" in captured.out
    assert "--- last lines of the log of raysubmit_" in captured.err
    assert "/nonexistent/shards" in captured.err  # the driver's own error line is in the tail
