"""CPV, corner point verification (issue 11 item 5; paper Table 1 LSNet-CPV rows): the branch's
shapes and switch, corner pooling, the heatmap/offset targets and losses by hand, the gradient into
the branch, and the test-time corner refinement by hand."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lsnet.config import ConfigError, from_dict, to_dict
from lsnet.modeling import HeadOutputs, ModelConfig, build_model
from lsnet.modeling.cpv import (
    corner_pool,
    corner_targets,
    cpv_losses,
    gaussian_radius,
    refine_boxes_with_corners,
)
from lsnet.modeling.inference import boxes_from_points, postprocess
from tests.test_model import make_targets, tiny_cfg, two_image_batch

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def test_cpv_switch_shapes_and_config_round_trip():
    images, _ = two_image_batch()
    plain = build_model(tiny_cfg("bbox"))
    assert plain.head.cpv is None and plain.forward_raw(images).corner_logits is None
    model = build_model(tiny_cfg("bbox", cpv=True))
    out = model.forward_raw(images)
    p = sum(out.num_points_per_level)
    assert out.corner_logits.shape == (2, p, 2) and out.corner_offsets.shape == (2, p, 4)
    assert out.level_sizes == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    extra = {n for n, _ in model.named_parameters()} - {n for n, _ in plain.named_parameters()}
    assert extra and all(n.startswith(("head.cpv.", "head.cpv_embed_")) for n in extra)
    # the heatmaps start at the focal prior, 0.01
    assert torch.sigmoid(out.corner_logits).mean().item() == pytest.approx(0.01, abs=0.005)
    cfg = from_dict(ModelConfig, {"task": "bbox", "cpv": True, "loss": {"cpv_heatmap_weight": 0.5}})
    assert cfg.cpv and cfg.loss.cpv_heatmap_weight == 0.5 and cfg.loss.cpv_offset_weight == 1.0
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    assert not ModelConfig().cpv  # off, as the paper's main LSNet rows
    with pytest.raises((ConfigError, ValueError), match="cpv"):
        from_dict(ModelConfig, {"task": "segm", "cpv": True})


def test_cpv_configs_of_table_1():
    from pipelines.config import load_config

    for name in ("bbox_cpv_x101_dcn_2x", "bbox_cpv_r2_101_dcn_2x", "bbox_cpv_r2_101_dcn_2x_mstest"):
        cfg = load_config(CONFIG_DIR / f"{name}.yaml")
        assert cfg.model.cpv and cfg.model.task == "bbox" and cfg.model.dcn_stages == [3, 4, 5]
        assert cfg.train.epochs == 24
    assert not load_config(CONFIG_DIR / "bbox_r2_101_dcn_2x.yaml").model.cpv


def test_corner_pool_by_hand():
    x = torch.tensor([[1.0, 5.0, 2.0], [4.0, 0.0, 3.0], [0.0, 6.0, 1.0]])[None, None]
    down = torch.tensor([[4.0, 6.0, 3.0], [4.0, 6.0, 3.0], [0.0, 6.0, 1.0]])  # max of the cell and those below
    right = torch.tensor([[5.0, 5.0, 2.0], [4.0, 3.0, 3.0], [6.0, 6.0, 1.0]])  # ... and those to its right
    up = torch.tensor([[1.0, 5.0, 2.0], [4.0, 5.0, 3.0], [4.0, 6.0, 3.0]])
    left = torch.tensor([[1.0, 5.0, 5.0], [4.0, 4.0, 4.0], [0.0, 6.0, 6.0]])
    for direction, expected in (("down", down), ("right", right), ("up", up), ("left", left)):
        assert torch.equal(corner_pool(x, direction)[0, 0], expected), direction


def test_gaussian_radius_is_the_inward_shift_that_leaves_iou_0_7_for_a_square():
    # for a square of side s the binding case moves both corners inwards by r: (s − 2r)² / s² = 0.7
    s = torch.tensor([100.0])
    assert gaussian_radius(s, s, 0.7).item() == pytest.approx((1 - math.sqrt(0.7)) / 2 * 100, rel=1e-5)


def test_corner_targets_by_hand():
    box = torch.tensor([[6.0, 5.0, 106.0, 105.0]])  # a 100-px square: radius 8.167 px, sigma (2r+1)/6
    heat, offsets, positive = corner_targets([(16, 16), (1, 1)], (8, 128), box)
    assert heat.shape == (257, 2) and offsets.shape == (257, 4) and positive.shape == (257, 2)
    r = (1 - math.sqrt(0.7)) / 2 * 100
    sigma = (2 * r + 1) / 6
    # top-left (6, 5): nearest cell centre (4, 4) -> cell 0, offset (2, 1) / 8
    assert heat[0, 0] == 1 and positive[0, 0] and positive[:256, 0].sum() == 1
    torch.testing.assert_close(offsets[0, :2], torch.tensor([0.25, 0.125]))
    # its neighbour (12, 4) is 6.08 px away (< r): Gaussian; (12, 12) is 9.2 px away (> r): 0
    assert heat[1, 0].item() == pytest.approx(math.exp(-37 / (2 * sigma ** 2)), rel=1e-5)
    assert heat[17, 0] == 0
    # bottom-right (106, 105): cell (row 13, col 13), centre (108, 108): offset (−2, −3) / 8
    br = 13 * 16 + 13
    assert heat[br, 1] == 1 and positive[br, 1] and positive[:256, 1].sum() == 1
    torch.testing.assert_close(offsets[br, 2:], torch.tensor([-0.25, -0.375]))
    # the single cell of the coarse level (centre 64, 64) holds both corners: heat 1, offsets in cells
    assert positive[256].tolist() == [True, True]
    torch.testing.assert_close(offsets[256], torch.tensor([-58 / 128, -59 / 128, 42 / 128, 41 / 128]))
    # no objects: all zero
    heat0, off0, pos0 = corner_targets([(4, 4)], (8,), torch.zeros(0, 4))
    assert heat0.abs().sum() == 0 and off0.abs().sum() == 0 and not pos0.any()


def test_cpv_losses_by_hand_and_zero_at_the_target():
    heat_t = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 0.0]])
    positive = heat_t == 1
    offset_t = torch.tensor([[0.25, -0.25, 0.0, 0.0], [0.0, 0.0, 0.5, 0.1], [0.0, 0.0, 0.0, 0.0]])
    num_pos = torch.tensor([1.0, 1.0])
    # logits 0 -> p = 1/2 everywhere: positive cell -log(1/2)·(1/2)², a heat-y cell -log(1/2)·(1/2)²·(1−y)⁴
    heat, off = cpv_losses(torch.zeros(3, 2), torch.zeros(3, 4), heat_t, offset_t, positive, num_pos)
    unit = math.log(2) * 0.25
    tl = unit + unit * 0.5 ** 4 + unit
    br = unit + unit + unit
    assert heat.item() == pytest.approx((tl + br) / 2, rel=1e-5)
    # smooth-l1 (beta 1/9): |0.25| -> 0.25 − 1/18 twice (tl); 0.5 -> 0.5 − 1/18, 0.1 -> 0.1² / (2/9) (br)
    b = 1 / 9
    expected_off = ((0.25 - b / 2) * 2 + (0.5 - b / 2) + 0.1 ** 2 / (2 * b)) / 2
    assert off.item() == pytest.approx(expected_off, rel=1e-5)
    # at the target: confident logits and exact offsets give (almost) nothing
    logits = torch.where(positive, torch.tensor(20.0), torch.tensor(-20.0))
    heat, off = cpv_losses(logits, offset_t, heat_t, offset_t, positive, num_pos)
    assert heat.item() < 1e-3 and off.item() == 0


def test_cpv_loss_terms_and_gradient_reach_the_branch():
    torch.manual_seed(0)
    model = build_model(tiny_cfg("bbox", cpv=True)).train()
    images, _ = two_image_batch()
    targets = [make_targets("bbox", 4, [[10, 12, 70, 80]], [0]), make_targets("bbox", 4, [[5, 30, 75, 120]], [1])]
    losses = model(images, targets)
    for k in ("loss_heatmap", "loss_offset"):
        assert torch.isfinite(losses[k]) and losses[k] > 0, k
    expected = (losses["loss_cls"] + losses["loss_vec_init"] + 2 * losses["loss_vec_refine"]
                + 0.25 * losses["loss_heatmap"] + losses["loss_offset"])
    torch.testing.assert_close(losses["loss"], expected)
    losses["loss"].backward()
    head = model.head
    for name, param in [("heat_tl", head.cpv.heat_tl.weight), ("offset_br", head.cpv.offset_br.weight),
                        ("corner pooling", head.cpv.pool_tl.branch1[0].weight), ("shared", head.cpv.shared[0].weight),
                        ("embed_cls", head.cpv_embed_cls.weight), ("embed_reg", head.cpv_embed_reg.weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # and the corner losses train the regression tower that feeds the branch
    model.zero_grad()
    model(images, targets)["loss_heatmap"].backward()
    assert head.reg_tower[0].weight.grad.abs().sum() > 0 and head.cls_tower[0].weight.grad is None


def _maps(sizes, peak_level, peak_cell, peak_offsets):
    """Corner maps with -5 logits everywhere but a +5 peak (both corners) at ``peak_cell`` of ``peak_level``."""
    heat = [torch.full((2, h, w), -5.0) for h, w in sizes]
    offsets = [torch.zeros(4, h, w) for h, w in sizes]
    r, c = peak_cell
    heat[peak_level][:, r, c] = 5.0
    offsets[peak_level][:, r, c] = torch.tensor(peak_offsets)
    return heat, offsets


def test_refine_boxes_with_corners_by_hand():
    strides = (8, 16, 32, 64, 128)
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    heat, offsets = _maps(sizes, 0, (2, 3), [0.1, -0.2, 0.3, 0.4])
    boxes = torch.tensor([[27.0, 19.0, 30.0, 22.0],   # level 1: both corners' 2x2 windows hold the P3 peak
                          [27.0, 19.0, 30.0, 22.0],   # level 0: kept
                          [50.0, 40.0, 60.0, 55.0],   # level 2: windows without the peak -> their first cell
                          [27.0, 19.0, 30.0, 22.0]])  # level 3: uses P4 (all -5): its window's first cell
    levels = torch.tensor([1, 0, 2, 3])
    out = refine_boxes_with_corners(boxes, levels, heat, offsets, strides, (64.0, 64.0))
    # peak cell (row 2, col 3) of stride 8: centre (28, 20); + offsets (0.1, −0.2) / (0.3, 0.4) cells
    torch.testing.assert_close(out[0], torch.tensor([(3.5 + 0.1) * 8, (2.5 - 0.2) * 8, (3.5 + 0.3) * 8, (2.5 + 0.4) * 8]))
    torch.testing.assert_close(out[1], boxes[1])
    # x1 50 -> window cols floor(50/8 − 0.5) = 5..6, y1 40 -> rows 4..5: cell (4, 5), centre (44, 36)
    # x2 60 -> cols 7..(pad), y2 55 -> rows 6..7: cell (6, 7), centre (60, 52)
    torch.testing.assert_close(out[2], torch.tensor([44.0, 36.0, 60.0, 52.0]))
    # level 3 on P4 (stride 16): x 27 -> col floor(27/16 − 0.5) = 1, y 19 -> row 0: cell (0, 1) = (24, 8);
    # x2 30 -> col 1, y2 22 -> row 0: the same cell
    torch.testing.assert_close(out[3], torch.tensor([24.0, 8.0, 24.0, 8.0]))
    # clipped to the image
    far = refine_boxes_with_corners(torch.tensor([[27.0, 19.0, 30.0, 22.0]]), torch.tensor([1]), heat, offsets,
                                    strides, (20.0, 25.0))
    torch.testing.assert_close(far[0], torch.tensor([25.0, 18.4, 25.0, 20.0]))


def test_postprocess_with_cpv_moves_the_box_not_the_landmarks():
    """One detection on level 1 (stride 16) of a hand-made output; CPV moves its corners to the P3
    peak, the extreme points stay where the vectors put them."""
    logit = torch.logit(torch.tensor(0.9)).item()
    sizes, strides = [(4, 4), (2, 2)], (8, 16)
    num = [16, 4]
    cls = torch.full((1, 20, 1), -10.0)
    cls[0, 16 + 3] = logit  # level 1, cell (1, 1): anchor (24, 24)
    anchors = torch.cat([torch.stack(torch.meshgrid((torch.arange(w) + 0.5) * s, (torch.arange(h) + 0.5) * s,
                                                    indexing="xy"), -1).reshape(-1, 2) for (h, w), s in zip(sizes, strides)])
    vec = torch.zeros(1, 20, 4, 4)
    vec[0, 19] = torch.tensor([[14, 0, 0, 0], [0, 0, 14, 0], [0, 6, 0, 0], [0, 0, 0, 6]], dtype=torch.float32)
    heat, offsets = _maps(sizes, 0, (1, 1), [0.25, 0.0, 0.0, 0.0])  # peak at (12, 12) for both corners
    heat[0][1, 1, 1] = -5.0
    heat[0][1, 3, 3] = 5.0  # bottom-right peak at cell (3, 3): centre (28, 28)
    flat = lambda maps: torch.cat([m.flatten(1).T for m in maps])[None]
    out = HeadOutputs(cls, vec, vec, anchors, num, strides, flat(heat), flat(offsets), sizes)
    cfg = ModelConfig(task="bbox", num_classes=1, cpv=True)
    dets = postprocess(out, [(32, 32)], cfg, (32, 32))[0]
    assert len(dets) == 1
    # the vectors give the box x 10..30, y 10..30; CPV: tl -> (12 + 0.25·8, 12), br -> (28, 28)
    torch.testing.assert_close(dets.boxes[0], torch.tensor([14.0, 12.0, 28.0, 28.0]))
    torch.testing.assert_close(dets.points[0], torch.tensor([[24.0, 10.0], [10.0, 24.0], [24.0, 30.0], [30.0, 24.0]]))
    cfg.test.cpv_refine = False
    plain = postprocess(out, [(32, 32)], cfg, (32, 32))[0]
    torch.testing.assert_close(plain.boxes[0], torch.tensor([10.0, 10.0, 30.0, 30.0]))
    plain = postprocess(out, [(32, 32)], ModelConfig(task="bbox", num_classes=1), (32, 32))[0]
    torch.testing.assert_close(plain.boxes[0], torch.tensor([10.0, 10.0, 30.0, 30.0]))


def test_cpv_model_with_flip_and_multiscale_tta_keeps_refined_boxes_in_the_image():
    torch.manual_seed(1)
    cfg = tiny_cfg("bbox", cpv=True)
    cfg.test.score_thr, cfg.test.max_dets = 0.0, 50
    model = build_model(cfg).eval()
    images, sizes = two_image_batch()
    with torch.no_grad():
        plain = model(images, image_sizes=sizes)
        model.cfg.test.flip, model.cfg.test.scales = True, [1.0, 0.5]
        tta = model(images, image_sizes=sizes)
    for p, d, (h, w) in zip(plain, tta, sizes):
        assert len(d) == 50
        for dets in (p, d):
            assert (dets.boxes[:, 0::2] >= 0).all() and (dets.boxes[:, 0::2] <= w).all()
            assert (dets.boxes[:, 1::2] >= 0).all() and (dets.boxes[:, 1::2] <= h).all()
        # CPV boxes are not the landmarks' boxes for the refined (P4-P7) detections
        assert not torch.allclose(p.boxes, boxes_from_points(p.points))
