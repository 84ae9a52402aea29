"""A local Ray started by lsnet (pipelines.ray_local): quiet console, loopback, gone with its driver
(issue 12 items 3, 12, 18)."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import ray_local

REPO_ROOT = Path(__file__).resolve().parent.parent
PREEMPTION_LINE = ("(TrainController pid=123) [2026-12-02 01:35:33,212 E 7921 8002] core_worker.cc:2465: Actor "
                   "with class name: 'PreemptionWatcher' and ID: '67d3' has constructor arguments in the object "
                   "store and max_restarts > 0.")


def test_console_drops_ray_noise_and_colours_when_not_a_tty(monkeypatch):
    """Before: every successful run printed the PreemptionWatcher ERROR line and the token-auth warning,
    and ANSI colour codes went into log files."""
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    ray_local.quiet_console()
    print(PREEMPTION_LINE, file=sys.stderr)
    print("(RayTrainWorker pid=5) [epoch 1/2] loss 1.0", file=sys.stderr)
    print("[epoch 1/2 step 1/4] loss 1.0")
    sys.stderr.flush()
    assert err.getvalue() == "(RayTrainWorker pid=5) [epoch 1/2] loss 1.0\n"
    assert out.getvalue() == "[epoch 1/2 step 1/4] loss 1.0\n"
    assert os.environ["RAY_COLOR_PREFIX"] == "0"  # Ray's "(pid=...)" prefixes without ANSI codes
    ray_local.mute_actor_output("TrainController")  # after lsnet kills a run: its dying words are muted
    print("(TrainController pid=9) Traceback (most recent call last):", file=sys.stderr)
    print("(RayTrainWorker pid=5) still shown", file=sys.stderr)
    sys.stderr.flush()
    assert err.getvalue().endswith("loss 1.0\n(RayTrainWorker pid=5) still shown\n")
    ray_local._MUTED.clear()
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger(ray_local.TOKEN_AUTH_LOGGER)
    logger.addHandler(Keep())
    logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
    logger.warning("Token authentication is enabled but no token was found.")  # a real problem: kept
    assert records == ["Token authentication is enabled but no token was found."]


DRIVER = """
import sys, time, ray
from pipelines.ray_local import start_ray
start_ray(num_cpus=1)
print("SESSION", ray.get_runtime_context().get_node_id(), flush=True)
import ray._private.worker as w
print("DIR", w._global_node.get_session_dir_path(), flush=True)
ray.get(ray.remote(lambda: 1).remote())
print("READY", flush=True)
time.sleep(600)
"""


def _wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.5):
    """Poll ``condition()`` until it returns something truthy (returned) -- generous deadlines, no
    single short timeout: the machine may be loaded."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout_s:.0f} s: {what}")
        time.sleep(poll_s)


