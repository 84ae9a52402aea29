"""Shared fixtures. Ray is started at most once per test session (``ray_session``)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The developers' folder beside the checkout (a user's clone has none): only an optional source of
#: the real data (``lsnet data fetch --from``); golden vectors live in tests/data/.
SHARED_DIR = Path(os.environ.get("LSNET_SHARED_DIR", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory):
    """lsnet's machine-wide cache (the empty MLflow store template) in a directory of this session, for
    every process the tests start (Ray workers, CLI subprocesses inherit the variable)."""
    os.environ["LSNET_CACHE_DIR"] = str(tmp_path_factory.mktemp("lsnet_cache"))


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that sets torch's thread count (the head-equality reference is single-threaded) gives the
    next tests the default back: float reductions, and so the overfit tests' trajectories, depend on it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _no_writes_to_the_checkouts_mlflow_store(tmp_path_factory):
    """Runs whose config names no store log to the checkout's shared ``results/mlflow.db`` by default;
    a test run must never add to it. Session-scoped so it also covers module-scoped fixtures that train.
    (A Ray worker never resolves the default itself: the driver passes the store it resolved.)"""
    store = tmp_path_factory.mktemp("default_mlflow_store") / "mlflow.db"
    mp = pytest.MonkeyPatch()
    # read by pipelines.tracking.tracker.default_store_path in this process and every one the tests start
    mp.setenv("LSNET_DEFAULT_MLFLOW_STORE", str(store))
    yield store
    mp.undo()


@pytest.fixture(autouse=True)
def _isolated_mlflow_tracking_uri():
    """``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI`` to the process environment, which a
    Ray started later (and every worker it spawns) would inherit: undo it after each test."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    import sys

    if "mlflow" in sys.modules:
        sys.modules["mlflow"].set_tracking_uri(None)  # clears mlflow's global and the variable
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def _real_dataset(name: str, tmp_path_factory) -> Path:
    """A verified copy of a fetchable real dataset (``lsnet data fetch NAME``): fetched from the developers'
    mirror ``../shared/data/<dir>`` into a session temp dir when that exists, else the checkout's
    ``data/<dir>`` once a user fetched it; skips with the fetch instruction otherwise."""
    from lsnet.data.fetch import default_dir, fetch_dataset, fetch_instruction, load_manifest

    manifest = load_manifest(name)
    mirror = SHARED_DIR / "data" / manifest.directory
    if mirror.is_dir():
        target = tmp_path_factory.mktemp(manifest.directory)
        report = fetch_dataset(manifest, target, source=str(mirror))
        assert report.ok, f"lsnet data fetch {name} --from {mirror}: {report.failed[:3]}"
        return target
    fetched = default_dir(name)
    if all((fetched / f.path).is_file() for f in manifest.annotations + manifest.images):
        return fetched
    pytest.skip(f"real-data test: {fetched} is not there: {fetch_instruction(name)}")


@pytest.fixture(scope="session")
def tiny_coco_dir(tmp_path_factory) -> Path:
    """The 50 real COCO images of tiny-coco (``lsnet data fetch tiny-coco``; read-only: copy before mutating)."""
    return _real_dataset("tiny-coco", tmp_path_factory)


@pytest.fixture(scope="session")
def coco_mini_dir(tmp_path_factory) -> Path:
    """The 158 real COCO images of coco-mini (``lsnet data fetch coco-mini``; train/val; read-only)."""
    return _real_dataset("coco-mini", tmp_path_factory)



