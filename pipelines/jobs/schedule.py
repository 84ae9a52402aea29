"""Scheduled forms of a job spec with a ``schedule`` (``lsnet jobs schedule SPEC --emit ...``).

- ``k8s``: a KubeRay ``RayCronJob`` (ray.io/v1; KubeRay >= 1.6, *alpha*, only served when the operator
  runs with the ``RayCronJob`` feature gate, ``--feature-gates=RayCronJob=true`` / Helm
  ``featureGates: [{name: RayCronJob, enabled: true}]``). Each tick creates a RayJob with its own
  RayCluster (from the spec's ``cluster`` template) that is deleted when the job ends. RayCronJob has
  no concurrency policy: a run that outlasts the period overlaps the next one.
- ``k8s-cronjob``: a plain Kubernetes ``CronJob`` (``concurrencyPolicy: Forbid``, history limits)
  whose pod runs ``lsnet jobs submit SPEC --address ... --wait`` against a long-lived cluster.
- ``crontab``: one crontab line for a plain host (``flock`` keeps runs from overlapping).
"""
from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from lsnet.config import ConfigError
from pipelines.jobs.spec import ClusterTemplate, JobSpec
from pipelines.paths import REPO_ROOT

RAYCRONJOB_NOTE = ("RayCronJob is an alpha API of KubeRay >= 1.6: the operator must run with the RayCronJob "
                   "feature gate (--feature-gates=RayCronJob=true; Helm: featureGates: [{name: RayCronJob, "
                   "enabled: true}]). It has no concurrency policy; use --emit k8s-cronjob for Forbid.")


def _need_schedule(spec: JobSpec) -> str:
    if not spec.schedule:
        raise ConfigError(f"{spec.path or spec.name}: the spec has no `schedule` (a cron expression)")
    return spec.schedule


def _container(name: str, image: str, cpu: str, memory: str, gpu: int = 0, env: list | None = None) -> dict:
    limits = {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": str(gpu)} if gpu else {})}
    c = {"name": name, "image": image, "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": limits}}
    if env:
        c["env"] = env
    return c


