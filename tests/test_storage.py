"""Object storage (issue 20, part 1): every file lsnet writes or reads can live at ``s3://bucket/key``, reached
through the standard AWS variables only (the ``s3`` fixture: a moto server on 127.0.0.1 and exactly those
variables).

- :mod:`lsnet.storage`: whole-file reads and writes, listings, and :class:`~lsnet.storage.MirroredDir` (the
  local working copy a process keeps of a stored run directory);
- ``lsnet preprocess`` with the images, the annotations and the output on the bucket, resuming by checksum;
  both shard readers reading it back.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lsnet import storage

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_the_aws_variables_alone_reach_the_bucket(s3):
    """pyarrow.fs (what lsnet and Ray use) finds the endpoint in AWS_ENDPOINT_URL: an object written
    through :mod:`lsnet.storage` is in the bucket as boto3 sees it."""
    assert set(os.environ) >= {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}
    storage.write_text(s3.uri("a", "b.txt"), "hello")
    assert s3.objects() == ["a/b.txt"]
    assert storage.read_text(s3.uri("a", "b.txt")) == "hello"
    assert storage.file_size(s3.uri("a", "b.txt")) == 5 and storage.file_size(s3.uri("a", "none")) is None
    assert storage.list_dir(s3.uri("a")) == [("b.txt", False)]
    assert storage.list_dir(s3.uri("nothing")) == []
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(s3.uri("a", "missing.txt"))
    storage.delete_file(s3.uri("a", "b.txt"))
    storage.delete_file(s3.uri("a", "b.txt"))  # twice: nothing to delete is no error
    assert s3.objects() == []


def test_join_and_name_of_paths_and_uris():
    assert storage.join("s3://b/runs/", "x", "y.pt") == "s3://b/runs/x/y.pt"
    assert storage.join("/tmp/runs", "x") == "/tmp/runs/x"
    assert storage.name_of("s3://b/runs/x/") == "x" and not storage.is_uri("/tmp/x") and storage.is_uri("s3://b")


def test_mirrored_dir_pushes_changes_and_deletions_and_pulls_on_another_machine(s3, tmp_path):
    """Two working copies of one stored directory (two nodes): what one pushes the other pulls; a file
    deleted here is deleted there; skipped prefixes never travel; unchanged files are not re-sent."""
    writer = storage.MirroredDir(s3.uri("run"), local=tmp_path / "node_a", skip=("checkpoint_",))
    writer.pull()
    (writer.local / "journal").mkdir()
    (writer.local / "journal" / "log.jsonl").write_text("1\n")
    (writer.local / "epochs.jsonl").write_text("e1\n")
    (writer.local / "checkpoint_epoch_0001").mkdir()
    (writer.local / "checkpoint_epoch_0001" / "state.pt").write_text("big")
    assert writer.push() == 2
    assert s3.objects("run/") == ["run/epochs.jsonl", "run/journal/log.jsonl"]
    assert writer.push() == 0  # nothing changed
    with (writer.local / "epochs.jsonl").open("a") as fh:
        fh.write("e2\n")
    (writer.local / "journal" / "log.jsonl").unlink()
    assert writer.push() == 1
    assert s3.objects("run/") == ["run/epochs.jsonl"]

    reader = storage.MirroredDir(s3.uri("run"), local=tmp_path / "node_b")
    (tmp_path / "node_b").mkdir()
    (tmp_path / "node_b" / "stale.txt").write_text("from an earlier attempt")
    assert reader.pull() == 1
    assert (reader.local / "epochs.jsonl").read_text() == "e1\ne2\n"
    assert not (reader.local / "stale.txt").exists()  # the stored directory is the truth


def test_a_local_mirrored_dir_is_the_directory_itself(tmp_path):
    mirror = storage.MirroredDir(tmp_path / "run")
    assert mirror.local == tmp_path / "run" and not mirror.remote
    assert mirror.pull() == 0 and not mirror.local.exists()  # nothing to fetch, nothing created
    mirror.local.mkdir()
    (mirror.local / "x").write_text("1")
    assert mirror.push() == 0 and (tmp_path / "run" / "x").exists()


# -- lsnet preprocess on the bucket ------------------------------------------------------------------------

def _upload_tree(local: Path, uri: str) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            storage.upload_file(path, storage.join(uri, path.relative_to(local).as_posix()))


@pytest.fixture
def synthetic_on_s3(s3, tmp_path):
    """A 6-image synthetic COCO set, written locally and uploaded to the bucket (images and JSON)."""
    from lsnet.data.synthetic import write_synthetic_coco

    data = write_synthetic_coco(tmp_path / "synth", num_images=6, image_size=(96, 96), seed=3)
    _upload_tree(data.image_dir, s3.uri("coco", "images"))
    storage.upload_file(data.instances_json, s3.uri("coco", "instances.json"))
    return data


def _shard_digests(location: str) -> dict[str, str]:
    manifest = json.loads(storage.read_text(storage.join(location, "manifest.json")))
    return {s["file"]: s["sha256"] for s in manifest["shards"]}


def test_preprocess_from_and_to_the_bucket_resumes_by_checksum(s3, synthetic_on_s3, tmp_path, capsys):
    """Images, annotations and shards on s3://: the shards equal those of a local run byte for byte; a rerun
    redoes exactly the shards whose stored bytes no longer match their checksum (or lost their sidecar)."""
    from pipelines.preprocess import preprocess

    data = synthetic_on_s3
    out = s3.uri("shards", "train")
    kwargs = {"max_size": 96, "contour_points": (18,), "max_rows_per_shard": 2, "executor": "local"}
    manifest = preprocess(s3.uri("coco", "instances.json"), s3.uri("coco", "images"), out, **kwargs)
    local = preprocess(data.instances_json, data.image_dir, tmp_path / "local_shards", verbose=False, **kwargs)
    assert len(manifest["shards"]) == 3 and manifest["num_images"] == 6
    assert _shard_digests(out) == {s["file"]: s["sha256"] for s in local["shards"]}
    names = [s["file"] for s in manifest["shards"]]
    assert {k.removeprefix("shards/train/") for k in s3.objects("shards/train/")} == {
        "manifest.json", "gt.json", *names, *(f"{n}.done" for n in names)}
    for name in names:  # the stored bytes are what the manifest says
        assert storage.sha256_of(storage.join(out, name))[0] == _shard_digests(out)[name]

    # corrupt shard 0 in place (same size), drop shard 2's sidecar, leave a stray temporary upload
    first = storage.join(out, names[0])
    corrupted = bytearray(storage.read_bytes(first))
    corrupted[len(corrupted) // 2] ^= 0xFF
    storage.write_bytes(first, bytes(corrupted))
    storage.delete_file(storage.join(out, names[2] + ".done"))
    storage.write_text(storage.join(out, ".shard-x.tmp-1"), "partial")
    capsys.readouterr()
    again = preprocess(s3.uri("coco", "instances.json"), s3.uri("coco", "images"), out, **kwargs)
    log = capsys.readouterr().out
    assert "resuming: 1 shard(s) complete and verified, 2 to do" in log
    assert "shard 1/3 written" in log and "shard 3/3 written" in log and "shard 2/3 written" not in log
    assert _shard_digests(out) == _shard_digests(storage.join(str(tmp_path), "local_shards"))
    assert again["shards"] == manifest["shards"]
    assert storage.sha256_of(first)[0] == _shard_digests(out)[names[0]]  # rewritten
    assert not storage.exists(storage.join(out, ".shard-x.tmp-1"))


def test_both_readers_read_shards_on_the_bucket(s3, synthetic_on_s3, tmp_path):
    """The map-style reader (ShardDataset over s3://, ranged reads) gives the samples of the local shards;
    the Ray Data reader is exercised on the bucket by the training runs (test_storage_training.py)."""
    from lsnet.data.shards import ShardDataset
    from pipelines.preprocess import preprocess

    data = synthetic_on_s3
    kwargs = {"max_size": 96, "contour_points": (18,), "max_rows_per_shard": 4, "executor": "local",
              "verbose": False}
    preprocess(data.instances_json, data.image_dir, s3.uri("shards"), **kwargs)
    preprocess(data.instances_json, data.image_dir, tmp_path / "shards", **kwargs)
    settings = {"task": "bbox", "train": True, "scale_range": (64, 96), "max_size": 96, "seed": 5}
    remote = ShardDataset(s3.uri("shards"), verify="sha256", **settings)
    local = ShardDataset(tmp_path / "shards", **settings)
    assert len(remote) == len(local) == 6 and remote.gt_path == s3.uri("shards", "gt.json")
    for epoch in (0, 1):
        remote.set_epoch(epoch)
        local.set_epoch(epoch)
        for i in range(len(local)):
            (a, ta, ma), (b, tb, mb) = remote[i], local[i]
            assert torch.equal(a, b) and torch.equal(ta.boxes, tb.boxes) and ma == mb


def test_preprocess_cli_on_the_bucket_with_ray_data(s3, synthetic_on_s3):
    """``lsnet preprocess --images s3://... --out s3://.../shards`` as a user runs it (Ray Data tasks read the
    images from the bucket: they get the AWS variables from the command's environment)."""
    out = s3.uri("cli", "shards")
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "preprocess", "--ann",
                           s3.uri("coco", "instances.json"), "--images", s3.uri("coco", "images"), "--out", out,
                           "--max-size", "96", "--contour-points", "18", "--num-cpus", "1"],
                          check=False, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    manifest = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    assert manifest["num_images"] == 6 and manifest["source"]["images"] == s3.uri("coco", "images")


