"""The MLflow tracking server as teams run it (pipelines/tracking/server.py): PostgreSQL backend store,
proxied artifacts, logged to through the project's own journal (RunTracker)."""
from __future__ import annotations

from pipelines.tracking.server import TrackingServer, _group_alive, free_port, process_running
from pipelines.tracking.tracker import RunTracker


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


def test_stop_leaves_no_process_and_a_restart_reuses_the_cluster(tmp_path_factory):
    """Stop ends the server's process group and PostgreSQL; a second start on the same directory keeps the data."""
    import tempfile
    from pathlib import Path

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
        with TrackingServer(root, port=free_port(), durable=False, deadline_s=600) as server:
            assert MlflowClient(server.uri).get_experiment_by_name("kept").experiment_id == experiment
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
