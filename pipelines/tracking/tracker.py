"""MLflow tracking for training runs that survives a tracking-server outage.

Only rank 0 of a training run creates a :class:`RunTracker`. Every call (params, metrics, tags,
artifacts, the end of the run) is first appended to a local **journal** under the run directory and
then uploaded by a background thread. The journal is a write-ahead log:

- ``<run_dir>/mlflow_journal/journal.jsonl`` — append-only, one JSON record per call, each with a
  sequence number ``seq``; artifacts are copied next to it (``files/<seq>/<name>``) at logging time
  so a checkpoint rotated away by Ray is still uploaded later;
- ``<run_dir>/mlflow_journal/state.json`` — written atomically: the run's local id (``run_uid``),
  the MLflow ``run_id`` once the server has created it, and ``synced_seq``, the highest sequence
  number known to be on the server.

If the server is unreachable, training does not wait: the uploader backs off and retries every
``retry_interval_s``; when the server is back the pending records are replayed in order. A run that
ended while the server was still down is uploaded later with ``lsnet mlflow-sync RUN_DIR``.

Why replay never duplicates: a metric record carries the timestamp taken when it was logged, and
MLflow's SQL store ignores a metric whose (key, step, timestamp, value) already exists; params are
write-once with the same value, tags and artifacts overwrite. So re-sending a batch whose
acknowledgement was lost (crash between upload and ``state.json``) is harmless. The run itself is
found again by its ``lsnet.run_uid`` tag before a new one is created. A metric re-logged for a
(key, step) that the journal already holds — e.g. the steps replayed after Ray Train restarts from
the last checkpoint — is dropped, so each (key, step) appears once.

Tracking URI: ``tracking.uri`` of the config, else ``$MLFLOW_TRACKING_URI``, else the checkout's shared
embedded store ``sqlite:///<repository>/results/mlflow.db`` with artifacts beside it in
``results/mlartifacts/<experiment>`` -- one store for every local run, so the UI compares them (open it
with ``mlflow ui --backend-store-uri sqlite:///<repository>/results/mlflow.db --host 127.0.0.1``). SQLite
serialises concurrent writers; a write that finds the database locked fails and is retried by the
journal like any outage. For a cluster use an ``http://`` tracking server.

What a run looks like in the MLflow UI: experiments are created as classic model-training experiments
(``mlflow.experimentKind``), runs carry the user / source / git tags MLflow's own clients set, the
training and validation shard sets as dataset inputs (name, manifest digest, shard directory), and the
final weights as an MLflow PyTorch model (``runs:/<run_id>/model``, see :meth:`RunTracker.log_model`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

JOURNAL_DIRNAME = "mlflow_journal"
#: Server answers that mean "this record will never be accepted" (e.g. a param re-logged with another
#: value). Such a record is set aside in rejected.jsonl instead of blocking everything behind it.
_REJECTED_CODES = ("INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "BAD_REQUEST")
RUN_UID_TAG = "lsnet.run_uid"
#: MLflow's per-request limits for log_batch (metrics / params / tags).
_MAX_METRICS, _MAX_PARAMS, _MAX_TAGS = 1000, 100, 100
_MAX_PARAM_CHARS = 6000


def configure_mlflow_http(max_retries: int = 0, timeout_s: int = 5) -> None:
    """Short HTTP retries/timeouts so an unreachable server fails fast instead of stalling training.

    MLflow's defaults (7 retries with exponential backoff, 120 s timeout) would block a logging call
    for minutes; our own journal does the retrying. Values already set in the environment win.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")


from pipelines.paths import REPO_ROOT

#: The experiment tag by which MLflow 3 marks an experiment as model training rather than GenAI. (The
#: UI of MLflow 3.17 lets its own "GenAI | Model training" switch win over it, default GenAI: the run
#: URLs lsnet prints select the latter, see :func:`run_url`.)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
#: The run tags that MLflow's UI shows as creator and source (set by :func:`mlflow_system_tags`).
SYSTEM_TAG_KEYS = ("mlflow.user", "mlflow.source.name", "mlflow.source.type", "mlflow.source.git.commit")
#: The MLflow model of a run is logged under this name: ``runs:/<run_id>/model``.
MODEL_NAME = "model"


