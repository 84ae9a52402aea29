"""Cross-IOU loss (paper Eq. 1), the reference form (golden vectors) and the Table 2 baselines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lsnet.coding import encode_offsets, soften_targets
from lsnet.losses import (
    VectorLossConfig,
    cross_iou,
    cross_iou_autograd,
    cross_iou_loss,
    cross_iou_loss_reference,
    focal_loss,
    giou_box_loss,
    smooth_l1_box_loss,
    smooth_l1_point_loss,
    vector_loss,
)


def _random_targets(
    num_objects: int, num_points: int, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsoftened targets of random landmarks around random anchors, plus the anchors."""
    anchors = torch.rand(num_objects, 2, dtype=dtype) * 100
    points = anchors[:, None] + (torch.rand(num_objects, num_points, 2, dtype=dtype) - 0.5) * 60
    return encode_offsets(points, anchors), anchors


# ---------------------------------------------------------------------------- hand-computed values
def test_hand_computed_single_vector():
    # target (unsoftened) [top, bottom, left, right] = [2, 0, 0, 1]  (up 2, right 1)
    # softened, alpha = 0.2: [2, 0.2*2, 0.2*1, 1] = [2, 0.4, 0.2, 1]
    # pred = [1, 0, 2, 0]
    # min = [1, 0, 0.2, 0] -> 1.2 ; max = [2, 0.4, 2, 1] -> 5.4 ; cIOU = 1.2 / 5.4 = 2/9 ; loss = 7/9
    pred = torch.tensor([[[1.0, 0.0, 2.0, 0.0]]])
    target = torch.tensor([[[2.0, 0.0, 0.0, 1.0]]])
    assert cross_iou(pred[0], soften_targets(target[0], 0.2)).item() == pytest.approx(2 / 9, abs=1e-7)
    assert cross_iou_loss(pred, target, alpha=0.2).item() == pytest.approx(7 / 9, abs=1e-6)
    # alpha = 0: target stays [2, 0, 0, 1]; min = [1,0,0,0] -> 1 ; max = [2,0,2,1] -> 5 ; loss = 1 - 1/5
    assert cross_iou_loss(pred, target, alpha=0.0).item() == pytest.approx(0.8, abs=1e-6)


def test_hand_computed_mean_over_landmarks_visibility_weights_and_reductions():
    target = torch.tensor([[[2.0, 0.0, 0.0, 1.0], [0.0, 3.0, 4.0, 0.0]]])  # 1 object, N = 2
    exact = soften_targets(target[:, 1:], 0.2)  # 2nd landmark predicted exactly -> cIOU 1
    pred = torch.cat([torch.tensor([[[1.0, 0.0, 2.0, 0.0]]]), exact], dim=1)
    # object loss = 1 - (2/9 + 1) / 2 = 7/18
    assert cross_iou_loss(pred, target).item() == pytest.approx(7 / 18, abs=1e-6)
    # only the first landmark visible -> 1 - 2/9 = 7/9; only the second -> 0
    assert cross_iou_loss(pred, target, visible=torch.tensor([[True, False]])).item() == pytest.approx(
        7 / 9, abs=1e-6
    )
    assert cross_iou_loss(pred, target, visible=torch.tensor([[False, True]])).item() == pytest.approx(
        0.0, abs=1e-7
    )

    # Three objects: losses 7/18, 7/9, and one with nothing visible (0, not counted in the mean).
    pred3, target3 = pred.repeat(3, 1, 1), target.repeat(3, 1, 1)
    visible = torch.tensor([[True, True], [True, False], [False, False]])
    none = cross_iou_loss(pred3, target3, visible=visible, reduction="none")
    torch.testing.assert_close(none, torch.tensor([7 / 18, 7 / 9, 0.0]))
    # mean over the 2 objects with a visible landmark: (7/18 + 14/18) / 2 = 7/12
    assert cross_iou_loss(pred3, target3, visible=visible).item() == pytest.approx(7 / 12, abs=1e-6)
    # weights (2, 0.5, 9): sum = 14/18 + 7/18 + 0 = 7/6 ; avg_factor 7 -> 1/6
    weight = torch.tensor([2.0, 0.5, 9.0])
    assert cross_iou_loss(pred3, target3, visible, weight, reduction="sum").item() == pytest.approx(
        7 / 6, abs=1e-6
    )
    assert cross_iou_loss(pred3, target3, visible, weight, avg_factor=7.0).item() == pytest.approx(
        1 / 6, abs=1e-6
    )
    with pytest.raises(ValueError, match="reduction"):
        cross_iou_loss(pred3, target3, reduction="avg")
    with pytest.raises(ValueError, match="weight"):
        cross_iou_loss(pred3, target3, weight=torch.ones(2))


