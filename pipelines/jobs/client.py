"""Submitting job specs through Ray's Jobs API (``ray.job_submission.JobSubmissionClient``).

Cluster address: ``--address http://HEAD:8265``, else ``$RAY_API_SERVER_ADDRESS`` / ``$RAY_ADDRESS``
(Ray's own variables), else the spec's ``address``; with none of them ``lsnet jobs submit`` starts a
private head on 127.0.0.1 for the job (:class:`pipelines.jobs.head.LocalRayHead`) and stops it after.

A job on such a private head runs *in this checkout* (:func:`local_runtime_env`): no upload, so its
relative paths mean what they mean in the user's shell, its checkpoints land in the checkout's
``results/runs`` and its MLflow runs in the store this checkout uses (resolved here, once, and passed
to the job as ``MLFLOW_TRACKING_URI``; a store the spec names wins) -- nothing of it lives in the
head's temporary directory, which is deleted with the head. Its input paths are checked before the
head starts (:mod:`pipelines.jobs.preflight`), and its status and log are kept in
``results/jobs/local/`` (:mod:`pipelines.jobs.records`) for ``lsnet jobs status|logs|list`` after the
head is gone.

Token authentication of a remote cluster is Ray's: ``RAY_AUTH_MODE=token`` and the token in
``RAY_AUTH_TOKEN``, or in the file ``RAY_AUTH_TOKEN_PATH`` (default ``~/.ray/auth_token``); the client
then sends ``Authorization: Bearer <token>`` with every request.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lsnet.errors import ServiceError, one_line
from pipelines.jobs.spec import JobSpec
from pipelines.paths import REPO_ROOT

#: Ray job states that end a job, and the ones among them that are a success.
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
LOG_TAIL_LINES = 40


def cluster_address(explicit: str | None, spec: JobSpec | None = None) -> str | None:
    return (explicit or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
            or (spec.address if spec is not None else None))


AUTH_HINT = ("export RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<the cluster's token> (or RAY_AUTH_TOKEN_PATH="
             "<a file holding it>; on the head: `ray get-auth-token`), then retry; see docs/jobs.md")


class JobAuthError(ServiceError):
    """The job server wants a Ray auth token that was not given (or refused the one given)."""


def make_client(address: str, headers: dict[str, str] | None = None):
    """A ``JobSubmissionClient``; an unreachable server or a missing/refused token is one line."""
    from ray.job_submission import JobSubmissionClient

    with server_errors(address):
        return JobSubmissionClient(address, headers=headers)


@contextlib.contextmanager
def server_errors(address: str):
    """Ray's client errors as one line: a token the head wants (:class:`JobAuthError`, saying how to set
    it), a server that does not answer, a request it refused (an unknown submission id ...)."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as err:
        given = bool(os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))
        what = "refused the auth token given" if given and "missing" not in str(err).lower() \
            else "wants a Ray auth token (token authentication is on)"
        raise JobAuthError(f"the Ray job server at {address} {what}: {AUTH_HINT}") from None
    except (ConnectionError, requests.exceptions.ConnectionError) as err:
        raise JobServerError(f"cannot reach the Ray job server at {address} (is the head running? "
                             f"{one_line(err)[:200]})") from None
    except RuntimeError as err:
        if isinstance(err, ServiceError):
            raise
        raise JobServerError(f"the Ray job server at {address}: {one_line(err)[:300]}") from None


def submit_spec(client, spec: JobSpec, extra_args: list[str] | None = None,
                submission_id: str | None = None, local: dict[str, str] | None = None) -> str:
    """Submit ``spec``; returns the submission id (``raysubmit_...`` unless given). ``local``: the job
    runs on a private head on this machine, in this checkout, with these extra variables
    (:func:`local_runtime_env`)."""
    from pipelines.provenance import COMMIT_ENV, git_commit

    res = spec.resources
    commit = git_commit()
    metadata = {"lsnet_job": spec.name, **({"spec": spec.path} if spec.path else {}), **spec.metadata,
                "git_commit": commit}
    entrypoint = spec.entrypoint(extra_args)
    if local is not None:
        runtime_env, prefix = local_runtime_env(spec, local)
        entrypoint = prefix + entrypoint
    else:
        runtime_env = spec.runtime_env.to_ray(REPO_ROOT)
    # the uploaded working dir has no .git: the job's runs are tagged with the commit submitted
    runtime_env.setdefault("env_vars", {}).setdefault(COMMIT_ENV, commit)
    with quiet_packaging():
        return client.submit_job(
            entrypoint=entrypoint, runtime_env=runtime_env,
            submission_id=submission_id, metadata=metadata,
            entrypoint_num_cpus=res.num_cpus, entrypoint_num_gpus=res.num_gpus,
            entrypoint_memory=res.memory, entrypoint_resources=res.resources)


#: Ray's loggers that narrate the working-dir upload at INFO level (a dozen lines per submission).
PACKAGING_LOGGERS = ("ray._private.runtime_env.packaging", "ray.dashboard.modules.dashboard_sdk")


