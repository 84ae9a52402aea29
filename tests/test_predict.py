"""Overlays (lsnet.visualize) and `lsnet predict` with a randomly initialised tiny LSNet checkpoint."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lsnet.config import to_dict
from lsnet.engine import checkpoint_state, save_checkpoint
from lsnet.errors import InputError
from lsnet.predict import image_ids_for, load_image, prepare_images
from lsnet.structures import IMAGE_MEAN, IMAGE_STD, SIZE_DIVISOR, Detections
from lsnet.visualize import draw_detections, save_png

# ---- visualize ------------------------------------------------------------------------------------


def _one(points, task_scores=None, score=0.9, label=1):
    return Detections(torch.tensor([[20.0, 30.0, 60.0, 70.0]]), torch.tensor([score]), torch.tensor([label]),
                      torch.tensor(points, dtype=torch.float32)[None], task_scores)


@pytest.mark.parametrize("task", ["bbox", "segm", "pose"])
def test_drawing_changes_pixels_at_the_object_and_nowhere_far(task):
    image = np.full((100, 120, 3), 40, np.uint8)
    if task == "segm":
        points = [[20, 30], [60, 30], [60, 70], [20, 70]]
    elif task == "pose":
        points = np.stack([np.linspace(25, 55, 17), np.linspace(35, 65, 17)], 1).tolist()
    else:
        points = [[40, 30], [20, 50], [40, 70], [60, 50]]
    out = draw_detections(image, _one(points), task, class_names=["a", "b"], score_thr=0.5)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out[30, 40], image[30, 40])  # on the box's top edge
    assert not np.array_equal(out[50, 20], image[50, 20])  # on the box's left edge
    assert np.array_equal(out[85:, 80:], image[85:, 80:])  # far away: untouched
    assert np.array_equal(image, np.full((100, 120, 3), 40, np.uint8))  # input not modified
    if task == "segm":  # translucent fill: changed, but the background still shows through
        inside = out[55, 45].astype(int)
        assert not np.array_equal(inside, image[55, 45]) and (inside != 0).all()
    if task == "pose":
        assert not np.array_equal(out[50, 40], image[50, 40])  # the middle keypoint


def test_detections_below_the_threshold_are_not_drawn(tmp_path):
    image = np.random.default_rng(0).integers(0, 255, (50, 80, 3), dtype=np.uint8)
    out = draw_detections(image, _one([[40, 30], [20, 50], [40, 70], [60, 50]], score=0.2), "bbox", score_thr=0.3)
    assert np.array_equal(out, image)
    path = save_png(tmp_path / "sub" / "o.png", out)
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), image)


def test_bad_image_array_is_rejected():
    with pytest.raises(ValueError, match="uint8"):
        draw_detections(np.zeros((10, 10, 3), np.float32), _one([[0, 0]] * 4), "bbox")


# ---- preprocessing --------------------------------------------------------------------------------


def test_keep_ratio_resize_and_padding():
    images = [np.zeros((60, 80, 3), np.uint8), np.full((100, 50, 3), 255, np.uint8)]
    batch, metas = prepare_images(images, [3, 4], short_side=30, max_size=50)
    assert batch.shape[0] == 2 and batch.shape[2] % SIZE_DIVISOR == 0 and batch.shape[3] % SIZE_DIVISOR == 0
    assert metas[0].size == (30, 40) and metas[0].scale == pytest.approx((0.5, 0.5))
    assert metas[1].size == (50, 25) and metas[1].orig_size == (100, 50) and metas[1].image_id == 4
    expected = (255 - IMAGE_MEAN[0]) / IMAGE_STD[0]
    assert batch[1, 0, 10, 10].item() == pytest.approx(expected, rel=1e-5)
    assert batch[1, :, 10, 30].abs().max() == 0  # zero padding right of the valid region


def test_image_ids_from_coco_style_names():
    assert image_ids_for(["a/000000397133.jpg", "b/42.png"]) == [397133, 42]
    assert image_ids_for(["cat.jpg", "42.png"]) == [1, 2]
    assert image_ids_for(["1.jpg", "001.png"]) == [1, 2]  # same number twice


def test_bad_image_files_are_named(tmp_path):
    with pytest.raises(InputError, match="nothere.jpg"):
        load_image(tmp_path / "nothere.jpg")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png"):
        load_image(tmp_path / "broken.png")


# ---- lsnet predict with a tiny random model ---------------------------------------------------------

TINY_MODEL = {"num_classes": 3, "backbone": "resnet18", "pretrained": None, "frozen_stages": -1,
              "norm_eval": False, "fpn_channels": 32, "head_channels": 32, "head_convs": 1, "norm_groups": 8}


def _tiny_checkpoint(tmp_path, task: str, store_config: bool, data_config: dict | None = None):
    modeling = pytest.importorskip("lsnet.modeling")
    cfg = modeling.ModelConfig(task=task, **TINY_MODEL)
    torch.manual_seed(0)
    model = modeling.build_model(cfg)
    extra = {"category_ids": [2, 5, 9], "class_names": ["circle", "square", "person"], "task": task}
    if store_config:
        extra["model_config"] = to_dict(cfg)
    if data_config is not None:
        extra["data_config"] = data_config
    path = save_checkpoint(checkpoint_state(model, extra=extra, include_rng=False), tmp_path / f"{task}.pt")
    config = tmp_path / f"{task}.yaml"
    config.write_text(yaml.safe_dump({"model": {"task": task, **TINY_MODEL}, "data": {"test_scale": 64, "max_size": 96}}))
    return path, config


def _images(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name, (h, w) in (("000000000012.png", (72, 96)), ("000000000034.jpg", (90, 60))):
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        image[20:50, 15:45] = (230, 40, 40)
        path = tmp_path / name
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("task", ["bbox", "segm", "pose"])
def test_predict_cli_writes_results_and_overlays(tmp_path, capsys, task):
    from pipelines.cli import main

    ckpt, config = _tiny_checkpoint(tmp_path, task, store_config=False)
    paths = _images(tmp_path)
    out = tmp_path / "out"
    rc = main(["predict", *map(str, paths), "--config", str(config), "--checkpoint", str(ckpt), "--out", str(out),
               "--score-thr", "0.001"] + (["--flip-tta"] if task == "bbox" else []))
    assert rc == 0, capsys.readouterr().err
    records = json.loads((out / "predictions.json").read_text())
    assert records, "a random model at threshold 0.001 still returns detections"
    assert {r["image_id"] for r in records} <= {12, 34}
    assert {r["category_id"] for r in records} <= {2, 5, 9}
    sizes = {12: (72, 96), 34: (90, 60)}
    # The records are the model's detections on the resized image mapped back to original pixels:
    # recompute them here (test resize: short side 64, long side <= 96) and divide by the resize
    # factor known from the sizes, so a wrong mapping (multiply, swapped axes, no rescale) fails.
    from lsnet.modeling.inference import predict_with_tta
    from lsnet.predict import load_model

    loaded = load_model(ckpt, config)
    loaded.model.cfg.test.score_thr = 0.001
    resized = {12: (64, 85), 34: (96, 64)}
    for path in paths:
        image_id = int(path.stem)
        batch, metas = prepare_images([load_image(path)], [image_id], 64, 96)
        assert metas[0].size == resized[image_id]
        with torch.no_grad():
            det = (predict_with_tta(loaded.model, batch, metas, flip=True) if task == "bbox"
                   else loaded.model(batch, image_sizes=[metas[0].size]))[0]
        (h, w), (rh, rw) = sizes[image_id], resized[image_id]
        boxes = det.boxes / torch.tensor([rw / w, rh / h] * 2)
        boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h),
                             boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], 1)
        mine = [r for r in records if r["image_id"] == image_id]
        assert len(mine) == len(det) > 0
        got = torch.tensor([r["bbox"] for r in mine])
        got[:, 2:] += got[:, :2]  # xywh -> xyxy
        torch.testing.assert_close(got, boxes, atol=1e-3, rtol=0, msg=lambda m, i=image_id: f"image {i}: {m}")
        assert [r["score"] for r in mine] == pytest.approx(det.scores.tolist())
    for r in records:
        h, w = sizes[r["image_id"]]
        if task == "segm":
            assert r["segmentation"]["size"] == [h, w]
        if task == "pose":
            assert len(r["keypoints"]) == 51
    index = json.loads((out / "images.json").read_text())
    assert [i["id"] for i in index["images"]] == [12, 34]
    assert index["categories"][2] == {"id": 9, "name": "person"}
    for path in paths:
        overlay = np.asarray(Image.open(out / f"{path.stem}.png").convert("RGB"))
        original = np.asarray(Image.open(path).convert("RGB"))
        assert overlay.shape == original.shape
        assert (overlay != original).any(), "something was drawn"


@pytest.mark.slow
def test_predict_uses_the_stored_config_and_reports_bad_files(tmp_path, capsys):
    from pipelines.cli import main

    ckpt, _ = _tiny_checkpoint(tmp_path, "bbox", store_config=True)
    paths = _images(tmp_path)
    out = tmp_path / "out"
    assert main(["predict", str(paths[0]), "--checkpoint", str(ckpt), "--out", str(out), "--short-side", "64",
                 "--score-thr", "0.001"]) == 0
    assert (out / "000000000012.png").exists()
    rc = main(["predict", str(paths[0]), str(tmp_path / "missing.jpg"), "--checkpoint", str(ckpt),
               "--out", str(tmp_path / "out2")])
    assert rc == 2 and "missing.jpg" in capsys.readouterr().err
    (tmp_path / "x").mkdir()
    ckpt2, _ = _tiny_checkpoint(tmp_path / "x", "bbox", store_config=False)
    rc = main(["predict", str(paths[0]), "--checkpoint", str(ckpt2), "--out", str(tmp_path / "out3")])
    assert rc == 2 and "--config" in capsys.readouterr().err


def test_test_time_resize_comes_from_the_checkpoint(tmp_path, capsys):
    """Before: a checkpoint trained at 128 px was run at 800/1333 without --config (AP 0.019 -> 0.000)."""
    from lsnet.predict import load_model

    ckpt, config = _tiny_checkpoint(tmp_path, "bbox", store_config=True,
                                    data_config={"test_scale": 128, "max_size": 160, "flip_test": False})
    loaded = load_model(ckpt)
    assert (loaded.short_side, loaded.max_size, loaded.resize_source) == (128, 160, "checkpoint")
    loaded = load_model(ckpt, config)  # an experiment YAML with a data section wins
    assert (loaded.short_side, loaded.max_size, loaded.resize_source) == (64, 96, "config")
    model_only = tmp_path / "model_only.yaml"
    model_only.write_text(yaml.safe_dump({"task": "bbox", **TINY_MODEL}))
    assert load_model(ckpt, model_only).short_side == 128
    assert load_model(ckpt, short_side=32, max_size=40).resize_source == "arguments"
    (tmp_path / "old").mkdir()
    old, _ = _tiny_checkpoint(tmp_path / "old", "bbox", store_config=True)
    loaded = load_model(old)
    assert (loaded.short_side, loaded.resize_source) == (800, "default")
    from lsnet.predict import describe_resize

    assert describe_resize(loaded).startswith("warning: test resize: shorter side 800")