def test_zero_length_vectors_count_as_perfect():
    # Landmark at the anchor and a zero prediction: cIOU 1 -> loss 0, with a finite (zero) gradient.
    pred = torch.zeros(2, 3, 4, requires_grad=True)
    loss = cross_iou_loss(pred, torch.zeros(2, 3, 4))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(pred.grad).all()
    # Zero target, non-zero prediction: min = 0 -> cIOU 0 -> loss 1 (finite).
    assert cross_iou_loss(torch.ones(1, 1, 4), torch.zeros(1, 1, 4)).item() == 1.0


@pytest.mark.parametrize("form", ["paper", "reference"])
def test_empty_positives_give_zero_with_a_graph(form):
    pred = torch.zeros(0, 4, 4, requires_grad=True)
    loss = vector_loss(
        pred, torch.zeros(0, 4, 4), form=form, anchors=torch.zeros(0, 2), gt_boxes=torch.zeros(0, 4)
    )
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert pred.grad.shape == (0, 4, 4)
    # all landmarks invisible: also 0 (nothing to average), finite
    pred = torch.rand(3, 17, 4, requires_grad=True)
    loss = cross_iou_loss(pred, torch.rand(3, 17, 4), visible=torch.zeros(3, 17, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(pred.grad).all()


# ----------------------------------------------------------------------------------------- invariants
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5])
def test_loss_is_zero_at_the_target(alpha):
    target, _ = _random_targets(8, 36)
    loss = cross_iou_loss(soften_targets(target, alpha), target, alpha=alpha, reduction="none")
    torch.testing.assert_close(loss, torch.zeros(8), atol=1e-6, rtol=0)


def test_loss_decreases_monotonically_towards_the_target():
    # pred(t) = (1-t) p0 + t q*. Per component: where p0 < q*, min = pred grows and max = q* stays;
    # where p0 > q*, min = q* stays and max = pred shrinks -> cIOU non-decreasing, strictly unless p0 = q*.
    target, _ = _random_targets(16, 4)
    start = torch.rand(16, 4, 4) * 40
    soft = soften_targets(target, 0.2)
    losses = torch.stack(
        [
            cross_iou_loss((1 - t) * start + t * soft, target, reduction="none")
            for t in torch.linspace(0, 1, 21)
        ]
    )
    steps = losses[1:] - losses[:-1]
    assert (steps < 0).all(), steps.max()
    torch.testing.assert_close(losses[-1], torch.zeros(16), atol=1e-6, rtol=0)


def test_loss_along_a_geometric_path_of_the_landmark():
    # The predicted point slides on a straight line from the opposite quadrant (-20, 10) through the
    # anchor's neighbourhood to the target point (15, -5); prediction = softened encoding of the point.
    anchor = torch.zeros(1, 2)
    target = encode_offsets(torch.tensor([[[15.0, -5.0]]]), anchor)
    ts = torch.linspace(0, 1, 41)
    path = torch.tensor([-20.0, 10.0]) + ts[:, None] * torch.tensor([35.0, -15.0])
    pred = soften_targets(encode_offsets(path[:, None, None, :], anchor.expand(41, 1, 2)), 0.2)
    losses = cross_iou_loss(pred[:, 0], target.expand(41, 1, 4), reduction="none")
    # Inside the target's quadrant (x > 0, y < 0) the encoding is linear in the point, so this is the
    # component-space path above: strictly decreasing down to 0.
    inside = (path[:, 0] > 0) & (path[:, 1] < 0)
    assert inside.sum() >= 10
    assert (losses[inside][1:] < losses[inside][:-1]).all()
    assert losses[-1].item() == pytest.approx(0.0, abs=1e-7)
    # Far on the opposite side all softened components exceed the target's except the alpha-scaled ones,
    # min and max grow together and the loss is flat at 0.8 (hand value at (-20, 10): pred [2, 10, 20, 4],
    # target [5, 1, 3, 15] -> min 2+1+3+4 = 10, max 5+10+20+15 = 50, loss 1 - 1/5). Crossing near the
    # anchor it rises before falling: monotone decrease is NOT a property of arbitrary point paths.
    assert losses[0].item() == pytest.approx(0.8, abs=1e-6)
    assert (losses[1:] > losses[:-1] + 1e-3).any()


