"""Guards for data and the training worker (issue 24, rows 12, 17, 21, 22): mask extreme points use
each side's own band width; ``data.verify=sha256`` really hashes the shards in both readers (training
loader -- train and val -- and the Ray Data reader); the Ray training loop's ``train.init_from`` loads
weights only, while a resume restores everything it saved. No Ray cluster is started."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from lsnet.data.shards import ShardError, load_manifest
from lsnet.targets import TargetConfig, compute_image_targets
from pipelines.config import load_config

REPO_ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------------
# row 12: the top/bottom band is 2 % of the *height*, the left/right band 2 % of the *width*


def _wide_object() -> np.ndarray:
    """A 100 x 10 px object (rows 0-9, cols 0-99 of a 20 x 110 image) whose top row holds only cols 10-19."""
    mask = np.zeros((20, 110), np.uint8)
    mask[1:10, 0:100] = 1
    mask[0, 10:20] = 1
    return mask


def _targets(seg, h=20, w=110):
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 100.0, 10.0], "segmentation": seg,
           "iscrowd": 0, "area": 910.0}
    record, rejections = compute_image_targets([ann], h, w, {1: 0}, TargetConfig(extreme_tolerance=0.02))
    assert rejections == []
    return record["extreme"][0]


def test_mask_extreme_points_use_each_sides_band_width():
    """Top band: 2 % of the 10-px height = 0.2 px -> only row 0 (cols 10-19): top x = 15. With the
    width's 2 px it would take row 1 too, and the whole width: x = 50. Left band: 2 px -> cols 0-1,
    rows 1-9 -> y = 5.5."""
    rle = mask_utils.encode(np.asfortranarray(_wide_object()))
    rle["counts"] = rle["counts"].decode()
    extreme = _targets(rle)
    np.testing.assert_allclose(extreme, [[15.0, 0.0], [0.0, 5.5], [50.0, 10.0], [100.0, 5.5]], atol=1e-3)


def test_polygon_extreme_points_use_each_sides_band_width():
    """(second path of row 12) the polygon rule: band = 2 % of (side + 1 px): 0.22 px of the height, so
    the top run is the two vertices at y = 0 (x 10, 20) -> 15; the width's 2.02 px would also take the
    shoulders at y = 1.5 (x 0..100) -> 50."""
    poly = [10.0, 0.0, 20.0, 0.0, 20.0, 1.5, 100.0, 1.5, 100.0, 10.0, 0.0, 10.0, 0.0, 1.5, 10.0, 1.5]
    extreme = _targets([poly])
    assert extreme[0].tolist() == pytest.approx([15.0, 0.0], abs=1e-3)
    assert extreme[2, 1] == pytest.approx(10.0) and extreme[1, 0] == 0.0 and extreme[3, 0] == 100.0


def test_tall_mask_extreme_points_use_each_sides_band_width():
    """The transpose: a 10 x 100 (w x h) object whose left column holds only rows 10-19."""
    mask = _wide_object().T.copy()
    rle = mask_utils.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode()
    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 10.0, 100.0], "segmentation": rle,
           "iscrowd": 0, "area": 910.0}
    record, _ = compute_image_targets([ann], 110, 20, {1: 0}, TargetConfig(extreme_tolerance=0.02))
    np.testing.assert_allclose(record["extreme"][0], [[5.5, 0.0], [0.0, 15.0], [5.5, 100.0], [10.0, 50.0]],
                               atol=1e-3)


# ------------------------------------------------------------------------------------------------
# shards (rows 21, 22) and the training worker (row 17)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Train and val shards of 4 synthetic 64-px images each (two shards per split), built in-process."""
    from lsnet.data.synthetic import write_synthetic_coco
    from pipelines.preprocess import preprocess

    root = tmp_path_factory.mktemp("guard_shards")
    out = {}
    for split, seed in (("train", 1), ("val", 2)):
        synth = write_synthetic_coco(root / f"src_{split}", num_images=4, image_size=64, seed=seed, split=split)
        out[split] = root / split
        preprocess(synth.instances_json, synth.image_dir, out[split], max_size=64, contour_points=(18,),
                   max_rows_per_shard=2, executor="local", verbose=False)
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _flip_one_byte(shard_dir: Path) -> Path:
    """Corrupt the last shard without changing its size (a size check cannot see it)."""
    path = shard_dir / load_manifest(shard_dir)["shards"][-1]["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _cfg(shards_: dict, run_dir: Path, *extra: str):
    classes = len(load_manifest(shards_["train"])["categories"])
    return load_config(REPO_ROOT / "configs" / "tiny_bbox.yaml", [
        f"data.train_shards={shards_['train']}", f"data.val_shards={shards_['val']}", f"model.num_classes={classes}",
        "data.scale_range=[64,64]", "data.max_size=64", "data.test_scale=64", "train.batch_size=1",
        "train.epochs=2", "train.lr_steps=[]", "train.warmup_iters=4", f"run.storage_path={run_dir}", *extra])


def _ctx(run_dir: Path):
    from pipelines.train.parts import WorkerContext

    run_dir.mkdir(parents=True, exist_ok=True)
    return WorkerContext(rank=0, world=1, device=torch.device("cpu"), run_dir=run_dir)


@pytest.mark.parametrize("split", ["train", "val"])
def test_training_loader_hashes_the_shards_with_verify_sha256(shards, tmp_path, split):
    from pipelines.train.parts import build_training

    bad = dict(shards)
    bad[split] = _copy(shards[split], tmp_path / split)
    path = _flip_one_byte(bad[split])
    with pytest.raises(ShardError, match=rf"shard {path} is corrupted: SHA-256"):
        build_training(_cfg(bad, tmp_path / "run"), _ctx(tmp_path / "run"))
    # data.verify=size is the documented weaker check: it does not see a same-size corruption
    parts = build_training(_cfg(bad, tmp_path / "run", "data.verify=size"), _ctx(tmp_path / "run"))
    assert len(parts.train_ds) == 4
    # but a truncated shard it does
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ShardError, match=rf"shard {path} is corrupted: \d+ bytes"):
        build_training(_cfg(bad, tmp_path / "run", "data.verify=size"), _ctx(tmp_path / "run"))


