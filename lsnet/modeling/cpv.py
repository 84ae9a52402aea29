"""CPV -- corner point verification (paper Table 1, LSNet-CPV rows; RepPoints v2's verification).

An optional branch of the detection head (``model.cpv: true``, bbox task) that predicts, on every
FPN level, two corner heatmaps (top-left and bottom-right box corners) and each corner's sub-cell
offset. It is used twice:

- **Joint features**: the 6 output maps (2 heatmap logits + 4 offsets) join the stage-2
  classification and regression features (how depends on the head: "Two builds" below).
- **Box refinement at test time** (:func:`refine_boxes_with_corners`): a box found on P4–P7 moves
  each corner to the most confident heatmap cell among the 2x2 cells around it on a finer level
  (P3 for boxes of P4 and P5, P4 for P6 and P7), plus that cell's predicted offset. Boxes of P3 are
  kept. Scores are not changed: the reference computes the corner's heat score but does not use it.

Architecture (reference config: shared convs 1, corner_dim 64, first kernel 3, kernel 1): one
3x3 conv + GN + ReLU on the regression tower (a DCNv2 one on the reference head), then per corner
CornerNet's corner pooling module (:class:`CornerPoolModule`), and 3x3 convs to 1 heatmap logit and
2 offsets per corner.

Training targets (:func:`corner_targets`, RepPoints v2's point heatmap assigner) on every level: a
box corner's nearest cell (the cell centre ``(j + ½)·stride`` closest to it) has heat 1 and offset
``(corner − centre) / stride`` (in cells, within ±½); other cells within CornerNet's Gaussian radius
of the corner (min-overlap 0.7, in pixels) get ``exp(−d² / 2σ²)``, σ = (2r + 1) / 6, the maximum
over objects. Losses: CornerNet's Gaussian focal loss (α 2, γ 4) of the sigmoid heatmaps and a
smooth-ℓ1 (β 1/9) of the offsets at the heat-1 cells, each divided by the number of heat-1 cells and
averaged over the two corners; weights ``loss.cpv_heatmap_weight`` 0.25 and
``loss.cpv_offset_weight`` 1 (reference config). Crowd boxes have no corners.

Two builds share these parts:

- ``model.head: compact`` (:class:`CPVBranch`, :mod:`lsnet.modeling.head`): a plain 3x3 shared conv, the
  6 maps projected by a 1x1 conv and added after the point DCN at the anchor point, no foreground
  branch -- the cheaper variant.
- ``model.head: reference`` (:class:`ReferenceCPV`, :mod:`lsnet.modeling.reference_head`): as the
  authors' ``lscpvnet_head.py`` builds it: a DCNv2 shared conv on the regression tower, RepPoints v2's
  foreground ("sem") branch -- per-class logits (:func:`foreground_targets`, :func:`foreground_loss`,
  weight ``loss.cpv_foreground_weight`` 0.1) and a 1x1 conv + GN + ReLU embedding that is added to
  the classification tower, the regression tower and the corner branch's input -- and the 6 corner
  maps concatenated to both towers ahead of the pyramid DCN and its 3x3 feature conv.

The corner offsets and heatmap cells use our cell-centre convention ``(j + ½)·stride`` (targets and
test-time refinement alike); the reference measures them from ``j·stride``. A checkpoint converted
from the authors' code therefore predicts offsets half a cell from ours (documented in
``docs/reference_network.md``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsnet.modeling.layers import TowerLayer, group_norm


def _conv_gn(cin: int, cout: int, k: int, groups: int, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, padding=(k - 1) // 2, bias=False), group_norm(cout, groups)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def corner_pool(x: Tensor, direction: str) -> Tensor:
    """CornerNet's pooling: every cell gets the max of the cells from it towards ``direction``'s
    end: ``"down"`` (all cells below, inclusive), ``"right"``, ``"up"``, ``"left"``."""
    dim = 2 if direction in ("down", "up") else 3
    if direction in ("down", "right"):
        return x.flip(dim).cummax(dim).values.flip(dim)
    return x.cummax(dim).values


class CornerPoolModule(nn.Module):
    """CornerNet's corner pooling module for one corner: a top-left corner looks right and down
    (the object lies there), a bottom-right corner up and left."""

    def __init__(self, channels: int, corner: str, corner_dim: int = 64, norm_groups: int = 32):
        super().__init__()
        if corner not in ("tl", "br"):
            raise ValueError(f"corner must be 'tl' or 'br', got {corner!r}")
        self.directions = ("down", "right") if corner == "tl" else ("up", "left")
        self.branch1 = _conv_gn(channels, corner_dim, 3, norm_groups)
        self.branch2 = _conv_gn(channels, corner_dim, 3, norm_groups)
        self.merge = _conv_gn(corner_dim, channels, 3, norm_groups, relu=False)
        self.skip = _conv_gn(channels, channels, 1, norm_groups, relu=False)
        self.out = _conv_gn(channels, channels, 1, norm_groups)

    def forward(self, x: Tensor) -> Tensor:
        pooled = corner_pool(self.branch1(x), self.directions[0]) + corner_pool(self.branch2(x), self.directions[1])
        return self.out(F.relu(self.merge(pooled) + self.skip(x)))


class _CornerMaps(nn.Module):
    """The corner part both CPV variants share: a top-left and a bottom-right corner pool, each with a
    3x3 heatmap conv and a 3x3 offset conv (RepPoints v2; ``lscpvnet_head.py:98-179``)."""

    def _add_corner_layers(self, channels: int, corner_dim: int, norm_groups: int) -> None:
        self.pool_tl = CornerPoolModule(channels, "tl", corner_dim, norm_groups)
        self.pool_br = CornerPoolModule(channels, "br", corner_dim, norm_groups)
        self.heat_tl = nn.Conv2d(channels, 1, 3, padding=1)
        self.heat_br = nn.Conv2d(channels, 1, 3, padding=1)
        self.offset_tl = nn.Conv2d(channels, 2, 3, padding=1)
        self.offset_br = nn.Conv2d(channels, 2, 3, padding=1)

    def corner_maps(self, feature: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> heat logits (B, 2, H, W) [tl, br], offsets (B, 4, H, W)."""
        tl, br = self.pool_tl(feature), self.pool_br(feature)
        heat = torch.cat([self.heat_tl(tl), self.heat_br(br)], dim=1)
        offsets = torch.cat([self.offset_tl(tl), self.offset_br(br)], dim=1)
        return heat, offsets


