"""The write-ahead journal of a run's tracking calls and the uploader that replays it onto MLflow.

- ``<run_dir>/mlflow_journal/journal.jsonl`` — append-only, one JSON record per call, each with a
  sequence number ``seq``; artifacts are copied next to it (``files/<seq>/<name>``) at logging time
  so a checkpoint rotated away by Ray is still uploaded later;
- ``<run_dir>/mlflow_journal/state.json`` — written atomically: the run's local id (``run_uid``),
  the MLflow ``run_id`` once the server has created it, and ``synced_seq``, the highest sequence
  number known to be on the server.

Why replay never duplicates: a metric record carries the timestamp taken when it was logged, and
MLflow's SQL store ignores a metric whose (key, step, timestamp, value) already exists; params are
write-once with the same value, tags and artifacts overwrite. So re-sending a batch whose
acknowledgement was lost (crash between upload and ``state.json``) is harmless. The run itself is
found again by its ``lsnet.run_uid`` tag before a new one is created.

A run that ended while the server was down is uploaded later with ``lsnet mlflow-sync RUN_DIR``
(:func:`sync_run_dir`).
"""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from lsnet.atomic import atomic_write_json
from pipelines.provenance import SYSTEM_TAG_KEYS
from pipelines.tracking.store import configure_mlflow_http, ensure_experiment, prepare_sqlite_store

JOURNAL_DIRNAME = "mlflow_journal"


#: Server answers that mean "this record will never be accepted" (e.g. a param re-logged with another
#: value). Such a record is set aside in rejected.jsonl instead of blocking everything behind it.
_REJECTED_CODES = ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST")


RUN_UID_TAG = "lsnet.run_uid"


#: MLflow's per-request limits for log_batch (metrics / params / tags).
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100


#: The MLflow model of a run is logged under this name: ``runs:/<run_id>/model``.
MODEL_NAME = "model"


