"""Scheduled forms of a job spec with a ``schedule`` (``lsnet jobs schedule SPEC --emit ...``).

- ``k8s``: a KubeRay ``RayCronJob`` (ray.io/v1; KubeRay >= 1.6, *alpha*, only served when the operator
  runs with the ``RayCronJob`` feature gate, ``--feature-gates=RayCronJob=true`` / Helm
  ``featureGates: [{name: RayCronJob, enabled: true}]``). Each tick creates a RayJob with its own
  RayCluster (from the spec's ``cluster`` template) that is deleted when the job ends. RayCronJob has
  no concurrency policy: a run that outlasts the period overlaps the next one.
- ``k8s-cronjob``: a plain Kubernetes ``CronJob`` (``concurrencyPolicy: Forbid``, history limits)
  whose pod runs ``lsnet jobs submit SPEC --address ... --wait`` against a long-lived cluster.
- ``crontab``: one crontab line for a plain host, run through :mod:`pipelines.jobs.guarded` (its log
  directory made, the log rotated, an overlapping run skipped *and logged*, a failure webhook).

The Kubernetes forms are deployable as emitted (:func:`deployment`: the spec's ``cluster`` with
the flags of ``lsnet jobs schedule``): a pinned image (registry and tag, never ``:latest``), namespace,
service account, image-pull secrets, a PersistentVolumeClaim or object-storage location for the
outputs and ``--resume`` state (the job's output arguments point there), the MLflow URI with its
credentials from a Secret (``env.valueFrom.secretKeyRef``), and a failure that fails the Kubernetes Job
(``backoffLimit: 0``; ``ray job submit`` / ``lsnet jobs submit --wait`` exit 1 on a FAILED job) and can
call a webhook.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import fields, replace
from pathlib import Path

import yaml

from lsnet.config import ConfigError
from pipelines.jobs.guarded import WEBHOOK_ENV
from pipelines.jobs.spec import ClusterTemplate, JobSpec
from pipelines.paths import REPO_ROOT

RAYCRONJOB_NOTE = ("RayCronJob is an alpha API of KubeRay >= 1.6: the operator must run with the RayCronJob "
                   "feature gate (--feature-gates=RayCronJob=true; Helm: featureGates: [{name: RayCronJob, "
                   "enabled: true}]). It has no concurrency policy; use --emit k8s-cronjob for Forbid.")


def _need_schedule(spec: JobSpec) -> str:
    if not spec.schedule:
        raise ConfigError(f"{spec.path or spec.name}: the spec has no `schedule` (a cron expression)")
    return spec.schedule


#: Commands that write outputs and resume state, and the arguments that put them at a location.
OUTPUT_ARGS = {
    "ablation": lambda loc: ["--out", f"{loc}/ablations"],
    "train": lambda loc: ["--set", f"run.storage_path={loc}/runs"],
    "tune": lambda loc: ["--set", f"run.storage_path={loc}/runs"],
}
#: Commands whose outputs must be on a filesystem (a volume), not an object store.
NEEDS_VOLUME = {"ablation"}
DATA_VOLUME = "lsnet-data"
_SECRET_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def check_image(image: str | None, source: str) -> str:
    """A pinned image reference: ``[REGISTRY/]NAME:TAG`` with a tag other than ``latest``, or ``@sha256:``."""
    how = ("pass --image REGISTRY/lsnet:TAG or set $LSNET_IMAGE (`make image` tags lsnet:<commit> of this "
           "checkout; push it where the cluster pulls from)")
    if not image:
        raise ConfigError(f"{source}: no container image: {how}")
    if "@sha256:" in image:
        return image
    last = image.rsplit("/", 1)[-1]
    if ":" not in last or last.rsplit(":", 1)[1] in ("", "latest"):
        raise ConfigError(f"{source}: image {image!r} is not pinned (a tag other than latest, or a digest): the "
                          f"cluster would run whatever it is today; {how}")
    return image


#: ``lsnet jobs schedule`` flags whose ClusterTemplate field has another name
FLAG_FIELDS = {"webhook": "failure_webhook"}  # --on-failure-webhook


def deployment(spec: JobSpec, **flags) -> ClusterTemplate:
    """The spec's ``cluster`` settings with the flags of ``lsnet jobs schedule`` over them (a flag given
    wins; ``webhook`` sets ``failure_webhook``), checked: a pinned image; for a command with outputs, a
    volume or object-storage location for them; an MLflow store that outlives the pod (a server, or
    SQLite on the volume; default: the spec's ``MLFLOW_TRACKING_URI``)."""
    source = spec.path or spec.name
    given = {FLAG_FIELDS.get(k, k): v for k, v in flags.items() if v not in (None, [], "")}
    unknown = sorted(set(given) - {f.name for f in fields(ClusterTemplate)})
    if unknown:
        raise TypeError(f"deployment(): no cluster setting {unknown[0]!r}")
    d = replace(spec.cluster, **given)
    d.image = check_image(d.image, source)
    d.mount_path = d.mount_path or "/mnt/lsnet"
    d.mlflow_uri = d.mlflow_uri or spec.runtime_env.env_vars.get("MLFLOW_TRACKING_URI")
    for what, name in [("--service-account", d.service_account), ("--image-pull-secret", None),
                       ("--pvc", d.pvc), ("--storage-secret", d.storage_secret), ("--mlflow-secret", d.mlflow_secret),
                       ("--on-failure-webhook-secret", d.failure_webhook_secret), ("--namespace", d.namespace),
                       *(("--image-pull-secret", n) for n in d.image_pull_secrets)]:
        if name is not None and not _SECRET_NAME.match(name):
            raise ConfigError(f"{source}: {what} {name!r} is not a Kubernetes name (lower-case letters, digits, '-', '.')")
    if d.pvc and d.storage:
        raise ConfigError(f"{source}: --pvc and --storage both name where outputs go: give one")
    if d.storage is not None and "://" not in d.storage:
        raise ConfigError(f"{source}: --storage {d.storage!r} is not an object-storage URI (s3://bucket/prefix)")
    if not d.mount_path.startswith("/"):
        raise ConfigError(f"{source}: mount path {d.mount_path!r} must be absolute")
    if spec.command in OUTPUT_ARGS and d.output_location is None:
        raise ConfigError(f"{source}: `{spec.command}` writes outputs and --resume state: pass --pvc CLAIM (a "
                          "PersistentVolumeClaim) or --storage s3://BUCKET/PREFIX, or they die with the pod")
    if spec.command in NEEDS_VOLUME and d.storage:
        raise ConfigError(f"{source}: `{spec.command}` writes its tables to a filesystem: pass --pvc CLAIM, not --storage")
    if d.mlflow_uri is None:
        if not d.pvc:
            raise ConfigError(f"{source}: no MLflow store: pass --mlflow-uri http://SERVER:5000 (or MLFLOW_TRACKING_URI "
                              "in the spec's env_vars), or --pvc CLAIM for a SQLite store on the volume")
        d.mlflow_uri = f"sqlite:///{d.mount_path}/mlflow.db"
    elif not d.mlflow_uri.startswith(("http://", "https://", "databricks", "postgresql", "mysql")) and not (
            d.pvc and d.mlflow_uri.startswith(f"sqlite:///{d.mount_path}/")):
        raise ConfigError(f"{source}: MLflow URI {d.mlflow_uri!r} would live and die in the pod: a tracking server "
                          f"(http://...), a database, or sqlite:///{d.mount_path}/... on --pvc")
    return d


def _secret_env(name: str, secret: str, key: str, optional: bool = False) -> dict:
    ref = {"name": secret, "key": key, **({"optional": True} if optional else {})}
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def container_env(spec: JobSpec, d: ClusterTemplate, extra: list[dict] | None = None) -> list[dict]:
    """The variables of every container: the spec's env_vars, the MLflow URI and the credentials from
    Secrets (never in the manifest itself)."""
    env = [{"name": k, "value": str(v)} for k, v in spec.runtime_env.env_vars.items() if k != "MLFLOW_TRACKING_URI"]
    env.append({"name": "MLFLOW_TRACKING_URI", "value": d.mlflow_uri})
    if d.mlflow_secret:  # whichever the server uses: basic auth or a bearer token
        env += [_secret_env(k, d.mlflow_secret, k, optional=True)
                for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")]
    if d.storage_secret:
        env += [_secret_env(k, d.storage_secret, k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
        env.append(_secret_env("AWS_ENDPOINT_URL", d.storage_secret, "AWS_ENDPOINT_URL", optional=True))
    if d.failure_webhook_secret:
        env.append(_secret_env(WEBHOOK_ENV, d.failure_webhook_secret, "url"))
    elif d.failure_webhook:
        env.append({"name": WEBHOOK_ENV, "value": d.failure_webhook})
    return env + list(extra or [])


def _pod_spec(d: ClusterTemplate, containers: list[dict], **extra) -> dict:
    pod = {**extra}
    if d.service_account:
        pod["serviceAccountName"] = d.service_account
    if d.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in d.image_pull_secrets]
    if d.pvc:
        pod["volumes"] = [{"name": DATA_VOLUME, "persistentVolumeClaim": {"claimName": d.pvc}}]
        for c in containers:
            c["volumeMounts"] = [{"name": DATA_VOLUME, "mountPath": d.mount_path}]
    pod["containers"] = containers
    return pod


def _container(name: str, image: str, cpu: str, memory: str, gpu: int = 0, env: list | None = None) -> dict:
    limits = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": str(gpu)} if gpu else {})}
    c = {"name": name, "image": image, "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": limits}}
    if env:
        c["env"] = env
    return c


def _copy_env(env: list[dict]) -> list[dict]:
    import copy

    return copy.deepcopy(env)


def ray_cluster_spec(d: ClusterTemplate, env: list[dict]) -> dict:
    """The RayJob's ``rayClusterSpec``: a head group and the template's worker groups (``d``: the
    :func:`deployment` settings)."""
    head_container = {**_container("ray-head", d.image, d.head_cpu, d.head_memory, env=_copy_env(env)),
                      "ports": [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"}]}
    head = {"rayStartParams": {"dashboard-host": "0.0.0.0"},  # inside the pod: the Service reaches it
            "template": {"spec": _pod_spec(d, [head_container])}}
    workers = []
    for group in d.workers:
        workers.append({
            "groupName": group.name, "replicas": group.replicas,
            "minReplicas": group.min_replicas if group.min_replicas is not None else group.replicas,
            "maxReplicas": group.max_replicas if group.max_replicas is not None else group.replicas,
            "rayStartParams": {},
            "template": {"spec": _pod_spec(d, [_container("ray-worker", d.image, group.cpu, group.memory, group.gpu,
                                                          _copy_env(env))])}})
    spec = {"rayVersion": d.ray_version, "headGroupSpec": head, "workerGroupSpecs": workers}
    if d.auth == "token":
        spec["authOptions"] = {"mode": "token"}
    return spec


def scheduled_argv(spec: JobSpec, d: ClusterTemplate) -> list[str]:
    """The job's command with its outputs at the deployment's location (and wrapped for the webhook)."""
    location = d.output_location
    extra = OUTPUT_ARGS[spec.command](location) if spec.command in OUTPUT_ARGS and location else []
    argv = spec.argv + extra
    if d.failure_webhook or d.failure_webhook_secret:
        argv = ["python", "-m", "pipelines.jobs.guarded", "--job", spec.name, "--", *argv]
    return argv


def ray_job_spec(spec: JobSpec, d: ClusterTemplate) -> dict:
    """A RayJob ``spec`` (also the ``jobTemplate`` of a RayCronJob); ``d``: :func:`deployment`."""
    runtime_env = spec.runtime_env.to_ray(root=None)
    # On Kubernetes the code is in the image (or at the spec's cluster.working_dir, a URI): no local upload.
    runtime_env.pop("working_dir", None)
    runtime_env.pop("excludes", None)
    # the MLflow URI is the deployment's, in the containers' environment (runtime_env would override it)
    runtime_env.get("env_vars", {}).pop("MLFLOW_TRACKING_URI", None)
    if not runtime_env.get("env_vars", True):
        runtime_env.pop("env_vars")
    if d.working_dir:
        runtime_env["working_dir"] = d.working_dir
    env = container_env(spec, d)
    submitter = {"name": "ray-job-submitter", "image": d.image,
                 "resources": {"requests": {"cpu": "200m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}}
    pod = _pod_spec(d, [submitter], restartPolicy="Never")
    pod.pop("volumes", None)  # the submitter only runs `ray job submit`
    submitter.pop("volumeMounts", None)
    job = {"entrypoint": shlex.join(scheduled_argv(spec, d)),
           "shutdownAfterJobFinishes": d.shutdown_after_job_finishes,
           "ttlSecondsAfterFinished": d.ttl_seconds_after_finished,
           # a FAILED Ray job makes `ray job submit` exit 1: the submitter Job fails, once, visibly
           "submissionMode": "K8sJobMode", "backoffLimit": 0, "submitterConfig": {"backoffLimit": 0},
           "submitterPodTemplate": {"spec": pod},
           "metadata": {"lsnet_job": spec.name},
           "rayClusterSpec": ray_cluster_spec(d, env)}
    if runtime_env:
        job["runtimeEnvYAML"] = yaml.safe_dump(runtime_env, sort_keys=False)
    res = spec.resources
    if res.num_cpus is not None:
        job["entrypointNumCpus"] = float(res.num_cpus)
    if res.num_gpus is not None:
        job["entrypointNumGpus"] = float(res.num_gpus)
    if d.active_deadline_seconds is not None:
        job["activeDeadlineSeconds"] = d.active_deadline_seconds
    return job


def _metadata(spec: JobSpec, d: ClusterTemplate) -> dict:
    meta = {"name": spec.name, "labels": {"app.kubernetes.io/part-of": "lsnet", "app.kubernetes.io/name": spec.name}}
    if d.namespace:
        meta["namespace"] = d.namespace
    return meta


def ray_cron_job(spec: JobSpec, d: ClusterTemplate) -> dict:
    body = {"schedule": _need_schedule(spec), "jobTemplate": ray_job_spec(spec, d)}
    if spec.time_zone:
        body["timeZone"] = spec.time_zone
    return {"apiVersion": "ray.io/v1", "kind": "RayCronJob", "metadata": _metadata(spec, d), "spec": body}


def k8s_cron_job(spec: JobSpec, d: ClusterTemplate, address: str | None = None) -> dict:
    address = address or spec.address
    if not address:
        raise ConfigError(f"{spec.path or spec.name}: --emit k8s-cronjob needs the long-lived cluster's address "
                          "(--address http://HEAD:8265 or `address:` in the spec)")
    spec_uri = spec.runtime_env.env_vars.get("MLFLOW_TRACKING_URI")
    if spec_uri and spec_uri != d.mlflow_uri:  # the pod's `lsnet jobs submit` sends the spec's env_vars as they are
        raise ConfigError(f"{spec.path or spec.name}: --emit k8s-cronjob submits the spec as written, so its job "
                          f"would log to the spec's MLFLOW_TRACKING_URI {spec_uri!r}, not {d.mlflow_uri!r}: make "
                          "them the same, or drop the spec's")
    spec_path = _repo_relative(spec.path) if spec.path else f"jobs/{spec.name}.yaml"
    extra = [{"name": "RAY_API_SERVER_ADDRESS", "value": address}]
    if d.auth == "token":
        extra += [{"name": "RAY_AUTH_MODE", "value": "token"}, _secret_env("RAY_AUTH_TOKEN", d.token_secret, "token")]
    location = d.output_location
    outputs = OUTPUT_ARGS[spec.command](location) if spec.command in OUTPUT_ARGS and location else []
    # outputs are written by the job on the long-lived cluster: the location must be one it mounts too
    command = ["lsnet", "jobs", "submit", spec_path, "--address", address, "--wait", *_submit_extra(outputs)]
    if d.failure_webhook or d.failure_webhook_secret:
        command = ["python", "-m", "pipelines.jobs.guarded", "--job", spec.name, "--", *command]
    container = {"name": "submit", "image": d.image, "command": command, "env": container_env(spec, d, extra),
                 "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}}}
    pod = _pod_spec(d, [container], restartPolicy="Never")
    pod.pop("volumes", None)  # the submitter pod writes nothing: the job on the cluster does
    container.pop("volumeMounts", None)
    # a failed job: `lsnet jobs submit --wait` exits 1, the pod fails, the Job fails without a retry
    job_spec = {"backoffLimit": 0, "template": {"metadata": {"labels": {"app.kubernetes.io/name": spec.name}},
                                                "spec": pod}}
    if d.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = d.active_deadline_seconds
    body = {"schedule": _need_schedule(spec), "concurrencyPolicy": "Forbid",
            "successfulJobsHistoryLimit": d.history_limit, "failedJobsHistoryLimit": d.history_limit,
            "startingDeadlineSeconds": 3600, "jobTemplate": {"spec": job_spec}}
    if spec.time_zone:
        body["timeZone"] = spec.time_zone
    return {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": _metadata(spec, d), "spec": body}


def _submit_extra(outputs: list[str]) -> list[str]:
    """The output arguments as ``lsnet jobs submit`` appends them to the entrypoint: ``--set`` pairs through
    its ``--set``, other options (``--out DIR``) after ``--``."""
    sets, raw = [], []
    for option, value in zip(outputs[::2], outputs[1::2], strict=True):
        (sets if option == "--set" else raw).extend(["--set", value] if option == "--set" else [option, value])
    return sets + (["--", *raw] if raw else [])


def _repo_relative(path: str) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def crontab_line(spec: JobSpec, address: str | None = None, repo: str | None = None, webhook: str | None = None,
                 keep: int = 5, max_bytes: int = 10 << 20) -> str:
    """One crontab entry: ``cd REPO && python -m pipelines.jobs.guarded ... -- lsnet jobs submit SPEC --wait``
    (log in ``results/jobs/NAME.log``, rotated; overlapping runs skipped and logged; failure webhook)."""
    repo = str(Path(repo).resolve()) if repo else str(REPO_ROOT)
    submit = [".venv/bin/lsnet", "jobs", "submit", _repo_relative(spec.path) if spec.path else f"jobs/{spec.name}.yaml",
              "--wait"]
    if address or spec.address:
        submit += ["--address", address or spec.address]
    guard = [".venv/bin/python", "-m", "pipelines.jobs.guarded", "--job", spec.name,
             "--log", f"results/jobs/{spec.name}.log", "--keep", str(keep), "--max-bytes", str(max_bytes),
             "--lock", f"results/jobs/{spec.name}.lock"]
    url = webhook or spec.cluster.failure_webhook
    if url:
        guard += ["--webhook", url]
    # cron reads % as a newline: escape it (a webhook URL may hold one)
    line = f"{_need_schedule(spec)} cd {shlex.quote(repo)} && {shlex.join(guard + ['--'] + submit)}".replace("%", "\\%")
    return (f"CRON_TZ={spec.time_zone}\n" if spec.time_zone else "") + line + "\n"


def emit(spec: JobSpec, kind: str, address: str | None = None, repo: str | None = None, **flags) -> str:
    header = f"# lsnet job {spec.name}: {spec.description.strip()}\n" if spec.description else ""
    if kind == "crontab":
        return (header + "# install with `crontab -e`; the log is results/jobs/" + spec.name + ".log in the checkout "
                "(rotated), an overlapping run is skipped and logged\n"
                + crontab_line(spec, address, repo, webhook=flags.get("webhook")))
    d = deployment(spec, **flags)
    where = f"namespace {d.namespace}" if d.namespace else "the namespace of `kubectl apply -n NAMESPACE -f FILE`"
    header += f"# image {d.image}; {where}; outputs at {d.output_location or '(none)'}; MLflow {d.mlflow_uri}\n"
    if kind == "k8s":
        note = "".join(f"# {line}\n" for line in _wrap(RAYCRONJOB_NOTE))
        return header + note + yaml.safe_dump(ray_cron_job(spec, d), sort_keys=False)
    if kind == "k8s-cronjob":
        return header + yaml.safe_dump(k8s_cron_job(spec, d, address), sort_keys=False)
    raise ConfigError(f"--emit: expected k8s, k8s-cronjob or crontab, got {kind!r}")


def _wrap(text: str, width: int = 100) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)