def test_scale_invariance_unlike_smooth_l1():
    target, anchors = _random_targets(10, 4)
    pred = torch.rand(10, 4, 4) * 30
    base = cross_iou_loss(pred, target, reduction="none")
    points_p, points_t = (
        anchors[:, None] + pred[..., [3, 1]] - pred[..., [2, 0]],
        anchors[:, None] + target[..., [3, 1]] - target[..., [2, 0]],
    )
    l1_base = smooth_l1_point_loss(points_p, points_t)
    for k in (0.01, 3.0, 250.0):
        torch.testing.assert_close(
            cross_iou_loss(k * pred, k * target, reduction="none"), base, rtol=1e-5, atol=1e-6
        )
        assert not math.isclose(
            smooth_l1_point_loss(k * points_p, k * points_t).item(), l1_base.item(), rel_tol=1e-3
        )


# ------------------------------------------------------------------------------------------ gradients
def test_signed_prediction_alpha0_has_no_gradient_on_the_wrong_side():
    # docs/design.md §1 "Note on gradients": a *signed* prediction s (one number per axis, split into its
    # (s)^- and (s)^+ parts). Target: 10 to the right. For any s < 0 the numerator
    # min((s)^-, 0) + min((s)^+, 10) is 0, so with alpha = 0 the loss is flat (= 1) and d loss/ds = 0.
    target = torch.tensor([[[0.0, 0.0, 0.0, 10.0]]])

    def loss_of(s: torch.Tensor, alpha: float) -> torch.Tensor:
        zero = torch.zeros_like(s)
        pred = torch.stack([zero, zero, (-s).clamp(min=0), s.clamp(min=0)], -1).reshape(1, 1, 4)
        return cross_iou_loss(pred, target, alpha=alpha)

    for value in (-1.0, -5.0, -20.0):
        s = torch.tensor(value, requires_grad=True)
        loss = loss_of(s, alpha=0.0)
        loss.backward()
        assert loss.item() == 1.0 and s.grad.item() == 0.0
    # alpha = 0.2: softened target [0, 0, 2, 10]; at s = -5: cIOU = min(5,2)/(max(5,2) + 10) = 2/(10 - s)
    # -> d loss/ds = -2/(10 - s)^2 = -2/225 < 0: gradient descent moves s towards the right side.
    s = torch.tensor(-5.0, requires_grad=True)
    loss_of(s, alpha=0.2).backward()
    assert s.grad.item() == pytest.approx(-2 / 225, rel=1e-5)


def test_four_component_prediction_gradients_on_opposite_sides():
    # Target 10 to the right, prediction 5 to the left (4 independent components). With alpha = 0
    # the numerator is 0; d cIOU/d left = -num/den^2 = 0 (the wrong-side component gets NO gradient),
    # but d cIOU/d right = 1/den = 1/15 (min(0, 10) grows with the right component): not flat.
    # With alpha = 0.2 the softened target's left component is 2 < 5, so num = 2, den = 15 and
    # d loss/d left = +2/225 (pushes the wrong-side component down), d loss/d right = -1/15.
    target = torch.tensor([[[0.0, 0.0, 0.0, 10.0]]])
    for alpha, expected_left, expected_right in ((0.0, 0.0, -1 / 15), (0.2, 2 / 225, -1 / 15)):
        pred = torch.tensor([[[0.0, 0.0, 5.0, 0.0]]], requires_grad=True)
        cross_iou_loss(pred, target, alpha=alpha).backward()
        assert pred.grad[0, 0, 2].item() == pytest.approx(expected_left, abs=1e-8)
        assert pred.grad[0, 0, 3].item() == pytest.approx(expected_right, rel=1e-5)
    # So the true statement for alpha = 0 is: the opposite-side component receives exactly zero
    # gradient; alpha > 0 is what gives it one.


