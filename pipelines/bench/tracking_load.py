"""``lsnet bench tracking_load``: many processes logging to one MLflow store at once, through the project's
own tracking path (:class:`~pipelines.tracking.tracker.RunTracker`: the journal and its uploader with
retry), as the trials of a search or the workers of many runs do. Counts what arrives.

Each writer is its own process (as Tune trials and Ray workers are): it opens a run, waits for a common
start signal, logs ``metrics`` values of ``loss`` (steps ``0..metrics-1``, value ``index + step/1000``)
with its uploader sending every ``flush_interval_s``, then closes the run — retrying the last upload
until its deadline, never longer (bounded, self-stopping). The driver then reads every run back from the
store and counts the (step, value) pairs that arrived against those logged: ``lost`` must be 0.

Stores: ``postgres`` — an ``mlflow server`` on a private PostgreSQL cluster started for the benchmark
(pipelines/tracking/server.py); ``sqlite`` — the default embedded store (one SQLite file, as
``results/mlflow.db``), where concurrent writers meet ``database is locked``.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from pipelines.paths import REPO_ROOT

EXPERIMENT = "tracking-load"
LOAD_TAG = "lsnet.load_id"
METRIC = "loss"


def expected_value(index: int, step: int) -> float:
    """The value writer ``index`` logs at ``step`` (distinct per writer and step: a mix-up is counted)."""
    return index + step / 1000.0


def _writer(spec: dict[str, Any]) -> int:
    """One writer process (``python -m pipelines.bench.tracking_load SPEC_JSON``)."""
    from pipelines.tracking.tracker import RunTracker

    tracker = RunTracker(spec["run_dir"], spec["uri"], EXPERIMENT, f"writer-{spec['index']:03d}",
                         flush_interval_s=spec["flush_interval_s"], retry_interval_s=spec["retry_interval_s"],
                         verbose=False)
    tracker.set_tags({LOAD_TAG: spec["load_id"], "lsnet.writer": spec["index"]})
    go = Path(spec["go_path"])
    while not go.exists() and time.time() < spec["deadline"]:
        time.sleep(0.01)
    started = time.time()
    for step in range(spec["metrics"]):
        tracker.log_metrics({METRIC: expected_value(spec["index"], step)}, step)
        if spec["step_interval_s"]:
            time.sleep(spec["step_interval_s"])
    logged = time.time()
    ok = tracker.close(final_flush_timeout_s=max(1.0, spec["deadline"] - time.time()))
    result = {"index": spec["index"], "run_id": tracker.run_id, "all_uploaded": ok,
              "pending": tracker.journal.pending(), "failed_uploads": tracker.failed_uploads,
              "failures": dict(tracker.failure_kinds), "log_seconds": logged - started,
              "seconds": time.time() - started, "finished_unix": time.time()}
    Path(spec["result_path"]).write_text(json.dumps(result))
    return 0 if ok else 1


def run_load(uri: str, work_dir: str | Path, writers: int = 32, metrics: int = 500, step_interval_s: float = 0.0,
             flush_interval_s: float = 0.25, retry_interval_s: float = 15.0, deadline_s: float = 600.0) -> dict:
    """Start ``writers`` writer processes against ``uri``, wait for them (at most ``deadline_s`` after the
    start signal, then they are killed) and count what arrived. Returns the counts (see :func:`_count`)."""
    from pipelines.tracking.store import open_store

    uri = open_store(uri)  # resolved and (SQLite) created once, as a command does, before the writers start
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    load_id = uuid.uuid4().hex
    go = work_dir / "go"
    deadline = time.time() + deadline_s + 300  # + start-up: every writer imports MLflow first
    procs = []
    for index in range(writers):
        run_dir = work_dir / f"writer-{index:03d}"
        spec = {"index": index, "uri": uri, "run_dir": str(run_dir), "load_id": load_id, "metrics": metrics,
                "step_interval_s": step_interval_s, "flush_interval_s": flush_interval_s,
                "retry_interval_s": retry_interval_s, "go_path": str(go), "deadline": deadline,
                "result_path": str(work_dir / f"result-{index:03d}.json")}
        log = (work_dir / f"writer-{index:03d}.log").open("w")
        procs.append(subprocess.Popen([sys.executable, "-m", "pipelines.bench.tracking_load", json.dumps(spec)],
                                      stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=_writer_env()))
        log.close()
    # the start signal once every writer has opened its run (its journal exists) or the start-up time is up
    start_deadline = time.time() + 300
    while time.time() < start_deadline and any(p.poll() is None for p in procs):
        opened = sum((work_dir / f"writer-{i:03d}" / "mlflow_journal" / "state.json").exists() for i in range(writers))
        if opened == writers:
            break
        time.sleep(0.1)
    load_before = os.getloadavg()
    start = time.time()
    go.touch()
    killed = 0
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, start + deadline_s - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            killed += 1
    results = [json.loads(p.read_text()) for p in sorted(work_dir.glob("result-*.json"))]
    end = max([r["finished_unix"] for r in results], default=time.time())
    counts = _count(uri, load_id, writers, metrics)
    return {**counts, "writers": writers, "metrics_per_writer": metrics, "killed_writers": killed,
            "writers_reporting": len(results), "seconds": end - start,
            "metrics_per_s": counts["arrived"] / max(end - start, 1e-9),
            "failed_uploads": sum(r["failed_uploads"] for r in results),
            "failures": dict(sum((Counter(r["failures"]) for r in results), Counter())),
            "left_pending": sum(r["pending"] for r in results),
            "slowest_writer_s": max([r["seconds"] for r in results], default=None),
            "load_avg_before": load_before[0], "load_avg_after": os.getloadavg()[0]}


def _writer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _count(uri: str, load_id: str, writers: int, metrics: int) -> dict:
    """What arrived in the store: per writer's run, the ``loss`` history against the values logged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{LOAD_TAG}` = '{load_id}'",
                              max_results=10 * writers) if experiment else []
    arrived = wrong = duplicates = 0
    finished = 0
    for run in runs:
        index = int(run.data.tags["lsnet.writer"])
        history = client.get_metric_history(run.info.run_id, METRIC)
        pairs = Counter((m.step, m.value) for m in history)
        for (step, value), n in pairs.items():
            ok = 0 <= step < metrics and value == expected_value(index, step)
            arrived += ok
            wrong += not ok
            duplicates += n - 1
        finished += run.info.status == "FINISHED"
    expected = writers * metrics
    return {"runs": len(runs), "runs_finished": finished, "expected": expected, "arrived": arrived,
            "lost": expected - arrived, "wrong": wrong, "duplicates": duplicates}


