"""Starting Ray for an ``lsnet`` command: quiet, on loopback, and never outliving the command.

:func:`start_ray` connects to a cluster (``--address`` / ``RAY_ADDRESS``) or starts a private local
one. A local Ray started here

- binds to 127.0.0.1 for everything it can: the node address is loopback (:func:`_single_node_on_loopback`),
  so GCS, raylet, workers, dashboard, dashboard agent, runtime-env agent and the autoscaler's metrics
  server all listen on 127.0.0.1 only;
- keeps Ray's token authentication on (its default) without the start-up warning about it;
- dies with the command: a watchdog process (``python -m pipelines.ray_local watch PID SESSION``) kills
  the session's processes (raylet, GCS, DashboardAgent, RuntimeEnvAgent, workers; see
  :func:`session_processes`) within a few seconds when the driver is gone, even after ``kill -9``;
  and the next start cleans up what a previous driver left behind (the records in
  :func:`_records_dir`) -- only sessions whose driver is dead, never another running command's.

:func:`quiet_console` drops Ray's known noise from the console (the ``core_worker`` ERROR line about
``PreemptionWatcher``'s constructor arguments that every Ray Train run prints) and turns off ANSI
colours when the output is not a terminal.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lsnet.errors import LsnetError, one_line


class RayStartError(LsnetError, RuntimeError):
    """A local Ray could not be started."""


#: Lines of Ray's forwarded worker output that are not the user's concern.
NOISE_PATTERNS = (
    # Ray Train V2's controller, on every run: an internal caveat of restartable actors.
    re.compile(r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher'"),
    # A new local Ray enables token auth by default (we keep it on) and says so on every start.
    re.compile(r"Token authentication is enabled for this Ray cluster"),
)
#: Patterns added at run time (:func:`mute_actor_output`).
_MUTED: list[re.Pattern] = []

#: The logger of Ray's token-auth start-up message.
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def mute_actor_output(*actor_names: str) -> None:
    """Drop the forwarded output of these actors from now on (e.g. the tracebacks of a Ray Train
    controller and workers that lsnet itself is killing after Ctrl-C)."""
    for name in actor_names:
        _MUTED.append(re.compile(rf"^\({re.escape(name)} pid="))


def _is_noise(line: str) -> bool:
    return any(p.search(line) for p in NOISE_PATTERNS) or any(p.search(line) for p in _MUTED)


class _FilteredStream:
    """A text stream that drops whole lines matching :data:`NOISE_PATTERNS` (Ray prints each forwarded
    line with one ``print`` call, so a line never spans two writes)."""

    def __init__(self, stream):
        self._stream = stream
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        kept = [line for line in lines if not _is_noise(line)]
        if kept:
            self._stream.write("\n".join(kept) + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending and not _is_noise(self._pending):
            self._stream.write(self._pending)
            self._pending = ""
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        return getattr(self._stream, name)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(p.search(record.getMessage()) for p in NOISE_PATTERNS)


def quiet_console() -> None:
    """Filter Ray's noise out of stdout/stderr and its loggers (idempotent); no colour codes when not
    a terminal."""
    logger = logging.getLogger(TOKEN_AUTH_LOGGER)
    if not any(isinstance(f, _DropNoise) for f in logger.filters):
        logger.addFilter(_DropNoise())
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, _FilteredStream):
            setattr(sys, name, _FilteredStream(stream))
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's "(pid=...)" prefixes without ANSI codes
        os.environ.setdefault("NO_COLOR", "1")


def _records_dir() -> Path:
    path = Path(tempfile.gettempdir()) / f"lsnet-ray-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


#: Ray processes that rename themselves (setproctitle): their command line no longer names the session.
RENAMED_PREFIXES = ("ray::", "ray-dashboard-")


def session_processes(session_dir: str) -> list:
    """The processes of one local Ray session: every process whose command line names its directory
    (as a whole path component: ``.../session_X_12`` is not ``.../session_X_123``), and the renamed
    ones (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``, workers) that hold a file of it open --
    their logs. The agents outlive a killed driver by minutes otherwise: after their raylet died
    they are orphans, found neither by command line nor as anyone's children."""
    import psutil

    session_dir = session_dir.rstrip("/")
    named = re.compile(re.escape(session_dir) + r"(?![^/\s'\"=,;:])")
    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error):
            by_name = named.search(" ".join(proc.info["cmdline"] or []))
            if by_name or ((proc.info["name"] or "").startswith(RENAMED_PREFIXES)
                           and any(f.path.startswith(session_dir + "/") for f in proc.open_files())):
                found.append(proc)
    return found


def kill_session(session_dir: str, grace_s: float = 3.0) -> int:
    """SIGTERM, then SIGKILL after ``grace_s``, to every process of ``session_dir``; returns how many."""
    import psutil

    procs = [p for p in session_processes(session_dir) if "pipelines.ray_local" not in " ".join(p.cmdline())]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return len(procs)


