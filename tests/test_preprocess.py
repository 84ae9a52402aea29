"""Preprocessing job end to end on Ray Data: round trips, kill-and-resume, bad input, streaming reader.

All Ray tests share the session Ray (``ray_session``) and use a few tiny images: Ray start-up
dominates their run time.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from lsnet.data.augment import collate_batch
from lsnet.data.shards import ShardDataset, ShardSampler
from lsnet.data.synthetic import write_synthetic_coco
from lsnet.targets import TargetConfig, compute_image_targets, scale_record
from pipelines.preprocess import PreprocessError, preprocess
from pipelines.preprocess.settings import CRASH_ENV

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic_coco(tmp_path_factory.mktemp("synth"), num_images=7, image_size=(96, 128), seed=11,
                                size_jitter=0.25, person_prob=0.4)


@pytest.fixture(scope="module")
def reference(synth, tmp_path_factory):
    """The same job run serially in-process: what every Ray / resumed run must reproduce byte for byte."""
    out = tmp_path_factory.mktemp("reference")
    preprocess(synth.instances_json, synth.image_dir, out, max_size=112, max_rows_per_shard=2,
               contour_points=(18, 36), executor="local", verbose=False)
    return out


def _run_job(synth, out, **kw):
    return preprocess(synth.instances_json, kw.pop("images", synth.image_dir), out, max_size=112,
                      max_rows_per_shard=2, contour_points=(18, 36), verbose=False, **kw)


def test_ray_job_from_file_uri_matches_reference(ray_session, synth, reference, tmp_path):
    manifest = _run_job(synth, tmp_path / "out", images=synth.image_dir.resolve().as_uri())
    assert manifest["source"]["images"].startswith("file://")
    assert len(manifest["shards"]) == 4 and manifest["num_images"] == 7
    ref, got = _files(reference), _files(tmp_path / "out")
    assert sorted(got) == sorted(ref)
    for name in ref:
        if name != "manifest.json":  # the manifest records the image root as given
            assert got[name] == ref[name], name
    # Only the source image root differs between the two manifests.
    m_ref = json.loads(ref["manifest.json"])
    m_ref["source"]["images"] = manifest["source"]["images"]
    assert m_ref == json.loads(got["manifest.json"])


def test_tiny_coco_round_trip(ray_session, tiny_coco_dir, tmp_path):
    """Real COCO (polygons, crowd RLEs, 80 classes): shards == targets computed directly."""
    ann = tiny_coco_dir / "annotations" / "instances_train2017.json"
    manifest = preprocess(ann, tiny_coco_dir / "train2017", tmp_path, max_size=480, shard_size_mb=2,
                          contour_points=(36,), verbose=False)
    data = json.loads(ann.read_text())
    cats = sorted(c["id"] for c in data["categories"])
    cat_to_label = {c: k for k, c in enumerate(cats)}
    assert [c["id"] for c in manifest["categories"]] == cats
    assert len(manifest["shards"]) > 1
    images = {im["id"]: im for im in data["images"]}
    anns: dict[int, list] = {i: [] for i in images}
    for a in data["annotations"]:
        anns[a["image_id"]].append(a)
    cfg = TargetConfig(contour_points=(36,))
    expected_rejected = []
    ds = ShardDataset(tmp_path, scale_range=None)
    seen = []
    for index in range(len(ds)):
        _, record, meta = ds.raw(index)
        im = images[meta["image_id"]]
        direct, rejected = compute_image_targets(anns[im["id"]], im["height"], im["width"], cat_to_label, cfg)
        expected_rejected += [r.ann_id for r in rejected]
        resized = max(im["height"], im["width"]) > 480
        assert max(meta["height"], meta["width"]) == (480 if resized else max(im["height"], im["width"]))
        if resized:
            direct = scale_record(direct, meta["scale_x"], meta["scale_y"])
        for key in direct:
            assert np.array_equal(record[key], direct[key]), (im["id"], key)
        seen.append(im["id"])
    assert seen == sorted(images)
    assert sorted(r["ann_id"] for r in manifest["rejected"]) == sorted(expected_rejected)
    gt = json.loads((tmp_path / "gt.json").read_text())
    assert len(gt["images"]) == 50
    assert len(gt["annotations"]) == len(data["annotations"]) - len(expected_rejected)


def _crash_run(synth, out, crash: str, address: str) -> subprocess.CompletedProcess:
    code = (
        "import sys; from pipelines.preprocess import preprocess; "
        "preprocess(sys.argv[1], sys.argv[2], sys.argv[3], max_size=112, max_rows_per_shard=2, "
        "contour_points=(18, 36), executor=sys.argv[4])"
    )
    executor = "ray" if address else "local"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {CRASH_ENV: crash}
    if address:
        env["RAY_ADDRESS"] = address
    return subprocess.run([sys.executable, "-c", code, str(synth.instances_json), str(synth.image_dir), str(out),
                           executor], check=False, env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


def test_shard_bytes_do_not_depend_on_block_size(synth, tmp_path, monkeypatch):
    """Rows are streamed into the shard files as blocks arrive, in write groups of a fixed number of
    rows; blocks of 1, 2, 3 or all 7 images (straddling the groups and the shards) give the same bytes."""
    import pipelines.preprocess.writer as pp

    monkeypatch.setattr(pp, "SHARD_WRITE_GROUP_ROWS", 2)
    files = []
    for per_task in ("1", "2", "3", "7"):
        monkeypatch.setenv("LSNET_PREPROCESS_IMAGES_PER_TASK", per_task)
        out = tmp_path / per_task
        preprocess(synth.instances_json, synth.image_dir, out, max_size=112, max_rows_per_shard=5,
                   contour_points=(18,), executor="local", verbose=False)
        files.append(_files(out))
    assert len([n for n in files[0] if n.endswith(".arrow")]) == 2
    assert all(f == files[0] for f in files[1:])


def test_stored_jpeg_encoding(synth, reference, tmp_path):
    """Stored images are re-encoded at the configured quality and chroma subsampling (default q90,
    4:2:0: faster to decode every epoch); --keep-original-jpeg stores an RGB JPEG that needs no resize
    as it is, and the choice is part of the plan (a re-run with the other setting rewrites the shards)."""
    from PIL import JpegImagePlugin

    def stored(out):
        ds = ShardDataset(out, scale_range=None)
        return {ds.raw(i)[2]["file_name"]: bytes(ds.raw(i)[0]) for i in range(len(ds))}

    def q90_tables(data):
        im = Image.open(io.BytesIO(data))
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=90, subsampling=2)
        return Image.open(buf).quantization

    for name, data in stored(reference).items():
        im = Image.open(io.BytesIO(data))
        assert JpegImagePlugin.get_sampling(im) == 2, name  # 4:2:0 (the synthetic originals are 4:4:4)
        assert im.quantization == q90_tables(data), name
    manifest = _run_job(synth, tmp_path / "keep", executor="local", keep_original_jpeg=True,
                        jpeg_subsampling="4:4:4")
    assert manifest["config"]["keep_original_jpeg"] is True
    originals = {p.name: p.read_bytes() for p in synth.image_dir.iterdir()}
    kept = 0
    for name, data in stored(tmp_path / "keep").items():
        h, w = Image.open(io.BytesIO(originals[name])).size[::-1]
        if max(h, w) <= 112:  # no resize: the original bytes
            assert data == originals[name], name
            kept += 1
        else:  # resized: re-encoded, with the requested 4:4:4 chroma
            assert JpegImagePlugin.get_sampling(Image.open(io.BytesIO(data))) == 0, name
    assert 0 < kept < len(originals)
    with pytest.raises(ValueError, match="jpeg_subsampling"):
        _run_job(synth, tmp_path / "bad", executor="local", jpeg_subsampling="4:1:1")


def test_kill_and_resume_is_byte_identical(ray_session, synth, reference, tmp_path):
    out = tmp_path / "out"
    address = ray_session.get_runtime_context().gcs_address
    proc = _crash_run(synth, out, "1", address)  # dies (os._exit) right after shard 1 of 4
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000-of-00004.arrow", "shard-00000-of-00004.arrow.done"]
    first = out / "shard-00000-of-00004.arrow"
    stamp = first.stat().st_mtime_ns, first.stat().st_ino
    _run_job(synth, out)  # resume on Ray
    assert (first.stat().st_mtime_ns, first.stat().st_ino) == stamp  # the finished shard was not redone
    assert _files(out) == _files(reference)


def test_kill_before_rename_leaves_no_half_shard(synth, reference, tmp_path):
    out = tmp_path / "out"
    proc = _crash_run(synth, out, "2:before_rename", "")  # shard 1 done, shard 2 written to a temp name only
    assert proc.returncode == 75, proc.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert "shard-00001-of-00004.arrow" not in names
    assert any(n.startswith(".shard-00001-of-00004.arrow.tmp-") for n in names)
    with pytest.raises(Exception, match="no manifest"):  # a reader sees no dataset yet
        ShardDataset(out)
    _run_job(synth, out, executor="local")
    assert _files(out) == _files(reference)  # temp file gone, same bytes


def test_rerun_skips_done_and_repairs_corrupted(synth, reference, tmp_path):
    out = tmp_path / "out"
    _run_job(synth, out, executor="local")
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    _run_job(synth, out, executor="local")
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == stamps
    victim = out / "shard-00002-of-00004.arrow"
    raw = bytearray(victim.read_bytes())
    raw[100] ^= 1
    victim.write_bytes(bytes(raw))
    (out / "shard-00000-of-00004.arrow.done").unlink()  # lost sidecar: that shard is redone too
    (out / "shard-00009-of-00010.arrow").write_bytes(b"stale")  # from another plan: removed
    _run_job(synth, out, executor="local")
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    changed = sorted(n for n in stamps if after[n] != stamps[n])
    assert changed == ["shard-00000-of-00004.arrow", "shard-00000-of-00004.arrow.done",
                       "shard-00002-of-00004.arrow", "shard-00002-of-00004.arrow.done"]
    assert _files(out) == _files(reference)


# --------------------------------------------------------------------------------------------------
# Bad input


def _bad_dataset(root: Path) -> tuple[Path, Path, dict]:
    syn = write_synthetic_coco(root / "syn", num_images=3, image_size=(64, 80), seed=2, person_prob=0.0)
    data = json.loads(syn.instances_json.read_text())
    img_dir = syn.image_dir
    good = data["images"][0]
    jpeg = (img_dir / good["file_name"]).read_bytes()
    (img_dir / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (img_dir / "text.jpg").write_text("this is not an image\n")
    # outside the image root: must never be read
    noise = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "syn" / "secret.jpg", quality=90)
    base = {"height": 64, "width": 80}
    data["images"] += [
        {"id": 901, "file_name": "missing.jpg", **base},
        {"id": 902, "file_name": "truncated.jpg", **base},
        {"id": 903, "file_name": "text.jpg", **base},
        {"id": 904, "file_name": good["file_name"], "height": 65, "width": 80},  # size mismatch
        {"id": 905, "file_name": "../secret.jpg", **base},
        {"id": 906, "file_name": "/etc/passwd", **base},
        {"id": 907, "file_name": good["file_name"], "height": float("nan"), "width": 80},
        {"id": 908, "file_name": good["file_name"], "height": 64, "width": -80},
        {"id": "x", "file_name": good["file_name"], **base},
        {"id": good["id"], "file_name": good["file_name"], **base},  # duplicate id
        {"id": [7], "file_name": good["file_name"], **base},  # unhashable id
    ]
    poly = [[10, 10, 30, 10, 30, 30, 10, 30]]
    ann = {"category_id": 3, "iscrowd": 0, "area": 400.0, "bbox": [10, 10, 20, 20], "segmentation": poly}
    data["annotations"] += [
        {**ann, "id": 9001, "image_id": 901},  # its image file is missing -> image_rejected
        {**ann, "id": 9005, "image_id": 905},  # image rejected on the driver (path traversal)
        {**ann, "id": 9010, "image_id": 123456},  # unknown image
        {**ann, "id": 9011, "image_id": good["id"], "category_id": 2},  # unknown category
        {**ann, "id": 9012, "image_id": good["id"], "segmentation": [[10, 10, 30, 10, 30]]},  # odd coords
        {**ann, "id": 9013, "image_id": good["id"], "segmentation": [[10, 10, 30, 10]]},  # 2 points
        {**ann, "id": 9014, "image_id": good["id"], "segmentation": [["a", "b", "c", "d", "e", "f"]]},
        {**ann, "id": 9015, "image_id": good["id"], "bbox": [500, 500, 20, 20],
         "segmentation": [[500, 500, 520, 500, 520, 520]]},  # entirely outside the image
        {**ann, "id": 9016, "image_id": good["id"], "bbox": [float("nan"), 10, 20, 20]},
        {**ann, "id": 9017, "image_id": good["id"], "bbox": [10, 10, -20, 20]},
        {**ann, "id": data["annotations"][0]["id"], "image_id": good["id"]},  # duplicate id
        {**ann, "id": 9018, "image_id": good["id"], "category_id": [3]},  # unhashable category
        {**ann, "id": [9019], "image_id": good["id"]},  # unhashable id
    ]
    ann_path = root / "bad.json"
    ann_path.write_text(json.dumps(data))  # json writes NaN, which Python's parser accepts
    return ann_path, img_dir, data


EXPECTED_IMAGE_CODES = {901: "missing_file", 902: "decode_error", 903: "decode_error", 904: "size_mismatch",
                        905: "path_traversal", 906: "path_traversal", 907: "invalid_size", 908: "invalid_size"}
EXPECTED_ANN_CODES = {9001: "image_rejected", 9005: "image_rejected", 9010: "unknown_image",
                      9011: "unknown_category", 9012: "invalid_annotation", 9013: "invalid_annotation",
                      9014: "invalid_annotation", 9015: "invalid_annotation", 9016: "invalid_annotation",
                      9017: "invalid_annotation", 9018: "unknown_category"}


def test_bad_input_rejected_with_reasons_never_dropped(ray_session, tmp_path, capsys):
    ann_path, img_dir, data = _bad_dataset(tmp_path)
    manifest = preprocess(ann_path, img_dir, tmp_path / "out", max_rows_per_shard=4, contour_points=(18,),
                          max_reject_fraction=1.0)
    printed = capsys.readouterr().out
    assert "rejected: 11 images" in printed and "path_traversal 2" in printed
    rejected = manifest["rejected"]
    assert all(r["reason"] for r in rejected)
    images = {r["image_id"]: r["code"] for r in rejected if r["kind"] == "image" and r["image_id"] != data["images"][0]["id"]}
    for image_id, code in EXPECTED_IMAGE_CODES.items():
        assert images.get(image_id) == code, (image_id, [r for r in rejected if r["image_id"] == image_id])
    assert {r["code"] for r in rejected if r["kind"] == "image"} >= {"invalid_id", "duplicate_id"}
    anns = {r["ann_id"]: r for r in rejected if r["kind"] == "annotation"}
    for ann_id, code in EXPECTED_ANN_CODES.items():
        assert anns[ann_id]["code"] == code, anns.get(ann_id)
    assert "truncated" in anns[9001]["reason"] or "not found" in anns[9001]["reason"]
    assert any(r["code"] == "duplicate_id" for r in anns.values())
    # The good images survive, and nothing is silently dropped: every source record is either kept
    # (in gt.json and the shards) or listed as rejected.
    gt = json.loads((tmp_path / "out" / "gt.json").read_text())
    assert sorted(im["id"] for im in gt["images"]) == sorted(im["id"] for im in data["images"][:3])
    kept_anns = {a["id"] for a in gt["annotations"]}
    rejected_anns = {r["ann_id"] for r in rejected if r["kind"] == "annotation"}
    source_ids = {a["id"] for a in data["annotations"] if isinstance(a["id"], int)}
    assert source_ids == kept_anns | (rejected_anns - {None})
    assert any(r["code"] == "invalid_id" and r["ann_id"] is None for r in rejected if r["kind"] == "annotation")
    assert len(ShardDataset(tmp_path / "out", scale_range=None)) == 3
    # the secret file outside the root was never stored
    secret = (tmp_path / "syn" / "secret.jpg").read_bytes()
    assert not any(secret in p.read_bytes() for p in (tmp_path / "out").glob("shard-*.arrow"))


def test_missing_image_root_and_too_many_rejections_fail(synth, tmp_path, capsys):
    """Before: `--images WRONG_DIR` exited 0 after "wrote 0 images ... missing_file 8"."""
    from pipelines.cli import main

    ann = str(synth.instances_json)
    args = ["preprocess", "--ann", ann, "--out", str(tmp_path / "o"), "--executor", "local"]
    assert main([*args, "--images", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lsnet preprocess: error: --images {tmp_path / 'nowhere'}: the image root does not exist"
    assert not (tmp_path / "o").exists()  # failed before any work
    # An existing root without the files: every image rejected -> error, after the manifest is written.
    (tmp_path / "empty").mkdir()
    assert main([*args, "--images", str(tmp_path / "empty")]) == 2
    progress, err = capsys.readouterr().err.strip().splitlines()
    assert progress.startswith("[preprocess] 7/7 images (100%)")  # a plain line (item 15), no \r
    assert err.startswith("lsnet preprocess: error: 7 of 7 images rejected (100% > --max-reject-fraction 0.5): "
                          "7 images (missing_file 7)") and err.endswith("manifest.json") and "\n" not in err
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert [r["code"] for r in manifest["rejected"] if r["kind"] == "image"] == ["missing_file"] * 7
    # 2 of 7 missing: 29% is under the default 0.5 (exit 0), over 0.25 (exit 2).
    part = tmp_path / "part"
    shutil.copytree(synth.image_dir, part)
    for im in json.loads(synth.instances_json.read_text())["images"][:2]:
        (part / im["file_name"]).unlink()
    assert main([*args, "--images", str(part)]) == 0  # same --out: shards of missing files are redone
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["num_images"] == 5
    assert main([*args, "--images", str(part), "--max-reject-fraction", "0.25"]) == 2
    assert "2 of 7 images rejected (29% > --max-reject-fraction 0.25)" in capsys.readouterr().err


def test_malformed_json_fails_fast_with_position(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "images": [],\n  "annotations": [,]\n}\n')
    with pytest.raises(PreprocessError, match=r"bad.json: malformed JSON at line 3, column 19"):
        preprocess(bad, tmp_path, tmp_path / "out", executor="local")
    from pipelines.cli import main

    assert main(["preprocess", "--ann", str(bad), "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "line 3, column 19" in capsys.readouterr().err
    bad.write_text('{"images": [], "annotations": []}')
    with pytest.raises(PreprocessError, match="'categories' must be a list"):
        preprocess(bad, tmp_path, tmp_path / "out", executor="local")
    bad.write_text('{"images": [], "annotations": [], "categories": [{"id": 1}]}')
    with pytest.raises(PreprocessError, match=r"categories\[0\]"):
        preprocess(bad, tmp_path, tmp_path / "out", executor="local")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --------------------------------------------------------------------------------------------------
# Ray Data streaming reader


def test_ray_streaming_reader_equals_map_style(ray_session, reference):
    from pipelines.datasets import batches_equal, build_ray_dataset, iter_ray_batches, rows_to_batch

    opts = {"task": "segm", "num_points": 36, "train": True, "scale_range": (64, 96), "max_size": 128, "seed": 4}
    ds = ShardDataset(reference, verify="none", **opts)
    for world, rank, epoch in ((1, 0, 1), (2, 1, 0)):
        sampler = ShardSampler(len(ds), rank=rank, world_size=world, seed=4)
        sampler.set_epoch(epoch)
        ds.set_epoch(epoch)
        expected = list(DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate_batch))
        ray_ds = build_ray_dataset(reference, epoch=epoch, rank=rank, world_size=world, samples_per_task=2, **opts)
        got = list(iter_ray_batches(ray_ds, batch_size=2))
        assert len(got) == math.ceil(len(sampler) / 2)
        assert batches_equal(got, expected)
    # As Ray Train's get_dataset_shard does: split one epoch's stream across 2 consumers. Every
    # sample reaches exactly one of them, identical to the map-style sample.
    ray_ds = build_ray_dataset(reference, epoch=0, samples_per_task=2, **opts)
    splits = ray_ds.streaming_split(2)
    received: list[list] = [[], []]

    def consume(k):
        for rows in splits[k].iter_batches(batch_size=1, batch_format="numpy"):
            received[k].append((int(rows["index"][0]), rows_to_batch(rows)))

    threads = [threading.Thread(target=consume, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    got = dict(received[0] + received[1])
    assert len(received[0]) + len(received[1]) == len(got) == len(ds)
    ds.set_epoch(0)
    for index, batch in got.items():
        assert batches_equal([batch], [collate_batch([ds[index]])])
