"""The MLflow tracking server as teams run it (pipelines/tracking/server.py): PostgreSQL backend store,
proxied artifacts, logged to through the project's own journal (RunTracker)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pipelines.tracking.server import TrackingServer, _group_alive, free_port, process_running
from pipelines.tracking.tracker import RunTracker

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_run_logged_through_the_journal_lands_in_postgres_and_the_artifact_proxy(tracking_server, tmp_path):
    from mlflow.tracking import MlflowClient

    tracker = RunTracker(tmp_path / "run", tracking_server.uri, "server-test", background=False, verbose=False)
    tracker.log_params({"lr": 0.01})
    for step in range(3):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step)
    (tmp_path / "notes.txt").write_text("hello")
    tracker.log_artifact(tmp_path / "notes.txt")
    assert tracker.close() is True
    client = MlflowClient(tracking_server.uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.01"}
    history = client.get_metric_history(tracker.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.5), (2, 1.0 / 3)]
    # proxied: the client uploaded over HTTP, the server wrote into its --artifacts-destination
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    stored = list(tracking_server.artifacts.rglob("notes.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "hello"
    # the backend store is the PostgreSQL database, not a file
    import psycopg2

    with psycopg2.connect(host="127.0.0.1", port=tracking_server.postgres.port, user="lsnet",
                          password=tracking_server.postgres.password(), dbname="mlflow") as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'loss'", (tracker.run_id,))
        assert cur.fetchone()[0] == 3


def test_server_binds_loopback_only(tracking_server):
    import psutil

    listening = [c.laddr for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    for port in (tracking_server.port, tracking_server.postgres.port):
        addresses = {a.ip for a in listening if a.port == port}
        assert addresses == {"127.0.0.1"}, (port, addresses)


def _processes_in(root: Path) -> list[int]:
    """Live processes whose working directory or command line lies in ``root`` (the servers' processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not process_running(int(entry.name)):
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cwd.startswith(str(root)) or str(root) in cmdline:
            found.append(int(entry.name))
    return found


def test_stop_leaves_no_process_and_the_command_restarts_on_the_same_cluster():
    """Stop ends the server's process group and PostgreSQL; ``lsnet tracking-server DIR`` on the same directory
    serves the data of before, prints its URI, and stops everything on SIGTERM."""
    from mlflow.tracking import MlflowClient

    root = Path(tempfile.mkdtemp(prefix="lsnet-mlflow-", dir="/tmp"))
    root.chmod(0o711)
    try:
        with TrackingServer(root, durable=False, deadline_s=600) as server:
            group = server.process.pid
            postmaster = int((root / "pgdata" / "postmaster.pid").read_text().split()[0])
            experiment = MlflowClient(server.uri).create_experiment("kept")
        assert not _group_alive(group)
        assert not process_running(postmaster)
        assert not (root / "pgdata" / "postmaster.pid").exists()
        assert _processes_in(root) == []

        port = free_port()
        command = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "tracking-server", str(root), "--port",
                                    str(port), "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, cwd=REPO_ROOT)
        try:
            lines = []
            for line in command.stdout:  # until the URI is printed (or the command ends)
                lines.append(line)
                if line.startswith("MLflow tracking server:"):
                    break
            assert lines[-1].strip() == f"MLflow tracking server: http://127.0.0.1:{port}", "".join(lines)
            uri = lines[-1].split(": ", 1)[1].strip()
            assert MlflowClient(uri).get_experiment_by_name("kept").experiment_id == experiment
        finally:
            command.send_signal(signal.SIGTERM)
            rest = command.communicate(timeout=300)[0]
        assert command.returncode == 0, rest
        assert _processes_in(root) == []
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_directory_postgres_cannot_enter_and_a_busy_port_are_one_line_errors(tmp_path):
    """As root PostgreSQL runs as another user: a DIR it cannot enter (pytest's tmp_path is under a 0700
    folder) is refused before initdb; a port in use is refused before anything starts."""
    import socket

    from lsnet.errors import InputError
    from pipelines.tracking.server import PostgresCluster

    if os.geteuid() == 0:
        with pytest.raises(InputError, match="cannot enter it") as err:
            PostgresCluster(tmp_path / "server").init()
        assert "\n" not in str(err.value) and not (tmp_path / "server" / "pgdata").exists()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(InputError, match=f"port {port} on 127.0.0.1"):
            TrackingServer(tmp_path / "other", port=port).start()
    assert not (tmp_path / "other" / "pgdata").exists()