def _driver_alive(pid: int, create_time: float) -> bool:
    """Whether the driver process still runs: same pid *and* start time (a reused pid is another
    process), and not a zombie (killed, its exit status not yet collected by its parent)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        return abs(proc.create_time() - create_time) < 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _record_path(pid: int, create_time: float) -> Path:
    """One record per driver process (pid and start time: a reused pid gets its own record)."""
    return _records_dir() / f"{pid}-{int(create_time * 1000)}.json"


def cleanup_stale_sessions() -> int:
    """Kill the local Ray sessions whose ``lsnet`` driver is gone (e.g. killed with SIGKILL before its
    watchdog could act); returns how many processes were ended. Only sessions with a record whose
    driver is dead are touched: the Ray of another running ``lsnet`` command (its driver alive), a
    ``ray start`` cluster or a Ray started by other code (no record) are left alone."""
    killed = 0
    for record in _records_dir().glob("*.json"):
        try:
            info = json.loads(record.read_text())
        except (OSError, json.JSONDecodeError):
            record.unlink(missing_ok=True)
            continue
        if _driver_alive(info["pid"], info["create_time"]):
            continue
        killed += kill_session(info["session_dir"])
        record.unlink(missing_ok=True)
    return killed


def _register(session_dir: str) -> None:
    """Record the session and start its watchdog (in its own session: Ctrl-C of the driver's terminal
    does not reach it, and it outlives a SIGKILL of the driver)."""
    import psutil

    me = psutil.Process()
    info = {"pid": me.pid, "create_time": me.create_time(), "session_dir": session_dir}
    _record_path(me.pid, me.create_time()).write_text(json.dumps(info))
    subprocess.Popen([sys.executable, "-m", "pipelines.ray_local", "watch", str(me.pid), str(me.create_time()),
                      session_dir], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, cwd=str(Path(__file__).resolve().parent.parent))


def watch(pid: int, create_time: float, session_dir: str, poll_s: float = 0.5) -> None:
    """Wait for the driver to end; then kill what is left of its Ray session."""
    while _driver_alive(pid, create_time):
        time.sleep(poll_s)
    kill_session(session_dir)
    _record_path(pid, create_time).unlink(missing_ok=True)


@contextlib.contextmanager
def _single_node_on_loopback():
    """Make Ray take 127.0.0.1 as the node address. ``ray.init(_node_ip_address="127.0.0.1")`` alone
    does not: Ray replaces a loopback address by the machine's reachable one (so that other nodes could
    join), and the raylet, the dashboard agent (gRPC and metrics on all interfaces), the runtime-env
    agent and the autoscaler's metrics server then listen on it. Ray keeps a node on loopback where it
    does not support clusters (macOS, Windows); the same switch (``ENABLE_RAY_CLUSTER``, environment
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``) is turned off here while the node starts. A private local
    Ray never has other nodes; use ``--address`` for a real cluster."""
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


def _is_loopback_address(address: str) -> bool:
    """``127.0.0.1:6379``, ``localhost:6379``: a GCS address on this machine's loopback (a Ray client
    address, ``ray://...``, is not: the client runs no node of its own)."""
    if "://" in address:
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _free_port(host: str = "127.0.0.1") -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def init_local_ray(**init_kwargs: Any):
    """``ray.init(address="local", **init_kwargs)`` whose processes all know their own cluster.

    Ray's helpers that run inside the cluster find "their" GCS through ``RAY_ADDRESS`` or, without it,
    by scanning the machine's processes: with two Rays on one machine (two ``lsnet`` commands, a test
    session beside a ``ray start`` head) that scan fails or picks the other cluster. Ray Train's
    placement-group cleaner is such a helper: it then never frees the workers' CPUs after a trial is
    stopped, or frees those of a live run. So the GCS port is chosen here and ``RAY_ADDRESS`` is in the
    environment that the GCS, the raylet and every worker inherit; this process's own environment is
    restored afterwards (a later ``ray.init`` must not connect to a cluster that has ended).
    """
    import ray

    port = _free_port()
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    try:
        return ray.init(address="local", **init_kwargs)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def start_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool = True,
              **init_kwargs: Any) -> bool:
    """Connect to ``address`` (or ``$RAY_ADDRESS``), else start a private local Ray on 127.0.0.1 that
    dies with this process. Returns True when a local Ray was started here. No-op when Ray is up."""
    import ray

    quiet_console()
    if ray.is_initialized():
        return False
    common = {"log_to_driver": verbose, "configure_logging": False, **init_kwargs}
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "local":
        if _is_loopback_address(address):
            # a cluster on this machine's loopback (a private head, the tests' session): the driver must
            # take 127.0.0.1 as its node address too, or Ray waits for a raylet on the machine's
            # reachable address that does not exist
            try:
                with _single_node_on_loopback():
                    ray.init(address=address, _node_ip_address="127.0.0.1", **common)
            except ConnectionError:
                # a `ray start` cluster registers its nodes under the machine's address even when its GCS
                # is reached on loopback (Ray resolves --node-ip-address 127.0.0.1 to it): join as it does
                ray.init(address=address, **common)
        else:
            ray.init(address=address, **common)
        return False
    cleanup_stale_sessions()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for attempt in (1, 2):
        try:
            with _single_node_on_loopback():
                context = init_local_ray(num_cpus=num_cpus, _node_ip_address="127.0.0.1",
                                         dashboard_host="127.0.0.1", **common)
            break
        except Exception as err:
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(err):
                raise RayStartError(f"a local Ray did not start: {one_line(err)[:300]} (an overloaded "
                                    "machine? retry, or pass --address of a running cluster)") from err
    _register(context.address_info["session_dir"])
    return True


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "watch":
        watch(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
    else:
        sys.exit("usage: python -m pipelines.ray_local watch PID CREATE_TIME SESSION_DIR")
