"""The paper's multi-scale test (issue 11 item 7: "we refer to ATSS"): ATSS's soft box voting, its
per-scale size ranges measured in each scale's own frame, the config switches, and the identity of a
single unflipped pass with the plain output."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lsnet.config import ConfigError, from_dict
from lsnet.modeling import ModelConfig, build_model
from lsnet.modeling.inference import (
    ATSS_SCALE_RANGES,
    ATSS_TEST_SHORT_SIDES,
    atss_test_scales,
    in_scale_range,
    predict_with_tta,
    vote_detections,
)
from lsnet.structures import Detections
from tests.test_model import FractionStub, tiny_cfg

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _dets(boxes, scores, labels) -> Detections:
    b = torch.tensor(boxes, dtype=torch.float32)
    points = b.reshape(-1, 2, 2)  # two "landmarks": the corners, so the vote's point mean is checkable
    return Detections(b, torch.tensor(scores), torch.tensor(labels), points)


def test_soft_vote_hand_computed():
    dets = _dets([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 9], [20, 20, 30, 30], [0, 0, 10, 10]],
                 [0.9, 0.6, 0.1, 0.5, 0.3], [0, 0, 0, 0, 1])
    out = vote_detections(dets, vote_iou=0.66, max_dets=100)
    # class 0: A (0.9) groups B (IoU 90/110 = 0.818) and F (IoU 90/100 = 0.9); C (IoU 0) is alone.
    # merged box = score-weighted mean over A, B, F (weights 0.9, 0.6, 0.1, sum 1.6), score = 0.9:
    merged = [(0.6 * 1) / 1.6, 0.0, (0.9 * 10 + 0.6 * 11 + 0.1 * 10) / 1.6, (0.9 * 10 + 0.6 * 10 + 0.1 * 9) / 1.6]
    # soft copies: A 0.9·(1−1) = 0 (dropped), B 0.6·(1 − 90/110) = 0.10909 (kept, own box),
    # F 0.1·(1 − 0.9) = 0.01 < 0.05 (dropped); class 1: D alone, kept as it is
    expected_boxes = torch.tensor([merged, [20, 20, 30, 30], [0, 0, 10, 10], [1, 0, 11, 10]])
    expected_scores = torch.tensor([0.9, 0.5, 0.3, 0.6 * (1 - 90 / 110)])
    torch.testing.assert_close(out.scores, expected_scores)
    torch.testing.assert_close(out.boxes, expected_boxes)
    assert out.labels.tolist() == [0, 0, 1, 0]
    torch.testing.assert_close(out.points, expected_boxes.reshape(-1, 2, 2))  # landmarks voted alike
    # max_dets keeps the best
    assert vote_detections(dets, 0.66, max_dets=2).scores.tolist() == pytest.approx([0.9, 0.5])
    # a stricter vote IoU splits the group: A keeps B out (0.818 < 0.85) but takes F
    strict = vote_detections(dets, vote_iou=0.85)
    torch.testing.assert_close(strict.boxes[0], torch.tensor([0.0, 0, 10, (0.9 * 10 + 0.1 * 9) / 1.0]))


def test_scale_range_is_inclusive_on_the_area():
    boxes = torch.tensor([[0.0, 0, 8, 8], [0, 0, 8, 9], [0, 0, 7, 9]])  # areas 64, 72, 63
    assert in_scale_range(boxes, 0, 8).tolist() == [True, False, True]
    assert in_scale_range(boxes, 8, 100).tolist() == [True, True, False]


def _stub_images():
    images = torch.zeros(1, 3, 96, 128)
    images[0, :, :96, :128] = 1.0
    return images


# FractionStub's box on a 96x128 valid region: x 25.6..64, y 24..67.2 -> sqrt(area) = 40.73 px, i.e.
# 20.36 px in the frame of scale 0.5 and 81.46 px in that of scale 2.
BOX = torch.tensor([0.2 * 128, 0.25 * 96, 0.5 * 128, 0.7 * 96])


@pytest.mark.parametrize("ranges, kept_by", [
    ([[0, 30], [50, 10000]], (0.5, 2.0)),  # both scales keep it -- only true in their own frames
    ([[30, 10000], [0, 50]], ()),  # 20.4 < 30 at 0.5 and 81.5 > 50 at 2 (the original 40.7 fits both)
    ([[0, 30], [0, 50]], (0.5,)),
    ([[30, 10000], [50, 10000]], (2.0,)),
])
def test_scale_ranges_filter_in_each_scales_frame(ranges, kept_by):
    stub = FractionStub()
    dets = predict_with_tta(stub, _stub_images(), [(96, 128)], flip=False, scales=(0.5, 2.0), scale_ranges=ranges,
                            merge="vote")[0]
    if not kept_by:
        assert len(dets) == 0
        return
    # one scale, or two copies of the same box (IoU ~1) voted into one at the same place
    assert len(dets) == 1 and dets.labels.tolist() == [1]
    torch.testing.assert_close(dets.boxes[0], BOX, atol=1.0, rtol=0)
    # the per-scale detections before the vote, one scale at a time, agree with the filter
    for scale, rng in zip((0.5, 2.0), ranges):
        alone = predict_with_tta(stub, _stub_images(), [(96, 128)], flip=False, scales=(scale,), scale_ranges=[rng])[0]
        assert len(alone) == (1 if scale in kept_by else 0), (scale, rng)


def test_flip_and_vote_merge_the_mirrored_passes_of_a_symmetric_box():
    """With flip, a box symmetric about the image's vertical midline is found at the same place by
    both passes and voted into one detection whose score is the pass's and whose box is the mean."""
    class SymmetricStub(FractionStub):
        BOX = (0.25, 0.25, 0.75, 0.5)

    dets = predict_with_tta(SymmetricStub(), _stub_images(), [(96, 128)], flip=True, scales=(1.0,), merge="vote")[0]
    assert len(dets) == 1
    torch.testing.assert_close(dets.boxes[0], torch.tensor([32.0, 24.0, 96.0, 48.0]), atol=1e-4, rtol=0)
    assert dets.scores[0] == pytest.approx(torch.sigmoid(torch.tensor(10.0)).item())
    nms = predict_with_tta(SymmetricStub(), _stub_images(), [(96, 128)], flip=True, scales=(1.0,), merge="nms")[0]
    assert len(nms) == 1