def test_fast_path_matches_the_autograd_definition():
    # cross_iou uses a hand-written backward when the target is constant; it must agree with plain
    # autograd through min/max (inputs without ties, where both are differentiable), including
    # zero-length vectors (both zero: cIOU 1, gradient 0).
    target, _ = _random_targets(50, 6, dtype=torch.float64)
    target = soften_targets(target, 0.2)
    target[:5, 0] = 0.0
    pred = torch.rand(50, 6, 4, dtype=torch.float64) * 40 + 0.1
    pred[:5, 0] = 0.0
    upstream = torch.randn(50, 6, dtype=torch.float64)
    fast_pred = pred.clone().requires_grad_()
    slow_pred = pred.clone().requires_grad_()
    fast, slow = cross_iou(fast_pred, target), cross_iou_autograd(slow_pred, target)
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
    assert (fast[:5, 0] == 1).all()
    (fast * upstream).sum().backward()
    (slow * upstream).sum().backward()
    torch.testing.assert_close(fast_pred.grad, slow_pred.grad, rtol=1e-10, atol=1e-12)
    assert (fast_pred.grad[:5, 0] == 0).all()


def test_gradcheck_paper_form_float64():
    target, _ = _random_targets(3, 5, dtype=torch.float64)
    pred = (torch.rand(3, 5, 4, dtype=torch.float64) * 30 + 0.5).requires_grad_()
    visible = torch.tensor([[True, False, True, True, True], [False] * 5, [True] * 5])
    weight = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda p: cross_iou_loss(p, target, visible, weight, reduction="none"), (pred,)
    )
    assert torch.autograd.gradcheck(lambda p: cross_iou_loss(p, target, avg_factor=4.0), (pred,))


@pytest.mark.parametrize("task,num_vectors", [("bbox", 5), ("polygon", 37), ("keypoint", 18)])
def test_gradcheck_reference_form_float64(task, num_vectors):
    target, anchors = _random_targets(3, num_vectors, dtype=torch.float64)
    pred = (torch.rand(3, num_vectors, 4, dtype=torch.float64) * 30 + 0.5).requires_grad_()
    gt_boxes = torch.tensor([[10.0, 20.0, 50.0, 45.0]], dtype=torch.float64).repeat(3, 1)
    visible = torch.rand(3, num_vectors) > 0.3
    assert torch.autograd.gradcheck(
        lambda p: vector_loss(
            p,
            target,
            visible,
            form="reference",
            task=task,
            anchors=anchors,
            gt_boxes=gt_boxes,
            last_is_centre=True,
        ),
        (pred,),
    )


@pytest.mark.parametrize("task", ["bbox", "segm", "pose"])
def test_reference_form_is_safe_on_degenerate_input(task):
    # All-zero vectors (landmarks on the anchor) and point boxes: overlap 1 and v = 0 make the
    # penalty's 1 - overlap + v zero; the value and the gradient must stay finite.
    pred = torch.zeros(2, 5, 4, requires_grad=True)
    anchors = torch.tensor([[10.0, 10.0], [0.0, 0.0]])
    gt_boxes = torch.tensor([[10.0, 10.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]])
    loss = vector_loss(
        pred, torch.zeros(2, 5, 4), form="reference", task=task, anchors=anchors, gt_boxes=gt_boxes
    )
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    if task != "pose":  # the keypoint form clamps max to eps, so all-zero pairs score 0 there
        assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_reference_form_zero_at_target_bbox():
    # Extreme points (top, left, bottom, right) of the box [10, 20, 50, 45] and its centre.
    points = torch.tensor([[[30.0, 20.0], [10.0, 30.0], [25.0, 45.0], [50.0, 40.0], [30.0, 32.5]]])
    anchors = torch.tensor([[28.0, 33.0]])
    target = encode_offsets(points, anchors)
    loss = vector_loss(
        soften_targets(target, 0.2),
        target,
        form="reference",
        task="bbox",
        anchors=anchors,
        gt_boxes=torch.tensor([[10.0, 20.0, 50.0, 45.0]]),
    )
    assert loss.item() == pytest.approx(0.0, abs=1e-5)


