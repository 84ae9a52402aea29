"""`lsnet browse` (issue 12 item 14): ground truth and landmark targets drawn onto the images."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from lsnet.data.synthetic import write_synthetic_coco

    return write_synthetic_coco(tmp_path_factory.mktemp("browse"), num_images=2, image_size=(96, 96), seed=3,
                                person_prob=0.5)


@pytest.mark.parametrize("task", ["bbox", "segm", "pose"])
def test_browse_draws_the_targets_the_reader_yields(synth, tmp_path, capsys, task):
    from lsnet.data.shards import ShardDataset
    from lsnet.visualize import class_color
    from pipelines.cli import main
    from pipelines.preprocess import preprocess

    ann = synth.keypoints_json if task == "pose" else synth.instances_json
    out = tmp_path / "out"
    assert main(["browse", "--ann", str(ann), "--images", str(synth.image_dir), "--out", str(out),
                 "--task", task, "--limit", "2"]) == 0
    assert f"wrote 2 images with their {task} targets" in capsys.readouterr().out
    # the same images as the reader yields them, undrawn
    preprocess(ann, synth.image_dir, tmp_path / "shards", contour_points=(18, 36, 72), executor="local", verbose=False)
    ds = ShardDataset(tmp_path / "shards", task=task, train=False, scale_range=None)
    for index in range(2):
        image, targets, meta = ds[index]
        raw = image.permute(1, 2, 0).clamp(0, 255).byte().numpy()
        drawn = np.asarray(Image.open(out / f"{meta.image_id}.png").convert("RGB"))
        assert drawn.shape == raw.shape
        if len(targets.labels) == 0:
            assert (drawn == raw).all()
            continue
        assert (drawn != raw).any(axis=2).sum() > 50
        # every object's class colour appears (its box outline at least)
        for label in targets.labels.tolist():
            assert (drawn == np.array(class_color(label), dtype=np.uint8)).all(axis=2).any(), label
        if task == "pose":  # labelled keypoints are white dots (the last object is drawn on top)
            kps = targets.points[-1][targets.visible[-1] > 0].round().long().tolist()
            assert kps and any((drawn[y, x] == 255).all() for x, y in kps)


def test_browse_needs_one_source(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["browse", "--out", str(tmp_path)]) == 2
    assert "give either SHARDS or --ann JSON --images DIR" in capsys.readouterr().err
