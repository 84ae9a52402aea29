"""Submitting job specs through Ray's Jobs API (``ray.job_submission.JobSubmissionClient``).

Cluster address: ``--address http://HEAD:8265``, else ``$RAY_API_SERVER_ADDRESS`` / ``$RAY_ADDRESS``
(Ray's own variables), else the spec's ``address``; with none of them ``lsnet jobs submit`` starts a
private head on 127.0.0.1 for the job (:class:`pipelines.jobs.head.LocalRayHead`) and stops it after.

Token authentication of a remote cluster is Ray's: ``RAY_AUTH_MODE=token`` and the token in
``RAY_AUTH_TOKEN``, or in the file ``RAY_AUTH_TOKEN_PATH`` (default ``~/.ray/auth_token``); the client
then sends ``Authorization: Bearer <token>`` with every request.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass

from lsnet.errors import ServiceError
from pipelines.jobs.spec import JobSpec
from pipelines.paths import REPO_ROOT

#: Ray job states that end a job, and the ones among them that are a success.
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
LOG_TAIL_LINES = 40


def cluster_address(explicit: str | None, spec: JobSpec | None = None) -> str | None:
    return (explicit or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
            or (spec.address if spec is not None else None))


def make_client(address: str, headers: dict[str, str] | None = None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=headers)


def submit_spec(client, spec: JobSpec, extra_args: list[str] | None = None,
                submission_id: str | None = None) -> str:
    """Submit ``spec``; returns the submission id (``raysubmit_...`` unless given)."""
    from pipelines.provenance import COMMIT_ENV, git_commit

    res = spec.resources
    commit = git_commit()
    metadata = {"lsnet_job": spec.name, **({"spec": spec.path} if spec.path else {}), **spec.metadata,
                "git_commit": commit}
    runtime_env = spec.runtime_env.to_ray(REPO_ROOT)
    # the uploaded working dir has no .git: the job's runs are tagged with the commit submitted
    runtime_env.setdefault("env_vars", {}).setdefault(COMMIT_ENV, commit)
    return client.submit_job(
        entrypoint=spec.entrypoint(extra_args), runtime_env=runtime_env,
        submission_id=submission_id, metadata=metadata,
        entrypoint_num_cpus=res.num_cpus, entrypoint_num_gpus=res.num_gpus,
        entrypoint_memory=res.memory, entrypoint_resources=res.resources)


def wait_for(client, submission_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    """Poll until the job is terminal; returns its status name. :class:`JobTimeoutError` past ``timeout_s``."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(submission_id).value)
        if status in TERMINAL:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise JobTimeoutError(f"job {submission_id} still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def follow_logs(client, submission_id: str, out=None) -> None:
    """Stream the job's log to ``out`` until the job ends (``tail_job_logs``)."""
    out = out or sys.stdout

    async def pump():
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    asyncio.run(pump())


def log_tail(client, submission_id: str, lines: int = LOG_TAIL_LINES) -> str:
    text = client.get_job_logs(submission_id)
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


@dataclass
class JobOutcome:
    submission_id: str
    status: str
    address: str
    log_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "SUCCEEDED"


def run_job(spec: JobSpec, *, address: str | None = None, wait: bool = False, follow: bool = False,
            extra_args: list[str] | None = None, submission_id: str | None = None,
            timeout_s: float | None = None, out=None, head_cpus: int | None = None) -> JobOutcome:
    """Submit ``spec`` to ``address`` (or to a private local head, then waiting is implied)."""
    out = out or sys.stdout
    address = cluster_address(address, spec)
    if address is None:
        from pipelines.jobs.head import LocalRayHead

        print("no --address: starting a private Ray head on 127.0.0.1 for this job (token auth)", file=out)
        with LocalRayHead(num_cpus=head_cpus) as head:
            print(f"Ray head {head.address} (temp dir {head.temp_dir})", file=out, flush=True)
            return _submit_and_watch(make_client(head.address, head.headers), head.address, spec, True, follow,
                                     extra_args, submission_id, timeout_s, out)
    return _submit_and_watch(make_client(address), address, spec, wait, follow, extra_args, submission_id,
                             timeout_s, out)


class JobTimeoutError(ServiceError, TimeoutError):
    """A job did not reach a terminal state within ``--timeout``."""


class JobServerError(ServiceError):
    """The job server could not be reached / did not answer (one line: address and cause)."""


def submit_with_retries(client, address: str, spec: JobSpec, extra_args, submission_id, attempts: int = 3,
                        backoff_s: float = 5.0) -> str:
    """``submit_spec`` retried on dropped connections (a loaded head may close the upload); a fixed
    submission id makes a retry after a lost *response* fail as a duplicate rather than run twice."""
    import secrets

    import requests

    submission_id = submission_id or f"raysubmit_lsnet_{secrets.token_hex(6)}"
    for attempt in range(1, attempts + 1):
        try:
            return submit_spec(client, spec, extra_args, submission_id)
        except requests.exceptions.ConnectionError as err:
            if attempt == attempts:
                raise JobServerError(f"cannot reach the Ray job server at {address} after {attempts} attempts "
                                     f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
            time.sleep(backoff_s * attempt)
        except RuntimeError as err:
            if "already exists" in str(err) and attempt > 1:  # the previous attempt did go through
                return submission_id
            if "Failed to get head node agent" in str(err) and attempt < attempts:  # agent still starting
                time.sleep(backoff_s * attempt)
                continue
            raise
    raise AssertionError("unreachable")


def _submit_and_watch(client, address, spec, wait, follow, extra_args, submission_id, timeout_s, out) -> JobOutcome:
    sid = submit_with_retries(client, address, spec, extra_args, submission_id)
    print(f"submitted {spec.name} as {sid} to {address}", file=out, flush=True)
    if not (wait or follow):
        return JobOutcome(sid, str(client.get_job_status(sid).value), address)
    if follow:
        follow_logs(client, sid, out)
    status = wait_for(client, sid, timeout_s)
    tail = log_tail(client, sid) if status != "SUCCEEDED" else ""
    return JobOutcome(sid, status, address, tail)