def test_resume_finds_the_newest_complete_checkpoint_in_the_bucket(s3, tmp_path):
    """As on a local disk (tests/test_train_ux.py): a checkpoint directory without state.pt, or with a
    truncated one (a worker killed while uploading), is skipped and named; the answer is the URI."""
    from lsnet.engine import TrainState, checkpoint_state, save_checkpoint
    from pipelines.train.rundir import newest_complete_checkpoint

    run = s3.uri("runs", "r1")
    model = torch.nn.Linear(2, 2)
    for epoch in (1, 3, 4):
        local = save_checkpoint(checkpoint_state(model, state=TrainState(epoch=epoch), include_rng=False),
                                tmp_path / f"e{epoch}" / "state.pt")
        storage.upload_file(local, storage.join(run, f"checkpoint_epoch_{epoch:04d}", "state.pt"))
    storage.write_bytes(storage.join(run, "checkpoint_epoch_0005", "rng_rank1.pt"), b"only the other rank's")
    truncated = storage.join(run, "checkpoint_epoch_0004", "state.pt")
    storage.write_bytes(truncated, storage.read_bytes(truncated)[:100])
    logged: list[str] = []
    assert newest_complete_checkpoint(run, log=logged.append) == storage.join(run, "checkpoint_epoch_0003")
    assert [line.split(":")[0] for line in logged] == ["[resume] skipping incomplete checkpoint_epoch_0005",
                                                       "[resume] skipping incomplete checkpoint_epoch_0004"]
    assert newest_complete_checkpoint(s3.uri("runs", "nothing")) is None


def test_worker_records_go_straight_to_the_runs_location(s3):
    """A worker's data error and its whereabouts are written to the run's location (the driver, on another
    node, reads them there), and a new attempt clears the errors."""
    from lsnet.data.shards import ShardError
    from pipelines.train.rundir import clear_worker_errors, record_worker_error, worker_error

    run = s3.uri("runs", "r2")
    assert worker_error(run) is None
    record_worker_error(run, 1, ShardError("shard s3://x/shard-00000.arrow is corrupted"))
    assert s3.objects("runs/r2/") == ["runs/r2/worker_errors/rank1.json"]
    err = worker_error(run)
    assert isinstance(err, ShardError) and str(err) == "worker 1: shard s3://x/shard-00000.arrow is corrupted"
    clear_worker_errors(run)
    assert worker_error(run) is None and s3.objects("runs/r2/") == []
