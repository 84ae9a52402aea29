"""Job specs: one YAML file under ``jobs/`` describes one Ray job (``lsnet jobs submit SPEC``).

::

    name: train-tiny-bbox                  # DNS-1123 label: also the Kubernetes resource name
    description: ...
    command: train                         # an `lsnet` subcommand (pipelines/cli.py COMMANDS)
    config: configs/tiny_bbox.yaml         # optional; must exist (relative to the repository root)
    args: [--address, auto, --set, train.epochs=4]     # or one string (shell-split)
    runtime_env:                           # Ray's runtime_env: the code, pip extras, variables
      working_dir: .                       # the repository root for `lsnet jobs submit`
      excludes: [.git, .venv, results, data, mlruns]
      pip: null
      env_vars: {MLFLOW_TRACKING_URI: http://mlflow.internal:5000}
    resources: {num_cpus: 1, num_gpus: 0}  # of the entrypoint (driver) process
    address: null                          # default cluster (http://HEAD:8265) for submit / k8s-cronjob
    schedule: "0 3 * * *"                  # optional cron (5 fields), checked with croniter
    time_zone: Etc/UTC
    cluster: {...}                         # ClusterTemplate: the RayCluster of a KubeRay RayJob

The entrypoint that Ray runs is ``python -m pipelines.cli COMMAND [CONFIG] ARGS...``. Paths in a spec
are relative to the repository root (the job's working directory). Errors are one line naming the
file and the key: ``jobs/x.yaml: unknown config key foo (known: ...)``.
"""
from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from lsnet.config import ConfigError, from_dict, read_yaml_mapping
from pipelines.paths import REPO_ROOT

DEFAULT_EXCLUDES = [".git", ".venv", "results", "data", "mlruns", "*.arrow", "*.pt", "*.db", ".ruff_cache",
                    ".pytest_cache", "__pycache__"]
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
#: RayCronJob -> RayJob -> RayCluster names get suffixes; KubeRay keeps the base name short.
MAX_NAME_LEN = 40
#: The container image of the K8s manifests: what `make image` built and pushed (the repository's
#: Dockerfile), with its registry and a pinned tag. ``$LSNET_IMAGE`` names it for `make image` and every
#: spec that names none; a spec's ``cluster.image`` and ``lsnet jobs schedule --image`` override it.
#: There is no default: a manifest must not run whatever ``:latest`` is today (pipelines/jobs/schedule.py).
IMAGE_ENV = "LSNET_IMAGE"


def default_image() -> str | None:
    return os.environ.get(IMAGE_ENV) or None


class JobSpecError(ConfigError):
    """A job spec does not parse or validate (message: ``FILE: problem``, one line)."""


@dataclass
class RuntimeEnvSpec:
    working_dir: str | None = "."
    excludes: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDES))
    pip: list[str] | None = None
    env_vars: dict[str, str] = field(default_factory=dict)

    def to_ray(self, root: Path | None = None) -> dict:
        """The ``runtime_env`` dict for the Jobs API (``working_dir`` resolved against ``root``)."""
        env: dict = {}
        if self.working_dir is not None:
            wd = self.working_dir
            if "://" not in wd and root is not None and not Path(wd).is_absolute():
                wd = str((root / wd).resolve())
            env["working_dir"] = wd
            if self.excludes:
                env["excludes"] = list(self.excludes)
        if self.pip:
            env["pip"] = list(self.pip)
        if self.env_vars:
            env["env_vars"] = dict(self.env_vars)
        return env


@dataclass
class EntrypointResources:
    """Resources reserved for the entrypoint (the job driver) — ``submit_job(entrypoint_num_cpus=...)``."""

    num_cpus: float | None = None
    num_gpus: float | None = None
    memory: int | None = None  # bytes
    resources: dict[str, float] | None = None

    def __post_init__(self) -> None:
        # Ray refuses a negative request only at submission (on the cluster, after the upload)
        for name, value in (("num_cpus", self.num_cpus), ("num_gpus", self.num_gpus), ("memory", self.memory),
                            *(self.resources or {}).items()):
            if value is not None and value < 0:
                raise ConfigError(f"resources.{name}: must be >= 0, got {value}")


@dataclass
class WorkerGroup:
    name: str = "workers"
    replicas: int = 1
    min_replicas: int | None = None  # default: replicas
    max_replicas: int | None = None
    cpu: str = "4"
    memory: str = "16Gi"
    gpu: int = 0

    def __post_init__(self) -> None:
        # KubeRay would refuse (or never scale) a group whose bounds do not hold its replicas
        low = self.replicas if self.min_replicas is None else self.min_replicas
        high = self.replicas if self.max_replicas is None else self.max_replicas
        if self.gpu < 0 or not 0 <= low <= self.replicas <= high:
            raise ConfigError(f"cluster.workers {self.name!r}: needs gpu >= 0 and 0 <= min_replicas <= replicas "
                              f"<= max_replicas, got gpu {self.gpu}, {low} <= {self.replicas} <= {high}")