@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster started once for the whole test session (2 CPUs, no dashboard, on loopback)."""
    import ray

    if not ray.is_initialized():
        # Workers inherit this process's environment: none of the stores a test may have named.
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        # address="local": always a fresh cluster, never one that another process started on this machine
        from pipelines.ray_local import _single_node_on_loopback, init_local_ray

        for attempt in range(3):  # a loaded machine's raylet may miss Ray's fixed 30-s registration window
            try:
                with _single_node_on_loopback():  # as `lsnet` starts it: every server on 127.0.0.1
                    init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False,
                                   configure_logging=False, _node_ip_address="127.0.0.1")
                break
            except Exception:  # "The current node timed out during startup"
                ray.shutdown()
                if attempt == 2:
                    raise
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_head():
    """A private real Ray head (`ray start --head`, token auth, loopback, private temp dir) shared by
    tests/test_jobs.py and tests/test_ablations.py, stopped at the end of the session."""
    from pipelines.jobs.head import LocalRayHead

    head = LocalRayHead(num_cpus=2, start_timeout_s=300)
    head.start()
    try:
        yield head
    finally:
        head.stop(timeout_s=10)  # then SIGKILL: the session is over, nothing of it is kept
        assert head.temp_dir is None


@pytest.fixture(scope="session")
def mlflow_server(tracking_server) -> str:
    """The tracking URI (``http://127.0.0.1:PORT``) of an MLflow server as teams run it, shared by the whole
    test session: see :func:`tracking_server`."""
    return tracking_server.uri


@pytest.fixture(scope="session")
def tracking_server():
    """``mlflow server`` on a private PostgreSQL cluster (initdb/pg_ctl in a temporary directory, 127.0.0.1
    only) with proxied artifacts (pipelines/tracking/server.py), started once per test session: the
    :class:`~pipelines.tracking.server.TrackingServer` (``.uri``, ``.process``, ``.postgres``). Stopped, and
    its directory removed, at the end. Skips where PostgreSQL is not installed."""
    import shutil
    import tempfile

    from lsnet.errors import ServiceError
    from pipelines.tracking.server import TrackingServer, postgres_bin_dir

    try:
        postgres_bin_dir()
    except ServiceError as err:
        pytest.skip(str(err))
    # not under pytest's tmp_path (mode 0700 under /tmp/pytest-of-root): PostgreSQL runs as another user
    root = Path(tempfile.mkdtemp(prefix="lsnet-mlflow-", dir="/tmp"))
    root.chmod(0o711)
    server = TrackingServer(root, durable=False, deadline_s=600)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- object storage (issue 20): an S3-compatible server reached through the standard AWS variables only --

@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """An S3-compatible server (moto, in memory) on 127.0.0.1 for the whole session, stopped at the end."""
    from servers import MotoS3Server

    server = MotoS3Server(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture
def s3(moto_server, monkeypatch):
    """A fresh bucket, with exactly the standard AWS variables pointing at it set for this test (and so for
    every process the test starts): ``s3.uri("shards")`` -> ``s3://<bucket>/shards``."""
    from servers import AWS_VARIABLES, S3Bucket

    for name in AWS_VARIABLES:
        monkeypatch.setenv(name, moto_server.env()[name])
    return S3Bucket(moto_server, moto_server.create_bucket())


# -- `long` tests: minute-long runs whose parts faster tests cover; `make test` (< 15 min on a 2-core
# machine) leaves them out, LSNET_SLOW_TESTS=1 (make test-long) runs them too --

def pytest_collection_modifyitems(config, items):
    if os.environ.get("LSNET_SLOW_TESTS"):
        return
    skip = pytest.mark.skip(reason="long test beyond make test's 15-minute budget: LSNET_SLOW_TESTS=1 (make test-long) runs it")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def bucket(moto_server):
    """A bucket per test module, the standard AWS variables pointing at it while the module's tests run."""
    from servers import AWS_VARIABLES, S3Bucket

    mp = pytest.MonkeyPatch()
    for name in AWS_VARIABLES:
        mp.setenv(name, moto_server.env()[name])
    yield S3Bucket(moto_server, moto_server.create_bucket())
    mp.undo()


@pytest.fixture(scope="module")
def search_shards(tmp_path_factory, ray_session):
    """Synthetic train (8 images) and val (4 images) sets, 64 px, contours of 18 points, as shards under
    ``<root>/shards/{train,val}`` (one per module: the search tests write next to them)."""
    from lsnet.data.synthetic import write_synthetic_coco
    from pipelines.preprocess import preprocess

    root = tmp_path_factory.mktemp("search")
    train = write_synthetic_coco(root / "synth_train", num_images=8, image_size=(64, 64), seed=0)
    val = write_synthetic_coco(root / "synth_val", num_images=4, image_size=(64, 64), seed=1,
                               split="val", first_image_id=5000)
    for src, dst in ((train, "train"), (val, "val")):
        preprocess(src.instances_json, src.image_dir, root / "shards" / dst, max_size=64, contour_points=(18,),
                   verbose=False)
    return root
