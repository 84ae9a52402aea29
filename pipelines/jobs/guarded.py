"""Run a scheduled command so that an operator sees what happened to it.

    python -m pipelines.jobs.guarded --job NAME [--log FILE [--keep N] [--max-bytes B]] [--lock FILE]
                                     [--webhook URL] -- COMMAND [ARGS...]

What ``lsnet jobs schedule`` wraps around a scheduled run (the crontab line; the entrypoint of a
RayCronJob and the command of a CronJob when a failure webhook is set):

- ``--log``: the run's output is appended to FILE, whose directory is made; before the run a log of
  ``--max-bytes`` or more is rotated (FILE -> FILE.1 -> ... -> FILE.N, the oldest dropped), so it never
  grows without bound and needs no logrotate. Without ``--log`` the output passes through (``kubectl logs``).
- ``--lock``: a run that finds the previous one still running (an exclusive ``flock`` on FILE) does not
  start: it logs one line saying so and exits 75 (EX_TEMPFAIL) instead of skipping silently.
- ``--webhook`` (or ``$LSNET_FAILURE_WEBHOOK``, e.g. from a Kubernetes Secret): a run that exits non-zero
  POSTs ``{"job", "status": "failed", "exit_code", "host", "log_tail"}`` as JSON there (Slack-style
  incoming webhooks also get a ``text``). A webhook that cannot be reached is logged, never hides the
  run's own exit status, which this wrapper exits with.
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

WEBHOOK_ENV = "LSNET_FAILURE_WEBHOOK"
#: exit status of a run skipped because the previous one still holds the lock (sysexits EX_TEMPFAIL)
SKIPPED = 75
TAIL_LINES = 30


def _stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rotate(log: Path, keep: int, max_bytes: int) -> bool:
    """``log`` -> ``log.1`` -> ... -> ``log.<keep>`` when it has reached ``max_bytes``; returns whether it did."""
    if not log.is_file() or log.stat().st_size < max_bytes:
        return False
    for k in range(keep - 1, 0, -1):
        older = log.with_name(f"{log.name}.{k}")
        if older.exists():
            older.replace(log.with_name(f"{log.name}.{k + 1}"))
    if keep > 0:
        log.replace(log.with_name(f"{log.name}.1"))
    else:
        log.unlink()
    return True


def post_failure(url: str, job: str, exit_code: int, tail: list[str], timeout_s: float = 10.0) -> None:
    text = f"lsnet job {job} failed (exit {exit_code}) on {socket.gethostname()}"
    body = {"job": job, "status": "failed", "exit_code": exit_code, "host": socket.gethostname(),
            "time": _stamp(), "log_tail": "".join(tail)[-4000:], "text": text}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        response.read()


def run(job: str, command: list[str], log: Path | None = None, keep: int = 5, max_bytes: int = 10 << 20,
        lock: Path | None = None, webhook: str | None = None) -> int:
    sink = sys.stdout
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        rotated = rotate(log, keep, max_bytes)
        sink = log.open("a", buffering=1)
        if rotated:
            sink.write(f"[{_stamp()}] {job}: log rotated (previous in {log.name}.1, keeping {keep})\n")

    def say(line: str) -> None:
        sink.write(f"[{_stamp()}] {job}: {line}\n")
        sink.flush()

    held = None
    if lock is not None:
        lock.parent.mkdir(parents=True, exist_ok=True)
        held = lock.open("a+")
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.seek(0)
            owner = held.read().strip() or "unknown"
            say(f"SKIPPED: the previous run ({owner}) still holds {lock}; this run did not start")
            print(f"{job}: skipped, the previous run still holds {lock}", file=sys.stderr)
            return SKIPPED
        held.seek(0)
        held.truncate()
        held.write(f"pid {os.getpid()}, started {_stamp()}")
        held.flush()
    say(f"start: {' '.join(command)}")
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
    except OSError as err:
        say(f"cannot start: {err}")
        code, tail = 127, collections.deque([f"cannot start {command[0]}: {err}\n"])
    else:
        # SIGTERM (a Kubernetes deadline, `kill`) reaches the run; it decides how to end
        signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
        for line in proc.stdout:
            sink.write(line)
            tail.append(line)
        code = proc.wait()
    say(f"end: exit {code}")
    url = webhook or os.environ.get(WEBHOOK_ENV)
    if code != 0 and url:
        try:
            post_failure(url, job, code, list(tail))
            say("failure reported to the webhook")
        except Exception as err:  # noqa: BLE001 -- the run's status stands; the log says why no alert came
            say(f"the failure webhook could not be called: {type(err).__name__}: {err}")
    if held is not None:
        held.close()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.jobs.guarded", description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", required=True)
    parser.add_argument("--log", type=Path, default=None)
    parser.add_argument("--keep", type=int, default=5, help="rotated logs kept (FILE.1 .. FILE.N)")
    parser.add_argument("--max-bytes", type=int, default=10 << 20, help="rotate the log from this size on")
    parser.add_argument("--lock", type=Path, default=None)
    parser.add_argument("--webhook", default=None, help=f"POST here when the run fails (default ${WEBHOOK_ENV})")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command after --")
    return run(args.job, command, args.log, args.keep, args.max_bytes, args.lock, args.webhook)


if __name__ == "__main__":
    sys.exit(main())