def test_reference_keypoint_form_hand_computed():
    # pred [1, 0, 0, 2], target [2, 0, 0, 1], alpha 0: per axis pair (max clamped to eps = 1e-6)
    # y: min(1,2) + min(0,0) = 1 over max 2 + eps -> ~1/2 ; x: 0 + min(2,1) = 1 over eps + 2 -> ~1/2
    # loss = 1 - (1/2 + 1/2) / 2 = 1/2 ; invisible -> both pairs zeroed, still divided by 2 -> 1
    pred, target = torch.tensor([[1.0, 0, 0, 2]]), torch.tensor([[2.0, 0, 0, 1]])
    mask = torch.tensor([[1, 0, 0, 1]])
    loss = cross_iou_loss_reference(pred, target, mask, None, "keypoint", alpha=0.0)
    assert loss.item() == pytest.approx(0.5, abs=1e-5)
    loss = cross_iou_loss_reference(
        pred, target, mask, None, "keypoint", alpha=0.0, visible=torch.tensor([[False]])
    )
    assert loss.item() == pytest.approx(1.0, abs=1e-7)


# ------------------------------------------------------------------------------------------- golden
#: Golden vectors of the authors' loss (tests/data/README.md says where they come from): per case the
#: inputs and the per-object loss their ``cross_iou_loss`` returns, bbox (V = 5: 4 extreme points +
#: the centre) and polygon (V = 37: 36 contour points + the centre).
GOLDEN = Path(__file__).parent / "data" / "cross_iou_reference.json"


def test_reference_form_matches_golden():
    tasks = set()
    for case in json.loads(GOLDEN.read_text())["cases"]:
        assert case["num_vectors"] == {"bbox": 5, "polygon": 37}[case["task"]]
        t = {
            k: torch.tensor(case[k], dtype=torch.float32)
            for k in (
                "pred",
                "target_unsoftened",
                "target_pos_mask",
                "bbox_gt_xyxy",
                "anchor",
                "loss_per_object",
            )
        }
        loss = cross_iou_loss_reference(
            t["pred"],
            t["target_unsoftened"],
            t["target_pos_mask"],
            t["bbox_gt_xyxy"],
            case["task"],
            case["alpha"],
            anchors=t["anchor"],
        )
        torch.testing.assert_close(loss, t["loss_per_object"], atol=1e-5, rtol=0)
        # The model's entry point derives the positive mask itself and must agree.
        n = t["pred"].shape[0]
        via_entry = vector_loss(
            t["pred"].reshape(n, -1, 4),
            t["target_unsoftened"].reshape(n, -1, 4),
            form="reference",
            task=case["task"],
            alpha=case["alpha"],
            anchors=t["anchor"],
            gt_boxes=t["bbox_gt_xyxy"],
            last_is_centre=True,
            reduction="none",
        )
        torch.testing.assert_close(via_entry, t["loss_per_object"], atol=1e-5, rtol=0)
        tasks.add(case["task"])
    assert tasks == {"bbox", "polygon"}


# ---------------------------------------------------------------------------------------- baselines
def test_giou_box_loss_values():
    gt = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 4.0, 2.0]])
    assert giou_box_loss(gt.clone(), gt).item() == pytest.approx(0.0, abs=1e-6)
    # [0,0,2,2] vs [1,1,3,3]: inter 1, union 7, IoU 1/7; enclosing 3x3 = 9; GIoU = 1/7 - 2/9 = -5/63
    loss = giou_box_loss(torch.tensor([[0.0, 0.0, 2.0, 2.0]]), gt[:1])
    assert loss.item() == pytest.approx(1 + 5 / 63, abs=1e-6)