class CPVBranch(_CornerMaps):
    """Corner heatmaps and offsets of one FPN level from the regression tower (module docstring).

    ``forward`` returns ``(heat_logits (B, 2, H, W) [tl, br], offsets (B, 4, H, W) [tl dx, tl dy,
    br dx, br dy] in cells)``.
    """

    def __init__(self, channels: int, norm_groups: int = 32, corner_dim: int = 64, prior_prob: float = 0.01):
        super().__init__()
        self.shared = _conv_gn(channels, channels, 3, norm_groups)
        self._add_corner_layers(channels, corner_dim, norm_groups)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in (self.heat_tl, self.heat_br):
            nn.init.constant_(m.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, reg_tower: Tensor) -> tuple[Tensor, Tensor]:
        f = self.shared(reg_tower)
        return self.corner_maps(f)


class ReferenceCPV(_CornerMaps):
    """The CPV parts of the reference's ``LSCPVHead`` for one FPN level (``lscpvnet_head.py:98-179``,
    forward ``:287-341``).

    ``forward(reg_tower)`` with the regression tower's output (B, C, H, W) returns
    ``(embedding (B, C, H, W), foreground logits (B, num_classes, H, W), heat_logits (B, 2, H, W)
    [tl, br], offsets (B, 4, H, W) [tl dx, tl dy, br dx, br dy])``: ``shared = DCNv2 conv + GN + ReLU
    (tower)``; the foreground logits are a 1x1 conv of ``shared``, the embedding a 1x1 conv + GN +
    ReLU of it; the corner pools see ``shared + embedding``. The caller adds the embedding to its
    towers and concatenates ``heat, offsets`` to them (:class:`lsnet.modeling.reference_head.ReferenceHead`).
    """

    def __init__(self, channels: int, num_classes: int, norm_groups: int = 32, corner_dim: int = 64,
                 deformable: bool = True, prior_prob: float = 0.01):
        super().__init__()
        # shared_stacked_convs = 1 in the reference configs; a DCNConvModule with conv_module_type='dcn'
        self.shared = nn.Sequential(TowerLayer(channels, channels, norm_groups, deformable))
        self.foreground_out = nn.Conv2d(channels, num_classes, 1)
        self.foreground_embed = _conv_gn(channels, channels, 1, norm_groups)
        self._add_corner_layers(channels, corner_dim, norm_groups)
        bias = -math.log((1 - prior_prob) / prior_prob)
        for m in (self.foreground_out, self.heat_tl, self.heat_br, self.offset_tl, self.offset_br):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.constant_(m.bias, bias if m in (self.foreground_out, self.heat_tl, self.heat_br) else 0.0)

    def forward(self, reg_tower: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        shared = self.shared(reg_tower)
        foreground = self.foreground_out(shared)
        embedding = self.foreground_embed(shared)
        corner_feat = shared + embedding
        heat, offsets = self.corner_maps(corner_feat)
        return embedding, foreground, heat, offsets


def foreground_targets(size: tuple[int, int], boxes: Tensor, labels: Tensor, num_classes: int,
                       stride: int = 8) -> tuple[Tensor, Tensor]:
    """RepPoints v2's foreground map of one image (the reference's ``LoadRPDV2Annotations``,
    ``datasets/pipelines/loading_reppointsv2.py:31-48``) on the stride-8 grid of the padded image.

    Every cell whose index lies in ``[floor(y1/s), floor(y2/s)] x [floor(x1/s), floor(x2/s)]`` of a
    box is 1 in its class's channel, with weight ``1 / box area``; where boxes of a class overlap the
    smaller box's weight wins.

    Args:
        size: (H, W) of the grid (the padded image / ``stride``: P3's map size).
        boxes: (M, 4) ``x1, y1, x2, y2`` pixels; labels: (M,) class indices.
    Returns:
        ``(target, weight)``, each (num_classes, H, W).
    """
    h, w = size
    target = boxes.new_zeros(num_classes, h, w)
    weight = boxes.new_zeros(num_classes, h, w)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for i in torch.argsort(areas, descending=True).tolist():  # largest first: smaller boxes overwrite
        x1, y1, x2, y2 = (int(v) for v in (boxes[i] / stride).floor().tolist())
        rows, cols = slice(max(y1, 0), max(y2 + 1, 0)), slice(max(x1, 0), max(x2 + 1, 0))
        target[labels[i], rows, cols] = 1.0
        weight[labels[i], rows, cols] = 1.0 / areas[i].clamp(min=1e-6)
    return target, weight


def foreground_loss(logits: list[Tensor], target: Tensor, weight: Tensor, alpha: float = 0.25,
                    gamma: float = 2.0) -> Tensor:
    """The reference's ``SEPFocalLoss`` of the foreground logits over all levels, unweighted
    (``losses/focal_loss.py:45-71``, summed in ``lscpvnet_head.py:926-946``).

    Each level's target and weight are the stride-8 maps resized (nearest) to the level. Positive
    cells (target 1): ``−α (1−p)^γ log p · w``, divided by the sum of their weights ``w``; the others:
    ``−(1−α) p^γ log(1−p)``, divided by the number of positive cells (at least 1: the reference
    divides by zero on an image without objects).

    Args:
        logits: per level (B, C, H_l, W_l); target, weight: (B, C, H_0, W_0).
    """
    pos_sum, neg_sum, pos_w, num_pos = 0.0, 0.0, 0.0, 0
    for lvl in logits:
        t = F.interpolate(target, lvl.shape[-2:])  # mmcv/torch default: nearest
        wt = F.interpolate(weight, lvl.shape[-2:])
        p = torch.sigmoid(lvl.float()).clamp(1e-6, 1 - 1e-6)
        pos = t.eq(1)
        pos_sum = pos_sum + (-p.log() * (1 - p).pow(gamma) * alpha * wt)[pos].sum()
        neg_sum = neg_sum + (-(1 - p).log() * p.pow(gamma) * (1 - alpha))[~pos].sum()
        pos_w = pos_w + wt[pos].sum()
        num_pos += int(pos.sum())
    loss = neg_sum / max(num_pos, 1)
    if num_pos:
        loss = loss + pos_sum / pos_w
    return loss


def gaussian_radius(height: Tensor, width: Tensor, min_overlap: float = 0.7) -> Tensor:
    """CornerNet's radius: the largest corner displacement (in pixels) for which a box of this size
    still has IoU >= ``min_overlap`` with the true one, the minimum of its three cases."""
    h, w = height, width
    b1 = h + w
    c1 = w * h * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 - torch.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2 = 2 * (h + w)
    c2 = (1 - min_overlap) * w * h
    r2 = (b2 - torch.sqrt(b2 ** 2 - 16 * c2)) / 8
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (h + w)
    c3 = (min_overlap - 1) * w * h
    r3 = (b3 + torch.sqrt(b3 ** 2 - 4 * a3 * c3)) / (2 * a3)
    return torch.minimum(torch.minimum(r1, r2), r3)


def corner_targets(level_sizes: list[tuple[int, int]], strides: tuple[int, ...], boxes: Tensor,
                   gaussian_iou: float = 0.7) -> tuple[Tensor, Tensor, Tensor]:
    """Heatmap and offset targets of one image on all levels (module docstring).

    Args:
        level_sizes: (H_l, W_l) per level; strides: per level.
        boxes: (M, 4) ``x1, y1, x2, y2`` of the (non-crowd) objects.
    Returns:
        heat (P, 2) in [0, 1], offsets (P, 4) in cells, positive (P, 2) bool (heat-1 cells), ``P``
        all levels' cells concatenated level by level, row-major (as :class:`HeadOutputs`).
    """
    device, dtype = boxes.device, boxes.dtype
    heats, offsets, positives = [], [], []
    radius = gaussian_radius(boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0], gaussian_iou)
    sigma = (2 * radius + 1) / 6
    corners = (boxes[:, :2], boxes[:, 2:])  # tl, br as (M, 2) x, y
    for (h, w), s in zip(level_sizes, strides):
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) * s
        centres = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)  # (HW, 2)
        heat = torch.zeros(h * w, 2, device=device, dtype=dtype)
        offset = torch.zeros(h * w, 4, device=device, dtype=dtype)
        pos = torch.zeros(h * w, 2, dtype=torch.bool, device=device)
        for c, corner in enumerate(corners):
            if corner.shape[0] == 0:
                continue
            d = torch.cdist(centres, corner)  # (HW, M)
            g = torch.exp(-d ** 2 / (2 * sigma[None] ** 2))
            g = torch.where(d < radius[None], g, torch.zeros_like(g))
            heat[:, c] = g.amax(dim=1)
            col = (corner[:, 0] / s).floor().clamp(0, w - 1).long()
            row = (corner[:, 1] / s).floor().clamp(0, h - 1).long()
            nearest = row * w + col
            heat[nearest, c] = 1.0
            pos[nearest, c] = True
            offset[nearest, 2 * c:2 * c + 2] = (corner - centres[nearest]) / s
        heats.append(heat)
        offsets.append(offset)
        positives.append(pos)
    return torch.cat(heats), torch.cat(offsets), torch.cat(positives)