def ray_cluster_spec(cluster: ClusterTemplate, env_vars: dict[str, str]) -> dict:
    """The RayJob's ``rayClusterSpec``: a head group and the template's worker groups."""
    env = [{"name": k, "value": str(v)} for k, v in env_vars.items()]
    head = {"rayStartParams": {"dashboard-host": "0.0.0.0"},  # inside the pod: the Service reaches it
            "template": {"spec": {"containers": [
                {**_container("ray-head", cluster.image, cluster.head_cpu, cluster.head_memory, env=env),
                 "ports": [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"}]}]}}}
    workers = []
    for group in cluster.workers:
        workers.append({
            "groupName": group.name, "replicas": group.replicas,
            "minReplicas": group.min_replicas if group.min_replicas is not None else group.replicas,
            "maxReplicas": group.max_replicas if group.max_replicas is not None else group.replicas,
            "rayStartParams": {},
            "template": {"spec": {"containers": [
                _container("ray-worker", cluster.image, group.cpu, group.memory, group.gpu, env)]}}})
    spec = {"rayVersion": cluster.ray_version, "headGroupSpec": head, "workerGroupSpecs": workers}
    if cluster.auth == "token":
        spec["authOptions"] = {"mode": "token"}
    return spec


def ray_job_spec(spec: JobSpec) -> dict:
    """A RayJob ``spec`` (also the ``jobTemplate`` of a RayCronJob)."""
    cluster = spec.cluster
    runtime_env = spec.runtime_env.to_ray(root=None)
    # On Kubernetes the code is in the image (or at cluster.working_dir, a URI): no local upload.
    runtime_env.pop("working_dir", None)
    runtime_env.pop("excludes", None)
    if cluster.working_dir:
        runtime_env["working_dir"] = cluster.working_dir
    job = {"entrypoint": spec.entrypoint(),
           "shutdownAfterJobFinishes": cluster.shutdown_after_job_finishes,
           "ttlSecondsAfterFinished": cluster.ttl_seconds_after_finished,
           "submissionMode": "K8sJobMode", "backoffLimit": 0,
           "metadata": {"lsnet_job": spec.name},
           "rayClusterSpec": ray_cluster_spec(cluster, spec.runtime_env.env_vars)}
    if runtime_env:
        job["runtimeEnvYAML"] = yaml.safe_dump(runtime_env, sort_keys=False)
    res = spec.resources
    if res.num_cpus is not None:
        job["entrypointNumCpus"] = float(res.num_cpus)
    if res.num_gpus is not None:
        job["entrypointNumGpus"] = float(res.num_gpus)
    if cluster.active_deadline_seconds is not None:
        job["activeDeadlineSeconds"] = cluster.active_deadline_seconds
    return job


def ray_cron_job(spec: JobSpec) -> dict:
    body = {"schedule": _need_schedule(spec), "jobTemplate": ray_job_spec(spec)}
    if spec.time_zone:
        body["timeZone"] = spec.time_zone
    return {"apiVersion": "ray.io/v1", "kind": "RayCronJob",
            "metadata": {"name": spec.name, "namespace": spec.cluster.namespace,
                         "labels": {"app.kubernetes.io/part-of": "lsnet"}},
            "spec": body}


def k8s_cron_job(spec: JobSpec, address: str | None = None) -> dict:
    address = address or spec.address
    if not address:
        raise ConfigError(f"{spec.path or spec.name}: --emit k8s-cronjob needs the long-lived cluster's address "
                          "(--address http://HEAD:8265 or `address:` in the spec)")
    cluster = spec.cluster
    spec_path = _repo_relative(spec.path) if spec.path else f"jobs/{spec.name}.yaml"
    env = [{"name": "RAY_API_SERVER_ADDRESS", "value": address}]
    if cluster.auth == "token":
        env += [{"name": "RAY_AUTH_MODE", "value": "token"},
                {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": cluster.token_secret,
                                                                          "key": "token"}}}]
    container = {"name": "submit", "image": cluster.image,
                 "command": ["lsnet", "jobs", "submit", spec_path, "--address", address, "--wait"], "env": env,
                 "resources": {"requests": {"cpu": "100m", "memory": "512Mi"}}}
    job_spec = {"backoffLimit": 0, "template": {"spec": {"restartPolicy": "Never", "containers": [container]}}}
    if cluster.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = cluster.active_deadline_seconds
    body = {"schedule": _need_schedule(spec), "concurrencyPolicy": "Forbid",
            "successfulJobsHistoryLimit": cluster.history_limit, "failedJobsHistoryLimit": cluster.history_limit,
            "startingDeadlineSeconds": 3600, "jobTemplate": {"spec": job_spec}}
    if spec.time_zone:
        body["timeZone"] = spec.time_zone
    return {"apiVersion": "batch/v1", "kind": "CronJob",
            "metadata": {"name": spec.name, "namespace": cluster.namespace,
                         "labels": {"app.kubernetes.io/part-of": "lsnet"}},
            "spec": body}


def _repo_relative(path: str) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def crontab_line(spec: JobSpec, address: str | None = None, repo: str | None = None) -> str:
    repo = str(Path(repo).resolve()) if repo else str(REPO_ROOT)
    cmd = ["flock", "-n", f"/tmp/lsnet-job-{spec.name}.lock", ".venv/bin/lsnet", "jobs", "submit",
           _repo_relative(spec.path) if spec.path else f"jobs/{spec.name}.yaml", "--wait"]
    if address or spec.address:
        cmd += ["--address", address or spec.address]
    line = (f"{_need_schedule(spec)} cd {shlex.quote(repo)} && {shlex.join(cmd)} "
            f">> results/jobs/{spec.name}.log 2>&1")
    return (f"CRON_TZ={spec.time_zone}\n" if spec.time_zone else "") + line + "\n"


def emit(spec: JobSpec, kind: str, address: str | None = None, repo: str | None = None) -> str:
    header = f"# lsnet job {spec.name}: {spec.description.strip()}\n" if spec.description else ""
    if kind == "k8s":
        note = "".join(f"# {line}\n" for line in _wrap(RAYCRONJOB_NOTE))
        return header + note + yaml.safe_dump(ray_cron_job(spec), sort_keys=False)
    if kind == "k8s-cronjob":
        return header + yaml.safe_dump(k8s_cron_job(spec, address), sort_keys=False)
    if kind == "crontab":
        return (header + "# mkdir -p results/jobs in the checkout first; install with `crontab -e`\n"
                + crontab_line(spec, address, repo))
    raise ConfigError(f"--emit: expected k8s, k8s-cronjob or crontab, got {kind!r}")


def _wrap(text: str, width: int = 100) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)