def default_store_path() -> Path:
    """The checkout's shared embedded store, ``results/mlflow.db``; ``$LSNET_DEFAULT_MLFLOW_STORE`` moves it
    (the test suite points it, for every process it starts, at a temporary directory)."""
    moved = os.environ.get("LSNET_DEFAULT_MLFLOW_STORE")
    return Path(moved) if moved else REPO_ROOT / "results" / "mlflow.db"


def default_tracking_uri() -> str:
    """The embedded default: one SQLite file for every run of this checkout."""
    return f"sqlite:///{default_store_path().resolve()}"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri`` if given, else ``$MLFLOW_TRACKING_URI``, else :func:`default_tracking_uri`. A bare
    ``*.db`` path is taken for a SQLite file and made absolute (workers may run in another cwd)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    if "://" not in uri and uri.endswith(".db"):
        uri = f"sqlite:///{Path(uri).resolve()}"
    return uri


def artifact_root_for(tracking_uri: str, experiment_name: str) -> str | None:
    """Where an embedded SQLite store keeps an experiment's artifacts: beside the database, in
    ``mlartifacts/<experiment>`` (MLflow's own default would be ``./mlruns`` of whatever directory the
    process runs in). None (the server decides) for other stores."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment_name) or "experiment"
    return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts" / safe).as_uri()


def ensure_experiment(client, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created if needed as a model-training experiment with its
    artifacts beside an embedded store. An existing experiment without a kind gets ours (MLflow 3's
    UI otherwise infers one)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_root_for(tracking_uri, name),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except Exception:  # created concurrently by another run: look it up again
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        with contextlib.suppress(Exception):  # cosmetic: never let it hold up the run's records
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def _migrate_new_sqlite_store(path: Path) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments(max_results=1)  # runs the migrations


def _empty_store_template() -> Path | None:
    """An empty, fully migrated SQLite store for this MLflow version, built once per machine and copied
    for every new store (MLflow's dozens of migrations take 2-7 s; a copy takes milliseconds).
    ``$LSNET_CACHE_DIR`` (default ``~/.cache/lsnet``); None when that directory is not writable."""
    import mlflow

    cache = Path(os.environ.get("LSNET_CACHE_DIR") or Path.home() / ".cache" / "lsnet")
    template = cache / f"mlflow-{mlflow.__version__}-empty.db"
    if template.is_file():
        return template
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{template.name}.tmp{os.getpid()}"
        tmp.unlink(missing_ok=True)
        _migrate_new_sqlite_store(tmp)
        os.replace(tmp, template)  # built whole, then renamed: another process never copies half of it
    except OSError:
        return None
    return template


def prepare_sqlite_store(tracking_uri: str) -> None:
    """Create an embedded SQLite store atomically: MLflow builds a new database with dozens of
    schema migrations, and a process killed half-way (a Ray worker whose group is restarted) would
    leave a database that MLflow can neither use nor re-create. So the schema is built in a temporary
    file and renamed into place. A no-op for other URIs and for existing files."""
    if not tracking_uri.startswith("sqlite:///"):
        return
    path = Path(tracking_uri.removeprefix("sqlite:///"))
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.unlink(missing_ok=True)
    template = _empty_store_template()
    if template is not None:
        shutil.copyfile(template, tmp)
    else:
        _migrate_new_sqlite_store(tmp)
    try:
        os.link(tmp, path)  # fails if another process got there first: keep theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def mlflow_system_tags(source_name: str, commit: str) -> dict[str, str]:
    """The tags MLflow's own clients set and its UI shows (User, Source, Version): who ran it, which
    command (``lsnet train`` / ``lsnet tune``), which git commit."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = "unknown"
    tags = {"mlflow.user": user, "mlflow.source.name": source_name, "mlflow.source.type": "LOCAL"}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit.removesuffix("-dirty")
    return tags


UI_PORT = 5000


def ui_command(tracking_uri: str, mlflow_bin: str = "mlflow") -> str:
    """The command that opens the MLflow UI on a local store (or the URL of a server)."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri}"
    return f"{mlflow_bin} ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port {UI_PORT}"


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI, in its "Model training" view (MLflow 3's UI opens in its
    GenAI view unless told otherwise)."""
    base = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) \
        else f"http://127.0.0.1:{UI_PORT}"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def _atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


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
            _atomic_write_json(self.state_path, self.state)

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
        prepare_sqlite_store(uri)
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
        already uploaded stay acknowledged in state.json)."""
        prepare_sqlite_store(self.journal.state["tracking_uri"])
        client = self._client()
        run_id = self._ensure_run(client)
        done = 0
        for record in self.journal.records(after_seq=self.journal.synced_seq):
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
            done += 1
        return done

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


def _dataset_key(dataset: dict[str, str]) -> tuple[str, str, str]:
    return dataset["name"], dataset["digest"], dataset["context"]


def _error_code(err: Exception) -> str | None:
    """MLflow's error code name of an exception (None for non-MLflow errors)."""
    return getattr(err, "error_code", None)


