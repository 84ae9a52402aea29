"""Guards for the MLflow tracking journal (issue 24, rows 13 and 14): a run whose id was never
acknowledged is found again by its own ``lsnet.run_uid`` (not by a name another run may share), and a
run moved to another store is replayed there from its first record -- through ``RunTracker`` and
through ``lsnet mlflow-sync --tracking-uri``."""
from __future__ import annotations

import json

import pytest

from pipelines.tracking.journal import RUN_UID_TAG, Journal, sync_run_dir
from pipelines.tracking.tracker import RunTracker

pytestmark = pytest.mark.filterwarnings("ignore")


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _runs(client, experiment="lsnet"):
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id])


def test_unacknowledged_run_is_not_confused_with_another_run_of_the_same_name(tmp_path):
    """Two trials of two searches both called ``s-00000`` in one store: the second one's first upload
    (its run id not yet in state.json) must create its own run, not write into the first's."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = RunTracker(tmp_path / "a" / "s-00000", uri, background=False, verbose=False)
    first.log_metrics({"loss": 1.0}, step=0)
    assert first.close()
    second = RunTracker(tmp_path / "b" / "s-00000", uri, background=False, verbose=False)
    second.log_metrics({"loss": 2.0}, step=0)
    second.log_params({"who": "second"})
    assert second.close()
    client = _client(uri)
    assert second.run_id != first.run_id and len(_runs(client)) == 2
    assert _history(client, first.run_id, "loss") == [(0, 1.0)]
    assert client.get_run(first.run_id).data.params == {}
    assert _history(client, second.run_id, "loss") == [(0, 2.0)]
    # and the second's lost acknowledgement finds its own run again (by run_uid), not the first
    own = second.run_id
    second.journal.save_state(run_id=None, synced_seq=0)
    assert sync_run_dir(second.run_dir) == (second.journal.last_seq, 0)
    assert Journal(second.run_dir).state["run_id"] == own and len(_runs(client)) == 2
    assert client.get_run(own).data.tags[RUN_UID_TAG] == second.journal.state["run_uid"]
    assert _history(client, own, "loss") == [(0, 2.0)] and _history(client, first.run_id, "loss") == [(0, 1.0)]


def _finished_run(run_dir, uri):
    tracker = RunTracker(run_dir, uri, background=False, verbose=False)
    tracker.log_params({"train.epochs": 3})
    tracker.set_tags({"task": "bbox"})
    for step in range(3):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step)
    assert tracker.close("FINISHED")
    return tracker


def _assert_whole_run(uri, run_id):
    client = _client(uri)
    run = client.get_run(run_id)
    assert _history(client, run_id, "loss") == [(0, 1.0), (1, 0.5), (2, 1.0 / 3)]
    assert run.data.params == {"train.epochs": "3"} and run.data.tags["task"] == "bbox"
    assert run.info.status == "FINISHED"


def test_tracker_reopened_on_another_store_replays_the_whole_run(tmp_path):
    old, new = f"sqlite:///{tmp_path / 'old.db'}", f"sqlite:///{tmp_path / 'new.db'}"
    run_dir = tmp_path / "run"
    before = _finished_run(run_dir, old)
    moved = RunTracker(run_dir, new, background=False, verbose=False)
    assert moved.journal.state["tracking_uri"] == new and moved.run_id is None
    assert moved.flush()
    assert moved.run_id and moved.run_id != before.run_id
    _assert_whole_run(new, moved.run_id)
    _assert_whole_run(old, before.run_id)  # the old store keeps its copy
    # reopening on the store it is on now replays nothing more
    again = RunTracker(run_dir, new, background=False, verbose=False)
    assert again.run_id == moved.run_id and again.journal.pending() == 0


def test_mlflow_sync_to_another_store_replays_the_whole_run(tmp_path, capsys):
    from pipelines.cli import main

    old, new = f"sqlite:///{tmp_path / 'old.db'}", f"sqlite:///{tmp_path / 'new.db'}"
    run_dir = tmp_path / "runs" / "r1"
    before = _finished_run(run_dir, old)
    assert main(["mlflow-sync", str(tmp_path / "runs"), "--tracking-uri", new]) == 0
    state = json.loads((run_dir / "mlflow_journal" / "state.json").read_text())
    assert state["tracking_uri"] == new and state["run_id"] != before.run_id
    _assert_whole_run(new, state["run_id"])
    assert len(_runs(_client(new))) == 1