class Journal:
    """The append-only local log of one run's tracking calls plus its sync state (see module doc)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / JOURNAL_DIRNAME
        self.path = self.dir / "journal.jsonl"
        self.state_path = self.dir / "state.json"
        self.files_dir = self.dir / "files"
        self._lock = threading.Lock()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state: dict[str, Any] = (
            json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        )
        self._next_seq = 1
        self.logged_metric_steps: set[tuple[str, int]] = set()
        self.logged_params: dict[str, str] = {}
        self.logged_datasets: set[tuple[str, str, str]] = set()
        for record in self.records():
            self._next_seq = record["seq"] + 1
            if record["kind"] == "metrics":
                self.logged_metric_steps.update((m["key"], m["step"]) for m in record["metrics"])
            elif record["kind"] == "params":
                self.logged_params.update(record["params"])
            elif record["kind"] == "inputs":
                self.logged_datasets.update(_dataset_key(d) for d in record["datasets"])

    @classmethod
    def exists(cls, run_dir: str | Path) -> bool:
        return (Path(run_dir) / JOURNAL_DIRNAME / "state.json").exists()

    def records(self, after_seq: int = 0) -> list[dict]:
        """Records with ``seq > after_seq`` in order. A torn last line (crash mid-write) is skipped."""
        if not self.path.exists():
            return []
        out = []
        lines = self.path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):
                    break
                raise ValueError(f"{self.path}:{number}: corrupt journal record") from None
            if record["seq"] > after_seq:
                out.append(record)
        return out

    def end_status(self) -> str | None:
        """The status of the run's last ``end`` record (None while the run has not ended, or was reopened
        after it)."""
        ends = [r for r in self.records() if r["kind"] in ("end", "reopen")]
        return ends[-1]["status"] if ends and ends[-1]["kind"] == "end" else None

    def append(self, kind: str, **fields: Any) -> dict:
        with self._lock:
            return self._write({"seq": self._next_seq, "kind": kind, **fields})

    def append_artifact(self, local_path: Path, artifact_path: str | None) -> dict:
        """Copy an artifact into the journal (the caller may then delete or rotate the original) and
        record it; the copy lives in ``files/<seq>/`` so it can be removed once uploaded."""
        with self._lock:
            seq = self._next_seq
            dest_dir = self.files_dir / str(seq)
            shutil.rmtree(dest_dir, ignore_errors=True)  # left over from a crash before the record
            dest_dir.mkdir(parents=True)
            dest = dest_dir / local_path.name
            if local_path.is_dir():
                shutil.copytree(local_path, dest)
            else:
                shutil.copy2(local_path, dest)
            staged = str(dest.relative_to(self.dir))
            return self._write({"seq": seq, "kind": "artifact", "staged": staged, "artifact_path": artifact_path})

    def append_staged(self, kind: str, name: str, write, **fields: Any) -> dict:
        """Record something that ``write(path)`` builds at ``files/<seq>/<name>`` (e.g. a saved model
        directory): built and recorded under the journal's lock, so the directory and the record share
        their sequence number."""
        with self._lock:
            seq = self._next_seq
            dest = self.files_dir / str(seq) / name
            shutil.rmtree(dest.parent, ignore_errors=True)  # left over from a crash before the record
            dest.parent.mkdir(parents=True)
            write(dest)
            return self._write({"seq": seq, "kind": kind, "staged": str(dest.relative_to(self.dir)), **fields})

    def _write(self, record: dict) -> dict:
        self._next_seq = record["seq"] + 1
        # One write of one line, fsynced: a crash leaves at most a torn last line.
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return record

    def save_state(self, **updates: Any) -> None:
        with self._lock:
            self.state.update(updates)
            atomic_write_json(self.state_path, self.state, indent=1)

    @property
    def synced_seq(self) -> int:
        return int(self.state.get("synced_seq", 0))

    @property
    def last_seq(self) -> int:
        return self._next_seq - 1

    def pending(self) -> int:
        return self.last_seq - self.synced_seq


class _Uploader:
    """Replays journal records onto an MLflow tracking store. Stateless apart from the journal."""

    def __init__(self, journal: Journal):
        self.journal = journal

    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.journal.state["tracking_uri"])

    def _ensure_run(self, client) -> str:
        state = self.journal.state
        if state.get("run_id"):
            return state["run_id"]
        uri = state["tracking_uri"]
        experiment_id = ensure_experiment(client, state["experiment_name"], uri)
        # A run created by an earlier attempt whose run_id never reached state.json.
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_UID_TAG}` = '{state['run_uid']}'", max_results=1
        )
        if found:
            run_id = found[0].info.run_id
        else:
            run = client.create_run(
                experiment_id,
                start_time=state.get("start_time_ms"),
                tags={RUN_UID_TAG: state["run_uid"]},
                run_name=state.get("run_name"),
            )
            run_id = run.info.run_id
        self.journal.save_state(run_id=run_id, experiment_id=experiment_id)
        return run_id

    def sync(self) -> int:
        """Upload every pending record; returns how many. Raises on the first failure (the records
        already uploaded stay acknowledged in state.json).

        Consecutive metric records (one per ``log_metrics`` call) go up together, up to MLflow's 1000
        metrics per request: one request per flush instead of one per training step, which is what
        many concurrent writers on one store need. A batch the store rejects is retried record by record,
        so only the bad record is set aside."""
        if not self.journal.state.get("run_id"):
            # the run is about to be created: its store too, atomically, before a client touches it
            # (a new --tracking-uri of mlflow-sync, or the first upload of a run)
            prepare_sqlite_store(self.journal.state["tracking_uri"])
        client = self._client()
        run_id = self._ensure_run(client)
        done = 0
        for group in _coalesce(self.journal.records(after_seq=self.journal.synced_seq)):
            if len(group) > 1:
                try:
                    self._upload_metric_group(client, run_id, group)
                except Exception as err:  # sorted below: rejected -> one by one; else retry later
                    if _error_code(err) not in _REJECTED_CODES:
                        raise
                else:
                    self.journal.save_state(synced_seq=group[-1]["seq"])
                    done += len(group)
                    continue
            for record in group:
                self._sync_one(client, run_id, record)
                done += 1
        return done

    def _sync_one(self, client, run_id: str, record: dict) -> None:
        try:
            self._upload(client, run_id, record)
        except Exception as err:  # sorted into "rejected" vs "retry later" below
            if _error_code(err) not in _REJECTED_CODES:
                raise  # unreachable / server error: retry later from this record
            with (self.journal.dir / "rejected.jsonl").open("a") as fh:
                fh.write(json.dumps({"record": record, "error": str(err)[:2000]}) + "\n")
            print(f"[mlflow] record {record['seq']} ({record['kind']}) rejected by the tracking server, "
                  f"set aside in {self.journal.dir / 'rejected.jsonl'}: {str(err).splitlines()[0][:300]}",
                  flush=True)
        self.journal.save_state(synced_seq=record["seq"])
        if record["kind"] in ("artifact", "model"):
            # Only after the acknowledgement is durable: a replay never needs a deleted copy.
            shutil.rmtree(self.journal.dir / Path(record["staged"]).parent, ignore_errors=True)

    def _upload_metric_group(self, client, run_id: str, group: list[dict]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(m["key"], _decode_float(m["value"]), m["timestamp"], m["step"])
                   for record in group for m in record["metrics"]]
        client.log_batch(run_id, metrics=metrics, synchronous=True)

    def _upload(self, client, run_id: str, record: dict) -> None:
        """Send one journal record."""
        from mlflow.entities import Metric, Param, RunTag

        kind = record["kind"]
        if kind == "metrics":
            metrics = [
                Metric(m["key"], _decode_float(m["value"]), m["timestamp"], m["step"])
                for m in record["metrics"]
            ]
            for i in range(0, len(metrics), _MAX_METRICS):
                client.log_batch(run_id, metrics=metrics[i : i + _MAX_METRICS], synchronous=True)
        elif kind == "params":
            params = [Param(k, v) for k, v in record["params"].items()]
            for i in range(0, len(params), _MAX_PARAMS):
                client.log_batch(run_id, params=params[i : i + _MAX_PARAMS], synchronous=True)
        elif kind == "tags":
            tags = [RunTag(k, v) for k, v in record["tags"].items()]
            for i in range(0, len(tags), _MAX_TAGS):
                client.log_batch(run_id, tags=tags[i : i + _MAX_TAGS], synchronous=True)
        elif kind == "artifact":
            staged = self.journal.dir / record["staged"]
            if staged.exists():
                if staged.is_dir():
                    client.log_artifacts(run_id, str(staged), record.get("artifact_path"))
                else:
                    client.log_artifact(run_id, str(staged), record.get("artifact_path"))
        elif kind == "inputs":
            from mlflow.entities import Dataset, DatasetInput, InputTag

            client.log_inputs(run_id, datasets=[
                DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], d["source"], d.get("schema"),
                                     d.get("profile")), tags=[InputTag("mlflow.data.context", d["context"])])
                for d in record["datasets"]])
        elif kind == "model":
            self._upload_model(client, run_id, record)
        elif kind == "end":
            client.set_terminated(run_id, status=record["status"], end_time=record["end_time_ms"])
        elif kind == "reopen":
            client.update_run(run_id, status="RUNNING")
        else:
            raise ValueError(f"{self.journal.path}: record {record['seq']} has unknown kind {kind!r}")


    def _upload_model(self, client, run_id: str, record: dict) -> None:
        """A staged MLflow model directory becomes the run's logged model (what ``mlflow.<flavor>.
        log_model`` does, from a directory saved while the server may have been down). A replay finds the
        model of an earlier, interrupted attempt by its journal sequence number instead of adding one."""
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model

        staged = self.journal.dir / record["staged"]
        if not staged.exists():  # uploaded, acknowledged and cleaned up before
            return
        run = client.get_run(run_id)
        experiment_id = run.info.experiment_id
        seq_tag = {"lsnet.journal_seq": str(record["seq"]), RUN_UID_TAG: self.journal.state["run_uid"]}
        # who / which command / which commit, as MLflow's own log_model records them ("Logged from")
        system = {k: v for k, v in run.data.tags.items() if k in SYSTEM_TAG_KEYS}
        existing = [m for m in client.search_logged_models([experiment_id], filter_string=f"name = '{MODEL_NAME}'")
                    if m.source_run_id == run_id and m.tags.get("lsnet.journal_seq") == seq_tag["lsnet.journal_seq"]]
        model = existing[0] if existing else client.create_logged_model(
            experiment_id, name=MODEL_NAME, source_run_id=run_id, tags={**system, **seq_tag},
            params=record.get("params"), model_type=record.get("model_type"))
        if model.status != LoggedModelStatus.READY:
            mlmodel = Model.load(staged / "MLmodel")  # the ids only the server can give
            mlmodel.run_id, mlmodel.model_id, mlmodel.model_uuid = run_id, model.model_id, model.model_id
            mlmodel.artifact_path = model.artifact_location
            mlmodel.save(staged / "MLmodel")
            client.log_model_artifacts(model.model_id, str(staged))
            client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        outputs = client.get_run(run_id).outputs
        if not any(o.model_id == model.model_id for o in (outputs.model_outputs if outputs else [])):
            client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=int(record.get("step", 0)))])


def _coalesce(records: list[dict]) -> list[list[dict]]:
    """Records in order, consecutive ``metrics`` records grouped up to ``_MAX_METRICS`` metrics a group
    (a record larger than that stands alone: it is split when uploaded); every other record alone."""
    groups: list[list[dict]] = []
    size = 0
    for record in records:
        n = len(record["metrics"]) if record["kind"] == "metrics" else 0
        fits = record["kind"] == "metrics" and n <= _MAX_METRICS
        last = groups[-1] if groups else None
        if fits and last and last[0]["kind"] == "metrics" and size + n <= _MAX_METRICS and size > 0:
            last.append(record)
            size += n
        else:
            groups.append([record])
            size = n if fits else 0
    return groups


def _dataset_key(dataset: dict[str, str]) -> tuple[str, str, str]:
    return dataset["name"], dataset["digest"], dataset["context"]


def _error_code(err: Exception) -> str | None:
    """MLflow's error code name of an exception (None for non-MLflow errors)."""
    return getattr(err, "error_code", None)


