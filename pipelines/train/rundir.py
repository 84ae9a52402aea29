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
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from lsnet.atomic import atomic_write_json
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


def newest_complete_checkpoint(run_dir: Path, log=None) -> Path | None:
    """The newest ``checkpoint_epoch_*`` directory of ``run_dir`` whose ``state.pt`` loads (a run killed
    while a checkpoint was being written leaves a partial one, which is skipped and named via ``log``)."""
    from lsnet.engine import load_checkpoint

    candidates = sorted((p for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*") if checkpoint_epoch(p) >= 0),
                        key=checkpoint_epoch, reverse=True)
    for path in candidates:
        try:
            ckpt = load_checkpoint(path / "state.pt")
            if "train_state" in ckpt:
                return path
            reason = "no train_state"
        except (OSError, ValueError) as err:
            reason = one_line(err)[:200]
        if log is not None:
            log(f"[resume] skipping incomplete {path.name}: {reason}")
    return None


def is_uri(path: str) -> bool:
    return "://" in path


def local_run_dir(storage_path: str, name: str) -> Path:
    """The run directory of run ``name``: under ``run.storage_path``, or -- when checkpoints go to an
    object store (a URI) -- ``~/lsnet_runs/<name>``, since the tracking journal needs a local directory."""
    return Path.home() / "lsnet_runs" / name if is_uri(storage_path) else Path(storage_path) / name


def clear_worker_errors(run_dir: Path) -> None:
    """Forget the data errors a previous attempt's workers recorded (this run checks afresh)."""
    for path in (run_dir / WORKER_ERRORS_DIR).glob("*.json"):
        path.unlink()


def write_worker_info(run_dir: Path, rank: int, world: int, device, resumed_from: dict | None) -> None:
    """``workers/rank{r}.json``: where each worker of the latest attempt ran (node id, host, pid)."""
    import socket

    import ray

    info = {"rank": rank, "world_size": world, "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(), "pid": os.getpid(), "device": str(device),
            "resumed_from": resumed_from,
            "time": _dt.datetime.now(_dt.UTC).isoformat()}
    atomic_write_json(run_dir / "workers" / f"rank{rank}.json", info, indent=1)


def record_worker_error(run_dir: Path, rank: int, err: LsnetError) -> None:
    """A worker's data/config error as ``worker_errors/rank{r}.json`` (read by :func:`worker_error`)."""
    message = str(err)
    if "Original Traceback" in message:  # re-raised from a DataLoader worker process: its last line
        last = [line for line in message.splitlines() if line.strip()][-1]
        message = last.split(f"{type(err).__name__}: ", 1)[-1]
    atomic_write_json(run_dir / WORKER_ERRORS_DIR / f"rank{rank}.json",
                      {"rank": rank, "type": type(err).__name__, "message": one_line(message)})


def worker_error(run_dir: Path) -> LsnetError | None:
    """The first data/config error a worker recorded (as its own error type), or None."""
    from lsnet.data.shards import ShardError
    from lsnet.modeling.backbone import PretrainedWeightsError

    types = {cls.__name__: cls for cls in (ConfigError, ShardError, InputError, PretrainedWeightsError)}
    for path in sorted((run_dir / WORKER_ERRORS_DIR).glob("rank*.json")):
        try:
            info = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        return types.get(info.get("type"), LsnetError)(f"worker {info.get('rank')}: {info.get('message')}")
    return None
