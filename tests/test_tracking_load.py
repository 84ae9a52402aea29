"""Many writers at once through the project's own tracking path (RunTracker: journal + uploader with retry):
nothing is lost, on the default SQLite store and on the MLflow server on PostgreSQL (pipelines/bench/
tracking_load.py is the benchmark; these are its small versions), and a store's pushback (``database is
locked``) is retried rather than given up."""
from __future__ import annotations

import pytest

from pipelines.bench.tracking_load import expected_value, run_load
from pipelines.tracking.tracker import RunTracker

LOCKED = "(sqlite3.OperationalError) database is locked"


def _locked_for(monkeypatch, calls: int) -> list[int]:
    """The first ``calls`` log_batch calls of any MlflowClient fail as SQLite's pushback does."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR
    from mlflow.tracking import MlflowClient

    real = MlflowClient.log_batch
    seen = [0]

    def log_batch(self, *args, **kwargs):
        seen[0] += 1
        if seen[0] <= calls:
            raise MlflowException(LOCKED, error_code=INTERNAL_ERROR)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    return seen


def test_pushback_at_the_end_of_a_run_is_retried_not_left_behind(tmp_path, monkeypatch):
    """Every run ending at once on SQLite: the closing upload meets ``database is locked`` several times in a
    row; close() retries it (soon, not after the outage interval) until it is through."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker(tmp_path / "run", uri, "pushback", background=False, verbose=False,
                         retry_interval_s=600)  # an outage's wait would outlast close()'s 60 s
    for step in range(20):
        tracker.log_metrics({"loss": step / 8}, step)
    seen = _locked_for(monkeypatch, 5)
    assert tracker.close(final_flush_timeout_s=60) is True
    assert seen[0] == 5 + 1  # five refused, then the twenty metric records accepted in one request
    assert tracker.failed_uploads == 5 and dict(tracker.failure_kinds) == {"database is locked": 5}
    client = MlflowClient(uri)
    history = sorted((m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss"))
    assert history == [(step, step / 8) for step in range(20)]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_an_unreachable_server_is_not_waited_for_at_close(tmp_path):
    """Only pushback is retried at close: a server that does not answer leaves the records in the journal
    at once (lsnet mlflow-sync uploads them later)."""
    from pipelines.tracking.server import free_port

    tracker = RunTracker(tmp_path / "run", f"http://127.0.0.1:{free_port()}", "down", background=False,
                         verbose=False, retry_interval_s=600)
    tracker.log_metrics({"loss": 1.0}, 0)
    assert tracker.close(final_flush_timeout_s=600) is False
    assert tracker.failed_uploads == 1 and tracker.journal.pending() == 2  # the metrics and the end


def _assert_nothing_lost(out: dict, writers: int, metrics: int) -> None:
    assert out["killed_writers"] == 0 and out["writers_reporting"] == writers, out
    assert (out["expected"], out["arrived"], out["lost"]) == (writers * metrics, writers * metrics, 0), out
    assert (out["wrong"], out["duplicates"], out["left_pending"]) == (0, 0, 0), out
    assert out["runs"] == out["runs_finished"] == writers, out


@pytest.mark.slow
def test_concurrent_writers_lose_nothing_on_sqlite(tmp_path):
    out = run_load(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "writers", writers=4, metrics=50,
                   flush_interval_s=0.05, deadline_s=300)
    _assert_nothing_lost(out, 4, 50)


@pytest.mark.slow
def test_concurrent_writers_lose_nothing_on_the_postgres_server(mlflow_server, tmp_path):
    out = run_load(mlflow_server, tmp_path / "writers", writers=4, metrics=50, flush_interval_s=0.05,
                   deadline_s=300)
    _assert_nothing_lost(out, 4, 50)


def test_expected_values_differ_per_writer_and_step():
    """The load's values identify writer and step, so a metric landing in the wrong run is counted wrong."""
    values = {expected_value(i, s) for i in range(32) for s in range(500)}
    assert len(values) == 32 * 500


def test_consecutive_metric_records_go_up_together_within_mlflows_limit():
    from pipelines.tracking.journal import _coalesce

    def metrics(seq, n):
        return {"seq": seq, "kind": "metrics", "metrics": [{"key": "k", "step": i} for i in range(n)]}

    records = [metrics(1, 1), metrics(2, 1), {"seq": 3, "kind": "params", "params": {}}, metrics(4, 600),
               metrics(5, 300), metrics(6, 200), metrics(7, 1500), metrics(8, 1)]
    assert [[r["seq"] for r in g] for g in _coalesce(records)] == [[1, 2], [3], [4, 5], [6], [7], [8]]


def test_a_rejected_metric_is_set_aside_alone_from_its_batch(tmp_path, monkeypatch):
    """The store refuses one record of a batch for good: the batch goes again record by record, only that
    record lands in rejected.jsonl and every other metric arrives."""
    import json

    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
    from mlflow.tracking import MlflowClient

    real = MlflowClient.log_batch

    def log_batch(self, run_id, metrics=(), *args, **kwargs):
        if any(m.key == "bad" for m in metrics):
            raise MlflowException("metric 'bad' refused", error_code=INVALID_PARAMETER_VALUE)
        return real(self, run_id, metrics, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker(tmp_path / "run", uri, "rejects", background=False, verbose=False)
    for step in range(6):
        tracker.log_metrics({"bad" if step == 3 else "loss": float(step)}, step)
    assert tracker.close() is True
    history = sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(tracker.run_id, "loss"))
    assert history == [(s, float(s)) for s in (0, 1, 2, 4, 5)]
    rejected = [json.loads(line) for line in (tmp_path / "run" / "mlflow_journal" / "rejected.jsonl").open()]
    assert [r["record"]["metrics"][0]["key"] for r in rejected] == ["bad"]


def test_records_logged_between_uploads_all_arrive_once(tmp_path):
    """A batch's acknowledgement covers exactly that batch: records logged after one upload go up with the
    next (an off-by-one in the acknowledged sequence would drop or repeat one of them)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = RunTracker(tmp_path / "run", uri, "between", background=False, verbose=False)
    for round_ in range(3):
        for step in range(3 * round_, 3 * round_ + 3):
            tracker.log_metrics({"loss": float(step)}, step)
        assert tracker.flush()
    assert tracker.close() is True
    history = sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(tracker.run_id, "loss"))
    assert history == [(s, float(s)) for s in range(9)]