def failure_kind(err: BaseException) -> str:
    """A short name of why an upload failed, to count them: the exception type and the first line of its
    message, up to 120 characters (``database is locked`` for SQLite's pushback, whatever wraps it)."""
    text = str(err)
    if "database is locked" in text:
        return "database is locked"
    first = text.strip().splitlines()[0][:120] if text.strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


#: MLflow error codes of a store that answered but is busy: try again soon.
_BUSY_CODES = ("REQUEST_LIMIT_EXCEEDED", "TEMPORARILY_UNAVAILABLE")


def is_contention(err: BaseException) -> bool:
    """Whether an upload failed because the store pushed back under concurrent writers (SQLite's
    ``database is locked``, directly or through a server; a server's rate limit) rather than being
    unreachable: worth retrying within a fraction of a second."""
    return "database is locked" in str(err) or _error_code(err) in _BUSY_CODES


def _decode_float(value: float | str) -> float:
    return float(value)


def sync_run_dir(run_dir: str | Path, tracking_uri: str | None = None) -> tuple[int, int]:
    """Upload what a run directory still has buffered. Returns (uploaded, still pending)."""
    configure_mlflow_http()
    run_dir = Path(run_dir)
    if not Journal.exists(run_dir):
        raise FileNotFoundError(f"{run_dir}: no {JOURNAL_DIRNAME}/state.json (not a tracked run directory)")
    journal = Journal(run_dir)
    if tracking_uri and tracking_uri != journal.state.get("tracking_uri"):
        journal.save_state(tracking_uri=tracking_uri, run_id=None, synced_seq=0)
    uploaded = _Uploader(journal).sync()
    return uploaded, journal.pending()


def find_run_dirs(root: str | Path) -> list[Path]:
    """Every directory under ``root`` (inclusive) holding a tracking journal."""
    root = Path(root)
    return sorted(p.parent.parent for p in root.glob(f"**/{JOURNAL_DIRNAME}/state.json"))