def _encode_float(value: float) -> float | str:
    value = float(value)
    return repr(value) if not math.isfinite(value) else value  # JSON has no NaN/inf


def _decode_float(value: float | str) -> float:
    return float(value)


class RunTracker:
    """The MLflow run of one training run, logged through a local journal (see module docstring).

    Args:
        run_dir: local directory of the run (the journal and its staged artifacts live here).
        tracking_uri: None -> ``$MLFLOW_TRACKING_URI`` -> the checkout's ``results/mlflow.db``.
        experiment_name / run_name: MLflow names. Reopening the same ``run_dir`` (a Ray Train restart)
            continues the same MLflow run.
        flush_interval_s: how often the uploader sends pending records while the server is up.
        retry_interval_s: how long it waits after a failed upload before trying again.
        background: upload from a daemon thread (training never waits on the network). With
            ``False`` uploads happen only in :meth:`flush` (used by tests for determinism).
    """

    def __init__(
        self,
        run_dir: str | Path,
        tracking_uri: str | None = None,
        experiment_name: str = "lsnet",
        run_name: str | None = None,
        flush_interval_s: float = 5.0,
        retry_interval_s: float = 15.0,
        background: bool = True,
        verbose: bool = True,
    ):
        configure_mlflow_http()
        self.run_dir = Path(run_dir)
        self.journal = Journal(run_dir)
        self.verbose = verbose
        if not self.journal.state.get("run_uid"):
            self.journal.save_state(
                run_uid=uuid.uuid4().hex,
                tracking_uri=resolve_tracking_uri(tracking_uri),
                experiment_name=experiment_name,
                run_name=run_name or self.run_dir.name,
                start_time_ms=int(time.time() * 1000),
                synced_seq=0,
            )
        elif tracking_uri and tracking_uri != self.journal.state.get("tracking_uri"):
            # The run moved to another server (e.g. the old one is gone): replay everything there.
            self.journal.save_state(tracking_uri=tracking_uri, run_id=None, synced_seq=0)
        self.tracking_uri: str = self.journal.state["tracking_uri"]
        self._uploader = _Uploader(self.journal)
        self.flush_interval_s = flush_interval_s
        self.retry_interval_s = retry_interval_s
        self.server_ok: bool | None = None  # unknown until the first upload attempt
        self.last_error: str | None = None
        self._sync_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._loop, name="mlflow-uploader", daemon=True)
            self._thread.start()

    # ---- logging (always local and fast) ---------------------------------------------------------
    @property
    def run_id(self) -> str | None:
        return self.journal.state.get("run_id")

    def log_params(self, params: dict[str, Any]) -> None:
        fresh = {}
        for key, value in params.items():
            text = value if isinstance(value, str) else json.dumps(value)
            text = text[:_MAX_PARAM_CHARS]
            if self.journal.logged_params.get(key) != text:
                fresh[key] = text
        if fresh:
            self.journal.append("params", params=fresh)
            self.journal.logged_params.update(fresh)
            self._wake.set()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log ``metrics`` at ``step``; a (key, step) already logged in this run is dropped."""
        timestamp = int(time.time() * 1000)
        fresh = [
            {"key": key, "value": _encode_float(value), "timestamp": timestamp, "step": int(step)}
            for key, value in metrics.items()
            if (key, int(step)) not in self.journal.logged_metric_steps
        ]
        if fresh:
            self.journal.append("metrics", metrics=fresh)
            self.journal.logged_metric_steps.update((m["key"], m["step"]) for m in fresh)

    def log_metric(self, key: str, value: float, step: int) -> None:
        self.log_metrics({key: value}, step)

    def reopen(self) -> None:
        """A run that ended (``close``) goes on: RUNNING again until the next ``close`` (a resumed
        ablation table continues its parent run)."""
        if self.journal.end_status() is not None:
            self.journal.append("reopen")
            self._wake.set()

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.journal.append("tags", tags={k: str(v) for k, v in tags.items()})
        self._wake.set()

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or directory; it is copied into the journal right away."""
        local_path = Path(local_path)
        if not local_path.exists():
            raise FileNotFoundError(f"artifact to log does not exist: {local_path}")
        self.journal.append_artifact(local_path, artifact_path)
        self._wake.set()

    def log_text(self, text: str, artifact_file: str) -> None:
        """Log ``text`` as the artifact ``artifact_file`` (e.g. ``"config/resolved.yaml"``)."""
        scratch = self.journal.dir / "scratch"
        scratch.mkdir(exist_ok=True)
        path = scratch / Path(artifact_file).name
        path.write_text(text)
        parent = str(Path(artifact_file).parent)
        self.log_artifact(path, None if parent == "." else parent)
        path.unlink()

    def log_datasets(self, datasets: list[dict[str, str]]) -> None:
        """Log dataset inputs (see :func:`shard_dataset`): each shows on the run page and the
        experiment's dataset filter."""
        fresh = [d for d in datasets if _dataset_key(d) not in self.journal.logged_datasets]
        if fresh:  # a restarted worker group logs the same datasets again: once is enough
            self.journal.append("inputs", datasets=fresh)
            self.journal.logged_datasets.update(_dataset_key(d) for d in fresh)
            self._wake.set()

    def log_model(self, model, *, step: int = 0, extra_files: list[Path] | None = None,
                  metadata: dict[str, Any] | None = None, params: dict[str, Any] | None = None,
                  model_type: str | None = None) -> bool:
        """Save ``model`` (a ``torch.nn.Module``) as an MLflow PyTorch model into the journal now and log
        it as the run's model (``runs:/<run_id>/model``) when the store is reachable. The lsnet source is
        bundled (``code/``) so the model loads without this checkout; ``extra_files`` (e.g. the config)
        and ``metadata`` (e.g. class names) travel with it. Never raises: a model that cannot be saved
        is reported and recorded as the run tag ``lsnet.model_log_error``; training has finished anyway."""
        try:
            import mlflow.pytorch

            self.journal.append_staged(
                "model", MODEL_NAME,
                lambda dest: mlflow.pytorch.save_model(
                    model, str(dest), serialization_format="pickle",  # "pt2" would need a traceable forward
                    code_paths=[str(REPO_ROOT / "lsnet")], pip_requirements=model_requirements(),
                    extra_files=[str(p) for p in extra_files or []], metadata=metadata),
                step=int(step), model_type=model_type, params={k: str(v) for k, v in (params or {}).items()})
        except Exception as err:  # noqa: BLE001 - logging the model must not fail a finished run
            message = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            print(f"[mlflow] the final model was not logged as an MLflow model ({message}); "
                  f"the weights are in {self.run_dir}", flush=True)
            self.set_tags({"lsnet.model_log_error": message})
            return False
        self._wake.set()
        return True

    # ---- uploading -------------------------------------------------------------------------------
    def flush(self) -> bool:
        """Try to upload every pending record now; True if nothing is left pending."""
        with self._sync_lock:
            if self.journal.pending() == 0 and self.run_id:
                return True
            try:
                self._uploader.sync()
            except Exception as err:  # noqa: BLE001 - any network/server error: keep the journal, retry later
                if self.server_ok is not False and self.verbose:
                    print(
                        f"[mlflow] tracking server {self.tracking_uri} unavailable ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200] if str(err) else ''}); buffering to {self.journal.dir}",
                        flush=True,
                    )
                self.server_ok = False
                self.last_error = f"{type(err).__name__}: {err}"
                return False
            if self.server_ok is False and self.verbose:
                print(f"[mlflow] tracking server back; replayed buffered records to run {self.run_id}", flush=True)
            self.server_ok = True
            return self.journal.pending() == 0

    def _loop(self) -> None:
        while not self._stop.is_set():
            ok = self.flush()
            self._wake.wait(self.flush_interval_s if ok else self.retry_interval_s)
            self._wake.clear()

    def close(self, status: str = "FINISHED", final_flush_timeout_s: float = 30.0) -> bool:
        """End the run: journal the end, stop the uploader, try a last upload (bounded in time).

        Returns True when everything is on the server; otherwise prints the ``lsnet mlflow-sync``
        command that uploads the rest later.
        """
        self.journal.append("end", status=status, end_time_ms=int(time.time() * 1000))
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=final_flush_timeout_s)
        ok = self.flush()
        if not ok and self.verbose:
            print(
                f"[mlflow] {self.journal.pending()} records still buffered in {self.journal.dir}; "
                f"upload them with: lsnet mlflow-sync {self.run_dir}",
                flush=True,
            )
        return ok


