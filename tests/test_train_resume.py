"""The resume step of the Ray Train loop on its own (no Ray session): each rank continues its own
random streams (issue 14, item 3).

The killed-worker test of tests/test_train_pipeline.py cannot see a missing RNG restore today (the
sampler and the augmentations are seeded by seed/epoch/index, nothing after a resume draws from the
global RNGs). Here :func:`pipelines.train.worker.checkpoint_and_report` writes a two-rank checkpoint the way
Ray Train collects it (every rank's files in one directory) and :func:`pipelines.train.parts.resume_training`
restores it; the next draws of torch / NumPy / Python after the resume must equal those an
uninterrupted worker of the same rank would have made.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipelines.config import load_config

REPO_ROOT = Path(__file__).resolve().parent.parent


def _fingerprint() -> tuple:
    """The next draws of every global RNG a training step could use (consumes them)."""
    return (tuple(torch.rand(3).tolist()), tuple(np.random.rand(3).tolist()), tuple(random.random() for _ in range(3)),
            tuple(torch.randint(0, 2**31 - 1, (2,)).tolist()))


def _parts(cfg):
    from lsnet.engine import TrainState, build_grad_scaler, build_optimizer, build_scheduler
    from pipelines.train.parts import TrainingParts

    model = nn.Linear(3, 2)
    optimizer = build_optimizer(model, cfg.train, global_batch=4)
    scheduler = build_scheduler(optimizer, cfg.train, iters_per_epoch=2)
    scaler = build_grad_scaler(cfg.train, "cpu")
    return TrainingParts(cfg, model, optimizer, scheduler, scaler, TrainState(epoch=1, global_step=2),
                         train_ds=None, sampler=None, train_loader=None, val_ds=None, val_loader=None)


def test_resume_restores_each_ranks_rng_streams(tmp_path, monkeypatch):
    import ray.train

    from pipelines.train.parts import TrainingParts, WorkerContext, resume_training
    from pipelines.train.worker import checkpoint_and_report

    cfg = load_config(REPO_ROOT / "configs" / "tiny_bbox.yaml")
    saved = tmp_path / "checkpoint_epoch_0001"

    def fake_report(metrics, checkpoint=None, checkpoint_dir_name=None):  # Ray Train merges the ranks' dirs
        assert checkpoint_dir_name == saved.name
        shutil.copytree(checkpoint.path, saved, dirs_exist_ok=True)

    monkeypatch.setattr(ray.train, "report", fake_report)
    monkeypatch.setattr(TrainingParts, "checkpoint_metadata", lambda self: {"task": "bbox"})

    # Two ranks with different streams reach the end of epoch 1 and checkpoint; what each would draw
    # next in an uninterrupted run is recorded.
    expected = {}
    for rank, seed in ((0, 100), (1, 101)):
        ctx = WorkerContext(rank=rank, world=2, device=torch.device("cpu"), run_dir=tmp_path)
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        _fingerprint()  # some draws during the epoch
        checkpoint_and_report(_parts(cfg), ctx, {"epoch": 1})
        expected[rank] = _fingerprint()
    assert {p.name for p in saved.iterdir()} == {"state.pt", "rng_rank0.pt", "rng_rank1.pt"}
    assert expected[0] != expected[1]

    # A restarted worker group: fresh processes (other RNG states) resume from that checkpoint.
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(saved))
    for rank in (1, 0):
        torch.manual_seed(7)
        np.random.seed(7)
        random.seed(7)
        parts = _parts(cfg)
        parts.state.epoch, parts.state.global_step = 0, 0
        resumed = resume_training(parts, WorkerContext(rank=rank, world=2, device=torch.device("cpu"),
                                                       run_dir=tmp_path))
        assert resumed == {"epoch": 1, "step": 2}
        assert _fingerprint() == expected[rank], f"rank {rank}: RNG streams after resume differ from the uninterrupted run"


def test_fresh_start_leaves_the_seeded_streams_alone(monkeypatch):
    import ray.train

    from pipelines.train.parts import WorkerContext, resume_training

    cfg = load_config(REPO_ROOT / "configs" / "tiny_bbox.yaml")
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    parts = _parts(cfg)
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    reference = _fingerprint()
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    assert resume_training(parts, WorkerContext(0, 1, torch.device("cpu"), Path("."))) is None
    assert _fingerprint() == reference

