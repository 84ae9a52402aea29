"""The model side of the Table 2 ablation (issue 10): box target style, the per-stage loss choice,
the stage-1-only mode and the mean IoU of positives (Figure 4). Cheap: tensors and a tiny model."""
from __future__ import annotations

import pytest
import torch

from lsnet.coding import encode_offsets
from lsnet.modeling import ModelConfig, build_model
from lsnet.modeling.config import LossConfig
from lsnet.modeling.detector import REFINE_BRANCH, box_style_targets, points_box, stage_loss
from lsnet.structures import LandmarkTargets

KINDS = ["cross_iou", "giou", "smooth_l1_box", "smooth_l1_points"]


def _targets() -> LandmarkTargets:
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 8.0, 30.0]])
    # extreme points that are NOT the edge midpoints (top point at x=12, etc.)
    points = torch.tensor([[[12.0, 20.0], [10.0, 35.0], [45.0, 40.0], [50.0, 22.0]],
                           [[1.0, 0.0], [0.0, 29.0], [7.0, 30.0], [8.0, 3.0]]])
    return LandmarkTargets(boxes, torch.tensor([0, 1]), points, torch.ones(2, 4, dtype=torch.bool),
                           torch.zeros(2, dtype=torch.bool))


def test_box_style_targets_are_edge_midpoints_of_the_same_box():
    t = box_style_targets(_targets())
    assert torch.equal(t.points[0], torch.tensor([[30.0, 20.0], [10.0, 30.0], [30.0, 40.0], [50.0, 30.0]]))
    assert torch.equal(points_box(t.points), t.boxes)
    assert torch.equal(points_box(_targets().points), _targets().boxes)  # extreme points span the box too


@pytest.mark.parametrize("kind", KINDS)
def test_stage_loss_zero_at_the_target_and_positive_elsewhere(kind):
    t = _targets()
    anchors = torch.tensor([[30.0, 30.0], [4.0, 15.0]])
    target = encode_offsets(t.points, anchors)
    cfg = ModelConfig(task="bbox", num_classes=2, backbone="resnet18", loss=LossConfig(alpha=0.0))
    args = (torch.ones(2, 4, dtype=torch.bool), t.boxes, anchors, torch.tensor([8.0, 8.0]), torch.tensor(2.0), cfg)
    exact = stage_loss(kind, target.clone(), target, *args)
    assert exact.item() == pytest.approx(0.0, abs=1e-6)
    pred = (target * 1.3 + 0.5).requires_grad_(True)
    loss = stage_loss(kind, pred, target, *args)
    assert loss.item() > 0.01
    loss.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_box_losses_ignore_the_extreme_point_positions_but_point_loss_does_not():
    """Moving the top point along the top edge keeps the box: GIoU / smooth-l1 box do not change,
    the smooth-l1 point loss does — what distinguishes the rectangle rows from the extreme-point row."""
    t = _targets()
    anchors = torch.tensor([[30.0, 30.0], [4.0, 15.0]])
    target = encode_offsets(t.points, anchors)
    moved = t.points.clone()
    moved[0, 0, 0] = 40.0  # top point slides right along y = 20
    pred = encode_offsets(moved, anchors)
    cfg = ModelConfig(task="bbox", num_classes=2, backbone="resnet18")
    args = (torch.ones(2, 4, dtype=torch.bool), t.boxes, anchors, torch.tensor([8.0, 8.0]), torch.tensor(2.0), cfg)
    assert stage_loss("giou", pred, target, *args).item() == pytest.approx(0.0, abs=1e-6)
    assert stage_loss("smooth_l1_box", pred, target, *args).item() == pytest.approx(0.0, abs=1e-6)
    assert stage_loss("smooth_l1_points", pred, target, *args).item() > 0
    assert stage_loss("cross_iou", pred, target, *args).item() > 0


def _tiny(**kw) -> ModelConfig:
    return ModelConfig(task="bbox", num_classes=3, backbone="resnet18", fpn_channels=32, head_channels=32,
                       head_convs=1, norm_groups=8, **kw)


def test_stage1_only_model_freezes_the_refinement_and_outputs_stage1():
    torch.manual_seed(0)
    model = build_model(_tiny(refine=False)).train()
    images = torch.randn(1, 3, 64, 64)
    targets = [LandmarkTargets(torch.tensor([[8.0, 10.0, 40.0, 50.0]]), torch.tensor([1]),
                               torch.tensor([[[20.0, 10.0], [8.0, 30.0], [25.0, 50.0], [40.0, 28.0]]]),
                               torch.ones(1, 4, dtype=torch.bool), torch.zeros(1, dtype=torch.bool))]
    losses = model(images, targets)
    assert losses["loss_vec_refine"].item() == 0.0
    assert torch.allclose(losses["loss"], losses["loss_cls"] + losses["loss_vec_init"])
    losses["loss"].backward()
    for name in REFINE_BRANCH:
        for p in getattr(model.head, name).parameters() if isinstance(getattr(model.head, name), torch.nn.Module) \
                else [getattr(model.head, name)]:
            assert not p.requires_grad and p.grad is None
    assert model.head.init_out.weight.grad.abs().sum() > 0
    out = model.forward_raw(images)
    assert out.vec_refine is out.vec_init
    # two-stage model: the refinement is trained
    full = build_model(_tiny()).train()
    assert all(p.requires_grad for p in full.head.refine_out.parameters())


def test_pos_iou_is_one_for_perfect_outputs_and_follows_the_output_stage():
    """pos_iou measures the boxes the model outputs: stage 2, or stage 1 in stage-1-only models."""
    from lsnet.modeling.detector import compute_losses
    from lsnet.modeling.head import HeadOutputs

    torch.manual_seed(0)
    model = build_model(_tiny())
    out = model.forward_raw(torch.randn(1, 3, 64, 64))
    t = _targets()
    t = LandmarkTargets(t.boxes[:1], t.labels[:1], t.points[:1], t.visible[:1], t.iscrowd[:1])
    perfect = encode_offsets(t.points[0].expand(out.anchors.shape[0], 4, 2), out.anchors).unsqueeze(0)
    wrong = torch.full_like(perfect, 1.0)  # 2x2 px boxes around every anchor
    for refine, init, refined, expected in ((True, wrong, perfect, 1.0), (True, perfect, wrong, None),
                                            (False, perfect, wrong, 1.0)):
        cfg = _tiny(refine=refine)
        o = HeadOutputs(out.cls_logits, init, refined, out.anchors, out.num_points_per_level, out.strides)
        iou = compute_losses(o, [t], cfg)["pos_iou"].item()
        if expected is None:
            assert iou < 0.1
        else:
            assert iou == pytest.approx(expected, abs=1e-5)


def test_box_target_style_is_bbox_only():
    with pytest.raises(ValueError, match="target_style"):
        ModelConfig(task="segm", target_style="box")