def test_smooth_l1_box_and_point_losses():
    gt = torch.tensor([[0.0, 0.0, 2.0, 3.0]])
    assert smooth_l1_box_loss(gt.clone(), gt).item() == 0.0
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    # diff [0,0,0,1], beta 1/9: |d| >= beta -> |d| - beta/2 = 17/18; mean over 4 -> 17/72
    assert smooth_l1_box_loss(pred, gt).item() == pytest.approx(17 / 72, abs=1e-6)
    # scale 2 (e.g. 4 x stride): d = 0.5 -> 0.5 - 1/18 = 4/9 ; / 4 -> 1/9
    assert smooth_l1_box_loss(pred, gt, scale=torch.tensor([2.0])).item() == pytest.approx(1 / 9, abs=1e-6)

    gt_pts = torch.tensor([[[0.0, 0.0], [1.0, 1.05]]])
    pred_pts = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    assert smooth_l1_point_loss(gt_pts.clone(), gt_pts).item() == 0.0
    # d = 0.05 < beta: 0.5 d^2 / beta = 0.5 * 0.0025 * 9 = 0.01125 ; mean over 4 coordinates
    assert smooth_l1_point_loss(pred_pts, gt_pts).item() == pytest.approx(0.01125 / 4, rel=1e-4)
    # only the first (exact) point visible -> 0 ; nothing visible -> 0 and finite
    assert smooth_l1_point_loss(pred_pts, gt_pts, visible=torch.tensor([[True, False]])).item() == 0.0
    assert smooth_l1_point_loss(pred_pts, gt_pts, visible=torch.tensor([[False, False]])).item() == 0.0


def test_focal_loss_normalised_by_positives():
    # logit 0 -> p = 0.5; positive: alpha (1-p)^2 ln 2 = 0.25 * 0.25 * ln 2 ;
    # negative: (1-alpha) p^2 ln 2 = 0.75 * 0.25 * ln 2. Two rows, one positive -> sum / 1.
    logits = torch.zeros(2, 1)
    targets = torch.tensor([[1.0], [0.0]])
    expected = (0.25 * 0.25 + 0.75 * 0.25) * math.log(2)
    assert focal_loss(logits, targets).item() == pytest.approx(expected, rel=1e-6)
    assert focal_loss(logits, targets, num_positives=4).item() == pytest.approx(expected / 4, rel=1e-6)
    assert focal_loss(logits, torch.zeros(2, 1)).item() == pytest.approx(
        2 * 0.75 * 0.25 * math.log(2), rel=1e-6
    )


def test_vector_loss_config_validation():
    assert VectorLossConfig().form == "paper"
    with pytest.raises(ValueError, match="form"):
        VectorLossConfig(form="ciou")
    with pytest.raises(ValueError, match="alpha"):
        VectorLossConfig(alpha=1.5)
    with pytest.raises(ValueError, match="form"):
        vector_loss(torch.rand(1, 4, 4), torch.rand(1, 4, 4), form="ciou")


def test_losses_benchmark_runner_smoke():
    # Runs the benchmark code path on a tiny problem; asserts structure only, never timings.
    from pipelines.bench.losses import run

    threads = torch.get_num_threads()
    result = run(num_objects=[64], warmup=0, repeats=1, num_threads=1)
    assert torch.get_num_threads() == threads
    assert {row["loss"] for row in result.rows} >= {
        "cross_iou (paper)",
        "giou (torchvision)",
        "smooth_l1 (boxes)",
    }
    assert set(result.checks) == {"cross_iou_vs_giou_per_object_64"}
    assert all(row["median_ms"] > 0 for row in result.rows)


