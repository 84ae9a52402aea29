"""Losses of LSNet: the cross-IOU loss (paper Eq. 1), the reference code's variant, and the
baselines of the paper's Table 2.

Vectors are cross-coordinate offsets (paper §3.3) in the layout of :mod:`lsnet.coding`: per landmark
four non-negative magnitudes ``[top, bottom, left, right]`` = ``[(dy)^-, (dy)^+, (dx)^-, (dx)^+]``.
Predictions are four independent non-negative numbers per landmark (the head ends in ReLU/exp);
targets are given *unsoftened* (exactly one of each ``±`` pair non-zero) and softened here with
:func:`lsnet.coding.soften_targets` (Appendix A).

Entry points:

- :func:`vector_loss` — what the model calls; ``form="paper"`` (default, Eq. 1) or
  ``form="reference"`` (the authors' code, docs/design.md §2).
- :func:`cross_iou_loss` — paper Eq. (1) with visibility masking, weights and reductions.
- :func:`cross_iou_loss_reference` — the authors' form: all vectors (with the centre, last) pooled
  into one overlap, CIoU-style penalty for boxes and polygons, 9-group polygon overlap, per-axis
  keypoint overlap. Matches the authors' code on ``tests/data/cross_iou_reference.json`` to 1e-5;
  docs/cross_iou_loss.md lists each fact with the reference's file:line.
- Table 2 baselines: :func:`giou_box_loss`, :func:`smooth_l1_box_loss`, :func:`smooth_l1_point_loss`;
  classification: :func:`focal_loss` (torchvision's sigmoid focal loss / number of positives).

Every loss is safe for zero-length vectors, degenerate boxes and empty inputs: no NaN/Inf in the
value or its gradient, and an empty input gives ``0`` that still backpropagates (``pred.sum() * 0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from lsnet.coding import decode_offsets, soften_targets

REDUCTIONS = ("mean", "sum", "none")
FORMS = ("paper", "reference")
#: Our task names -> the reference code's loss types.
REFERENCE_TASKS = {
    "bbox": "bbox",
    "segm": "polygon",
    "polygon": "polygon",
    "pose": "keypoint",
    "keypoint": "keypoint",
}


@dataclass
class VectorLossConfig:
    """Which cross-IOU loss the model uses for its vector branches.

    ``form``: ``"paper"`` = Eq. (1), mean of per-landmark cIOUs; ``"reference"`` = the authors' code
    (docs/design.md §2). ``alpha``: softening factor of the targets (Appendix A, paper uses 0.2).
    ``last_is_centre``: (reference form only) the last vector is the box centre, as in the
    authors' head; it is then left out of the box implied by a polygon.
    """

    form: str = "paper"
    alpha: float = 0.2
    last_is_centre: bool = False

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"VectorLossConfig.form must be one of {FORMS}, got {self.form!r}")
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"VectorLossConfig.alpha must be in [0, 1), got {self.alpha}")


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------
def _safe_ratio(numerator: Tensor, denominator: Tensor, value_if_zero: float) -> Tensor:
    """``numerator / denominator`` where ``denominator > 0``, else ``value_if_zero``.

    The denominator is replaced by 1 where it is 0 *before* dividing, so neither the value nor the
    gradient of the unused branch is NaN (``torch.where`` alone would still backpropagate 0 * NaN).
    """
    positive = denominator > 0
    ratio = numerator / torch.where(positive, denominator, torch.ones_like(denominator))
    return torch.where(positive, ratio, torch.full_like(ratio, value_if_zero))


def _reduce(
    per_object: Tensor, weight: Tensor | None, reduction: str, avg_factor, num_objects: Tensor | int
) -> Tensor:
    """Weight and reduce per-object losses, mmdetection-style.

    ``mean`` divides the weighted sum by ``avg_factor`` when given (e.g. the number of positives
    averaged over workers), else by ``num_objects`` (the objects that can carry a loss).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weight is not None:
        if weight.shape != per_object.shape:
            raise ValueError(
                f"weight must have the per-object shape {tuple(per_object.shape)}, got {tuple(weight.shape)}"
            )
        per_object = per_object * weight
    if reduction == "none":
        if avg_factor is not None:
            raise ValueError("avg_factor only makes sense with reduction='mean'")
        return per_object
    total = per_object.sum()
    if reduction == "sum":
        if avg_factor is not None:
            raise ValueError("avg_factor only makes sense with reduction='mean'")
        return total
    if avg_factor is None:
        avg_factor = num_objects
    # A zero avg_factor only happens without positives, where the sum is 0 anyway: clamp to stay finite.
    return total / torch.as_tensor(avg_factor, dtype=total.dtype, device=total.device).clamp(min=1e-6)


