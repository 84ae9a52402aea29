"""MLflow tracking for training runs that survives a tracking-server outage: :class:`RunTracker`.

Only rank 0 of a training run (and the driver of a search or ablation, for its parent run) creates a
:class:`RunTracker`. Every call (params, metrics, tags, artifacts, the end of the run) is first appended
to the run's local journal (:mod:`pipelines.tracking.journal`) and then uploaded by a background thread.
If the server is unreachable, training does not wait: the uploader backs off and retries every
``retry_interval_s``; when the server is back the pending records are replayed in order. A store that
answers but pushes back (SQLite's ``database is locked`` under many writers) is retried after a jittered
0.1-2 s instead, also while the run closes. A metric
re-logged for a (key, step) that the journal already holds — e.g. the steps replayed after Ray Train
restarts from the last checkpoint — is dropped, so each (key, step) appears once.

What a run looks like in the MLflow UI: experiments are created as classic model-training experiments
(``mlflow.experimentKind``), runs carry the user / source / git tags MLflow's own clients set
(:mod:`pipelines.provenance`), the training and validation shard sets as dataset inputs (name, manifest
digest, shard directory), and the final weights as an MLflow PyTorch model (``runs:/<run_id>/model``,
see :meth:`RunTracker.log_model`).
"""
from __future__ import annotations

import json
import math
import random
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from pipelines.paths import REPO_ROOT
from pipelines.provenance import manifest_hash
from pipelines.tracking.journal import (
    MODEL_NAME,
    Journal,
    _dataset_key,
    _Uploader,
    failure_kind,
    is_contention,
)
from pipelines.tracking.store import configure_mlflow_http, resolve_tracking_uri

_MAX_PARAM_CHARS = 6000


def _encode_float(value: float) -> float | str:
    value = float(value)
    return repr(value) if not math.isfinite(value) else value  # JSON has no NaN/inf


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
        self.failed_uploads = 0  # upload attempts that failed and were retried later
        self.failure_kinds: Counter[str] = Counter()  # ... by error (first line)
        self._busy_attempts = 0  # consecutive uploads the store pushed back (database is locked)
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
                self.last_error = f"{type(err).__name__}: {err}"
                self.failed_uploads += 1
                self.failure_kinds[failure_kind(err)] += 1
                if is_contention(err):  # the store answered, busy: retried soon, not after an outage's wait
                    self._busy_attempts += 1
                    return False
                self._busy_attempts = 0
                if self.server_ok is not False and self.verbose:
                    print(
                        f"[mlflow] tracking server {self.tracking_uri} unavailable ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:200] if str(err) else ''}); buffering to {self.journal.dir}",
                        flush=True,
                    )
                self.server_ok = False
                return False
            self._busy_attempts = 0
            if self.server_ok is False and self.verbose:
                print(f"[mlflow] tracking server back; replayed buffered records to run {self.run_id}", flush=True)
            self.server_ok = True
            return self.journal.pending() == 0

    def _retry_delay(self) -> float:
        """How long to wait after a failed upload: ``retry_interval_s`` after an outage; after pushback
        (``database is locked``) a jittered, doubling delay from 0.1 s up to 2 s (never above
        ``retry_interval_s``), so that writers that collided do not collide again in step."""
        if not self._busy_attempts:
            return self.retry_interval_s
        backoff = min(0.1 * 2 ** (self._busy_attempts - 1), 2.0)
        return min(self.retry_interval_s, random.uniform(0.5, 1.0) * backoff)

    def _loop(self) -> None:
        while not self._stop.is_set():
            ok = self.flush()
            self._wake.wait(self.flush_interval_s if ok else self._retry_delay())
            self._wake.clear()

    def close(self, status: str = "FINISHED", final_flush_timeout_s: float = 30.0) -> bool:
        """End the run: journal the end, stop the uploader, try a last upload (bounded in time). A store
        that pushes back (``database is locked``: many runs ending at once on SQLite) is retried until
        ``final_flush_timeout_s``; an unreachable one is not waited for.

        Returns True when everything is on the server; otherwise prints the ``lsnet mlflow-sync``
        command that uploads the rest later.
        """
        deadline = time.monotonic() + final_flush_timeout_s
        self.journal.append("end", status=status, end_time_ms=int(time.time() * 1000))
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=final_flush_timeout_s)
        ok = self.flush()
        while not ok and self._busy_attempts and time.monotonic() < deadline:
            time.sleep(min(self._retry_delay(), max(0.0, deadline - time.monotonic())))
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

    sha = manifest_hash(str(shard_dir))
    manifest = load_manifest(shard_dir)
    rows = sum(int(s.get("rows", 0)) for s in manifest.get("shards", []))
    profile = {"num_rows": rows, "num_shards": len(manifest.get("shards", [])), "manifest_sha256": sha,
               "num_categories": len(manifest.get("categories", []))}
    source = str(shard_dir) if "://" in str(shard_dir) else str(Path(shard_dir).resolve())
    return {"name": Path(str(shard_dir).rstrip("/")).name, "digest": sha[:36], "source_type": "local",
            "source": json.dumps({"uri": source}), "profile": json.dumps(profile), "context": context}


# ---- lsnet mlflow-sync ---------------------------------------------------------------------------


