"""Scheduled forms of job specs (issues 10 and 23 item 6): manifests an operator can deploy.

- the emitted RayCronJob / RayJob validate against KubeRay's CRDs (tests/data/kuberay, vendored) the way
  the API server does with strict field validation; the CronJob against the Kubernetes batch/v1 shape
  (its pod template against the PodTemplateSpec schema of the same CRDs);
- each deployment setting (pinned image, namespace, service account, image-pull secret, volume or object
  storage for outputs, MLflow URI and credentials from Secrets, failure webhook) appears where Kubernetes
  reads it; unpinned images and outputs that would die with the pod are refused;
- the crontab line's wrapper (pipelines/jobs/guarded.py) makes its log directory, rotates the log, logs a
  skipped overlapping run, keeps the run's exit status and calls the webhook on a failure.
"""
from __future__ import annotations

import copy
import datetime as dt
import functools
import http.server
import json
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from lsnet.config import ConfigError
from pipelines.jobs.spec import load_job_spec

REPO_ROOT = Path(__file__).resolve().parent.parent
JOBS = REPO_ROOT / "jobs"
CRD_DIR = REPO_ROOT / "tests" / "data" / "kuberay"  # vendored: source and version in its README.md
JOB_SPECS = sorted(JOBS.glob("*.yaml"))
IMAGE = "registry.example.com/ml/lsnet:0123456789ab"
FULL = {"image": IMAGE, "namespace": "ml", "service_account": "lsnet-runner", "image_pull_secrets": ["regcred"],
        "pvc": "lsnet-results", "mlflow_uri": "https://mlflow.example.com", "mlflow_secret": "mlflow-credentials",
        "failure_webhook_secret": "lsnet-alerts"}


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