@pytest.mark.parametrize("via_config", [False, True])
def test_single_unflipped_scale_equals_the_plain_output(via_config):
    cfg = tiny_cfg("bbox")
    cfg.test.score_thr = 0.0
    cfg.test.max_dets = 30
    model = build_model(cfg).eval()
    torch.manual_seed(5)
    images = torch.randn(2, 3, 96, 128)
    sizes = [(96, 128), (80, 100)]
    with torch.no_grad():
        plain = model(images, image_sizes=sizes)
    if via_config:  # model.test.scales set: the model's own inference runs the TTA path
        model.cfg.test.scales = [1.0]
        model.cfg.test.merge = "vote"
        with torch.no_grad():
            tta = model(images, image_sizes=sizes)
    else:
        tta = predict_with_tta(model, images, sizes, flip=False, scales=(1.0,), merge="vote")
    for a, b in zip(plain, tta):
        assert len(a) == 30
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and torch.equal(a.points, b.points)


def test_vote_keeps_vote_max_dets_after_the_merge():
    """Each pass keeps ``max_dets`` before the vote, the vote ``vote_max_dets`` (the reference: 100 per
    pass, 1000 after the vote, detectors/lsnet.py:355-365)."""
    cfg = tiny_cfg("bbox")
    cfg.test.score_thr, cfg.test.max_dets, cfg.test.vote_max_dets = 0.0, 20, 1000
    model = build_model(cfg).eval()
    torch.manual_seed(7)
    images = torch.randn(1, 3, 64, 96)
    many = predict_with_tta(model, images, None, flip=True, scales=(1.0, 0.75), merge="vote")[0]
    assert 20 < len(many) <= 4 * 20 * 2  # 4 passes of 20, at most one merged + one soft copy each
    model.cfg.test.vote_max_dets = 25
    few = predict_with_tta(model, images, None, flip=True, scales=(1.0, 0.75), merge="vote")[0]
    assert len(few) == 25 and torch.equal(few.scores, many.scores[:25])
    assert len(predict_with_tta(model, images, None, flip=True, scales=(1.0,), merge="vote", vote_max_dets=3)[0]) == 3
    model.cfg.test.vote_max_dets = None  # the default: max_dets after the vote too
    assert len(predict_with_tta(model, images, None, flip=True, scales=(1.0, 0.75), merge="vote")[0]) == 20


def test_config_flip_runs_tta_in_the_models_forward():
    cfg = tiny_cfg("bbox")
    cfg.test.score_thr = 0.0
    model = build_model(cfg).eval()
    torch.manual_seed(6)
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        explicit = predict_with_tta(model, images, None, flip=True, scales=(1.0,), merge="vote")[0]
        plain = model(images)[0]
        model.cfg.test.flip = True
        configured = model(images)[0]
    assert torch.equal(configured.boxes, explicit.boxes)
    assert not torch.equal(configured.boxes, plain.boxes)


def test_test_config_switches_round_trip_and_errors():
    from lsnet.config import to_dict

    data = {"test": {"flip": True, "scales": [0.5, 1], "scale_ranges": [[64, 10000], [0, 96]], "merge": "vote",
                     "vote_iou": 0.7}}
    cfg = from_dict(ModelConfig, data)
    assert cfg.test.scales == [0.5, 1.0] and cfg.test.scale_ranges == [[64.0, 10000.0], [0.0, 96.0]]
    assert cfg.test.augmented and not ModelConfig().test.augmented
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    for bad, match in (({"scales": [0.5, 1], "scale_ranges": [[0, 96]]}, "one per scale"),
                       ({"scales": []}, "non-empty"), ({"scales": [0.0]}, "factors > 0"),
                       ({"scale_ranges": [[96, 64]]}, "min < max"), ({"merge": "mean"}, "merge"),
                       ({"vote_iou": 0}, "vote_iou")):
        with pytest.raises((ConfigError, ValueError), match=match):
            from_dict(ModelConfig, {"test": bad})


def test_atss_presets_and_the_mstest_configs():
    from lsnet.checkpoint_eval import tta_arguments
    from pipelines.config import load_config

    assert len(ATSS_TEST_SHORT_SIDES) == len(ATSS_SCALE_RANGES) == 12
    assert atss_test_scales(800)[0] == 0.5 and atss_test_scales(800)[-1] == 2.25  # 1333 * 2.25 = 3000
    args = tta_arguments("atss", 800)
    assert args["flip"] and args["merge"] == "vote" and args["scales"] == atss_test_scales(800)
    assert args["vote_max_dets"] == 1000  # the reference's cap after the vote
    for name in ("bbox_cpv_r2_101_dcn_2x_mstest", "segm_r2_101_dcn_30e_mstest"):
        test = load_config(CONFIG_DIR / f"{name}.yaml").model.test
        assert test.flip and test.merge == "vote" and (test.vote_max_dets, test.max_dets) == (1000, 100)
        assert test.scales == pytest.approx(atss_test_scales(800))
        assert [tuple(r) for r in test.scale_ranges] == [tuple(map(float, r)) for r in ATSS_SCALE_RANGES]
