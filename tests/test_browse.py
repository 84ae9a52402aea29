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


def test_anchor_drawing_shows_exactly_the_assigners_positives():
    """``--anchors`` (item 14): the drawn stage-1 squares and stage-2 dots are the positives that
    assign_centroid / assign_atss give on the anchor points of the model's own forward pass."""
    import torch

    from lsnet.assigners import assign_atss, assign_centroid
    from lsnet.modeling import ModelConfig, build_model
    from lsnet.structures import LandmarkTargets
    from pipelines.browse import (
        LEGEND_HEIGHT,
        LEVEL_COLORS,
        STAGE1_HALF_SIDE,
        anchor_assignment,
        draw_anchor_assignment,
    )

    cfg = ModelConfig(task="bbox", num_classes=3, backbone="resnet18", fpn_channels=32, head_channels=32,
                      head_convs=1, norm_groups=8)
    boxes = torch.tensor([[10.0, 12.0, 30.0, 34.0], [56.0, 8.0, 118.0, 70.0], [1.0, 1.0, 119.0, 149.0],
                          [70.0, 100.0, 90.0, 118.0]])
    x1, y1, x2, y2 = boxes.unbind(1)
    points = torch.stack([torch.stack([(x1 + x2) / 2, y1], 1), torch.stack([x1, (y1 + y2) / 2], 1),
                          torch.stack([(x1 + x2) / 2, y2], 1), torch.stack([x2, (y1 + y2) / 2], 1)], 1)
    targets = LandmarkTargets(boxes, torch.tensor([0, 1, 2, 0]), points, torch.ones(4, 4, dtype=torch.bool),
                              torch.tensor([False, False, False, False]))
    image = np.zeros((150, 120, 3), np.uint8)  # padded to 160 x 128 (SIZE_DIVISOR 32) in a batch

    with torch.no_grad():  # the model's own anchors, from a real forward pass on the padded batch
        out = build_model(cfg).eval().forward_raw(torch.zeros(1, 3, 160, 128))
    expected1 = assign_centroid(out.anchors, out.num_points_per_level, out.strides, boxes, targets.iscrowd,
                                scale=cfg.loss.centroid_scale)
    expected2 = assign_atss(out.anchors, out.num_points_per_level, out.strides, boxes, targets.iscrowd,
                            topk=cfg.loss.atss_topk, anchor_scale=cfg.loss.atss_anchor_scale)

    assignment = anchor_assignment(targets, image.shape[:2], cfg)
    assert torch.equal(assignment.points, out.anchors)
    assert torch.equal(assignment.stage1, expected1) and torch.equal(assignment.stage2, expected2)
    drawn = draw_anchor_assignment(image, assignment)
    assert drawn.shape == (150 + LEGEND_HEIGHT, 120, 3)

    def shown(dx: int) -> set[int]:
        hits = set()
        for i, ((x, y), level) in enumerate(zip(out.anchors.long().tolist(), assignment.levels.tolist())):
            if 0 <= x + dx < 120 and 0 <= y < 150 and tuple(drawn[y, x + dx]) == LEVEL_COLORS[level]:
                hits.add(i)
        return hits

    positives2 = set(torch.nonzero(expected2 >= 0).flatten().tolist())
    positives1 = set(torch.nonzero(expected1 >= 0).flatten().tolist())
    assert shown(0) == positives2 and len(positives2) > 10
    assert shown(STAGE1_HALF_SIDE) == positives1 and len(positives1) == 4  # one per object
    assert len({int(assignment.levels[i]) for i in positives1 | positives2}) >= 3  # several levels drawn


def test_browse_cli_draws_anchors(synth, tmp_path, capsys):
    from pipelines.cli import main

    out = tmp_path / "out"
    assert main(["browse", "--ann", str(synth.instances_json), "--images", str(synth.image_dir), "--out", str(out),
                 "--limit", "1", "--anchors", "--config", "configs/tiny_bbox.yaml"]) == 0
    assert "wrote 1 images with their bbox targets and anchor assignment" in capsys.readouterr().out
    (png,) = out.glob("*.png")
    assert Image.open(png).size == (96, 96 + 14)  # the level legend under the image
    assert main(["browse", "--ann", str(synth.instances_json), "--images", str(synth.image_dir), "--out", str(out),
                 "--anchors", "--config", "configs/tiny_bbox.yaml", "--task", "segm"]) == 2
    assert "is a bbox model but --task is segm" in capsys.readouterr().err
