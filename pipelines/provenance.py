"""Where a result came from, in one place: the code (git commit), the machine, the Ray job, the data
(the shard manifest's hash) and the MLflow tags that carry them onto a run.

Every run, search parent, ablation parent and benchmark record takes its provenance from here, so the
tags mean the same thing everywhere: ``git_commit``, ``config_name``, ``task``,
``dataset_manifest_sha256`` / ``val_manifest_sha256``, ``ray_job_id`` (+ ``ray_job_submission_id`` for a
job submitted with ``lsnet jobs submit``) and MLflow's own ``mlflow.user`` / ``mlflow.source.*`` tags.
"""
from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

from lsnet.config import ConfigError
from pipelines.paths import REPO_ROOT

#: the commit of code that runs outside its git checkout (a Ray job's uploaded working dir, a container
#: image): ``lsnet jobs submit`` sets it; an image build should too (``ENV LSNET_GIT_COMMIT=...``)
COMMIT_ENV = "LSNET_GIT_COMMIT"
#: The run tags that MLflow's UI shows as creator and source (set by :func:`mlflow_system_tags`).
SYSTEM_TAG_KEYS = ("mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit")


def git_commit() -> str:
    """The checkout's HEAD commit, with ``-dirty`` when tracked files outside ``results/`` have changes (the
    committed outputs there -- tables a ``--publish`` rewrites, benchmark figures -- are not the code that
    ran: a weekly ``ablation run table2 table3 --publish`` must not tag table3 dirty because it published
    table2 first); outside a git checkout
    ``$LSNET_GIT_COMMIT`` if set (not git's answer: the directory may sit inside another repository), else
    ``unknown``."""
    if not (REPO_ROOT / ".git").exists() and os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"], cwd=REPO_ROOT,
                               check=False, capture_output=True, text=True, timeout=10).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    """The machine a benchmark ran on (written into ``results/bench/NAME.json``)."""
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": git_commit(),
    }


def manifest_hash(shard_dir: str | None) -> str:
    """SHA-256 of the shard directory's manifest.json (identifies the exact dataset version)."""
    if shard_dir is None:
        return "none"
    import pyarrow as pa

    from lsnet.data.shards import MANIFEST_NAME, resolve_filesystem, sha256_bytes_of

    fs, root = resolve_filesystem(shard_dir)
    try:
        return sha256_bytes_of(f"{root.rstrip('/')}/{MANIFEST_NAME}", fs)[0]
    except (OSError, pa.ArrowException) as err:
        raise ConfigError(f"data shards {shard_dir}: cannot read {MANIFEST_NAME} ({err}); "
                          "run `lsnet preprocess` first") from None


def ray_job_ids() -> dict[str, str]:
    """The Ray job of this driver (``ray_job_id``) and, for a submitted job, its submission id."""
    import ray

    ids = {"ray_job_id": ray.get_runtime_context().get_job_id()}
    try:  # a job submitted with `ray job submit` carries its submission id in the job metadata
        meta = ray._private.worker.global_worker.core_worker.get_job_config().metadata
        if "job_submission_id" in meta:
            ids["ray_job_submission_id"] = meta["job_submission_id"]
    except Exception as err:  # noqa: BLE001 - an internal API; the tag is optional
        ids["ray_job_submission_id"] = f"unknown ({type(err).__name__})"
    return ids


def mlflow_system_tags(source_name: str, commit: str) -> dict[str, str]:
    """The tags MLflow's own clients set and its UI shows (User, Source, Version): who ran it, which
    command (``lsnet train`` / ``lsnet tune``), which git commit."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = "unknown"
    tags = {"mlflow.user": user, "mlflow.source.name": source_name, "mlflow.source.type": "LOCAL"}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    return tags


def commit_tags(source_name: str) -> dict[str, str]:
    """MLflow's system tags plus ``git_commit``, for a run of command ``source_name``."""
    commit = git_commit()
    return {**mlflow_system_tags(source_name, commit), "git_commit": commit}


def run_tags(cfg, source_name: str) -> dict[str, str]:
    """The provenance tags of a training run or a search's parent run of ``cfg`` (an ExperimentConfig):
    code, config, task, data versions and the Ray job (call on the driver, with Ray started)."""
    return {**commit_tags(source_name), "config_name": cfg.name or "",
            "dataset_manifest_sha256": manifest_hash(cfg.data.train_shards),
            "val_manifest_sha256": manifest_hash(cfg.data.val_shards) if cfg.data.val_shards else "none",
            "task": cfg.model.task, **ray_job_ids()}
