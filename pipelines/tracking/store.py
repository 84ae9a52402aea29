"""Which MLflow store a run logs to, decided once: :func:`open_store` resolves the tracking URI and
prepares an embedded store, and every later step receives the resolved URI (in ``tracking.uri`` of the
config, or as an argument) instead of looking again.

Tracking URI: ``tracking.uri`` of the config, else ``$MLFLOW_TRACKING_URI``, else the checkout's shared
embedded store ``sqlite:///<repository>/results/mlflow.db`` with artifacts beside it in
``results/mlartifacts/<experiment>`` -- one store for every local run, so the UI compares them (open it
with ``mlflow ui --backend-store-uri sqlite:///<repository>/results/mlflow.db --host 127.0.0.1``). SQLite
serialises concurrent writers; a write that finds the database locked fails and is retried by the
journal like any outage. For a cluster use an ``http://`` tracking server.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from lsnet.atomic import atomic_write
from lsnet.config import ConfigError
from pipelines.paths import REPO_ROOT


def configure_mlflow_http(max_retries: int = 0, timeout_s: int = 5) -> None:
    """Short HTTP retries/timeouts so an unreachable server fails fast instead of stalling training.

    MLflow's defaults (7 retries with exponential backoff, 120 s timeout) would block a logging call
    for minutes; our own journal does the retrying. Values already set in the environment win.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(max_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")


#: The experiment tag by which MLflow 3 marks an experiment as model training rather than GenAI. (The
#: UI of MLflow 3.17 lets its own "GenAI | Model training" switch win over it, default GenAI: the run
#: URLs lsnet prints select the latter, see :func:`run_url`.)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


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
    from pipelines.text import slug

    safe = slug(experiment_name, "_") or "experiment"
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
    try:  # built whole, then renamed: another process never copies half of it
        atomic_write(template, _migrate_new_sqlite_store)
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


def compare_route(experiment_ids: list[str], run_ids: list[str]) -> str:
    """The UI's route (after the host) of MLflow's compare-runs page for ``run_ids``: a table of their
    params and metrics, and parallel-coordinates, scatter and contour plots over them (MLflow 3.17's
    route ``#/compare-runs?runs=[...]&experiments=[...]``, JSON lists, percent-encoded here)."""
    from urllib.parse import quote

    def as_json(ids: list[str]) -> str:
        return quote(json.dumps(list(ids), separators=(",", ":")), safe="")

    return f"#/compare-runs?runs={as_json(run_ids)}&experiments={as_json(experiment_ids)}"


def compare_url(tracking_uri: str, experiment_ids: list[str], run_ids: list[str]) -> str:
    """The compare-runs page of ``run_ids`` in the MLflow UI (see :func:`compare_route`), on the UI that
    :func:`ui_command` starts for a local store, or on the tracking server."""
    return f"{_ui_base(tracking_uri)}/{compare_route(experiment_ids, run_ids)}"


def runs_view_route(experiment_id: str, share_key: str) -> str:
    """The UI's route of the experiment's runs list in a saved (shared) view: its filter, sort and columns
    from the experiment tag ``mlflow.sharedViewState.<share_key>``; in the "Model training" view."""
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={share_key}&workflowType=machine_learning"


def runs_view_url(tracking_uri: str, experiment_id: str, share_key: str) -> str:
    return f"{_ui_base(tracking_uri)}/{runs_view_route(experiment_id, share_key)}"


def _ui_base(tracking_uri: str) -> str:
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) \
        else f"http://127.0.0.1:{UI_PORT}"


_prepared: set[str] = set()


def open_store(uri: str | None = None) -> str:
    """The tracking URI resolved (:func:`resolve_tracking_uri`) and its embedded store prepared
    (:func:`prepare_sqlite_store`) once per process: a command calls it and passes the answer on (in the
    config's ``tracking.uri``); a library entry point handed that answer gets it back unchanged."""
    resolved = resolve_tracking_uri(uri)
    if resolved not in _prepared or not _store_present(resolved):
        prepare_sqlite_store(resolved)
        _prepared.add(resolved)
    return resolved


def _store_present(uri: str) -> bool:
    return not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).exists()


# ---- a local store on a cluster ----------------------------------------------------------------------

def is_local_store(tracking_uri: str) -> bool:
    """A store that lives on one machine's disk: a SQLite file, a ``file:`` store or a bare path."""
    return tracking_uri.startswith(("sqlite:", "file:")) or "://" not in tracking_uri


def worker_resources(num_workers: int, use_gpu: bool, resources_per_worker: dict[str, float] | None) -> dict:
    """What one Ray Train worker asks for (Ray Train's rule: ``resources_per_worker`` if given, else 1 CPU;
    ``use_gpu`` adds 1 GPU when it names none)."""
    need = dict(resources_per_worker) if resources_per_worker else {"CPU": 1.0}
    if use_gpu:
        need.setdefault("GPU", 1.0)
    return {k: float(v) for k, v in need.items() if float(v) > 0}


def check_store_reaches_workers(tracking_uri: str, nodes: list[dict], driver_node_id: str | None,
                                need: dict[str, float], ray_client: bool = False) -> None:
    """Refuse a local-file store when a training worker may run on another node than this driver's: the
    worker that logs (rank 0) would write into a file on its own node's disk, and the run's metrics would be
    missing from the store the user opens. ``nodes``: ``ray.nodes()`` (``Alive``, ``NodeID``,
    ``Resources``); ``need``: one worker's resources (:func:`worker_resources`); ``ray_client``: the driver
    is a Ray Client (``ray://``), so no node shares its disk."""
    if not is_local_store(tracking_uri):
        return
    hosts = [n for n in nodes if n.get("Alive") and
             all(n.get("Resources", {}).get(key, 0.0) >= amount for key, amount in need.items())]
    elsewhere = [n for n in hosts if ray_client or n.get("NodeID") != driver_node_id]
    if elsewhere:
        where = "this machine (a Ray Client)" if ray_client else "this node"
        raise ConfigError(
            f"tracking.uri {tracking_uri} is a file on {where}, but training workers may run on "
            f"{len(elsewhere)} other node(s) of the Ray cluster ({len(hosts)} can host one): start a tracking "
            f"server (lsnet tracking-server DIR --host <head address>) and pass --tracking-uri http://HOST:PORT")


def check_store_for_cluster(tracking_uri: str, num_workers: int, use_gpu: bool,
                            resources_per_worker: dict[str, float] | None) -> None:
    """:func:`check_store_reaches_workers` on the Ray cluster this process is connected to."""
    if not is_local_store(tracking_uri):
        return
    import ray
    from ray.util.client import ray as ray_client

    check_store_reaches_workers(tracking_uri, ray.nodes(), ray.get_runtime_context().get_node_id(),
                                worker_resources(num_workers, use_gpu, resources_per_worker),
                                ray_client=ray_client.is_connected())