@dataclass
class ClusterTemplate:
    """The RayCluster that a KubeRay RayJob creates for each run (``--emit k8s``) and the image of the
    submitter pod (``--emit k8s-cronjob``). The image must contain this repository and its
    environment (``pip install .``) unless ``working_dir`` is a URI the cluster can download."""

    image: str | None = field(default_factory=default_image)  # resolved once, when the spec is read
    ray_version: str = "2.60.0"
    #: None: the namespace of `kubectl apply -n NS` (the context's)
    namespace: str | None = None
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    workers: list[WorkerGroup] = field(default_factory=list)
    #: runtime_env working_dir on Kubernetes: a URI (s3://.../lsnet.zip) or None (code in the image)
    working_dir: str | None = None
    #: KubeRay authOptions.mode: the operator creates and mounts the token secret
    auth: str = "token"
    shutdown_after_job_finishes: bool = True
    ttl_seconds_after_finished: int = 600
    active_deadline_seconds: int | None = None
    #: k8s-cronjob: Secret with key `token` holding the long-lived cluster's Ray auth token
    token_secret: str | None = "ray-auth-token"
    history_limit: int = 3
    # Deployment settings (each also a flag of `lsnet jobs schedule`, which wins; docs/jobs.md)
    #: the pods' Kubernetes service account
    service_account: str | None = None
    #: Secrets of type kubernetes.io/dockerconfigjson for pulling the image from a private registry
    image_pull_secrets: list[str] = field(default_factory=list)
    #: a PersistentVolumeClaim mounted at ``mount_path`` in every pod: outputs, checkpoints, resume state
    pvc: str | None = None
    mount_path: str = "/mnt/lsnet"
    #: or an object-storage location (s3://bucket/prefix) for them; ``storage_secret``: a Secret with
    #: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and optionally AWS_ENDPOINT_URL)
    storage: str | None = None
    storage_secret: str | None = None
    #: a Secret with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN
    mlflow_secret: str | None = None
    #: called (HTTP POST, JSON) when a run fails: a URL, or a Secret holding it under the key `url`
    failure_webhook: str | None = None
    failure_webhook_secret: str | None = None
    #: the MLflow store the pods log to (``--mlflow-uri``; default: runtime_env's MLFLOW_TRACKING_URI)
    mlflow_uri: str | None = None

    @property
    def output_location(self) -> str | None:
        """Where outputs and ``--resume`` state go: the volume's mount path, else the object-store URI."""
        return self.mount_path if self.pvc else self.storage


@dataclass
class JobSpec:
    name: str
    command: str
    config: str | None = None
    args: list[str] | str = field(default_factory=list)
    description: str = ""
    runtime_env: RuntimeEnvSpec = field(default_factory=RuntimeEnvSpec)
    resources: EntrypointResources = field(default_factory=EntrypointResources)
    address: str | None = None
    schedule: str | None = None
    time_zone: str | None = None
    cluster: ClusterTemplate = field(default_factory=ClusterTemplate)
    metadata: dict[str, str] = field(default_factory=dict)
    #: where the spec was read from (set by load_job_spec)
    path: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        from pipelines.cli import COMMANDS

        if not _DNS_LABEL.match(self.name) or len(self.name) > MAX_NAME_LEN:
            raise ConfigError(f"name: {self.name!r} must be lower-case letters, digits and '-' "
                             f"(a Kubernetes name), at most {MAX_NAME_LEN} characters")
        if self.command not in COMMANDS or self.command == "jobs":
            raise ConfigError(f"command: {self.command!r} is not an lsnet command (one of: {', '.join(COMMANDS)})")
        if isinstance(self.args, str):
            self.args = shlex.split(self.args)
        if self.config is not None:
            path = Path(self.config)
            if not (path if path.is_absolute() else REPO_ROOT / path).is_file():
                raise ConfigError(f"config: file not found: {self.config}")
        if self.schedule is not None:
            validate_cron(self.schedule)
        if self.time_zone is not None:
            validate_time_zone(self.time_zone)
        if self.cluster.auth not in ("token", "disabled"):
            raise ConfigError(f"cluster.auth: expected 'token' or 'disabled', got {self.cluster.auth!r}")

    @property
    def argv(self) -> list[str]:
        """The entrypoint as a list: ``python -m pipelines.cli COMMAND [CONFIG] ARGS...``."""
        return ["python", "-m", "pipelines.cli", self.command,
                *([self.config] if self.config else []), *self.args]

    def entrypoint(self, extra_args: list[str] | None = None) -> str:
        return shlex.join(self.argv + list(extra_args or []))

    @property
    def lsnet_argv(self) -> list[str]:
        """The same command as ``lsnet ...`` arguments (for running it in-process)."""
        return self.argv[3:]


def validate_cron(expression: str) -> None:
    """A standard 5-field cron expression (what Kubernetes, KubeRay and crontab accept)."""
    from croniter import croniter

    if not isinstance(expression, str) or len(expression.split()) != 5 or not croniter.is_valid(expression):
        raise ConfigError(f"schedule: {expression!r} is not a valid 5-field cron expression")


def validate_time_zone(name: str) -> None:
    """An IANA time zone name (what a CronJob's ``timeZone`` and crontab's ``CRON_TZ`` take)."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ConfigError(f"time_zone: {name!r} is not an IANA time zone name (e.g. Etc/UTC, Europe/Berlin)") from None


def job_spec_from_dict(data: dict, source: str = "<spec>") -> JobSpec:
    try:
        spec = from_dict(JobSpec, data)
    except ConfigError as err:
        raise JobSpecError(f"{source}: {err}") from None
    spec.path = source
    return spec


def load_job_spec(path: str | Path) -> JobSpec:
    """Read and validate a job spec; a bad file raises :class:`JobSpecError` (one line)."""
    data = read_yaml_mapping(path, JobSpecError, "job spec")
    return job_spec_from_dict(data, str(path))


def resolve_spec_path(name_or_path: str) -> Path:
    """``jobs/x.yaml``, a path, or a bare name ``x`` (-> ``jobs/x.yaml`` of the repository)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return REPO_ROOT / "jobs" / f"{name_or_path}.yaml"
