"""The run directory's names: what a training run writes where, and the small readers of it.

A run lives in ``RunConfig.storage_path / run name`` (the *run directory*)::

    config.yaml                   the resolved experiment config
    checkpoint_epoch_0003/        Ray Train checkpoints: state.pt (model, optimiser, scheduler, AMP
                                  scaler, TrainState) + rng_rank{r}.pt (each worker's RNG state);
                                  the best by the task's AP and the latest are kept
    model_best.pt, model_final.pt weights + metadata for ``lsnet predict`` (rank 0)
    epochs.jsonl                  one line per epoch (losses, throughput, COCO metrics)
    overlays/epoch_0003/*.png     prediction overlays of the first validation images
    eval/                         per-category AP tables
    workers/rank{r}.json          where each worker of the latest attempt ran
    worker_errors/rank{r}.json    a worker's data/config error (the driver stops the run on it)
    mlflow_journal/               the tracking write-ahead journal (pipelines.tracking.journal)
    fault_injected.marker         test-only: the fault injection fired (``run.fail_at_step``)

``run.storage_path`` is a local (or shared) directory, or an object-store URI (``s3://bucket/runs``). The
run's *location* is ``storage_path/<name>`` either way, and everything a later step needs is stored
there -- the checkpoints (written by Ray Train), the weights, ``epochs.jsonl``, the journal, the worker
records -- so a driver or worker on any node, or a resubmitted run, finds it. Processes work on a local
copy of the run directory (:func:`run_mirror`: the directory itself for a local path; a scratch copy on
this machine for a URI, pulled at start and pushed after each epoch); the small records workers and the
driver exchange (``workers/``, ``worker_errors/``, the fault marker) are written straight to the location.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from lsnet import storage
from lsnet.config import ConfigError
from lsnet.errors import InputError, LsnetError, one_line

CHECKPOINT_PREFIX = "checkpoint_epoch_"


FAULT_MARKER = "fault_injected.marker"


#: A worker that hits a data/config error (an LsnetError) writes it here (``rank{r}.json``); the driver
#: stops the run at once instead of letting Ray spend ``run.max_failures`` restarts on it.
WORKER_ERRORS_DIR = "worker_errors"


def checkpoint_epoch(path: str | Path) -> int:
    """``.../checkpoint_epoch_0003`` -> 3 (-1 for other names)."""
    name = Path(str(path).rstrip("/")).name
    try:
        return int(name.removeprefix(CHECKPOINT_PREFIX)) if name.startswith(CHECKPOINT_PREFIX) else -1
    except ValueError:
        return -1


def newest_complete_checkpoint(run_dir: str | Path, log=None) -> str | Path | None:
    """The newest ``checkpoint_epoch_*`` directory of the run location ``run_dir`` (a path or a URI) whose
    ``state.pt`` loads (a run killed while a checkpoint was being written leaves a partial one, which is
    skipped and named via ``log``). A Path for a local run directory, the URI for a stored one."""
    import tempfile

    from lsnet.engine import load_checkpoint

    location = str(run_dir)
    names = [name for name, is_dir in storage.list_dir(location) if is_dir and checkpoint_epoch(name) >= 0]
    for name in sorted(names, key=checkpoint_epoch, reverse=True):
        path = storage.join(location, name)
        try:
            if storage.is_uri(location):
                with tempfile.TemporaryDirectory() as tmp:
                    if not storage.is_file(storage.join(path, "state.pt")):
                        raise FileNotFoundError(f"checkpoint {path}/state.pt does not exist")
                    ckpt = load_checkpoint(storage.download_file(storage.join(path, "state.pt"),
                                                                 Path(tmp) / "state.pt"))
            else:
                ckpt = load_checkpoint(Path(path) / "state.pt")
            if "train_state" in ckpt:
                return path if storage.is_uri(location) else Path(path)
            reason = "no train_state"
        except (OSError, ValueError) as err:
            reason = one_line(err)[:200]
        if log is not None:
            log(f"[resume] skipping incomplete {name}: {reason}")
    return None


def is_uri(path: str | None) -> bool:
    return storage.is_uri(path)


def run_location(storage_path: str, name: str) -> str:
    """Where run ``name`` lives: ``storage_path/name`` (a local path or a URI such as ``s3://b/runs/name``)."""
    return storage.join(storage_path, name)


#: what a process does not copy into its local run directory: the checkpoints (Ray Train reads and writes
#: them at the location itself) and the records written straight to the location
NOT_MIRRORED = (CHECKPOINT_PREFIX, WORKER_ERRORS_DIR + "/", "workers/", FAULT_MARKER)


def run_mirror(location: str) -> storage.MirroredDir:
    """The local working copy of the run at ``location`` (see the module doc); for a local path the run
    directory itself."""
    return storage.MirroredDir(location, skip=NOT_MIRRORED)


def clear_worker_errors(run_dir: str | Path) -> None:
    """Forget the data errors a previous attempt's workers recorded (this run checks afresh)."""
    location = storage.join(run_dir, WORKER_ERRORS_DIR)
    for name, is_dir in storage.list_dir(location):
        if not is_dir and name.endswith(".json"):
            storage.delete_file(storage.join(location, name))


def write_worker_info(run_dir: str | Path, rank: int, world: int, device, resumed_from: dict | None) -> None:
    """``workers/rank{r}.json``: where each worker of the latest attempt ran (node id, host, pid)."""
    import socket

    import ray

    info = {"rank": rank, "world_size": world, "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(), "pid": os.getpid(), "device": str(device),
            "resumed_from": resumed_from,
            "time": _dt.datetime.now(_dt.UTC).isoformat()}
    storage.write_text(storage.join(run_dir, "workers", f"rank{rank}.json"), json.dumps(info, indent=1))


def record_worker_error(run_dir: str | Path, rank: int, err: LsnetError) -> None:
    """A worker's data/config error as ``worker_errors/rank{r}.json`` (read by :func:`worker_error`)."""
    message = str(err)
    if "Original Traceback" in message:  # re-raised from a DataLoader worker process: its last line
        last = [line for line in message.splitlines() if line.strip()][-1]
        message = last.split(f"{type(err).__name__}: ", 1)[-1]
    storage.write_text(storage.join(run_dir, WORKER_ERRORS_DIR, f"rank{rank}.json"),
                       json.dumps({"rank": rank, "type": type(err).__name__, "message": one_line(message)}))


def worker_error(run_dir: str | Path) -> LsnetError | None:
    """The first data/config error a worker recorded (as its own error type), or None."""
    from lsnet.data.shards import ShardError
    from lsnet.modeling.backbone import PretrainedWeightsError

    types = {cls.__name__: cls for cls in (ConfigError, ShardError, InputError, PretrainedWeightsError)}
    location = storage.join(run_dir, WORKER_ERRORS_DIR)
    for name, _ in storage.list_dir(location):
        if not (name.startswith("rank") and name.endswith(".json")):
            continue
        try:
            info = json.loads(storage.read_text(storage.join(location, name)))
        except (OSError, json.JSONDecodeError):
            continue
        return types.get(info.get("type"), LsnetError)(f"worker {info.get('rank')}: {info.get('message')}")
    return None