def _check_vectors(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape or pred.shape[-1:] != (4,):
        raise ValueError(
            f"pred and target must both be (..., N, 4) cross-coordinate vectors, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )


# ----------------------------------------------------------------------------------------------
# Paper form, Eq. (1)
# ----------------------------------------------------------------------------------------------
def _sum_components(x: Tensor) -> Tensor:
    """Sum over the last (size-4) axis. On CPU a mat-vec with ones is ~3x faster than ``sum(-1)``,
    whose reduction over a tiny inner axis is not vectorised; elsewhere ``sum(-1)`` is fine."""
    return x @ x.new_ones(4) if x.device.type == "cpu" else x.sum(-1)


def cross_iou_autograd(pred: Tensor, target: Tensor) -> Tensor:
    """cIOU of cross-coordinate vectors (paper §3.3): ``‖min(q, q*)‖₁ / ‖max(q, q*)‖₁``, written
    with plain tensor ops (the definition; differentiable in both arguments). Two zero-length
    vectors coincide, so their cIOU is 1.

    Args:
        pred, target: (..., K) non-negative components: K = 4 for one vector; the reference form
            pools several vectors into one overlap with K = 4V.
    Returns:
        (...) cIOU in [0, 1].
    """
    overlap = torch.minimum(pred, target).sum(-1)
    union = torch.maximum(pred, target).sum(-1)
    return _safe_ratio(overlap, union, 1.0)


class _CrossIoU(torch.autograd.Function):
    """Fast path of :func:`cross_iou` for a prediction against a constant target.

    Forward as :func:`cross_iou_autograd`; backward written by hand, which saves most of the
    element-wise passes autograd makes through ``minimum``/``maximum``. With ``I = Σ min(p, q)``,
    ``U = Σ max(p, q)`` and ``c = I / U``, for component ``i``:

        p_i < q_i:  dI/dp_i = 1, dU/dp_i = 0   ->  dc/dp_i = 1 / U
        p_i ≥ q_i:  dI/dp_i = 0, dU/dp_i = 1   ->  dc/dp_i = −I / U²

    (a tie counts as ``p_i ≥ q_i``: the one-sided derivative for increasing ``p_i``). Where
    ``U = 0`` (both vectors zero, c := 1) the gradient is 0.
    """

    @staticmethod
    def forward(ctx, pred: Tensor, target: Tensor) -> Tensor:
        overlap = _sum_components(torch.minimum(pred, target))
        union = _sum_components(torch.maximum(pred, target))
        nonzero = union > 0
        union = torch.where(nonzero, union, torch.ones_like(union))
        ctx.save_for_backward(pred < target, overlap, union, nonzero)
        return torch.where(nonzero, overlap / union, torch.ones_like(union))

    @staticmethod
    def backward(ctx, grad_ciou: Tensor) -> tuple[Tensor, None]:
        below, overlap, union, nonzero = ctx.saved_tensors
        grad_below = torch.where(nonzero, grad_ciou / union, torch.zeros_like(union))  # dc/dp_i · grad
        grad_above = -grad_below * overlap / union
        return torch.where(below, grad_below.unsqueeze(-1), grad_above.unsqueeze(-1)), None


def cross_iou(pred: Tensor, target: Tensor) -> Tensor:
    """cIOU of cross-coordinate vectors (paper §3.3): ``‖min(q, q*)‖₁ / ‖max(q, q*)‖₁``.

    Uses the hand-derived backward of :class:`_CrossIoU` when only ``pred`` needs a gradient (the
    training case), else :func:`cross_iou_autograd`. Two zero-length vectors give 1.

    Args:
        pred, target: (..., 4) non-negative components.
    Returns:
        (...) cIOU in [0, 1].
    """
    if target.requires_grad or torch.is_autocast_enabled(pred.device.type):
        return cross_iou_autograd(pred, target)
    return _CrossIoU.apply(pred, target)


def cross_iou_loss(
    pred: Tensor,
    target: Tensor,
    visible: Tensor | None = None,
    weight: Tensor | None = None,
    alpha: float = 0.2,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """Cross-IOU loss, paper Eq. (1): per object ``1 − (1/N) Σ_n cIOU(q_n, soften(q*_n))``.

    Args:
        pred: (..., N, 4) predicted non-negative ``[top, bottom, left, right]`` per landmark.
        target: (..., N, 4) **unsoftened** target vectors (from :func:`lsnet.coding.encode_offsets`);
            softened here with ``alpha`` (Appendix A).
        visible: (..., N) bool or None. Only visible landmarks count (keypoints with v > 0); the
            mean runs over the visible ones. An object with no visible landmark has loss 0 and is
            not counted by ``reduction="mean"``.
        weight: (...) per-object weight or None.
        alpha: softening factor; 0 disables softening.
        reduction: ``"mean"`` (weighted sum / ``avg_factor``, or / number of objects with a
            visible landmark), ``"sum"`` or ``"none"`` (returns the (...) per-object losses).
        avg_factor: normaliser for ``"mean"`` (e.g. number of positives).
    Returns:
        scalar, or (...) for ``reduction="none"``.

    Note: a landmark exactly on the anchor has a zero target even after softening; any non-zero
    prediction then has cIOU 0 and no gradient (inherent to Eq. 1, as in the reference code). Only
    ``pred`` receives a gradient through the fast path; a target that requires grad falls back to
    plain autograd.
    """
    _check_vectors(pred, target)
    ciou = cross_iou(pred, soften_targets(target, alpha))  # (..., N)
    if visible is None:
        per_object = 1.0 - ciou.mean(-1)
        num_objects = per_object.numel()
    else:
        if visible.shape != ciou.shape:
            raise ValueError(f"visible must be (..., N) = {tuple(ciou.shape)}, got {tuple(visible.shape)}")
        vis = visible.to(ciou.dtype)
        num_visible = vis.sum(-1)
        # Σ_visible (1 − cIOU) / #visible = 1 − mean cIOU over visible; 0/1 = 0 when none is visible.
        per_object = ((1.0 - ciou) * vis).sum(-1) / num_visible.clamp(min=1.0)
        num_objects = (num_visible > 0).sum()
    return _reduce(per_object, weight, reduction, avg_factor, num_objects)


# ----------------------------------------------------------------------------------------------
# Reference form (authors' code, docs/design.md §2)
# ----------------------------------------------------------------------------------------------
def _decode_signed(vectors: Tensor) -> Tensor:
    """(..., 4) components -> (..., 2) ``dx, dy``: per axis the larger component with its sign.

    Ties go to the negative side (the reference picks the first of an equal pair); unlike
    :func:`lsnet.coding.decode_offsets` this keeps a gradient path to the winning component.
    """
    top, bottom, left, right = vectors.unbind(-1)
    dy = torch.where(bottom > top, bottom, -top)
    dx = torch.where(right > left, right, -left)
    return torch.stack([dx, dy], dim=-1)


def _aspect_angle(width: Tensor, height: Tensor) -> Tensor:
    """``atan(width / height)`` without dividing: ``atan2(w·sgn(h), |h|)`` (sgn(0) := 1).

    Equal to ``atan(w/h)`` for every ``h ≠ 0``, the right limit ``±π/2`` at ``h = 0``, and 0 with a
    finite gradient at ``w = h = 0`` (where atan2's gradient would be 0/0).
    """
    sign = torch.where(height < 0, -torch.ones_like(height), torch.ones_like(height))
    both_zero = (width == 0) & (height == 0)
    return torch.atan2(width * sign, torch.where(both_zero, torch.ones_like(height), height.abs()))


def _reference_penalty(pred_boxes: Tensor, gt_boxes: Tensor, overlaps: Tensor, eps: float) -> Tensor:
    """CIoU-style penalty of the reference code (docs/design.md §2).

    ``ρ²/c² + v² / (1 − overlap + v)`` with ``ρ`` the distance of the box centres, ``c`` the
    diagonal of the enclosing box and ``v = 4/π² (atan(w*/h*) − atan(w/h))²``. Note the reference
    uses ``v²`` in the second term where CIoU (Zheng et al.) has ``α·v`` with ``α = v / (1 − IoU + v)``;
    we keep the reference's formula. ``eps`` is added to the heights and to ``c²`` as it does.

    Args:
        pred_boxes, gt_boxes: (n, 4) ``x1, y1, x2, y2``; predicted boxes may be inverted.
        overlaps: (n,) cross-IOU of the object.
    Returns:
        (n,) penalty ≥ 0.
    """
    enclose_wh = (
        torch.maximum(pred_boxes[:, 2:], gt_boxes[:, 2:]) - torch.minimum(pred_boxes[:, :2], gt_boxes[:, :2])
    ).clamp(min=0)
    diagonal2 = enclose_wh.pow(2).sum(-1) + eps
    # ((x1+x2)/2 − (x1*+x2*)/2)² + same in y.
    centre_distance2 = ((gt_boxes[:, :2] + gt_boxes[:, 2:]) - (pred_boxes[:, :2] + pred_boxes[:, 2:])).pow(
        2
    ).sum(-1) / 4
    pred_w, pred_h = pred_boxes[:, 2] - pred_boxes[:, 0], pred_boxes[:, 3] - pred_boxes[:, 1] + eps
    gt_w, gt_h = gt_boxes[:, 2] - gt_boxes[:, 0], gt_boxes[:, 3] - gt_boxes[:, 1] + eps
    v = (4 / math.pi**2) * (_aspect_angle(gt_w, gt_h) - _aspect_angle(pred_w, pred_h)).pow(2)
    # 1 − overlap + v is 0 only at overlap = 1 and v = 0, where v²/(…) tends to 0 (it is ≤ v).
    return centre_distance2 / diagonal2 + _safe_ratio(v.pow(2), 1.0 - overlaps + v, 0.0)


def cross_iou_loss_reference(
    pred: Tensor,
    target_unsoftened: Tensor,
    target_pos_mask: Tensor,
    bbox_gt_xyxy: Tensor | None,
    task: str,
    alpha: float = 0.2,
    *,
    anchors: Tensor | None = None,
    visible: Tensor | None = None,
    last_is_centre: bool = True,
    group_stride: int = 9,
    penalty: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """The authors' form of the cross-IOU loss (unweighted, per object), docs/design.md §2.

    Differences from Eq. (1), by task (reference names, ours accepted too: segm, pose):

    - ``"bbox"``: one cIOU over all ``4V`` components of the object (not a per-vector mean), plus
      the CIoU-style penalty (:func:`_reference_penalty`) between ``bbox_gt_xyxy`` and the box of
      the decoded extreme points (vectors 0..3 = top, left, bottom, right).
    - ``"polygon"``: the mean of ``group_stride`` cIOUs, group ``i`` pooling the components of
      vectors ``i, i + stride, i + 2·stride, …`` (for 36 points: 4 points 90° apart; with the
      centre as 37th vector group 0 also holds it), plus the penalty against the box of the
      decoded polygon (without the centre vector when ``last_is_centre``).
    - ``"keypoint"``: a cIOU per axis (pairs ``[y-, y+]`` and ``[x-, x+]``, max clamped to ``eps``),
      zeroed for invisible vectors, summed and divided by ``2V`` (invisible ones still count in the
      divisor, as in the reference); no penalty.

    Args:
        pred: (n, 4V) predicted components, vector-major ``[top, bottom, left, right]``.
        target_unsoftened: (n, 4V) target components, one of each ``±`` pair non-zero.
        target_pos_mask: (n, 4V) bool/0-1, the component carrying the true direction in each pair;
            the other one is softened to ``alpha ×`` its partner.
        bbox_gt_xyxy: (n, 4) box for the penalty (unused for keypoints).
        task: ``"bbox"`` | ``"polygon"`` | ``"keypoint"`` (or ``"segm"`` | ``"pose"``).
        anchors: (n, 2) anchor ``x, y`` (needed to place the decoded box, unused for keypoints).
        visible: (n, V) bool, keypoint task only (None = all visible).
        group_stride: polygon task: number of groups (9 in the reference).
        penalty: add the CIoU-style penalty (bbox and polygon). ``False`` isolates the reference's
            overlap term, so an ablation can compare the two differences from Eq. (1) separately;
            anchors and ``bbox_gt_xyxy`` are then not needed.
    Returns:
        (n,) loss per object.
    """
    if task not in REFERENCE_TASKS:
        raise ValueError(f"task must be one of {sorted(REFERENCE_TASKS)}, got {task!r}")
    task = REFERENCE_TASKS[task]
    n = pred.shape[0]
    if (
        pred.dim() != 2
        or pred.shape[1] % 4
        or target_unsoftened.shape != pred.shape
        or target_pos_mask.shape != pred.shape
    ):
        raise ValueError(
            "pred, target_unsoftened and target_pos_mask must all be (n, 4V), got "
            f"{tuple(pred.shape)}, {tuple(target_unsoftened.shape)}, {tuple(target_pos_mask.shape)}"
        )
    num_vectors = pred.shape[1] // 4
    pred_v = pred.reshape(n, num_vectors, 4)
    # Softening by the mask: in each ± pair the non-positive component becomes alpha × its partner.
    pairs = target_unsoftened.reshape(n, 2 * num_vectors, 2)
    positive = target_pos_mask.reshape(n, 2 * num_vectors, 2).bool()
    target_v = torch.where(positive, pairs, alpha * pairs.flip(-1)).reshape(n, num_vectors, 4)

    if task == "keypoint":
        pred_pairs, target_pairs = (
            pred_v.reshape(n, 2 * num_vectors, 2),
            target_v.reshape(n, 2 * num_vectors, 2),
        )
        overlap = torch.minimum(pred_pairs, target_pairs).sum(-1)
        union = torch.maximum(pred_pairs, target_pairs).clamp(min=eps).sum(-1)
        per_axis = overlap / union  # (n, 2V)
        if visible is not None:
            per_axis = per_axis * visible.to(per_axis.dtype).repeat_interleave(2, dim=1)
        return 1.0 - per_axis.sum(-1) / per_axis.shape[1]

    if task == "bbox":
        if num_vectors < 4:
            raise ValueError(f"bbox task needs the 4 extreme-point vectors, got V={num_vectors}")
        overlaps = cross_iou_autograd(pred, target_v.flatten(1))
    else:
        groups = [
            cross_iou_autograd(pred_v[:, start::group_stride].flatten(1), target_v[:, start::group_stride].flatten(1))
            for start in range(group_stride)
        ]
        overlaps = torch.stack(groups, dim=-1).mean(-1)
    if not penalty:
        return 1.0 - overlaps

    if anchors is None or bbox_gt_xyxy is None:
        raise ValueError(f"task {task!r} needs anchors (n, 2) and bbox_gt_xyxy (n, 4) for its penalty term")
    points = anchors[:, None, :] + _decode_signed(pred_v)  # (n, V, 2) x, y
    if task == "bbox":
        # Extreme points in (top, left, bottom, right) order give x1 = left.x, y1 = top.y, ...
        pred_boxes = torch.stack([points[:, 1, 0], points[:, 0, 1], points[:, 3, 0], points[:, 2, 1]], dim=-1)
    else:
        contour = points[:, :-1] if last_is_centre else points
        pred_boxes = torch.cat([contour.amin(dim=1), contour.amax(dim=1)], dim=-1)
    return 1.0 - overlaps + _reference_penalty(pred_boxes, bbox_gt_xyxy, overlaps, eps)


# ----------------------------------------------------------------------------------------------
# The model's entry point
# ----------------------------------------------------------------------------------------------
def vector_loss(
    pred: Tensor,
    target: Tensor,
    visible: Tensor | None = None,
    weight: Tensor | None = None,
    *,
    form: str = "paper",
    alpha: float = 0.2,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
    anchors: Tensor | None = None,
    gt_boxes: Tensor | None = None,
    task: str = "bbox",
    last_is_centre: bool = False,
    reference_penalty: bool = True,
) -> Tensor:
    """Cross-IOU loss of predicted vectors, in the paper's or the reference code's form.

    Args:
        pred: (P, V, 4) predicted non-negative ``[top, bottom, left, right]`` per vector.
        target: (P, V, 4) unsoftened targets (:func:`lsnet.coding.encode_offsets`).
        visible: (P, V) bool or None (keypoints).
        weight: (P,) per-object weight or None.
        form: ``"paper"`` -> :func:`cross_iou_loss`; ``"reference"`` ->
            :func:`cross_iou_loss_reference` (needs ``anchors`` (P, 2), and ``gt_boxes`` (P, 4)
            for bbox; for segm ``gt_boxes=None`` takes the box of the target contour, as the
            reference does, ``lsnet_head.py:1741-1754``).
        alpha: softening factor (Appendix A).
        reduction, avg_factor: as in :func:`cross_iou_loss`.
        task: ``"bbox"`` | ``"segm"`` | ``"pose"``; only the reference form depends on it.
        last_is_centre: the last vector is the object's centre (``model.center_vector``, the
            authors' head layout, :func:`lsnet.targets.with_centre_landmark`): it is pooled into
            the reference form's overlap (group 0 of the polygon form), left out of its penalty box,
            and always counts, whatever ``visible`` says for it (``cross_iou_loss.py:92-94``); the
            paper form averages it with the N landmarks. bbox then needs V = 5.
        reference_penalty: reference form: add the CIoU-style penalty (``penalty`` of
            :func:`cross_iou_loss_reference`); ``False`` keeps only its overlap term.
    Returns:
        scalar, or (P,) for ``reduction="none"``.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    _check_vectors(pred, target)
    if last_is_centre and visible is not None:
        # The centre has no visibility: it carries a loss for every positive (the reference masks
        # only the keypoint pairs, cross_iou_loss.py:92-94).
        visible = torch.cat([visible[..., :-1], torch.ones_like(visible[..., -1:])], dim=-1)
    if form == "paper":
        return cross_iou_loss(
            pred, target, visible, weight, alpha=alpha, reduction=reduction, avg_factor=avg_factor
        )
    if pred.dim() != 3:
        raise ValueError(f"the reference form takes (P, V, 4) vectors, got {tuple(pred.shape)}")
    num = pred.shape[0]
    if task == "bbox" and last_is_centre and pred.shape[1] != 5:
        raise ValueError(f"the reference bbox form with the centre takes V = 4 extreme points + 1, got V={pred.shape[1]}")
    if REFERENCE_TASKS.get(task) == "polygon" and gt_boxes is None and anchors is not None and reference_penalty:
        # The reference's polygon penalty box is the box of the target polygon (lsnet_head.py:1741-1754).
        contour = decode_offsets(target[:, :-1] if last_is_centre else target, anchors)
        gt_boxes = torch.cat([contour.amin(dim=1), contour.amax(dim=1)], dim=-1)
    # One component of each ± pair carries the direction; ties (both 0) soften to 0 either way.
    pairs = target.reshape(num, pred.shape[1] * 2, 2)
    pos_mask = torch.stack([pairs[..., 0] >= pairs[..., 1], pairs[..., 0] < pairs[..., 1]], dim=-1)
    per_object = cross_iou_loss_reference(
        pred.flatten(1),
        target.flatten(1),
        pos_mask.flatten(1),
        gt_boxes,
        task,
        alpha,
        anchors=anchors,
        visible=visible,
        last_is_centre=last_is_centre,
        penalty=reference_penalty,
    )
    return _reduce(per_object, weight, reduction, avg_factor, num)


# ----------------------------------------------------------------------------------------------
# Baselines (paper Table 2) and classification
# ----------------------------------------------------------------------------------------------
def giou_box_loss(
    pred_boxes: Tensor,
    gt_boxes: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """GIoU loss on rectangle boxes (Table 2 'GIoU, rectangle'), torchvision's implementation.

    Args:
        pred_boxes, gt_boxes: (P, 4) ``x1, y1, x2, y2``.
        weight: (P,) or None; reduction/avg_factor as in :func:`cross_iou_loss`.
    """
    per_object = generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="none")
    return _reduce(per_object, weight, reduction, avg_factor, per_object.numel())


def _scaled_smooth_l1(pred: Tensor, target: Tensor, scale: Tensor | float, beta: float) -> Tensor:
    """Element-wise smooth-ℓ1 of ``(pred − target) / scale``; ``scale`` broadcasts from the left."""
    scale = torch.as_tensor(scale, dtype=pred.dtype, device=pred.device)
    while scale.dim() and scale.dim() < pred.dim():
        scale = scale.unsqueeze(-1)
    return F.smooth_l1_loss(pred / scale, target / scale, reduction="none", beta=beta)


def smooth_l1_box_loss(
    pred_boxes: Tensor,
    gt_boxes: Tensor,
    scale: Tensor | float = 1.0,
    beta: float = 1.0 / 9,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """Smooth-ℓ1 on rectangle boxes (Table 2 'smooth-ℓ1, rectangle').

    Coordinates are divided by ``scale`` before the loss so that it does not grow with object size
    or level: pass ``scale = 4 × stride`` of each positive's FPN level (the normaliser of RepPoints,
    on which LSNet builds). Per object the loss is the mean over the 4 coordinates.

    Args:
        pred_boxes, gt_boxes: (P, 4) ``x1, y1, x2, y2``.
        scale: float or (P,) normaliser. beta: smooth-ℓ1 threshold (in normalised units).
    """
    per_object = _scaled_smooth_l1(pred_boxes, gt_boxes, scale, beta).mean(-1)
    return _reduce(per_object, weight, reduction, avg_factor, per_object.numel())


def smooth_l1_point_loss(
    pred_points: Tensor,
    gt_points: Tensor,
    scale: Tensor | float = 1.0,
    beta: float = 1.0 / 9,
    visible: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    avg_factor: float | Tensor | None = None,
) -> Tensor:
    """Smooth-ℓ1 on landmark points (Table 2 'smooth-ℓ1, extreme points'), normalised like
    :func:`smooth_l1_box_loss` (``scale = 4 × stride``). Per object: mean over the coordinates of
    the visible points (0 and not counted by ``"mean"`` when none is visible).

    Args:
        pred_points, gt_points: (P, N, 2) ``x, y``. visible: (P, N) bool or None.
    """
    per_coord = _scaled_smooth_l1(pred_points, gt_points, scale, beta)  # (P, N, 2)
    if visible is None:
        per_object = per_coord.mean(dim=(-2, -1))
        return _reduce(per_object, weight, reduction, avg_factor, per_object.numel())
    vis = visible.to(per_coord.dtype)
    num_visible = vis.sum(-1)
    per_object = (per_coord.sum(-1) * vis).sum(-1) / (2 * num_visible).clamp(min=1.0)
    return _reduce(per_object, weight, reduction, avg_factor, (num_visible > 0).sum())


def focal_loss(
    logits: Tensor,
    targets: Tensor,
    num_positives: float | Tensor | None = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """Sigmoid focal loss (torchvision) summed and divided by the number of positives (≥ 1).

    Args:
        logits: (P, C) class logits. targets: (P, C) one-hot float (all zero for background).
        num_positives: normaliser; default = number of rows with a positive class.
    """
    total = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="sum")
    if num_positives is None:
        num_positives = (targets > 0).any(-1).sum()
    return total / torch.as_tensor(num_positives, dtype=total.dtype, device=total.device).clamp(min=1.0)
