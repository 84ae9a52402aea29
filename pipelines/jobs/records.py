"""What is kept of a job that ran on a private local head (``lsnet jobs submit`` without ``--address``).

That head, and with it Ray's own record of its jobs, is gone when ``submit`` returns. So ``submit``
keeps the job's status (as the job server reported it at the end) in ``<records>/<submission id>.json``
and its whole log in ``<records>/<submission id>.log``; ``lsnet jobs status|logs|list`` without an
address read them. ``<records>`` is ``results/jobs/local/`` of the checkout (ignored by git), or
``$LSNET_JOB_RECORDS``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from lsnet.atomic import atomic_write
from lsnet.errors import InputError
from pipelines.paths import REPO_ROOT

RECORDS_ENV = "LSNET_JOB_RECORDS"


def records_dir() -> Path:
    moved = os.environ.get(RECORDS_ENV)
    return Path(moved) if moved else REPO_ROOT / "results" / "jobs" / "local"


def job_record(details, spec_name: str = "", spec_path: str | None = None, tracking_uri: str | None = None) -> dict:
    """The fields of Ray's ``JobDetails`` that ``jobs status`` / ``list`` show, as plain JSON."""
    metadata = dict(details.metadata or {})
    return {"submission_id": details.submission_id or details.job_id,
            "status": str(details.status.value), "message": details.message or "",
            "entrypoint": details.entrypoint, "start_time": details.start_time, "end_time": details.end_time,
            "driver_exit_code": getattr(details, "driver_exit_code", None),
            "job": spec_name or metadata.get("lsnet_job", ""), "spec": spec_path or metadata.get("spec"),
            "tracking_uri": tracking_uri, "head": "private (stopped with its submit command)"}


def save_record(client, submission_id: str, spec, tracking_uri: str | None) -> Path:
    """Write the job's record and log (called while its head is still up); returns the record's path."""
    directory = records_dir()
    directory.mkdir(parents=True, exist_ok=True)
    record = job_record(client.get_job_info(submission_id), spec.name, spec.path, tracking_uri)
    log = client.get_job_logs(submission_id)
    atomic_write(directory / f"{submission_id}.log", lambda p: Path(p).write_text(log))
    path = directory / f"{submission_id}.json"
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(record, indent=1) + "\n"))
    return path


def load_record(submission_id: str) -> dict:
    path = records_dir() / f"{submission_id}.json"
    if not path.is_file():
        raise InputError(f"no record of {submission_id} in {records_dir()} (a job of a private head is kept "
                         "there; for a cluster's job pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: not a job record ({err.msg} at line {err.lineno})") from None


def record_log(submission_id: str) -> str:
    load_record(submission_id)  # the same error for an unknown id
    path = records_dir() / f"{submission_id}.log"
    return path.read_text(errors="replace") if path.is_file() else ""


def all_records() -> list[dict]:
    records = []
    for path in sorted(records_dir().glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return records
