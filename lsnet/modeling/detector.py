"""LSNet = ResNet backbone + FPN P3–P7 + the two-stage landmark head, and its training loss.

``LSNet.forward(images, targets)`` returns the losses; ``LSNet.forward(images)`` the detections
(:mod:`lsnet.modeling.inference`). Loss (paper §3.2)::

    L = L_cls + beta · L_vec1 + gamma · L_vec2          (beta = 1, gamma = 2)

- ``L_cls``: sigmoid focal loss (gamma 2, alpha 0.25) of the stage-2 class logits, positives from
  ATSS (:func:`lsnet.assigners.assign_atss`; IoUs with the boxes of the stage-1 landmarks, as the
  reference, with ``loss.atss_on == "init"`` (default), or with fixed anchor squares), summed over
  all non-ignored points and divided by the number of ATSS positives.
- ``L_vec1``: cross-IOU loss (:func:`lsnet.losses.vector_loss`) of the stage-1 vectors at the
  centroid-assigned positives (one per object, :func:`lsnet.assigners.assign_centroid`), divided by
  their number.
- ``L_vec2``: cross-IOU loss of the refined vectors at the ATSS positives, divided by their number.
- with CPV (``cfg.cpv``), ``+ 0.25 · L_heatmap + 1 · L_offset`` of the corner branch
  (:func:`lsnet.modeling.cpv.cpv_losses`; weights ``loss.cpv_heatmap_weight`` / ``cpv_offset_weight``),
  and on the reference head ``+ 0.1 · L_foreground`` (:func:`lsnet.modeling.cpv.foreground_loss`,
  ``loss.cpv_foreground_weight``).

Targets are the vectors from each positive's anchor point to its object's landmarks
(:func:`lsnet.coding.encode_offsets`; softened inside the loss), with the landmarks' visibility
(keypoints with v = 0 carry no loss). The numbers of positives are averaged over workers when
``torch.distributed`` is initialised (every worker then divides by the same number, so summing the
workers' gradients is the gradient of the global mean) and clamped to ≥ 1, which also keeps batches
without any object finite.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from lsnet.assigners import _pairwise_iou_aligned, assign_atss, assign_centroid
from lsnet.coding import decode_offsets, encode_offsets
from lsnet.losses import giou_box_loss, smooth_l1_box_loss, smooth_l1_point_loss, vector_loss
from lsnet.modeling.backbone import ResNetBackbone
from lsnet.modeling.config import ModelConfig
from lsnet.modeling.cpv import corner_targets, cpv_losses, foreground_loss, foreground_targets
from lsnet.modeling.fpn import FPN
from lsnet.modeling.head import HeadOutputs, LSNetHead, default_dcn_point_indices
from lsnet.modeling.inference import output_vectors, postprocess, predict_with_tta
from lsnet.modeling.reference_head import ReferenceHead, head_outputs, task_branches
from lsnet.structures import Detections, LandmarkTargets
from lsnet.targets import with_centre_landmark

#: LSNetHead members that only produce the refined vectors (frozen in stage-1-only models).
REFINE_BRANCH = ("anchor_conv_reg", "landmark_weight_reg", "norm_reg", "refine_out")


def mean_over_workers(value: float, device: torch.device) -> Tensor:
    """``value`` averaged over the workers of the default process group (if any), clamped to ≥ 1."""
    t = torch.tensor(float(value), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return t.clamp(min=1.0)


def _gather_positives(labels: Tensor, target: LandmarkTargets, anchors: Tensor):
    """Indices of the positive points and the encoded targets of their objects."""
    pos = torch.nonzero(labels >= 0).squeeze(1)
    gt = labels[pos]
    vectors = encode_offsets(target.points[gt], anchors[pos])  # (n, N, 4) unsoftened
    return pos, gt, vectors


def with_box_landmarks(t: LandmarkTargets) -> LandmarkTargets:
    """Pose targets with the person box appended as 4 always-visible landmarks: the midpoints of its
    top, left, bottom and right edges (the extreme points of a box), for the pose box branch."""
    x1, y1, x2, y2 = t.boxes.unbind(1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    box_points = torch.stack([torch.stack([cx, y1], 1), torch.stack([x1, cy], 1),
                              torch.stack([cx, y2], 1), torch.stack([x2, cy], 1)], dim=1)
    visible = torch.ones(t.visible.shape[0], 4, dtype=torch.bool, device=t.visible.device)
    return LandmarkTargets(t.boxes, t.labels, torch.cat([t.points, box_points.to(t.points.dtype)], 1),
                           torch.cat([t.visible, visible], 1), t.iscrowd)


def box_style_targets(t: LandmarkTargets) -> LandmarkTargets:
    """The rectangle as 4 landmarks (Table 2 'rectangle'): the midpoints of the top, left, bottom and
    right edges of each box — the order of the extreme points, and the same box when decoded."""
    x1, y1, x2, y2 = t.boxes.unbind(-1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    points = torch.stack([torch.stack([cx, y1], -1), torch.stack([x1, cy], -1),
                          torch.stack([cx, y2], -1), torch.stack([x2, cy], -1)], dim=1)
    return LandmarkTargets(t.boxes, t.labels, points, torch.ones_like(t.visible), t.iscrowd)


def regression_targets(t: LandmarkTargets, cfg: ModelConfig) -> LandmarkTargets:
    """The landmarks the head's vectors point to, in its output order (:class:`HeadOutputs`): the task's
    N (the rectangle's 4 edge midpoints with ``target_style: box``), then the centre with
    ``center_vector`` (:func:`lsnet.targets.with_centre_landmark`), then for the pose box branch its 4
    box points and, with ``center_vector``, the box centre — the reference's two branches each end with
    their centre (``lsnet_head.py`` pose_bbox head)."""
    if cfg.target_style == "box":
        t = box_style_targets(t)
    if cfg.center_vector:
        t = with_centre_landmark(t, cfg.task)
    if cfg.num_box_points:
        t = with_box_landmarks(t)
        if cfg.center_vector:
            t = with_centre_landmark(t, "bbox")  # the person box's centre
    return t


def main_vectors(cfg: ModelConfig) -> int:
    """How many of the head's vectors belong to the task's branch: N (+1 for the centre)."""
    return cfg.num_points + int(cfg.center_vector)


def box_landmark_vectors(vectors: Tensor, cfg: ModelConfig) -> Tensor:
    """(P, V, 4) head vectors -> (P, K, 4) those whose landmarks span the output box: the pose box
    branch's 4 points, else the task's N landmarks (the decoded vectors of :func:`output_vectors`,
    which knows where the centres sit)."""
    landmarks = output_vectors(vectors, cfg)
    return landmarks[:, -cfg.num_box_points:] if cfg.num_box_points else landmarks


def points_box(points: Tensor) -> Tensor:
    """(P, N, 2) landmarks -> (P, 4) their enclosing box ``x1, y1, x2, y2``."""
    return torch.cat([points.amin(dim=-2), points.amax(dim=-2)], dim=-1)


def stage_loss(kind: str, pred: Tensor, target: Tensor, visible: Tensor, boxes: Tensor, anchors: Tensor,
               strides: Tensor, norm: Tensor, cfg: ModelConfig) -> Tensor:
    """One stage's vector loss (``LossConfig.init_loss`` / ``refine_loss``), summed and divided by ``norm``.

    Args: pred/target (P, N, 4) vectors (target unsoftened), visible (P, N), boxes (P, 4) GT boxes,
    anchors (P, 2), strides (P,) of each positive's level.
    """
    lc = cfg.loss
    if kind == "cross_iou":
        # segm: the reference's penalty box is the target contour's own box (lsnet_head.py:1741-1754)
        return vector_loss(pred, target, visible if cfg.task == "pose" else None, form=lc.vector_loss_form,
                           alpha=lc.alpha, reduction="mean", avg_factor=norm, anchors=anchors,
                           gt_boxes=None if cfg.task == "segm" else boxes, task=cfg.task,
                           last_is_centre=cfg.center_vector)
    if cfg.center_vector:  # the decoded-box baselines measure the landmarks only
        pred, target, visible = pred[:, :-1], target[:, :-1], visible[:, :-1]
    pred_points, gt_points = decode_offsets(pred, anchors), decode_offsets(target, anchors)
    scale = 4.0 * strides  # the RepPoints normaliser: a loss of the same size on every level
    if kind == "smooth_l1_points":
        return smooth_l1_point_loss(pred_points, gt_points, scale, lc.smooth_l1_beta,
                                    visible if cfg.task == "pose" else None, avg_factor=norm)
    pred_box, gt_box = points_box(pred_points), points_box(gt_points)
    if kind == "giou":
        return giou_box_loss(pred_box, gt_box, avg_factor=norm)
    if kind == "smooth_l1_box":
        return smooth_l1_box_loss(pred_box, gt_box, scale, lc.smooth_l1_beta, avg_factor=norm)
    raise ValueError(f"unknown vector loss {kind!r}")


def assign_samples(anchors: Tensor, npl: list[int], strides: list[int], t: LandmarkTargets, cfg: ModelConfig,
                   vec_init: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The (P,) sample labels of one image for stage 1 (:func:`assign_centroid`: one anchor point per
    object) and stage 2 (:func:`assign_atss`), as :func:`compute_losses` uses them (also drawn by
    ``lsnet browse --anchors``). ``vec_init``: the image's (P, N', 4) stage-1 vectors, needed only with
    ``loss.atss_on="init"`` (ATSS on the boxes of the stage-1 landmarks)."""
    lc = cfg.loss
    labels1 = assign_centroid(anchors, npl, strides, t.boxes, t.iscrowd, scale=lc.centroid_scale)
    init_boxes = None
    if lc.atss_on == "init":  # the boxes of the stage-1 landmarks (pose box branch: its own box)
        if vec_init is None:
            raise ValueError("loss.atss_on='init' assigns stage 2 on the stage-1 predictions: pass vec_init")
        landmarks = decode_offsets(box_landmark_vectors(vec_init.detach(), cfg), anchors)
        init_boxes = torch.cat([landmarks.amin(dim=1), landmarks.amax(dim=1)], dim=1)
    labels2 = assign_atss(anchors, npl, strides, t.boxes, t.iscrowd, topk=lc.atss_topk,
                          anchor_scale=lc.atss_anchor_scale, anchor_boxes=init_boxes)
    return labels1, labels2


def compute_losses(out: HeadOutputs, targets: list[LandmarkTargets], cfg: ModelConfig) -> dict[str, Tensor]:
    """The LSNet losses of one batch (see the module docstring).

    Args:
        out: head outputs for B images.
        targets: B targets in the pixel frame of the images.
    Returns:
        ``{"loss_cls", "loss_vec_init", "loss_vec_refine", "loss", "pos_iou"}`` (+ ``loss_box_init``,
        ``loss_box_refine`` with the pose box branch, ``loss_heatmap``, ``loss_offset`` with CPV,
        ``loss_foreground`` with the reference head's CPV); the loss terms are normalised and *unweighted*,
        ``loss`` the weighted total to backpropagate, ``pos_iou`` (no gradient) the mean IoU of the
        output boxes at the ATSS positives with their objects' boxes (Figure 4; 0 without positives).
        Stage-1-only models (``cfg.refine=False``) have ``loss_vec_refine = 0`` and their output boxes
        are the stage-1 ones.
    """
    lc = cfg.loss
    logits = out.cls_logits
    device = logits.device
    b, p, _ = logits.shape
    if len(targets) != b:
        raise ValueError(f"{len(targets)} targets for a batch of {b} images")
    anchors, npl, strides = out.anchors, out.num_points_per_level, out.strides

    cls_targets = torch.zeros_like(logits)
    valid = torch.ones(b, p, dtype=torch.bool, device=device)
    # pred, target, visible, boxes, anchors, count, strides
    stage = {1: ([], [], [], [], [], [], []), 2: ([], [], [], [], [], [], [])}
    level_strides = torch.repeat_interleave(torch.tensor(strides, device=device, dtype=anchors.dtype),
                                            torch.tensor(npl, device=device))
    iou_sum = torch.zeros((), device=device)
    corner = ([], [], []) if out.corner_logits is not None else None  # heat, offset, positive targets
    foreground = ([], []) if out.foreground_logits is not None else None  # target, weight maps
    for i, t in enumerate(targets):
        t = t.to(device)
        if foreground is not None:  # on P3's grid = the padded batch / 8
            keep = ~t.iscrowd
            for bucket, value in zip(foreground, foreground_targets(out.level_sizes[0], t.boxes[keep],
                                                                    t.labels[keep], logits.shape[2], strides[0])):
                bucket.append(value)
        if corner is not None:
            for bucket, value in zip(corner, corner_targets(out.level_sizes, strides, t.boxes[~t.iscrowd],
                                                            lc.cpv_gaussian_iou)):
                bucket.append(value)
        t = regression_targets(t, cfg)
        if t.num_points != out.vec_init.shape[2]:
            raise ValueError(f"targets of image {i} have {t.num_points} landmarks, the model predicts "
                             f"{out.vec_init.shape[2]}")
        labels1, labels2 = assign_samples(anchors, npl, strides, t, cfg, out.vec_init[i])
        valid[i] = labels2 != -2
        for k, labels, pred in ((1, labels1, out.vec_init[i]), (2, labels2, out.vec_refine[i])):
            pos, gt, vectors = _gather_positives(labels, t, anchors)
            bucket = stage[k]
            bucket[0].append(pred[pos])
            bucket[1].append(vectors)
            bucket[2].append(t.visible[gt])
            bucket[3].append(t.boxes[gt])
            bucket[4].append(anchors[pos])
            bucket[5].append(pos.numel())
            bucket[6].append(level_strides[pos])
            if k == 2 and pos.numel():
                cls_targets[i, pos, t.labels[gt]] = 1.0
                with torch.no_grad():
                    # pose box branch: the output box is that of the box vectors; centres excluded
                    output = box_landmark_vectors((out.vec_refine if cfg.refine else out.vec_init)[i, pos], cfg)
                    iou_sum = iou_sum + _pairwise_iou_aligned(
                        points_box(decode_offsets(output.float(), anchors[pos])), t.boxes[gt]).sum()

    losses = {}
    norm = {k: mean_over_workers(sum(stage[k][5]), device) for k in (1, 2)}
    losses["loss_cls"] = sigmoid_focal_loss(logits[valid], cls_targets[valid], alpha=lc.focal_alpha,
                                            gamma=lc.focal_gamma, reduction="sum") / norm[2]
    n = main_vectors(cfg)
    for k, name, kind in ((1, "loss_vec_init", lc.init_loss), (2, "loss_vec_refine", lc.refine_loss)):
        if k == 2 and not cfg.refine:
            losses[name] = torch.zeros((), device=device)
            continue
        pred, target, visible, boxes, pos_anchors = (torch.cat(x, dim=0) for x in stage[k][:5])
        losses[name] = stage_loss(kind, pred[:, :n], target[:, :n], visible[:, :n], boxes, pos_anchors,
                                  torch.cat(stage[k][6]), norm[k], cfg)
        if cfg.num_box_points:  # the pose box branch: the box's 4 edge midpoints, as a bbox target
            losses[name.replace("vec", "box")] = vector_loss(
                pred[:, n:], target[:, n:], None, form=lc.vector_loss_form, alpha=lc.alpha, reduction="mean",
                avg_factor=norm[k], anchors=pos_anchors, gt_boxes=boxes, task="bbox", last_is_centre=cfg.center_vector)
    losses["loss"] = losses["loss_cls"] + lc.beta * losses["loss_vec_init"] + lc.gamma * losses["loss_vec_refine"]
    if cfg.num_box_points:
        losses["loss"] = losses["loss"] + lc.box_beta * losses["loss_box_init"] + lc.box_gamma * losses["loss_box_refine"]
    if corner is not None:
        heat_t, offset_t, positive = (torch.cat(x) for x in corner)
        num_pos = torch.stack([mean_over_workers(int(positive[:, c].sum()), device) for c in range(2)])
        losses["loss_heatmap"], losses["loss_offset"] = cpv_losses(
            out.corner_logits.reshape(-1, 2), out.corner_offsets.reshape(-1, 4), heat_t, offset_t, positive, num_pos,
            lc.smooth_l1_beta)
        losses["loss"] = (losses["loss"] + lc.cpv_heatmap_weight * losses["loss_heatmap"]
                          + lc.cpv_offset_weight * losses["loss_offset"])
    if foreground is not None:
        losses["loss_foreground"] = foreground_loss(out.foreground_logits, torch.stack(foreground[0]),
                                                    torch.stack(foreground[1]), lc.focal_alpha, lc.focal_gamma)
        losses["loss"] = losses["loss"] + lc.cpv_foreground_weight * losses["loss_foreground"]
    losses["pos_iou"] = iou_sum / max(sum(stage[2][5]), 1)
    return losses


class LSNet(nn.Module):
    """The LSNet detector for one task (``cfg.task``: bbox / segm / pose)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNetBackbone(cfg.backbone, cfg.pretrained, cfg.frozen_stages, cfg.norm_eval,
                                       cfg.dcn_stages, cfg.dcn_type,
                                       norm_affine_trains=cfg.norm_affine_trains)
        self.fpn = FPN(self.backbone.out_channels, cfg.fpn_channels, cfg.fpn_extra_source, norm=cfg.fpn_norm,
                       relu_before_p7=cfg.fpn_relu_before_p7, norm_groups=cfg.norm_groups)
        self.head = build_head(cfg)
        if not cfg.refine:
            # Stage-1-only (Table 2): the refinement branch gets no loss; frozen, it is left out of
            # the optimiser and of DDP's gradient reduction (no unused-parameter errors).
            for module in refine_modules(self.head):
                module.requires_grad_(False)

    def forward_raw(self, images: Tensor) -> HeadOutputs:
        """Head outputs for a (B, 3, H, W) normalised image batch (stage-1-only models: the refined
        vectors are the stage-1 vectors)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        out = self.head(self.fpn(self.backbone(images)))
        if isinstance(self.head, ReferenceHead):
            out = head_outputs(out, self.head.layout, self.head.strides, self.cfg.center_vector)
        if not self.cfg.refine:
            out = dataclasses.replace(out, vec_refine=out.vec_init)
        return out

    def forward(self, images: Tensor, targets: list[LandmarkTargets] | None = None,
                image_sizes: list[tuple[int, int]] | None = None) -> dict[str, Tensor] | list[Detections]:
        """With ``targets``: the loss dict of :func:`compute_losses`. Without: B × Detections in the
        pixel frame of ``images``, landmarks clipped to each image's valid region ``image_sizes``
        ((h, w) per image, default the whole tensor) -- test-time augmented
        (:func:`lsnet.modeling.inference.predict_with_tta`) when ``cfg.test`` sets ``flip`` or ``scales``."""
        if targets is None and self.cfg.test.augmented:  # model.test.flip / scales: test-time augmentation
            return predict_with_tta(self, images, image_sizes)
        out = self.forward_raw(images)
        if targets is not None:
            return compute_losses(out, targets, self.cfg)
        return postprocess(out, image_sizes, self.cfg, image_shape=tuple(images.shape[-2:]))


def build_model(cfg: ModelConfig) -> LSNet:
    return LSNet(cfg)


def reference_task(cfg: ModelConfig) -> str:
    """The reference head's task for a model config: pose with the box vectors is ``pose_bbox``."""
    if cfg.task == "pose":
        return "pose_bbox" if cfg.num_box_points else "pose_kbox"
    return cfg.task


def build_head(cfg: ModelConfig) -> nn.Module:
    """The head of ``cfg.head``: :class:`ReferenceHead` (the authors' head) or :class:`LSNetHead`."""
    if cfg.head == "reference":
        return ReferenceHead(task_branches(reference_task(cfg), cfg.num_points), cfg.num_classes, cfg.fpn_channels,
                             cfg.head_channels, cfg.head_convs, cfg.norm_groups, cfg.deformable_towers,
                             cfg.pyramid_offset_scaling, cfg.dcn_offset_grad_scale, strides=cfg.strides,
                             pyramid_levels={"PP": 3, "PE": 1, "PA": 0}[cfg.feature_mode], cpv=cfg.cpv)
    # pose box branch: 4 more vectors after the keypoints; the DCN kernel stays on keypoints
    kernel = cfg.dcn_point_indices
    if cfg.num_box_points and kernel is None:
        kernel = default_dcn_point_indices(cfg.task, cfg.num_points)
    return LSNetHead(
        cfg.fpn_channels, cfg.num_classes, cfg.num_points + cfg.num_box_points, cfg.strides, cfg.head_channels,
        cfg.head_convs, cfg.norm_groups, cfg.feature_mode, cfg.pyramid_fuse, cfg.dcn_offset_grad_scale,
        kernel, cfg.task, cpv=cfg.cpv)


def refine_modules(head: nn.Module) -> list[nn.Module]:
    """The modules that only produce the refined vectors (frozen in stage-1-only models)."""
    if isinstance(head, ReferenceHead):
        return [m for b in head.branches.values() for m in (b.fusion, b.refine_out)]
    return [getattr(head, name) for name in REFINE_BRANCH if getattr(head, name, None) is not None]


def anchor_layout(cfg: ModelConfig, height: int, width: int) -> tuple[Tensor, list[int], list[int]]:
    """The anchor points ``(P, 2)``, points per level and strides that the model of ``cfg`` has for a
    ``height`` x ``width`` input batch, found without computing anything: the backbone and FPN run on
    PyTorch's meta device, which propagates shapes only (no weights are loaded or allocated)."""
    from lsnet.assigners import anchor_points

    with torch.device("meta"):
        model = LSNet(dataclasses.replace(cfg, pretrained=None))
        feats = model.fpn(model.backbone(torch.empty(1, 3, int(height), int(width))))
    sizes = [tuple(f.shape[-2:]) for f in feats]
    if isinstance(model.head, ReferenceHead):
        points = model.head.anchors(sizes, torch.empty(0))
    else:
        points = torch.cat(anchor_points(sizes, model.head.strides))
    return points, [h * w for h, w in sizes], list(model.head.strides)