def run(stores: list[str] = ("postgres", "sqlite"), writers: int = 32, metrics: int = 500,
        step_interval_s: float = 0.0, flush_interval_s: float = 0.25, retry_interval_s: float = 15.0,
        deadline_s: float = 900.0, server_workers: int = 4):
    """The benchmark: :func:`run_load` against each store; a row per store."""
    from pipelines.bench.runner import BenchResult
    from pipelines.tracking.server import TrackingServer

    rows, checks = [], {}
    for store in stores:
        scratch = Path(tempfile.mkdtemp(prefix="lsnet-load-", dir="/tmp"))
        scratch.chmod(0o711)  # PostgreSQL's own user passes through
        try:
            kwargs = {"writers": writers, "metrics": metrics, "step_interval_s": step_interval_s,
                      "flush_interval_s": flush_interval_s, "retry_interval_s": retry_interval_s,
                      "deadline_s": deadline_s}
            if store == "postgres":
                with TrackingServer(scratch / "server", workers=server_workers) as server:
                    out = run_load(server.uri, scratch / "writers", **kwargs)
            elif store == "sqlite":
                out = run_load(f"sqlite:///{scratch / 'mlflow.db'}", scratch / "writers", **kwargs)
            else:
                raise ValueError(f"unknown store {store!r} (postgres, sqlite)")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        rows.append({"store": store, **{k: v for k, v in out.items() if k != "failures"},
                     "failure_kinds": "; ".join(f"{k}: {n}" for k, n in out["failures"].items()) or "-"})
        checks[f"{store}: lost"] = {"value": out["lost"], "target": 0, "ok": out["lost"] == 0 and out["wrong"] == 0}
    columns = ["store", "writers", "metrics_per_writer", "expected", "arrived", "lost", "wrong", "duplicates",
               "runs_finished", "seconds", "metrics_per_s", "failed_uploads", "failure_kinds", "left_pending",
               "killed_writers", "load_avg_before", "load_avg_after"]
    return BenchResult(rows=rows, columns=columns, checks=checks, notes=[(
        f"{writers} writer processes x {metrics} metrics through RunTracker (journal + uploader, flush every "
        f"{flush_interval_s} s); failed_uploads = upload attempts the journal retried; load_avg = 1-min load "
        f"average of this machine ({os.cpu_count()} CPUs) when the writers started / ended")])


if __name__ == "__main__":
    sys.exit(_writer(json.loads(sys.argv[1])))