def test_reference_penalty_switch_bbox_hand_values():
    # Anchor (0, 0), extreme points 2 px away on each side: target vectors (alpha = 0, unsoftened)
    # top [2,0,0,0], left [0,0,2,0], bottom [0,2,0,0], right [0,0,0,2]. Prediction: top only 1 up,
    # right 4 to the right. Reference overlap pools all 16 components: min 1+2+2+2 = 7,
    # max 2+2+2+4 = 10 -> 1 - 0.7 = 0.3. (The paper's per-vector mean: 1 - (0.5+1+1+0.5)/4 = 0.25.)
    target = torch.tensor([[[2.0, 0, 0, 0], [0, 0, 2, 0], [0, 2, 0, 0], [0, 0, 0, 2]]])
    pred = torch.tensor([[[1.0, 0, 0, 0], [0, 0, 2, 0], [0, 2, 0, 0], [0, 0, 0, 4]]])
    anchors, gt_boxes = torch.zeros(1, 2), torch.tensor([[-2.0, -2.0, 2.0, 2.0]])
    kwargs = {"form": "reference", "task": "bbox", "alpha": 0.0, "anchors": anchors, "gt_boxes": gt_boxes}
    assert vector_loss(pred, target, **kwargs, reference_penalty=False).item() == pytest.approx(0.3, abs=1e-6)
    assert vector_loss(pred, target, form="paper", alpha=0.0).item() == pytest.approx(0.25, abs=1e-6)
    # Penalty: decoded box [-2, -1, 4, 2] vs gt [-2, -2, 2, 2]; centres (1, 0.5) and (0, 0): rho^2 = 1.25;
    # enclosing box 6 x 4: c^2 = 52; v = 4/pi^2 (atan(4/4) - atan(6/3))^2; term v^2 / (1 - 0.7 + v).
    v = 4 / math.pi**2 * (math.atan(1.0) - math.atan(2.0)) ** 2
    expected = 0.3 + 1.25 / 52 + v**2 / (0.3 + v)
    assert vector_loss(pred, target, **kwargs).item() == pytest.approx(expected, abs=1e-5)
    # Without the penalty no box is needed.
    assert cross_iou_loss_reference(
        pred.flatten(1), target.flatten(1), target.flatten(1) > 0, None, "bbox", 0.0, penalty=False
    ).item() == pytest.approx(0.3, abs=1e-6)


def test_reference_polygon_groups_pool_every_ninth_vector():
    # 18 vectors -> 9 groups {i, i + 9}. Halving vector 0 only lowers group 0:
    # overlap_0 = (|q0|/2 + |q9|) / (|q0| + |q9|) with softened |.|_1 norms; the others are 1.
    target, _ = _random_targets(1, 18, dtype=torch.float64)
    soft = soften_targets(target, 0.2)
    pred = soft.clone()
    pred[0, 0] *= 0.5
    n0, n9 = soft[0, 0].sum().item(), soft[0, 9].sum().item()
    expected = 1 - (8 + (n0 / 2 + n9) / (n0 + n9)) / 9
    loss = vector_loss(pred, target, form="reference", task="segm", reference_penalty=False, reduction="none")
    assert loss.item() == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------------------ centre vector
def _extremes_and_centre():
    """Anchor (0, 0); extreme points 2 px away (top, left, bottom, right), centre at (1, 1).
    Unsoftened vectors [top, bottom, left, right]: top [2,0,0,0], left [0,0,2,0], bottom [0,2,0,0],
    right [0,0,0,2], centre [0,1,0,1]."""
    target = torch.tensor([[[2.0, 0, 0, 0], [0, 0, 2, 0], [0, 2, 0, 0], [0, 0, 0, 2], [0, 1, 0, 1]]])
    return target, torch.zeros(1, 2), torch.tensor([[-2.0, -2.0, 2.0, 2.0]])


def test_reference_bbox_pools_the_centre_into_one_ratio():
    # The prediction is exact except the centre, 3 px down instead of 1: pooled over all 20
    # components, min = 8 + 1 + 1 = 10 and max = 8 + 3 + 1 = 12 -> 1 - 10/12 = 1/6. The box of the
    # extreme points is exact, so the penalty is 0. (Centre dropped: 0; per-vector mean: 0.1.)
    target, anchors, gt_boxes = _extremes_and_centre()
    pred = target.clone()
    pred[0, 4] = torch.tensor([0.0, 3.0, 0.0, 1.0])
    kwargs = {"form": "reference", "task": "bbox", "alpha": 0.0, "anchors": anchors, "gt_boxes": gt_boxes,
              "last_is_centre": True}
    assert vector_loss(pred, target, **kwargs).item() == pytest.approx(1 / 6, abs=1e-6)
    assert vector_loss(pred, target, **kwargs, reference_penalty=False).item() == pytest.approx(1 / 6, abs=1e-6)
    # The paper form averages the centre's cIOU (2/4) with the four exact landmarks' (1).
    assert vector_loss(pred, target, form="paper", alpha=0.0, last_is_centre=True).item() == pytest.approx(
        0.1, abs=1e-6)
    with pytest.raises(ValueError, match="V = 4 extreme points"):
        vector_loss(pred[:, :4], target[:, :4], **kwargs)


