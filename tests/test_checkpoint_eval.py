"""`lsnet test CHECKPOINT --shards DIR | --ann JSON --images DIR` (issue 12 item 13) and the log-friendly
progress line (item 15)."""
from __future__ import annotations

import io
import json

import pytest
import torch

from lsnet.config import to_dict
from lsnet.engine import checkpoint_state, save_checkpoint
from lsnet.progress import Progress

TINY_MODEL = {"num_classes": 8, "backbone": "resnet18", "pretrained": None, "frozen_stages": -1,
              "norm_eval": False, "fpn_channels": 32, "head_channels": 32, "head_convs": 1, "norm_groups": 8}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from lsnet.data.shards import ShardDataset
    from lsnet.data.synthetic import write_synthetic_coco
    from lsnet.modeling import ModelConfig, build_model
    from pipelines.preprocess import preprocess

    root = tmp_path_factory.mktemp("lsnet_test")
    syn = write_synthetic_coco(root / "synth", num_images=3, image_size=(64, 64), seed=0, split="val")
    preprocess(syn.instances_json, syn.image_dir, root / "shards", max_size=64, contour_points=(18,),
               executor="local", verbose=False)
    ds = ShardDataset(root / "shards", train=False, scale_range=None)
    cfg = ModelConfig(task="bbox", **TINY_MODEL)
    torch.manual_seed(0)
    model = build_model(cfg)
    cfg.test.score_thr = 0.0  # an untrained model: keep its (low-score) detections so AP is defined
    extra = {"category_ids": ds.category_ids, "class_names": [c["name"] for c in ds.categories], "task": "bbox",
             "model_config": to_dict(cfg), "data_config": {"test_scale": 64, "max_size": 64, "flip_test": False}}
    ckpt = save_checkpoint(checkpoint_state(model, extra=extra, include_rng=False), root / "model.pt")
    return root, syn, ckpt


def test_lsnet_test_on_shards_matches_lsnet_evaluate_of_its_predictions(dataset, tmp_path, capsys):
    from pipelines.cli import main

    root, syn, ckpt = dataset
    out = tmp_path / "preds.json"
    assert main(["test", str(ckpt), "--shards", str(root / "shards"), "--out", str(out),
                 "--metrics-out", str(tmp_path / "m.json")]) == 0
    captured = capsys.readouterr()
    assert "test resize: shorter side 64, longer side <= 64 (checkpoint)" in captured.out
    assert "per-category bbox AP" in captured.out and "category" in captured.out
    assert "[test] 3/3 images (100%)" in captured.err and "\r" not in captured.err
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert len(json.loads(out.read_text())) > 0
    # the predictions it wrote, evaluated on their own, give the numbers it printed
    assert main(["evaluate", "--gt", str(root / "shards" / "gt.json"), "--results", str(out),
                 "--out", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["metrics"] == pytest.approx(metrics)
    # from the COCO JSON + images directly (flip TTA): runs on the same 3 images
    assert main(["test", str(ckpt), "--ann", str(syn.instances_json), "--images", str(syn.image_dir),
                 "--tta", "flip"]) == 0
    assert "[test] 3/3 images (100%)" in capsys.readouterr().err


def test_lsnet_test_input_errors(dataset, tmp_path, capsys):
    from pipelines.cli import main

    _root, syn, ckpt = dataset
    assert main(["test", str(ckpt)]) == 2
    assert "give either --shards DIR or --ann JSON --images DIR" in capsys.readouterr().err
    assert main(["test", str(ckpt), "--ann", str(syn.instances_json), "--images", str(tmp_path / "no")]) == 2
    assert "the image folder does not exist" in capsys.readouterr().err


def test_progress_is_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    bar = Progress(4, "predict", "images", stream=stream, every_s=0.0)
    with bar:
        for _ in range(4):
            bar.update()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    assert [line.split(" images")[0] for line in lines] == ["[predict] 1/4", "[predict] 2/4", "[predict] 3/4",
                                                            "[predict] 4/4"]
    assert lines[-1].startswith("[predict] 4/4 images (100%)")
