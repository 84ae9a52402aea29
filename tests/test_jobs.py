"""Job specs, `lsnet jobs`, scheduled forms (issue 10).

- every spec under jobs/ validates (job specs, benchmark specs, ablation specs);
- bad specs fail with one clear line (unknown key, bad cron, missing config, bad name);
- emitted RayCronJob / RayJob manifests validate against KubeRay's CRD schemas (tests/data/kuberay, vendored)
  the way the API server does with strict field validation; CronJob / crontab schedules parse with croniter;
- with a REAL Ray head (``ray start --head`` on 127.0.0.1, token auth, private temp dir, stopped in a
  finaliser): a tiny preprocess + train job pair succeeds and its MLflow run carries the submission id;
  a failing entrypoint is FAILED, prints its log tail and exits 1.
"""
from __future__ import annotations

import copy
import datetime as dt
import functools
import json
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
# Scheduled forms
# ----------------------------------------------------------------------------------------------


def _strict(schema):
    """The CRD schema as `kubectl --validate=strict` applies it: objects with declared properties
    reject unknown fields (the API server would otherwise prune them silently)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_validator(kind: str):
    pytest.importorskip("jsonschema")
    path = CRD_DIR / {"RayCronJob": "ray.io_raycronjobs.yaml", "RayJob": "ray.io_rayjobs.yaml"}[kind]
    return _load_validator(path, kind)


@functools.cache
def _load_validator(path: Path, kind: str):
    import jsonschema

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-2 MB of YAML
    crd = yaml.load(path.read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def _scheduled_specs():
    return [p for p in JOB_SPECS if yaml.safe_load(p.read_text()).get("schedule")]


def test_shipped_schedules_exist():
    names = {p.stem for p in _scheduled_specs()}
    assert {"nightly_ablations_tiny", "weekly_ablations_small"} <= names, names


@pytest.mark.parametrize("path", JOB_SPECS, ids=lambda p: p.name)
def test_raycronjob_and_rayjob_validate_against_crds(path):
    from croniter import croniter

    from pipelines.jobs.schedule import ray_cron_job, ray_job_spec

    spec = load_job_spec(path)
    if spec.schedule is None:
        spec.schedule = "0 3 * * *"  # every spec can be scheduled
    manifest = ray_cron_job(spec)
    errors = sorted(crd_validator("RayCronJob").iter_errors(manifest), key=str)
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": spec.name}, "spec": ray_job_spec(spec)}
    errors = sorted(crd_validator("RayJob").iter_errors(job), key=str)
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    assert croniter.is_valid(manifest["spec"]["schedule"])
    template = manifest["spec"]["jobTemplate"]
    assert template["entrypoint"] == spec.entrypoint()
    assert template["shutdownAfterJobFinishes"] is True and template["ttlSecondsAfterFinished"] > 0
    runtime_env = yaml.safe_load(template.get("runtimeEnvYAML", "{}"))
    assert "working_dir" not in runtime_env or "://" in runtime_env["working_dir"]  # no local paths on k8s
    assert runtime_env.get("env_vars", {}) == spec.runtime_env.env_vars
    head = template["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == spec.cluster.image
    assert template["rayClusterSpec"]["authOptions"] == {"mode": "token"}


def test_strict_validation_catches_a_misspelt_field():
    """The validator is not vacuous: a field the CRD does not know and a wrong type are errors."""
    from pipelines.jobs.schedule import ray_cron_job

    manifest = ray_cron_job(load_job_spec(JOBS / "nightly_ablations_tiny.yaml"))
    validator = crd_validator("RayCronJob")
    assert not list(validator.iter_errors(manifest))
    bad = copy.deepcopy(manifest)
    bad["spec"]["jobTemplate"]["shutdownAfterJobFinish"] = True
    assert list(validator.iter_errors(bad))
    bad = copy.deepcopy(manifest)
    bad["spec"]["jobTemplate"]["ttlSecondsAfterFinished"] = "600"
    assert list(validator.iter_errors(bad))
    bad = copy.deepcopy(manifest)
    del bad["spec"]["schedule"]
    assert list(validator.iter_errors(bad))


def test_emit_k8s_says_alpha_and_feature_gate(capsys):
    from pipelines.cli import main

    assert main(["jobs", "schedule", "jobs/nightly_ablations_tiny.yaml", "--emit", "k8s"]) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and "RayCronJob feature gate" in out and "KubeRay >= 1.6" in out
    manifest = yaml.safe_load(out)
    assert manifest["kind"] == "RayCronJob" and manifest["spec"]["schedule"] == "30 2 * * *"


def test_emit_k8s_cronjob_and_crontab(tmp_path, capsys):
    from croniter import croniter

    from pipelines.cli import main

    spec_path = JOBS / "weekly_ablations_small.yaml"
    assert main(["jobs", "schedule", str(spec_path), "--emit", "k8s-cronjob"]) == 2  # no address
    assert "needs the long-lived cluster's address" in capsys.readouterr().err
    out = tmp_path / "cron.yaml"
    assert main(["jobs", "schedule", str(spec_path), "--emit", "k8s-cronjob", "--address",
                 "http://ray-head.ray:8265", "--out", str(out)]) == 0
    cron = yaml.safe_load(out.read_text())
    assert cron["apiVersion"] == "batch/v1" and cron["kind"] == "CronJob"
    body = cron["spec"]
    assert body["concurrencyPolicy"] == "Forbid" and body["successfulJobsHistoryLimit"] >= 1
    assert body["failedJobsHistoryLimit"] >= 1 and croniter.is_valid(body["schedule"])
    pod = body["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    command = pod["containers"][0]["command"]
    assert command[:4] == ["lsnet", "jobs", "submit", "jobs/weekly_ablations_small.yaml"] and "--wait" in command
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]

    capsys.readouterr()
    assert main(["jobs", "schedule", str(spec_path), "--emit", "crontab"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x and not x.startswith("#")]
    fields = lines[-1].split()
    assert croniter.is_valid(" ".join(fields[:5])) and "flock" in lines[-1]
    assert "jobs submit jobs/weekly_ablations_small.yaml --wait" in lines[-1]
    # the next run of the weekly schedule is on the weekday it names (Sunday)
    nxt = croniter(" ".join(fields[:5]), dt.datetime(2026, 1, 1)).get_next(dt.datetime)
    assert nxt.weekday() == 6


def test_schedule_without_cron_is_an_error(capsys):
    from pipelines.cli import main

    assert main(["jobs", "schedule", "jobs/train_tiny_bbox.yaml", "--emit", "crontab"]) == 2
    assert "has no `schedule`" in capsys.readouterr().err


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
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    spec = _spec_file(tmp_path, "train-tiny", {
        "command": "train", "config": "configs/tiny_bbox.yaml",
        "args": ["--address", "auto", "--cpus", "--num-workers", "1",
                 "--set", f"data.train_shards={root / 'shards' / 'train'}",
                 "--set", f"data.val_shards={root / 'shards' / 'train'}",
                 "--set", f"run.storage_path={tmp_path / 'runs'}", "--set", f"tracking.uri={store}",
                 "--set", "train.epochs=1", "--set", "train.lr_steps=[1]", "--set", "train.eval_every=1",
                 "--set", "data.scale_range=[64,64]", "--set", "data.max_size=64", "--set", "data.test_scale=64",
                 "--set", "eval.num_overlays=0", "--set", "train.warmup_iters=1"],
        "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}})
    capsys.readouterr()
    assert main(["jobs", "submit", str(spec), "--follow", "--timeout", "900"]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    submission_id = out.split("submitted train-tiny as ", 1)[1].split()[0]
    assert "[epoch 1/1]" in out and f"job {submission_id}: SUCCEEDED" in out
    mlflow.set_tracking_uri(store)
    runs = mlflow.search_runs(experiment_names=["lsnet-tiny"],
                              filter_string=f"tags.ray_job_submission_id = '{submission_id}'", output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "bbox_AP" in runs[0].data.metrics
    # the uploaded working dir has no .git: the commit comes from the submitter ($LSNET_GIT_COMMIT)
    from pipelines.provenance import git_commit

    assert runs[0].data.tags["git_commit"] == git_commit() != "unknown"
    # status / logs / list of the same job through the CLI
    assert main(["jobs", "status", submission_id]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "SUCCEEDED"
    assert main(["jobs", "logs", submission_id, "--tail", "3"]) == 0
    assert main(["jobs", "list"]) == 0
    assert submission_id in capsys.readouterr().out


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