@contextlib.contextmanager
def quiet_packaging(names: tuple[str, ...] = PACKAGING_LOGGERS):
    """Ray's upload narration (``Creating a file package ...``, ``Pushing file package ...``) hidden:
    :func:`submit_spec` says it in one line; Ray's warnings (a very large file) still show."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def runs_in_checkout(spec: JobSpec) -> bool:
    """Whether the spec's code is this checkout (``working_dir: .``, the default) rather than another
    directory or a URI: then a private head runs the job in place."""
    wd = spec.runtime_env.working_dir
    if wd is None:
        return True
    if "://" in wd:
        return False
    path = Path(wd) if Path(wd).is_absolute() else REPO_ROOT / wd
    return path.resolve() == REPO_ROOT.resolve()


def local_runtime_env(spec: JobSpec, env_vars: dict[str, str]) -> tuple[dict, str]:
    """``(runtime_env, entrypoint prefix)`` of a job on a private head on this machine.

    The job runs in this checkout (``cd CHECKOUT && ...``, the checkout first on ``PYTHONPATH`` of the
    driver and of every Ray worker of the job) instead of an uploaded copy in the head's temporary
    directory: relative paths (``results/demo/shards/...``, ``run.storage_path: results/runs``) and the
    default MLflow store are the checkout's, and outlive the head; no upload, no packaging."""
    runtime_env = spec.runtime_env.to_ray(REPO_ROOT)
    if not runs_in_checkout(spec):
        runtime_env.setdefault("env_vars", {}).update(env_vars)
        return runtime_env, ""
    runtime_env.pop("working_dir", None)
    runtime_env.pop("excludes", None)
    env = runtime_env.setdefault("env_vars", {})
    env.update(env_vars)  # resolved by the submitter from the spec's own values (a store it names wins there)
    root = str(REPO_ROOT)
    env["PYTHONPATH"] = os.pathsep.join([root, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return runtime_env, f"cd {shlex.quote(root)} && "


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

    with quiet_packaging(("ray.dashboard.modules.job.sdk",)):  # "WebSocket closed for job ..." at the end
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
    if address is not None:
        with server_errors(address):
            return _submit_and_watch(make_client(address), address, spec, wait, follow, extra_args,
                                     submission_id, timeout_s, out)
    from pipelines.jobs.head import LocalRayHead
    from pipelines.jobs.preflight import check_local_inputs
    from pipelines.jobs.records import records_dir, save_record
    from pipelines.tracking.store import resolve_tracking_uri

    check_local_inputs(spec, extra_args)  # before any Ray starts: one line naming the missing path
    # the store of the submitting checkout (or the spec's), resolved once; the job logs there
    tracking_uri = resolve_tracking_uri(spec.runtime_env.env_vars.get("MLFLOW_TRACKING_URI"))
    in_place = runs_in_checkout(spec)
    print(f"no --address: running the job on a private Ray head on 127.0.0.1 that stops when this command "
          f"ends{', in this checkout' if in_place else ''}; MLflow store {tracking_uri}; its status and log "
          f"are kept in {records_dir()} (`lsnet jobs status|logs|list` without --address read them)",
          file=out, flush=True)
    with LocalRayHead(num_cpus=head_cpus) as head, server_errors(head.address):
        client = make_client(head.address, head.headers)
        outcome = _submit_and_watch(client, head.address, spec, True, follow, extra_args, submission_id,
                                    timeout_s, out, local={"MLFLOW_TRACKING_URI": tracking_uri})
        with contextlib.suppress(Exception):  # the job's result stands even if its record cannot be kept
            path = save_record(client, outcome.submission_id, spec, tracking_uri)
            print(f"job record: {path}", file=out)
    from pipelines.tracking.store import ui_command

    if not tracking_uri.startswith("sqlite:///") or Path(tracking_uri.removeprefix("sqlite:///")).exists():
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        print(f"the job's MLflow runs: {ui_command(tracking_uri, str(mlflow_bin) if mlflow_bin.exists() else 'mlflow')}",
              file=out, flush=True)
    return outcome


class JobTimeoutError(ServiceError, TimeoutError):
    """A job did not reach a terminal state within ``--timeout``."""


class JobServerError(ServiceError):
    """The job server could not be reached / did not answer (one line: address and cause)."""


def submit_with_retries(client, address: str, spec: JobSpec, extra_args, submission_id, attempts: int = 3,
                        backoff_s: float = 5.0, local: dict[str, str] | None = None) -> str:
    """``submit_spec`` retried on dropped connections (a loaded head may close the upload); a fixed
    submission id makes a retry after a lost *response* fail as a duplicate rather than run twice."""
    import secrets

    import requests

    submission_id = submission_id or f"raysubmit_lsnet_{secrets.token_hex(6)}"
    for attempt in range(1, attempts + 1):
        try:
            return submit_spec(client, spec, extra_args, submission_id, local=local)
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


def _submit_and_watch(client, address, spec, wait, follow, extra_args, submission_id, timeout_s, out,
                      local: dict[str, str] | None = None) -> JobOutcome:
    if local is None and spec.runtime_env.working_dir and "://" not in spec.runtime_env.working_dir:
        excludes = ", ".join(spec.runtime_env.excludes) or "nothing"
        print(f"uploading the working dir {spec.runtime_env.to_ray(REPO_ROOT)['working_dir']} to {address} "
              f"(without {excludes})", file=out, flush=True)
    sid = submit_with_retries(client, address, spec, extra_args, submission_id, local=local)
    print(f"submitted {spec.name} as {sid} to {address}", file=out, flush=True)
    if not (wait or follow):
        return JobOutcome(sid, str(client.get_job_status(sid).value), address)
    if follow:
        follow_logs(client, sid, out)
    status = wait_for(client, sid, timeout_s)
    tail = log_tail(client, sid) if status != "SUCCEEDED" else ""
    return JobOutcome(sid, status, address, tail)
