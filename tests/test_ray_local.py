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
start_ray(num_cpus=1, include_dashboard=False)
print("SESSION", ray.get_runtime_context().get_node_id(), flush=True)
import ray._private.worker as w
print("DIR", w._global_node.get_session_dir_path(), flush=True)
ray.get(ray.remote(lambda: 1).remote())
print("READY", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_local_ray_binds_loopback_and_dies_with_a_killed_driver():
    """Before: SIGKILL of the driver left DashboardAgent and RuntimeEnvAgent running for minutes, and the
    dashboard agent listened on 0.0.0.0."""
    import psutil

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    session = None
    try:
        for line in proc.stdout:
            if line.startswith("DIR "):
                session = line.split(" ", 1)[1].strip()
            if line.startswith("READY"):
                break
        assert session, "the driver did not start Ray"
        deadline = time.monotonic() + 60
        agents = []
        while time.monotonic() < deadline and len(agents) < 2:  # the agents start in the background
            agents = [p for p in ray_local.session_processes(session)
                      if any(a in " ".join(p.cmdline()) for a in ("dashboard/agent.py", "runtime_env/agent/main.py"))]
            time.sleep(0.5)
        assert len(agents) == 2
        for agent in agents:
            listening = {c.laddr.ip for c in agent.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
            assert listening <= {"127.0.0.1", "::1"}, (agent.cmdline()[:2], listening)
        assert ray_local.session_processes(session)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    deadline = time.monotonic() + 120  # generous: the machine is loaded
    while ray_local.session_processes(session) and time.monotonic() < deadline:
        time.sleep(1)
    left = [(p.pid, " ".join(p.cmdline())[:80]) for p in ray_local.session_processes(session)]
    assert not [x for x in left if "pipelines.ray_local" not in x[1]], left