def model_requirements() -> list[str]:
    """The pip requirements of a logged model: the packages the bundled lsnet model code imports, at
    the installed versions (given explicitly: MLflow would otherwise load the model in a subprocess to
    infer them)."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in ("torch", "torchvision", "numpy"):
        try:
            out.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            out.append(package)
    return out


def shard_dataset(shard_dir: str | Path, context: str) -> dict[str, str]:
    """An MLflow dataset input for a shard directory: its name, the manifest's SHA-256 as digest (cut to
    MLflow's 36 characters; the whole hash is in the profile and the run's ``dataset_manifest_sha256``
    tag), the directory as source and ``context`` (``train`` / ``val``)."""
    from lsnet.data.shards import load_manifest
    from pipelines.train.driver import manifest_hash

    sha = manifest_hash(str(shard_dir))
    manifest = load_manifest(shard_dir)
    rows = sum(int(s.get("rows", 0)) for s in manifest.get("shards", []))
    profile = {"num_rows": rows, "num_shards": len(manifest.get("shards", [])), "manifest_sha256": sha,
               "num_categories": len(manifest.get("categories", []))}
    source = str(shard_dir) if "://" in str(shard_dir) else str(Path(shard_dir).resolve())
    return {"name": Path(str(shard_dir).rstrip("/")).name, "digest": sha[:36], "source_type": "local",
            "source": json.dumps({"uri": source}), "profile": json.dumps(profile), "context": context}


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


# ---- lsnet mlflow-sync ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", nargs="+", help="run directory (or a directory holding several runs)")
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="upload to this server instead of the one recorded in the run (replays the whole run)",
    )


def run(args: argparse.Namespace) -> int:
    failures = 0
    run_dirs = [d for root in args.run_dir for d in (find_run_dirs(root) or [Path(root)])]
    for run_dir in run_dirs:
        try:
            uploaded, pending = sync_run_dir(run_dir, args.tracking_uri)
        except Exception as err:  # noqa: BLE001 - report every run dir, not only the first failure
            print(f"{run_dir}: sync failed: {type(err).__name__}: {err}")
            failures += 1
            continue
        state = Journal(run_dir).state
        print(f"{run_dir}: uploaded {uploaded} records to {state['tracking_uri']} (run {state['run_id']}), "
              f"{pending} pending")
        failures += pending > 0
    return 1 if failures else 0
