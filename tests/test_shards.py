"""Shard reader, augmentations, collate and sampler (shards written in-process: no Ray here)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lsnet.data.augment import AugmentConfig, augment_sample, collate_batch, resized_shape, sample_params
from lsnet.data.shards import ShardDataset, ShardError, ShardSampler, load_manifest, record_from_batch
from lsnet.data.synthetic import write_synthetic_coco
from lsnet.structures import IMAGE_MEAN, IMAGE_STD, ImageMeta
from lsnet.targets import TargetConfig, compute_image_targets, scale_record
from lsnet.transforms import hflip_targets, resize_targets
from pipelines.preprocess import preprocess

MAX_SIZE = 150


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic_coco(tmp_path_factory.mktemp("synth"), num_images=9, image_size=(128, 160), seed=5,
                                size_jitter=0.2, person_prob=0.5)


@pytest.fixture(scope="module")
def shard_dir(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    preprocess(synth.keypoints_json.parent / "instances_train.json", synth.image_dir, out, max_size=MAX_SIZE,
               max_rows_per_shard=4, contour_points=(18, 36), executor="local", verbose=False)
    return out


@pytest.fixture(scope="module")
def pose_dir(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("pose")
    preprocess(synth.keypoints_json, synth.image_dir, out, max_size=MAX_SIZE, contour_points=(18,),
               executor="local", verbose=False)
    return out


def _source(ann_path):
    data = json.loads(ann_path.read_text())
    cats = sorted(c["id"] for c in data["categories"])
    by_image = {im["id"]: [] for im in data["images"]}
    for a in data["annotations"]:
        by_image[a["image_id"]].append(a)
    return data, {c: k for k, c in enumerate(cats)}, by_image


def _all_rows(shard_dir):
    import pyarrow as pa
    from pyarrow import ipc

    manifest = load_manifest(shard_dir)
    for shard in manifest["shards"]:
        reader = ipc.open_file(pa.memory_map(str(shard_dir / shard["file"])))
        assert reader.num_record_batches == shard["rows"]
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


@pytest.mark.parametrize("which", ["instances", "keypoints"])
def test_round_trip_equals_direct_targets(which, synth, shard_dir, pose_dir):
    """Every record read back equals compute_image_targets + scale_record on the original JSON."""
    ann_path = synth.instances_json if which == "instances" else synth.keypoints_json
    out = shard_dir if which == "instances" else pose_dir
    data, cat_to_label, by_image = _source(ann_path)
    cfg = TargetConfig(contour_points=(18, 36) if which == "instances" else (18,))
    images = {im["id"]: im for im in data["images"]}
    seen = []
    for batch in _all_rows(out):
        image_id = batch.column("image_id")[0].as_py()
        im = images[image_id]
        expected, rejected = compute_image_targets(by_image[image_id], im["height"], im["width"], cat_to_label, cfg)
        assert rejected == []
        h, w = batch.column("height")[0].as_py(), batch.column("width")[0].as_py()
        assert max(h, w) == min(MAX_SIZE, max(im["height"], im["width"]))
        sx, sy = batch.column("scale_x")[0].as_py(), batch.column("scale_y")[0].as_py()
        assert (sx, sy) == ((w / im["width"], h / im["height"]) if max(im["height"], im["width"]) > MAX_SIZE
                            else (1.0, 1.0))
        if (sx, sy) != (1.0, 1.0):
            expected = scale_record(expected, sx, sy)
        got = record_from_batch(batch)
        assert set(got) == set(expected)
        for key in expected:
            assert got[key].dtype == expected[key].dtype, key
            assert np.array_equal(got[key], expected[key]), key
        seen.append(image_id)
    assert seen == sorted(images)  # every image, sorted by id, no duplicates


def test_manifest_and_gt(synth, shard_dir):
    manifest = load_manifest(shard_dir)
    data = json.loads(synth.instances_json.read_text())
    assert [c["id"] for c in manifest["categories"]] == [1, 3, 7, 10, 13, 18, 22, 31]
    assert [c["label"] for c in manifest["categories"]] == list(range(8))
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 1]
    assert manifest["num_images"] == 9 and manifest["num_objects"] == len(data["annotations"])
    assert manifest["rejected"] == [] and manifest["config"]["target"]["contour_points"] == [18, 36]
    gt = json.loads((shard_dir / "gt.json").read_text())
    assert gt["images"] == data["images"] and gt["annotations"] == data["annotations"]


def test_dataset_items_and_meta(shard_dir, synth):
    ds = ShardDataset(shard_dir, task="bbox", train=False, scale_range=None)
    assert len(ds) == 9 and ds.num_classes == 8 and ds.category_ids[:3] == [1, 3, 7]
    _data, cat_to_label, by_image = _source(synth.instances_json)
    for i in range(len(ds)):
        image, targets, meta = ds[i]
        assert image.dtype == torch.uint8 and tuple(image.shape[1:]) == meta.size
        anns = by_image[meta.image_id]
        # boxes map back to the COCO boxes through meta.scale
        coco = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                             for a in anns], dtype=torch.float32)
        sx, sy = meta.scale
        back = targets.boxes / torch.tensor([sx, sy, sx, sy])
        assert torch.allclose(back, coco, atol=0.02)
        assert targets.labels.tolist() == [cat_to_label[a["category_id"]] for a in anns]
        assert targets.points.shape[1:] == (4, 2) and targets.visible.all()


def test_segm_and_pose_tasks(shard_dir, pose_dir):
    segm = ShardDataset(shard_dir, task="segm", num_points=18, scale_range=None)
    assert segm[0][1].points.shape[1:] == (18, 2)
    with pytest.raises(ValueError, match="72"):
        ShardDataset(shard_dir, task="segm", num_points=72)
    pose = ShardDataset(pose_dir, task="pose", scale_range=None)
    assert pose.num_classes == 1
    found = False
    for i in range(len(pose)):
        _, t, _ = pose[i]
        if len(t):
            assert t.points.shape[1:] == (17, 2) and t.visible.any(dim=1).all()
            found = True
    assert found


def test_augment_deterministic_per_seed_epoch_index(shard_dir):
    ds = ShardDataset(shard_dir, task="segm", num_points=36, train=True, scale_range=(96, 160), max_size=200, seed=7)
    first = [ds[i] for i in range(len(ds))]
    again = [ds[i] for i in reversed(range(len(ds)))][::-1]  # order does not matter
    for (a, ta, ma), (b, tb, mb) in zip(first, again):
        assert torch.equal(a, b) and torch.equal(ta.points, tb.points) and ma == mb
    ds.set_epoch(1)
    other = [ds[i] for i in range(len(ds))]
    assert any(m1 != m2 for (_, _, m1), (_, _, m2) in zip(first, other))
    flips = [m.flipped for _, _, m in first + other]
    assert any(flips) and not all(flips)
    for image, _, meta in first + other:
        short = min(meta.size)
        assert 96 <= short <= 160 or max(meta.size) == 200


def test_sample_params_draws():
    cfg = AugmentConfig(scale_range=(100, 103), flip_prob=0.5)
    draws = [sample_params(cfg, True, 0, 0, i) for i in range(400)]
    assert {s for s, _ in draws} == {100, 101, 102, 103}
    assert 150 < sum(f for _, f in draws) < 250
    assert sample_params(cfg, False, 0, 0, 3) == (103, False)
    assert resized_shape(100, 200, 50, 1000) == (50, 100)
    assert resized_shape(100, 200, 400, 500) == (250, 500)  # long side capped
    assert resized_shape(100, 200, None, 150) == (75, 150)
    assert resized_shape(100, 200, None, None) == (100, 200)


def test_flip_and_resize_follow_transforms():
    """augment_sample = resize_targets then hflip_targets, image mirrored; meta tracks it."""
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 255, (3, 40, 60), dtype=torch.uint8, generator=g)
    from lsnet.structures import LandmarkTargets

    t = LandmarkTargets(boxes=torch.tensor([[5.0, 6.0, 30.0, 20.0]]), labels=torch.tensor([2]),
                        points=torch.tensor([[[17.5, 6.0], [5.0, 13.0], [17.5, 20.0], [30.0, 13.0]]]),
                        visible=torch.ones(1, 4, dtype=torch.bool), iscrowd=torch.zeros(1, dtype=torch.bool))
    meta = ImageMeta(image_id=1, orig_size=(80, 120), size=(40, 60), scale=(0.5, 0.5))
    cfg = AugmentConfig(scale_range=(20, 20), max_size=1000, flip_prob=1.0)
    out, ot, om = augment_sample(image, t, meta, cfg, task="bbox", train=True)
    assert out.shape == (3, 20, 30) and om.size == (20, 30) and om.flipped and om.scale == (0.25, 0.25)
    expected = hflip_targets(resize_targets(t, 0.5, 0.5), 30, "bbox")
    assert torch.equal(ot.boxes, expected.boxes) and torch.equal(ot.points, expected.points)
    assert torch.equal(ot.boxes, torch.tensor([[15.0, 3.0, 27.5, 10.0]]))
    no_flip, _, _ = augment_sample(image, t, meta, AugmentConfig(scale_range=(20, 20), flip_prob=0.0),
                                   task="bbox", train=True)
    assert torch.equal(out, no_flip.flip(-1))


@pytest.mark.parametrize("short", [17, 40, 41, 97, 160])  # down, same, up by a little, up by a lot
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_flip_before_or_after_resize_gives_the_same_pixels(short, layout):
    """augment_sample flips the smaller of the input and the resized image (cheaper); the pixels must
    be exactly those of resize-then-flip, for odd sizes, both ways, and both memory layouts (decoded
    JPEGs are channels-last views)."""
    import torchvision.transforms.v2.functional as TF

    g = torch.Generator().manual_seed(short)
    image = torch.randint(0, 256, (3, 41, 67), dtype=torch.uint8, generator=g)
    if layout == "channels_last":
        image = image.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    from lsnet.structures import LandmarkTargets

    t = LandmarkTargets(boxes=torch.tensor([[5.0, 6.0, 30.0, 20.0]]), labels=torch.tensor([2]),
                        points=torch.tensor([[[17.5, 6.0], [5.0, 13.0], [17.5, 20.0], [30.0, 13.0]]]),
                        visible=torch.ones(1, 4, dtype=torch.bool), iscrowd=torch.zeros(1, dtype=torch.bool))
    meta = ImageMeta(image_id=1, orig_size=(41, 67), size=(41, 67), scale=(1.0, 1.0))
    cfg = AugmentConfig(scale_range=(short, short), max_size=10_000, flip_prob=1.0)
    out, _, om = augment_sample(image, t, meta, cfg, task="bbox", train=True)
    nh, nw = resized_shape(41, 67, short, 10_000)
    expected = TF.resize(image, [nh, nw], antialias=True) if (nh, nw) != (41, 67) else image
    assert om.flipped and out.shape == (3, nh, nw)
    assert torch.equal(out, expected.flip(-1))


def test_collate_normalises_and_pads(shard_dir):
    ds = ShardDataset(shard_dir, task="bbox", scale_range=None)
    items = [ds[i] for i in range(3)]
    batch = collate_batch(items)
    assert batch.images.shape[2] % 32 == 0 and batch.images.shape[3] % 32 == 0
    for k, (img, _, meta) in enumerate(items):
        h, w = meta.size
        mean, std = torch.tensor(IMAGE_MEAN).view(3, 1, 1), torch.tensor(IMAGE_STD).view(3, 1, 1)
        assert torch.allclose(batch.images[k, :, :h, :w], (img.float() - mean) / std, atol=1e-5)
        assert (batch.images[k, :, h:, :] == 0).all() and (batch.images[k, :, :, w:] == 0).all()
    assert batch.metas == [m for _, _, m in items]


@pytest.mark.parametrize("n,world", [(10, 3), (9, 3), (2, 4), (7, 1)])
def test_sampler_exactly_once(n, world):
    for epoch in (0, 1):
        parts = []
        for rank in range(world):
            s = ShardSampler(n, rank=rank, world_size=world, seed=3)
            s.set_epoch(epoch)
            parts.append(list(s))
            assert len(s) == len(parts[-1])
        merged = sorted(i for p in parts for i in p)
        assert merged == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        dropped = []
        for rank in range(world):
            s = ShardSampler(n, rank=rank, world_size=world, seed=3, drop_last=True)
            s.set_epoch(epoch)
            dropped.append(list(s))
            assert len(dropped[-1]) == n // world == s.min_len()
        flat = [i for p in dropped for i in p]
        assert len(flat) == len(set(flat)) == n - n % world
    a, b = ShardSampler(50, seed=1), ShardSampler(50, seed=1)
    b.set_epoch(1)
    assert list(a) != list(b) and sorted(a) == sorted(b)
    assert list(ShardSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_dataloader_workers_match_main_process(shard_dir):
    ds = ShardDataset(shard_dir, task="bbox", train=True, scale_range=(64, 96), max_size=160, seed=2,
                      verify="none")
    sampler = ShardSampler(len(ds), seed=2)

    def batches(workers):
        loader = DataLoader(ds, batch_size=3, sampler=sampler, collate_fn=collate_batch, num_workers=workers)
        return list(loader)

    a, b = batches(0), batches(2)
    assert len(a) == 3
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images) and x.metas == y.metas
        assert all(torch.equal(s.points, t.points) for s, t in zip(x.targets, y.targets))
    # Persistent workers keep their dataset copy across epochs: set_epoch must still reach them.
    loader = DataLoader(ds, batch_size=3, sampler=sampler, collate_fn=collate_batch, num_workers=2,
                        persistent_workers=True)
    per_epoch = {}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        per_epoch[epoch] = list(loader)
    ds.set_epoch(1)
    expected = [collate_batch([ds[i] for i in idx]) for idx in
                [list(sampler)[k:k + 3] for k in range(0, len(ds), 3)]]
    assert [x.metas for x in per_epoch[1]] == [x.metas for x in expected]
    assert all(torch.equal(x.images, y.images) for x, y in zip(per_epoch[1], expected))
    assert [x.metas for x in per_epoch[0]] == [x.metas for x in a]


def test_constant_open_shards(shard_dir):
    ds = ShardDataset(shard_dir, task="bbox", scale_range=None, max_open_shards=2, verify="none")
    for i in range(len(ds)):
        ds[i]
    assert len(ds._readers._open) == 2


def test_skip_empty(tmp_path):
    syn = write_synthetic_coco(tmp_path / "s", num_images=3, image_size=(64, 64), seed=0)
    data = json.loads(syn.instances_json.read_text())
    first = data["images"][0]["id"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != first]
    (tmp_path / "a.json").write_text(json.dumps(data))
    preprocess(tmp_path / "a.json", syn.image_dir, tmp_path / "out", executor="local", verbose=False)
    assert len(ShardDataset(tmp_path / "out", scale_range=None)) == 3
    ds = ShardDataset(tmp_path / "out", scale_range=None, skip_empty=True)
    assert len(ds) == 2 and all(ds[i][2].image_id != first for i in range(2))


def test_corrupted_shard_is_named(shard_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    manifest = load_manifest(copy)
    victim = copy / manifest["shards"][1]["file"]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one flipped byte
    victim.write_bytes(bytes(raw))
    with pytest.raises(ShardError, match=f"{victim.name}.*corrupted.*SHA-256"):
        ShardDataset(copy)
    ShardDataset(copy, verify="size")  # sizes still agree: the cheap check cannot see it
    ShardDataset(copy, verify="none")
    victim.write_bytes(bytes(raw[:-10]))
    with pytest.raises(ShardError, match=f"{victim.name}.*bytes"):
        ShardDataset(copy, verify="size")
    victim.unlink()
    with pytest.raises(ShardError, match=f"{victim.name}.*missing"):
        ShardDataset(copy, verify="size")
    (copy / "manifest.json").unlink()
    with pytest.raises(ShardError, match="no manifest"):
        ShardDataset(copy)


def test_undecodable_image_names_shard_row_and_image(shard_dir, tmp_path):
    """An image that does not decode (bytes damaged after the checksum was skipped) is named."""
    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    ds = ShardDataset(copy, verify="none", scale_range=None)
    jpeg, _, meta = ds.raw(0)
    victim = copy / load_manifest(copy)["shards"][0]["file"]
    raw = victim.read_bytes()
    at = raw.find(bytes(jpeg))
    assert at > 0
    victim.write_bytes(raw[:at] + b"\0" * 64 + raw[at + 64:])  # no JPEG header any more
    with pytest.raises(ShardError, match=f"{victim.name}, row 0 \\(image_id {meta['image_id']}\\): cannot decode"):
        ShardDataset(copy, verify="none", scale_range=None)[0]


def test_reader_from_uri(shard_dir):
    """Shards addressed by a pyarrow.fs URI (object-store path) read the same as memory-mapped ones."""
    local = ShardDataset(shard_dir, task="segm", num_points=18, scale_range=None)
    remote = ShardDataset(shard_dir.resolve().as_uri(), task="segm", num_points=18, scale_range=None)
    remote._readers.local = False  # file:// is local; force the random-access-file path object stores use
    assert len(remote) == len(local)
    for i in (0, len(local) - 1):
        a, b = local[i], remote[i]
        assert torch.equal(a[0], b[0]) and torch.equal(a[1].points, b[1].points) and a[2] == b[2]


def test_tiny_coco_keypoints_round_trip(tiny_coco_dir, tmp_path):
    """Real person_keypoints JSON (crowd RLEs, v=0/1/2) through the same per-image function."""
    ann = tiny_coco_dir / "annotations" / "person_keypoints_train2017.json"
    manifest = preprocess(ann, tiny_coco_dir / "train2017", tmp_path, contour_points=(18,), executor="local",
                          verbose=False)
    data, cat_to_label, by_image = _source(ann)
    images = {im["id"]: im for im in data["images"]}
    cfg = TargetConfig(contour_points=(18,))
    rejected = []
    for batch in _all_rows(tmp_path):
        im = images[batch.column("image_id")[0].as_py()]
        expected, rej = compute_image_targets(by_image[im["id"]], im["height"], im["width"], cat_to_label, cfg)
        rejected += [r.ann_id for r in rej]
        got = record_from_batch(batch)
        for key in expected:
            assert np.array_equal(got[key], expected[key]), (im["id"], key)
    assert manifest["num_images"] == len(images)
    assert sorted(r["ann_id"] for r in manifest["rejected"]) == sorted(rejected)
    ds = ShardDataset(tmp_path, task="pose", scale_range=None)
    labelled = sum(int(ds[i][1].visible.any(dim=1).sum()) for i in range(len(ds)))
    assert labelled == sum(1 for a in data["annotations"] if a.get("num_keypoints", 0) > 0 and not a["iscrowd"]
                           and a["id"] not in rejected)