@functools.cache
def _crd_schema(kind: str) -> dict:
    pytest.importorskip("jsonschema")
    path = CRD_DIR / {"RayCronJob": "ray.io_raycronjobs.yaml", "RayJob": "ray.io_rayjobs.yaml"}[kind]
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-2 MB of YAML
    crd = yaml.load(path.read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(version["schema"]["openAPIV3Schema"])


def crd_validator(kind: str):
    import jsonschema

    return jsonschema.Draft7Validator(_crd_schema(kind))


def cronjob_validator():
    """batch/v1 CronJob as the API server reads it (fields of CronJobSpec and JobSpec of Kubernetes 1.33,
    unknown ones rejected), its pod template the PodTemplateSpec schema that the RayJob CRD embeds."""
    import jsonschema

    pod_template = _crd_schema("RayJob")["properties"]["spec"]["properties"]["submitterPodTemplate"]
    integer = {"type": "integer"}
    job_spec = {"type": "object", "additionalProperties": False, "required": ["template"], "properties": {
        "activeDeadlineSeconds": integer, "backoffLimit": integer, "backoffLimitPerIndex": integer,
        "completionMode": {"enum": ["NonIndexed", "Indexed"]}, "completions": integer, "managedBy": {"type": "string"},
        "manualSelector": {"type": "boolean"}, "maxFailedIndexes": integer, "parallelism": integer,
        "podFailurePolicy": {"type": "object"}, "podReplacementPolicy": {"type": "string"},
        "selector": {"type": "object"}, "successPolicy": {"type": "object"}, "suspend": {"type": "boolean"},
        "template": pod_template, "ttlSecondsAfterFinished": integer}}
    metadata = {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 52},
        "namespace": {"type": "string"}, "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}}}}
    schema = {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
              "properties": {
                  "apiVersion": {"const": "batch/v1"}, "kind": {"const": "CronJob"}, "metadata": metadata,
                  "spec": {"type": "object", "additionalProperties": False, "required": ["schedule", "jobTemplate"],
                           "properties": {
                               "schedule": {"type": "string"}, "timeZone": {"type": "string"},
                               "concurrencyPolicy": {"enum": ["Allow", "Forbid", "Replace"]},
                               "startingDeadlineSeconds": integer, "suspend": {"type": "boolean"},
                               "successfulJobsHistoryLimit": integer, "failedJobsHistoryLimit": integer,
                               "jobTemplate": {"type": "object", "additionalProperties": False, "properties": {
                                   "metadata": {"type": "object"}, "spec": job_spec}}}}}}
    return jsonschema.Draft7Validator(schema)


def _errors(validator, manifest) -> list[str]:
    return [f"{list(e.path)}: {e.message}" for e in sorted(validator.iter_errors(manifest), key=str)]


def _deploy(spec, **flags):
    from pipelines.jobs.schedule import deployment

    return deployment(spec, **{**FULL, **flags})


def _walk(node, key):
    """Every value of ``key`` anywhere in ``node``."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def _pods(manifest) -> list[dict]:
    """Every pod spec of a manifest (RayJob head, workers, submitter; CronJob's pod)."""
    return [t["spec"] for t in _walk(manifest, "template") if isinstance(t, dict) and "containers" in t.get("spec", {})] + \
        [t["spec"] for t in _walk(manifest, "submitterPodTemplate")]


def _scheduled_specs():
    return [p for p in JOB_SPECS if yaml.safe_load(p.read_text()).get("schedule")]


def test_shipped_schedules_exist():
    names = {p.stem for p in _scheduled_specs()}
    assert {"nightly_ablations_tiny", "weekly_ablations_small"} <= names, names


@pytest.mark.parametrize("path", JOB_SPECS, ids=lambda p: p.name)
def test_raycronjob_rayjob_and_cronjob_validate(path):
    from croniter import croniter

    from pipelines.jobs.schedule import k8s_cron_job, ray_cron_job, ray_job_spec, scheduled_argv

    spec = load_job_spec(path)
    if spec.schedule is None:
        spec.schedule = "0 3 * * *"  # every spec can be scheduled
    d = _deploy(spec)
    manifest = ray_cron_job(spec, d)
    assert not _errors(crd_validator("RayCronJob"), manifest)
    job = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": spec.name}, "spec": ray_job_spec(spec, d)}
    assert not _errors(crd_validator("RayJob"), job)
    spec_uri = spec.runtime_env.env_vars.get("MLFLOW_TRACKING_URI")
    if spec_uri:  # the cron pod submits the spec as written: its store must be the deployment's
        with pytest.raises(ConfigError, match="submits the spec as written"):
            k8s_cron_job(spec, d, address="http://ray-head.ml:8265")
    cron = k8s_cron_job(spec, _deploy(spec, mlflow_uri=spec_uri) if spec_uri else d, address="http://ray-head.ml:8265")
    assert not _errors(cronjob_validator(), cron)
    assert croniter.is_valid(manifest["spec"]["schedule"])
    template = manifest["spec"]["jobTemplate"]
    assert template["entrypoint"] == shlex.join(scheduled_argv(spec, d))
    assert template["shutdownAfterJobFinishes"] is True and template["ttlSecondsAfterFinished"] > 0
    runtime_env = yaml.safe_load(template.get("runtimeEnvYAML", "{}"))
    assert "working_dir" not in runtime_env or "://" in runtime_env["working_dir"]  # no local paths on k8s
    assert runtime_env.get("env_vars", {}) == {k: v for k, v in spec.runtime_env.env_vars.items()
                                               if k != "MLFLOW_TRACKING_URI"}
    assert set(_walk(manifest, "image")) == {IMAGE} == set(_walk(cron, "image"))
    assert template["rayClusterSpec"]["authOptions"] == {"mode": "token"}


def test_deployment_applies_flags_over_the_spec_without_changing_it():
    """One dataclass: the flags win over the spec's ``cluster`` keys, ``cluster.mlflow_uri`` over the spec's
    MLFLOW_TRACKING_URI; the spec's own settings are left as they were; an unknown setting is an error."""
    from pipelines.jobs.schedule import deployment

    spec = load_job_spec(JOBS / "weekly_ablations_signal.yaml")
    before = copy.deepcopy(spec.cluster)
    spec.cluster.pvc, spec.cluster.namespace = "from-spec", "spec-ns"
    d = deployment(spec, image=IMAGE, namespace="flag-ns", webhook="https://hooks.example.com/x")
    assert (d.pvc, d.namespace, d.failure_webhook) == ("from-spec", "flag-ns", "https://hooks.example.com/x")
    assert d.mlflow_uri == spec.runtime_env.env_vars["MLFLOW_TRACKING_URI"]  # no flag, no cluster key
    spec.cluster.mlflow_uri = "https://team-mlflow.example.com"
    assert deployment(spec, image=IMAGE).mlflow_uri == "https://team-mlflow.example.com"
    assert deployment(spec, image=IMAGE, mlflow_uri="https://flag.example.com").mlflow_uri == "https://flag.example.com"
    assert (spec.cluster.namespace, spec.cluster.failure_webhook, spec.cluster.image) == ("spec-ns", None, before.image)
    with pytest.raises(TypeError, match="no cluster setting 'pcv'"):
        deployment(spec, image=IMAGE, pcv="typo")


def test_strict_validation_catches_a_misspelt_field():
    """The validators are not vacuous: a field the schema does not know and a wrong type are errors."""
    from pipelines.jobs.schedule import k8s_cron_job, ray_cron_job

    spec = load_job_spec(JOBS / "nightly_ablations_tiny.yaml")
    manifest = ray_cron_job(spec, _deploy(spec))
    validator = crd_validator("RayCronJob")
    assert not list(validator.iter_errors(manifest))
    for edit in (lambda m: m["spec"]["jobTemplate"].update(shutdownAfterJobFinish=True),
                 lambda m: m["spec"]["jobTemplate"].update(ttlSecondsAfterFinished="600"),
                 lambda m: m["spec"].pop("schedule"),
                 lambda m: m["spec"]["jobTemplate"]["submitterPodTemplate"]["spec"].update(imagePullSecret=["x"])):
        bad = copy.deepcopy(manifest)
        edit(bad)
        assert list(validator.iter_errors(bad))
    cron = k8s_cron_job(spec, _deploy(spec), address="http://head:8265")
    validator = cronjob_validator()
    for edit in (lambda m: m["spec"].update(concurrencyPolicy="Never"),
                 lambda m: m["spec"]["jobTemplate"]["spec"].update(backoffLimits=0),
                 lambda m: m["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"][0].update(
                     valueFrom={"secretKeyRef": {"nme": "x"}}),
                 lambda m: m["spec"]["jobTemplate"]["spec"]["template"]["spec"].update(serviceAccount_name="x")):
        bad = copy.deepcopy(cron)
        edit(bad)
        assert list(validator.iter_errors(bad)), edit


@pytest.mark.parametrize("form", ["k8s", "k8s-cronjob"])
def test_every_setting_reaches_the_manifest(form):
    from pipelines.jobs.schedule import k8s_cron_job, ray_cron_job

    spec = load_job_spec(JOBS / "nightly_ablations_tiny.yaml")
    d = _deploy(spec)
    m = ray_cron_job(spec, d) if form == "k8s" else k8s_cron_job(spec, d, address="http://ray-head.ml:8265")
    assert m["metadata"]["namespace"] == "ml"
    pods = _pods(m)
    assert pods and all(p["serviceAccountName"] == "lsnet-runner" for p in pods)
    assert all(p["imagePullSecrets"] == [{"name": "regcred"}] for p in pods)
    containers = [c for p in pods for c in p["containers"]]
    assert {c["image"] for c in containers} == {IMAGE}
    # the pods that run the job's code (RayCronJob: head and workers) mount the volume; env from Secrets
    runners = [c for c in containers if c["name"] in ("ray-head", "ray-worker", "submit")]
    for c in runners:
        env = {e["name"]: e for e in c["env"]}
        assert env["MLFLOW_TRACKING_URI"]["value"] == "https://mlflow.example.com"
        for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-credentials", "key": var, "optional": True}
        assert env["LSNET_FAILURE_WEBHOOK"]["valueFrom"]["secretKeyRef"] == {"name": "lsnet-alerts", "key": "url"}
        assert "value" not in env["MLFLOW_TRACKING_PASSWORD"]  # no credential in the manifest itself
    if form == "k8s":
        head = m["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        assert head["volumes"] == [{"name": "lsnet-data", "persistentVolumeClaim": {"claimName": "lsnet-results"}}]
        assert head["containers"][0]["volumeMounts"] == [{"name": "lsnet-data", "mountPath": "/mnt/lsnet"}]
        argv = shlex.split(m["spec"]["jobTemplate"]["entrypoint"])
        assert argv[argv.index("--out") + 1] == "/mnt/lsnet/ablations"  # outputs and --resume state on the volume
        assert argv[:6] == ["python", "-m", "pipelines.jobs.guarded", "--job", spec.name, "--"]  # the webhook
        # a failed run fails the submitter Job (ray job submit exits 1), with no retry
        assert m["spec"]["jobTemplate"]["backoffLimit"] == 0
        assert m["spec"]["jobTemplate"]["submitterConfig"] == {"backoffLimit": 0}
    else:
        job = m["spec"]["jobTemplate"]["spec"]
        assert job["backoffLimit"] == 0 and job["template"]["spec"]["restartPolicy"] == "Never"
        command = job["template"]["spec"]["containers"][0]["command"]
        assert command[:6] == ["python", "-m", "pipelines.jobs.guarded", "--job", spec.name, "--"]
        assert command[6:10] == ["lsnet", "jobs", "submit", "jobs/nightly_ablations_tiny.yaml"] and "--wait" in command
        assert command[-3:] == ["--", "--out", "/mnt/lsnet/ablations"]
        env = {e["name"]: e for e in job["template"]["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "ray-auth-token", "key": "token"}


def test_object_storage_and_a_webhook_url_for_training(tmp_path):
    from pipelines.jobs.schedule import ray_cron_job

    spec = load_job_spec(JOBS / "train_tiny_bbox.yaml")
    spec.schedule = "0 3 * * *"
    m = ray_cron_job(spec, _deploy(spec, pvc=None, storage="s3://bucket/lsnet", storage_secret="s3-credentials",
                                   failure_webhook_secret=None, webhook="https://hooks.example.com/T1"))
    argv = shlex.split(m["spec"]["jobTemplate"]["entrypoint"])
    assert argv[-2:] == ["--set", "run.storage_path=s3://bucket/lsnet/runs"]  # the last --set wins
    head = m["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    env = {e["name"]: e for e in head["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "s3-credentials",
                                                                         "key": "AWS_SECRET_ACCESS_KEY"}
    assert env["LSNET_FAILURE_WEBHOOK"] == {"name": "LSNET_FAILURE_WEBHOOK", "value": "https://hooks.example.com/T1"}
    assert "volumes" not in head


@pytest.mark.parametrize("flags, message", [
    ({"image": None}, "no container image: pass --image REGISTRY/lsnet:TAG"),
    ({"image": "registry.example.com/lsnet:latest"}, "is not pinned"),
    ({"image": "registry.example.com:5000/lsnet"}, "is not pinned"),
    ({"pvc": None}, "`ablation` writes outputs and --resume state: pass --pvc CLAIM"),
    ({"pvc": None, "storage": "s3://b/p"}, "writes its tables to a filesystem: pass --pvc CLAIM"),
    ({"storage": "s3://b/p"}, "--pvc and --storage both"),
    ({"mlflow_uri": "sqlite:///tmp/mlflow.db"}, "would live and die in the pod"),
    ({"service_account": "Bad_Name"}, "--service-account 'Bad_Name' is not a Kubernetes name"),
    ({"image_pull_secrets": ["ok", "no way"]}, "--image-pull-secret 'no way'"),
])
def test_settings_that_cannot_deploy_are_refused(monkeypatch, flags, message):
    monkeypatch.delenv("LSNET_IMAGE", raising=False)
    spec = load_job_spec(JOBS / "nightly_ablations_tiny.yaml")
    with pytest.raises(ConfigError, match="^jobs/|nightly") as info:
        _deploy(spec, **flags)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_image_digest_and_sqlite_on_the_volume_are_accepted():
    spec = load_job_spec(JOBS / "nightly_ablations_tiny.yaml")
    d = _deploy(spec, image="registry.example.com/lsnet@sha256:" + "a" * 64, mlflow_uri=None)
    assert d.mlflow_uri == "sqlite:////mnt/lsnet/mlflow.db"


def test_emit_k8s_from_the_cli(monkeypatch, capsys, tmp_path):
    from pipelines.cli import main

    monkeypatch.setenv("LSNET_IMAGE", IMAGE)
    args = ["jobs", "schedule", "jobs/nightly_ablations_tiny.yaml", "--emit", "k8s", "--pvc", "lsnet-results",
            "--namespace", "ml", "--mlflow-uri", "https://mlflow.example.com"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "alpha" in out and "RayCronJob feature gate" in out and "KubeRay >= 1.6" in out
    manifest = yaml.safe_load(out)
    assert manifest["kind"] == "RayCronJob" and manifest["spec"]["schedule"] == "30 2 * * *"
    assert set(_walk(manifest, "image")) == {IMAGE} and manifest["metadata"]["namespace"] == "ml"
    monkeypatch.delenv("LSNET_IMAGE")
    assert main(args) == 2
    assert capsys.readouterr().err.startswith("lsnet jobs schedule: error: jobs/nightly_ablations_tiny.yaml: no container image")
    assert main([*args, "--image", "lsnet:latest"]) == 2
    assert "is not pinned" in capsys.readouterr().err


def test_emit_k8s_cronjob_needs_an_address(capsys):
    from pipelines.cli import main

    args = ["jobs", "schedule", "jobs/weekly_ablations_small.yaml", "--emit", "k8s-cronjob", "--image", IMAGE,
            "--pvc", "results"]
    assert main(args) == 2
    assert "needs the long-lived cluster's address" in capsys.readouterr().err
    assert main([*args, "--address", "http://ray-head.ray:8265"]) == 0
    cron = yaml.safe_load(capsys.readouterr().out)
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and not _errors(cronjob_validator(), cron)


def test_schedule_without_cron_is_an_error(capsys):
    from pipelines.cli import main

    assert main(["jobs", "schedule", "jobs/train_tiny_bbox.yaml", "--emit", "crontab"]) == 2
    assert "has no `schedule`" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# crontab and its wrapper
# ----------------------------------------------------------------------------------------------


def test_crontab_line(capsys):
    from croniter import croniter

    from pipelines.cli import main

    spec_path = JOBS / "weekly_ablations_small.yaml"
    assert main(["jobs", "schedule", str(spec_path), "--emit", "crontab", "--on-failure-webhook",
                 "https://hooks.example.com/x?a=1%20b"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x and not x.startswith("#")]
    assert lines[0] == "CRON_TZ=Etc/UTC"
    fields = lines[-1].split()
    schedule = " ".join(fields[:5])
    assert croniter.is_valid(schedule)
    assert croniter(schedule, dt.datetime(2026, 1, 1)).get_next(dt.datetime).weekday() == 6  # Sundays
    command = lines[-1].split(" && ", 1)[1]
    assert re.search(r"(?<!\\)%", command) is None and "\\%20" in command  # cron cuts the line at a bare %
    argv = shlex.split(command.replace("\\%", "%"))
    assert argv[:3] == [".venv/bin/python", "-m", "pipelines.jobs.guarded"]
    opts = dict(zip(argv[3:argv.index("--"):2], argv[4:argv.index("--"):2], strict=True))
    assert opts["--log"] == "results/jobs/weekly-ablations-small.log" and int(opts["--keep"]) >= 1
    assert opts["--lock"] and opts["--webhook"] == "https://hooks.example.com/x?a=1%20b"
    assert argv[argv.index("--") + 1:] == [".venv/bin/lsnet", "jobs", "submit", "jobs/weekly_ablations_small.yaml",
                                           "--wait"]


class _Hook(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list] = []

    def do_POST(self):
        _Hook.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    _Hook.received = []
    server = http.server.HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", _Hook.received
    server.shutdown()


def _guarded(tmp_path, *cmd, webhook=None, keep=2, max_bytes=10 << 20, lock=None):
    from pipelines.jobs.guarded import run

    return run("nightly", list(cmd), log=tmp_path / "logs" / "deep" / "nightly.log", keep=keep, max_bytes=max_bytes,
               lock=lock, webhook=webhook)


def test_guarded_run_makes_its_log_dir_and_keeps_the_exit_status(tmp_path, webhook):
    url, received = webhook
    assert _guarded(tmp_path, sys.executable, "-c", "print('hello')", webhook=url) == 0
    log = (tmp_path / "logs" / "deep" / "nightly.log").read_text()
    assert "hello" in log and "end: exit 0" in log and received == []  # no alert for a success
    code = _guarded(tmp_path, sys.executable, "-c", "import sys; print('boom at epoch 3'); sys.exit(3)", webhook=url)
    assert code == 3
    assert len(received) == 1 and received[0]["job"] == "nightly" and received[0]["exit_code"] == 3
    assert received[0]["status"] == "failed" and "boom at epoch 3" in received[0]["log_tail"]
    assert "failure reported to the webhook" in (tmp_path / "logs" / "deep" / "nightly.log").read_text()


def test_an_unreachable_webhook_is_logged_and_the_status_stands(tmp_path):
    from pipelines.jobs.head import free_port

    code = _guarded(tmp_path, sys.executable, "-c", "raise SystemExit(4)", webhook=f"http://127.0.0.1:{free_port()}/")
    assert code == 4
    assert "the failure webhook could not be called" in (tmp_path / "logs" / "deep" / "nightly.log").read_text()


def test_the_log_is_rotated_keeping_n(tmp_path):
    log = tmp_path / "logs" / "deep" / "nightly.log"
    for k in range(4):
        assert _guarded(tmp_path, sys.executable, "-c", f"print('run {k}' * 20)", keep=2, max_bytes=100) == 0
    assert sorted(p.name for p in log.parent.iterdir()) == ["nightly.log", "nightly.log.1", "nightly.log.2"]
    assert "run 3" in log.read_text() and "run 2" in (log.parent / "nightly.log.1").read_text()
    assert "run 1" in (log.parent / "nightly.log.2").read_text()  # run 0 is gone: two kept


def test_an_overlapping_run_is_skipped_and_logged(tmp_path):
    lock = tmp_path / "nightly.lock"
    log = tmp_path / "logs" / "deep" / "nightly.log"
    first = subprocess.Popen([sys.executable, "-m", "pipelines.jobs.guarded", "--job", "nightly", "--log", str(log),
                              "--lock", str(lock), "--", sys.executable, "-c",
                              "import time; print('started', flush=True); time.sleep(60)"], cwd=REPO_ROOT)
    try:
        deadline = dt.datetime.now() + dt.timedelta(seconds=60)
        while not (log.exists() and "started" in log.read_text()):
            assert dt.datetime.now() < deadline and first.poll() is None
            threading.Event().wait(0.1)
        assert _guarded(tmp_path, sys.executable, "-c", "print('second')", lock=lock) == 75
        text = log.read_text()
        assert f"SKIPPED: the previous run (pid {first.pid}, started " in text and "second" not in text
    finally:
        first.kill()
        first.wait()
    assert _guarded(tmp_path, sys.executable, "-c", "print('third')", lock=lock) == 0  # the lock died with it