def test_the_centre_counts_whatever_its_visibility():
    # Pose: 2 keypoints + the centre, every flag False. The reference masks only the keypoint pairs by
    # visibility and divides by all 2V pairs: a prediction equal to the softened target scores
    # 1 - (centre's 2 pairs) / 6 = 2/3; without a centre vector nothing counts (loss 1).
    points = torch.tensor([[[10.0, 4.0], [-3.0, 7.0], [2.0, -5.0]]])
    anchors = torch.zeros(1, 2)
    target = encode_offsets(points, anchors)
    pred = soften_targets(target, 0.2)
    hidden = torch.zeros(1, 3, dtype=torch.bool)
    kwargs = {"form": "reference", "task": "pose", "anchors": anchors}
    assert vector_loss(pred, target, hidden, **kwargs, last_is_centre=True).item() == pytest.approx(2 / 3, abs=1e-6)
    assert vector_loss(pred, target, hidden, **kwargs).item() == pytest.approx(1.0, abs=1e-6)
    # Visible keypoints count: the first one visible -> (2 + 2) / 6 pairs overlap.
    some = torch.tensor([[True, False, False]])
    assert vector_loss(pred, target, some, **kwargs, last_is_centre=True).item() == pytest.approx(1 / 3, abs=1e-6)
    # Paper form: the centre is a landmark of the mean over visible ones -- exact -> 0 even if flagged hidden.
    assert vector_loss(pred * 0.5, target, hidden, form="paper", last_is_centre=True).item() == pytest.approx(
        0.5, abs=1e-6)


def test_polygon_penalty_box_leaves_out_the_last_vector():
    # 36 contour points + centre. The contour is exact, the centre vector wildly wrong (1000 px to the
    # right): group 0 (vectors 0, 9, 18, 27, 36) loses overlap, but the penalty box -- the box of the
    # predicted contour, the *last* vector left out -- equals the target contour's box (taken from the
    # targets when gt_boxes is None, as the reference's polygon box), so the penalty stays 0.
    angles = torch.arange(36) * (2 * math.pi / 36)
    contour = torch.stack([50 + 30 * torch.cos(angles), 40 + 20 * torch.sin(angles)], -1)
    points = torch.cat([contour, torch.tensor([[50.0, 40.0]])])[None]
    anchors = torch.tensor([[48.0, 43.0]])
    target = encode_offsets(points, anchors)
    pred = soften_targets(target, 0.2).clone()
    pred[0, 36] = torch.tensor([0.0, 0.0, 0.0, 1000.0])
    kwargs = {"form": "reference", "task": "segm", "anchors": anchors, "last_is_centre": True}
    overlap_only = vector_loss(pred, target, **kwargs, reference_penalty=False)
    assert overlap_only.item() > 0.05
    assert vector_loss(pred, target, **kwargs).item() == pytest.approx(overlap_only.item(), abs=1e-6)
    # An explicit box elsewhere does add a penalty (so the check above is not vacuous).
    shifted = torch.tensor([[30.0, 20.0, 90.0, 60.0]])
    assert vector_loss(pred, target, **kwargs, gt_boxes=shifted).item() > overlap_only.item() + 1e-3


@pytest.mark.parametrize("task,num_vectors", [("bbox", 5), ("segm", 37), ("pose", 18)])
def test_reference_form_is_scale_invariant(task, num_vectors):
    # The reference divides pred, targets, anchors and boxes by 4 x stride before its loss
    # (lsnet_head.py:1076-1084); every term is a ratio of lengths, so only eps notices: we may feed pixels.
    target, anchors = _random_targets(4, num_vectors, dtype=torch.float64)
    pred = torch.rand(4, num_vectors, 4, dtype=torch.float64) * 30 + 0.5
    gt_boxes = torch.cat([anchors - 20, anchors + 25], dim=1)
    visible = torch.rand(4, num_vectors) > 0.3
    kwargs = {"form": "reference", "task": task, "last_is_centre": True, "reduction": "none"}
    full = vector_loss(pred, target, visible, anchors=anchors, gt_boxes=gt_boxes, **kwargs)
    scaled = vector_loss(pred / 32, target / 32, visible, anchors=anchors / 32, gt_boxes=gt_boxes / 32, **kwargs)
    torch.testing.assert_close(scaled, full, atol=1e-5, rtol=0)