def _read_until_ready(proc: subprocess.Popen, timeout_s: float) -> str | None:
    """The session directory the driver prints, once its Ray ran a task; None if the driver ended."""
    import selectors

    session, deadline = None, time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(timeout=1.0):
                continue
            line = proc.stdout.readline()
            if not line:
                return None
            if line.startswith("DIR "):
                session = line.split(" ", 1)[1].strip()
            if line.startswith("READY"):
                return session
    raise AssertionError(f"the driver did not start Ray within {timeout_s:.0f} s")


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _listening(session: str) -> dict[str, set[str]] | None:
    """The listening addresses of every process of the session, once the dashboard agent and the
    runtime-env agent are among them with their servers up (None before)."""
    import psutil

    found = {}
    for ray_proc in ray_local.session_processes(session):
        with contextlib.suppress(psutil.Error):
            listening = {c.laddr.ip for c in ray_proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
            if listening:
                found[f"{ray_proc.pid} {ray_proc.name()}"] = listening
    agents = [k for k in found if k.endswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent"))]
    return found if len(agents) == 2 else None


@pytest.mark.slow
def test_local_ray_binds_loopback_and_dies_with_a_killed_driver():
    """Before: SIGKILL of the driver left DashboardAgent and RuntimeEnvAgent running for minutes, and the
    dashboard agent listened on 0.0.0.0. (The test itself once waited on a Ray worker instead of the
    driver: a loop variable shadowed the driver's handle.)"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    session = None
    try:
        session = _read_until_ready(driver, timeout_s=300)
        if session is None:
            err = driver.communicate(timeout=120)[1]
            if "a local Ray did not start" in err:  # Ray's own 30-s node start-up limit, on a loaded machine
                pytest.skip("a local Ray could not start on this (overloaded) machine")
            raise AssertionError(f"the driver did not start Ray: {err[-2000:]}")
        # Every process of the session -- GCS, raylet, workers, dashboard, dashboard agent, runtime-env
        # agent, autoscaler monitor -- listens on loopback only (before: the node address was the
        # machine's, and the agents listened on it or on 0.0.0.0).
        listening = _wait_for(lambda: _listening(session), 180, "the dashboard agents did not listen")
        assert any("gcs_server" in name for name in listening) and any("raylet" in n for n in listening)
        for name, addresses in listening.items():
            assert addresses <= LOOPBACK, (name, addresses)
        assert ray_local.session_processes(session)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=120)  # the driver itself: SIGKILL ends it at once
        driver.stdout.close()
        driver.stderr.close()
    assert session is not None

    def gone():
        left = [p for p in ray_local.session_processes(session)
                if "pipelines.ray_local" not in " ".join(_cmdline(p))]
        return not left

    _wait_for(gone, 180, f"Ray processes of {session} outlived their driver: "
                         f"{[(p.pid, ' '.join(_cmdline(p))[:80]) for p in ray_local.session_processes(session)]}")
    _wait_for(lambda: not ray_local.session_processes(session), 60, "the watchdog did not exit")


def _cmdline(proc) -> list[str]:
    import psutil

    try:
        return proc.cmdline()
    except psutil.Error:
        return []


SLEEPER = "import sys, time; time.sleep(120)"


def test_start_up_cleanup_kills_only_sessions_whose_driver_is_dead(tmp_path, monkeypatch):
    """Two lsnet commands on one machine: the second one's start-up clean-up must not touch the first
    one's (live) Ray. Only a recorded session whose driver is gone is killed -- and only its own
    processes, not those of a session whose directory name merely starts the same."""
    import psutil

    monkeypatch.setattr(ray_local, "_records_dir", lambda: tmp_path)
    base = str(tmp_path / "ray" / "session_2026-12-02_12-00-00_000001_4")
    sessions = {"live": base + "1", "dead": base, "lookalike": base + "2"}  # "dead" prefixes the others
    fakes = {name: subprocess.Popen([sys.executable, "-c", SLEEPER, f"--session-dir={path}"])
             for name, path in sessions.items()}  # stand-ins for the raylet of each session
    try:
        me = psutil.Process()
        ray_local._record_path(me.pid, me.create_time()).write_text(json.dumps(
            {"pid": me.pid, "create_time": me.create_time(), "session_dir": sessions["live"]}))
        gone_driver = subprocess.Popen([sys.executable, "-c", "pass"])
        created = psutil.Process(gone_driver.pid).create_time()
        gone_driver.wait()
        ray_local._record_path(gone_driver.pid, created).write_text(json.dumps(
            {"pid": gone_driver.pid, "create_time": created, "session_dir": sessions["dead"]}))
        (tmp_path / "torn.json").write_text("{")

        assert ray_local.cleanup_stale_sessions() == 1
        _wait_for(lambda: fakes["dead"].poll() is not None, 30, "the dead driver's session survived")
        assert fakes["live"].poll() is None and fakes["lookalike"].poll() is None
        assert sorted(p.name for p in tmp_path.glob("*.json")) == [ray_local._record_path(me.pid, me.create_time()).name]
    finally:
        for fake in fakes.values():
            fake.kill()
            fake.wait()


def test_a_zombie_driver_counts_as_dead():
    """A SIGKILLed driver whose parent has not collected it yet is a zombie: its watchdog must act."""
    import psutil

    zombie = subprocess.Popen([sys.executable, "-c", SLEEPER])
    created = psutil.Process(zombie.pid).create_time()
    assert ray_local._driver_alive(zombie.pid, created)
    assert not ray_local._driver_alive(zombie.pid, created + 5)  # the pid reused by another process
    zombie.kill()
    _wait_for(lambda: psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE, 30, "no zombie")
    assert not ray_local._driver_alive(zombie.pid, created)
    zombie.wait()


def test_a_loopback_cluster_address_is_joined_on_loopback():
    """A driver joining a cluster on 127.0.0.1 must take 127.0.0.1 as its node address (else Ray waits
    for a raylet on the machine's other address: the preprocess kill-and-resume test hung on this)."""
    from pipelines.ray_local import _is_loopback_address

    assert _is_loopback_address("127.0.0.1:6379") and _is_loopback_address("localhost:41000")
    assert not _is_loopback_address("10.1.2.3:6379") and not _is_loopback_address("ray://127.0.0.1:10001")
    assert not _is_loopback_address("auto")