def gaussian_focal_loss(prob: Tensor, target: Tensor, alpha: float = 2.0, gamma: float = 4.0) -> Tensor:
    """CornerNet's focal loss for Gaussian heat targets, summed: ``−(1−p)^α log p`` at heat-1 cells,
    ``−(1−y)^γ p^α log(1−p)`` elsewhere."""
    eps = 1e-12
    pos = target.eq(1).to(prob.dtype)
    pos_loss = -(prob + eps).log() * (1 - prob).pow(alpha) * pos
    neg_loss = -(1 - prob + eps).log() * prob.pow(alpha) * (1 - target).pow(gamma) * (1 - pos)
    return (pos_loss + neg_loss).sum()


def cpv_losses(heat_logits: Tensor, offsets: Tensor, heat_t: Tensor, offset_t: Tensor, positive: Tensor,
               num_pos: Tensor, smooth_l1_beta: float = 1.0 / 9) -> tuple[Tensor, Tensor]:
    """``(loss_heatmap, loss_offset)`` of a batch, unweighted.

    Args:
        heat_logits (N, 2), offsets (N, 4): predictions at N cells (all images' valid cells).
        heat_t (N, 2), offset_t (N, 4), positive (N, 2): :func:`corner_targets`.
        num_pos: (2,) heat-1 cells per corner (all workers' mean, >= 1).
    """
    prob = torch.sigmoid(heat_logits.float()).clamp(1e-4, 1 - 1e-4)
    heat = sum(gaussian_focal_loss(prob[:, c], heat_t[:, c]) / num_pos[c] for c in range(2)) / 2
    off = 0.0
    for c in range(2):
        sel = positive[:, c]
        off = off + F.smooth_l1_loss(offsets[sel, 2 * c:2 * c + 2].float(), offset_t[sel, 2 * c:2 * c + 2],
                                     beta=smooth_l1_beta, reduction="sum") / num_pos[c]
    return heat, off / 2