def test_ray_data_reader_hashes_the_shards_with_verify_sha256(shards, tmp_path):
    from pipelines.datasets import build_ray_dataset

    bad = _copy(shards["train"], tmp_path / "train")
    path = _flip_one_byte(bad)
    with pytest.raises(ShardError, match=rf"shard {path} is corrupted: SHA-256"):
        build_ray_dataset(bad, task="bbox", scale_range=(64, 64), max_size=64, verify="sha256")
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ShardError, match=rf"shard {path} is corrupted: \d+ bytes"):
        build_ray_dataset(bad, task="bbox", scale_range=(64, 64), max_size=64, verify="size")


def _source_checkpoint(shards_, tmp_path) -> tuple[Path, dict]:
    """A checkpoint of a run that trained 3 steps: moved weights, momentum buffers, a scheduler past
    its warmup, epoch 1 / step 3."""
    from lsnet.engine import checkpoint_state, save_checkpoint
    from pipelines.train.parts import build_training

    src = build_training(_cfg(shards_, tmp_path / "src"), _ctx(tmp_path / "src"))
    for _ in range(3):
        for p in src.model.parameters():
            p.grad = torch.full_like(p, 0.01)
        src.optimizer.step()
        src.scheduler.step()
    src.state.epoch, src.state.global_step = 1, 3
    ckpt = checkpoint_state(src.model, src.optimizer, src.scheduler, src.scaler, src.state)
    return save_checkpoint(ckpt, tmp_path / "src" / "model_final.pt"), ckpt


def test_ray_loop_init_from_loads_weights_only(shards, tmp_path, monkeypatch):
    import ray.train

    from pipelines.train.parts import build_training, resume_training

    path, ckpt = _source_checkpoint(shards, tmp_path)
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)  # a fresh run, not a restart
    fresh = build_training(_cfg(shards, tmp_path / "fresh"), _ctx(tmp_path / "fresh"))
    parts = build_training(_cfg(shards, tmp_path / "ft", f"train.init_from={path}"), _ctx(tmp_path / "ft"))
    assert resume_training(parts, _ctx(tmp_path / "ft")) is None
    for key, value in parts.model.state_dict().items():
        assert torch.equal(value, ckpt["model"][key]), key
    assert parts.optimizer.state_dict()["state"] == {}  # no momentum buffers carried over
    assert parts.scheduler.state_dict()["last_epoch"] == fresh.scheduler.state_dict()["last_epoch"]
    assert [g["lr"] for g in parts.optimizer.param_groups] == [g["lr"] for g in fresh.optimizer.param_groups]
    assert (parts.state.epoch, parts.state.global_step) == (0, 0)


def test_ray_loop_resume_restores_what_was_saved_and_ignores_init_from(shards, tmp_path, monkeypatch):
    """(hole next to row 17) a restarted worker group continues from Ray's checkpoint: weights,
    optimiser, schedule and counters -- init_from is for fresh runs only."""
    import ray.train

    from lsnet.engine import save_checkpoint
    from pipelines.train.parts import build_training, resume_training

    _path, ckpt = _source_checkpoint(shards, tmp_path)
    ckpt_dir = tmp_path / "ray_ckpt" / "checkpoint_epoch_0001"
    save_checkpoint(ckpt, ckpt_dir / "state.pt")
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(ckpt_dir)))
    other = tmp_path / "other.pt"  # init_from names a different checkpoint: it must not be read
    torch.save({"model": {}}, other)
    parts = build_training(_cfg(shards, tmp_path / "r", f"train.init_from={other}"), _ctx(tmp_path / "r"))
    assert resume_training(parts, _ctx(tmp_path / "r")) == {"epoch": 1, "step": 3}
    for key, value in parts.model.state_dict().items():
        assert torch.equal(value, ckpt["model"][key]), key
    state = parts.optimizer.state_dict()["state"]
    assert state and all(torch.equal(s["momentum_buffer"], ckpt["optimizer"]["state"][k]["momentum_buffer"])
                         for k, s in state.items())
    assert parts.scheduler.state_dict()["last_epoch"] == 3
    # a newer complete checkpoint on disk than Ray's record (after a Ctrl-C) wins
    disk = tmp_path / "run_dir" / "checkpoint_epoch_0002"
    ckpt["train_state"] = {**ckpt["train_state"], "epoch": 2, "global_step": 6}
    save_checkpoint(ckpt, disk / "state.pt")
    ctx = _ctx(tmp_path / "r2")
    ctx.resume_from = str(disk)
    parts = build_training(_cfg(shards, tmp_path / "r2"), ctx)
    assert resume_training(parts, ctx) == {"epoch": 2, "step": 6}
