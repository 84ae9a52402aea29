"""A private Ray head on 127.0.0.1 for one job (``lsnet jobs submit`` without ``--address``) and tests.

``ray start --head --block`` runs as our child in its own session, with every port chosen free on
loopback and a private ``--temp-dir``; stopping it terminates that process, which shuts down the
daemons it started (``ray stop`` is never used: it stops *every* Ray on the machine).

Token authentication (Ray >= 2.59 enables it for local clusters by default): the head gets a fresh
random token in a 0600 file in its temp dir (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN_PATH``; the
job drivers it starts inherit both), and our Jobs API client sends it as ``Authorization: Bearer``.
Nothing is written to ``~/.ray/auth_token``.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from lsnet.errors import ServiceError

#: The variables that select and carry Ray's token authentication (Ray's own names).
AUTH_MODE_VAR, AUTH_TOKEN_VAR, AUTH_TOKEN_PATH_VAR = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"


class HeadStartError(ServiceError):
    """The local Ray head did not come up (the message ends with the tail of its log)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_executable() -> str:
    """The ``ray`` script of this interpreter's environment (not whatever is first on PATH)."""
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


@dataclass
class LocalRayHead:
    """``with LocalRayHead(num_cpus=2) as head: JobSubmissionClient(head.address, headers=head.headers)``."""

    num_cpus: int | None = None
    num_gpus: int | None = None
    #: custom resources of the head node (``ray start --resources``), e.g. to place workers in tests
    resources: dict[str, float] = field(default_factory=dict)
    start_timeout_s: float = 180.0
    #: extra ``KEY=VALUE`` environment for the head (and so for the job drivers it starts)
    env: dict[str, str] = field(default_factory=dict)
    #: "token" (a fresh random token, the default) or "disabled" (a head without token auth, as an
    #: older Ray or ``RAY_AUTH_MODE=disabled`` starts it; the tests use it)
    auth: str = "token"
    address: str = ""
    gcs_address: str = ""
    token: str = ""
    temp_dir: Path | None = None
    _proc: subprocess.Popen | None = None
    _log: Path | None = None
    _agent_port: int = 0

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def start(self) -> LocalRayHead:
        # short path: Ray's unix sockets live under --temp-dir and the path length is limited (~107)
        self.temp_dir = Path(tempfile.mkdtemp(prefix="lsray-", dir="/tmp"))
        token_file = self.temp_dir / "auth_token"
        if self.auth == "token":
            self.token = secrets.token_hex(32)
            token_file.touch(mode=0o600)
            token_file.write_text(self.token)
        dashboard_port = free_port()
        ports = {"--port": free_port(), "--dashboard-port": dashboard_port,
                 "--ray-client-server-port": free_port(), "--dashboard-agent-listen-port": free_port(),
                 "--dashboard-agent-grpc-port": free_port(), "--metrics-export-port": free_port(),
                 "--runtime-env-agent-port": free_port(), "--node-manager-port": free_port(),
                 "--object-manager-port": free_port()}
        cmd = [_ray_executable(), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
               "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--disable-usage-stats",
               "--temp-dir", str(self.temp_dir)]
        for flag, port in ports.items():
            cmd += [flag, str(port)]
        if self.num_cpus is not None:
            cmd += ["--num-cpus", str(self.num_cpus)]
        if self.num_gpus is not None:
            cmd += ["--num-gpus", str(self.num_gpus)]
        if self.resources:
            cmd += ["--resources", json.dumps(self.resources)]
        env = {**os.environ, **self.env}
        if self.auth == "token":
            env.update({AUTH_MODE_VAR: "token", AUTH_TOKEN_PATH_VAR: str(token_file)})
        else:
            env[AUTH_MODE_VAR] = "disabled"
            env.pop(AUTH_TOKEN_PATH_VAR, None)
        # job entrypoints say `python ...`: on this machine that must be this environment's python
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.pop(AUTH_TOKEN_VAR, None)  # would take precedence over our file
        env.pop("RAY_ADDRESS", None)
        self._log = self.temp_dir / "head.log"
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)
        self.address = f"http://127.0.0.1:{dashboard_port}"
        self.gcs_address = f"127.0.0.1:{ports['--port']}"  # what `ray start --address` / ray.init take
        self._agent_port = ports["--dashboard-agent-listen-port"]
        self._wait_ready()
        return self

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self._log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _wait_ready(self) -> None:
        """Poll the job server's version endpoint (with the token) until it answers, then the
        dashboard agent's port: the job server gives up on an absent agent after 10 s (Ray's
        WAIT_AVAILABLE_AGENT_TIMEOUT), which a loaded machine can exceed at start-up."""
        deadline = time.monotonic() + self.start_timeout_s
        request = urllib.request.Request(f"{self.address}/api/version", headers=self.headers)
        server_up = False
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                tail = self._log_tail()
                self.stop()
                raise HeadStartError(f"ray start exited with code {code}:\n{tail}")
            try:
                if not server_up:
                    with urllib.request.urlopen(request, timeout=5) as resp:
                        server_up = resp.status == 200
                if server_up:
                    with socket.create_connection(("127.0.0.1", self._agent_port), timeout=5):
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        tail = self._log_tail()
        self.stop()
        raise HeadStartError(f"the Ray head at {self.address} did not answer within {self.start_timeout_s:.0f}s:\n{tail}")

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM to ``ray start --block`` (it shuts its daemons down), then SIGKILL to what is left
        of its process group; the temp dir is removed."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # our own session only (start_new_session)
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.wait(timeout=10)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None

    def __enter__(self) -> Self:
        return self.start() if self._proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