def refine_boxes_with_corners(boxes: Tensor, levels: Tensor, heat_logits: list[Tensor], offsets: list[Tensor],
                              strides: tuple[int, ...], image_size: tuple[float, float]) -> Tensor:
    """Test-time CPV refinement of one image's boxes (module docstring).

    Args:
        boxes: (K, 4) ``x1, y1, x2, y2`` in pixels; levels: (K,) FPN level index of each box.
        heat_logits: per level (2, H_l, W_l); offsets: per level (4, H_l, W_l).
        image_size: (h, w) to clip the moved corners to.
    Returns:
        (K, 4) refined boxes (those of level 0 unchanged).
    """
    out = boxes.clone()
    h_img, w_img = image_size
    for level in range(1, len(strides)):
        sel = torch.nonzero(levels == level).squeeze(1)
        if sel.numel() == 0:
            continue
        src = 0 if level in (1, 2) else 1
        s = strides[src]
        heat = torch.sigmoid(heat_logits[src].float())
        _, h, w = heat.shape
        # the max of every 2x2 window (padded right/bottom so the last row/column has one too)
        padded = F.pad(heat, (0, 1, 0, 1), value=-1.0)
        _, idx = F.max_pool2d_with_indices(padded[:, None], kernel_size=2, stride=1)  # (2, 1, H, W)
        idx = idx[:, 0]
        for c, (xi, yi) in enumerate(((0, 1), (2, 3))):
            x, y = boxes[sel, xi], boxes[sel, yi]
            # the window whose 4 cell centres (j + 1/2)·s surround the corner
            col = (x / s - 0.5).floor().clamp(0, w - 1).long()
            row = (y / s - 0.5).floor().clamp(0, h - 1).long()
            best = idx[c, row, col]
            by, bx = best // (w + 1), best % (w + 1)
            dx, dy = offsets[src][2 * c, by, bx], offsets[src][2 * c + 1, by, bx]
            out[sel, xi] = ((bx.to(boxes.dtype) + 0.5 + dx) * s).clamp(0, w_img)
            out[sel, yi] = ((by.to(boxes.dtype) + 0.5 + dy) * s).clamp(0, h_img)
    return out
