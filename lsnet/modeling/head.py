"""The two-stage LSNet head with landmark (pyramid) deformable features (paper §3.2, §3.4, Fig. 2).

Per FPN level ``l`` (stride ``s_l``), shared across levels:

1. Two towers (``head_convs`` × [3x3 conv, GroupNorm, ReLU]) on P_l: a classification tower and a
   regression tower, as in FCOS/ATSS/RepPoints.
2. **Stage 1** — initial vectors from the anchor-point feature of the regression tower::

       v1 = s_l · exp(scale_l · conv3x3(reg_tower))          (B, N, 4) per point

   The four components of a cross-coordinate vector are non-negative magnitudes (Appendix A). We
   use ``exp`` rather than ReLU: it is always positive, so no component is ever stuck at 0 (where
   the cIOU ratio of a pair would have no gradient), and since the cross-IOU loss is a ratio of
   magnitudes, predicting in log space makes the gradient the same at every object size. The
   stride factor and a learnable per-level scale (FCOS) put every level's output in the same range.
3. **Landmark features** — the 9 sampling points of a 3x3 deformable convolution are moved to the
   landmarks decoded from ``v1`` (:func:`kernel_points`); the towers' features are sampled there
   bilinearly and multiplied with a (C_out, C, 3, 3) kernel, i.e. a DCN whose offsets are
   ``landmark / stride − regular-grid position``. The gradient reaching ``v1`` through the sampling
   positions is scaled by ``dcn_offset_grad_scale`` (0.1, as the reference code) with the
   ``x·0.1 + x.detach()·0.9`` trick, so the offsets follow the landmarks but the stage-1 regression
   is driven mainly by its own loss.
4. **Pyramid DCN** (§3.4) — the same landmark positions (image pixels, hence "offsets rescaled by
   the stride ratio" in each level's cell units) also sample the adjacent levels ``l−1`` and
   ``l+1``; the sampled features of the 2–3 levels are fused by their mean (``pyramid_fuse="sum"``
   adds them) before the shared kernel, which is the same as averaging the three DCN outputs
   because the convolution is linear. The mean keeps the border levels (P3, P7, two sources) on
   the scale of the inner ones (three sources).
5. **Stage 2** — the landmark features are *added* to the anchor-point feature (a 1x1 conv of the
   tower at the anchor point), as the paper's Table 3 reads ("anchor-point features", "+
   extreme-point features", "+ pyramid ..."); the sum goes through GroupNorm and ReLU::

       f = ReLU(GN(conv1x1(tower) + landmark_feature(tower)))       (one f for cls, one for reg)
       logits = conv1x1(f_cls)
       v2 = v1.detach() · exp(conv1x1(f_reg))

   The refinement is multiplicative (a residual in log space, the parameterisation of stage 1), so
   ``v2`` stays positive and starts equal to ``v1``. ``v1`` is detached so stage 1 learns only from
   its own (centroid-assigned) loss, as in RepPoints.

   Cost: stage 1 is a single 3x3 conv to 4N channels (as FCOS's box branch) and the anchor-point
   feature a 1x1 conv, so with 3 tower convs the head costs about as much as FCOS's 4-conv towers
   plus the landmark sampling (``lsnet bench model``).

Table 3 switches (``feature_mode``): ``"PA"`` — anchor-point features only (no landmark term, so a
PA model has no landmark kernels); ``"PE"`` — + landmark features on level ``l`` only; ``"PP"`` —
+ pyramid landmark features (default). PE and PP have exactly the same parameters.

Implementation note: the deformable sampling uses :func:`torch.nn.functional.grid_sample` (bilinear,
zeros outside, the same interpolation as ``torchvision.ops.deform_conv2d``; tests check equality)
followed by one matrix product. Unlike ``deform_conv2d`` this samples a level of *any* resolution at
the anchor grid of level ``l`` exactly, which the pyramid DCN needs, and it is vectorised on CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsnet.assigners import anchor_points
from lsnet.coding import decode_offsets
from lsnet.modeling.cpv import CPVBranch
from lsnet.modeling.layers import group_norm

#: Upper bound of the exponent of the vector parameterisation (exp(8) ≈ 3000 strides), for stability.
MAX_LOG_SCALE = 8.0


@dataclass
class HeadOutputs:
    """Raw head outputs for all levels, concatenated level by level (row-major within a level).

    - ``cls_logits`` (B, P, C) stage-2 class logits.
    - ``vec_init``   (B, P, N, 4) stage-1 vectors ``[top, bottom, left, right]`` in pixels.
    - ``vec_refine`` (B, P, N, 4) stage-2 (refined) vectors in pixels.
    - ``anchors``    (P, 2) anchor points ``x, y`` (cell centres, :func:`lsnet.assigners.anchor_points`).
    - ``num_points_per_level`` list of ``H_l * W_l``; ``strides`` per level.
    - with CPV (:mod:`lsnet.modeling.cpv`): ``corner_logits`` (B, P, 2) top-left / bottom-right
      heatmap logits, ``corner_offsets`` (B, P, 4) their offsets in cells, ``level_sizes`` (H_l, W_l);
      with the reference head's CPV also ``foreground_logits``: per level (B, C, H_l, W_l), RepPoints
      v2's foreground map (:func:`lsnet.modeling.cpv.foreground_loss`).
    """

    cls_logits: Tensor
    vec_init: Tensor
    vec_refine: Tensor
    anchors: Tensor
    num_points_per_level: list[int]
    strides: tuple[int, ...]
    corner_logits: Tensor | None = None
    corner_offsets: Tensor | None = None
    level_sizes: list[tuple[int, int]] | None = None
    foreground_logits: list[Tensor] | None = None


def default_dcn_point_indices(task: str, num_points: int) -> list[int] | None:
    """Which landmarks drive the 9 DCN kernel points.

    - bbox (N=4): ``None`` — the kernel is built from the extreme points (:func:`kernel_points`).
    - segm (closed contour): every (N/9)-th point, ``round(k·N/9)``, k = 0..8 (uniform along the
      contour; N=36 -> 0, 4, 8, …, 32).
    - pose: 9 keypoints evenly spaced in the COCO order, ``round(k·(N−1)/8)`` (N=17 -> nose and the
      even indices: right eye/ear/shoulder/elbow/wrist/hip/knee/ankle). Because horizontal-flip
      augmentation swaps left and right, the model sees right-side kernel points on both sides.
    """
    if task == "bbox" and num_points == 4:
        return None
    if task == "pose":
        return [round(k * (num_points - 1) / 8) for k in range(9)]
    return [round(k * num_points / 9) % num_points for k in range(9)]


def kernel_points(landmarks: Tensor, anchors: Tensor, indices: list[int] | None) -> Tensor:
    """The 9 sampling positions of the landmark DCN, in 3x3 kernel order (row-major).

    For the 4 extreme points (top, left, bottom, right) the kernel keeps its geometry::

        (x_left, y_top)     top       (x_right, y_top)
        left                anchor    right
        (x_left, y_bottom)  bottom    (x_right, y_bottom)

    i.e. the extreme points, the anchor point and the four corners of the box they imply, so each
    kernel weight keeps a fixed spatial meaning, as in a plain 3x3 conv.
    Otherwise the landmarks ``indices`` (9 of them) in that order.

    Args:
        landmarks: (B, P, N, 2) absolute ``x, y``.
        anchors: (P, 2).
        indices: 9 landmark indices, or None for the extreme-point kernel (N must be 4).
    Returns:
        (B, P, 9, 2) absolute ``x, y``.
    """
    if indices is not None:
        return landmarks[:, :, indices]
    if landmarks.shape[2] != 4:
        raise ValueError(f"the extreme-point kernel needs N=4 landmarks, got {landmarks.shape[2]}")
    top, left, bottom, right = landmarks.unbind(2)
    anchor = anchors.expand_as(top)

    def xy(x_from: Tensor, y_from: Tensor) -> Tensor:
        return torch.stack([x_from[..., 0], y_from[..., 1]], dim=-1)

    return torch.stack([xy(left, top), top, xy(right, top),
                        left, anchor, right,
                        xy(left, bottom), bottom, xy(right, bottom)], dim=2)


def sample_features(feature: Tensor, positions: Tensor, stride: int, out_hw: tuple[int, int]) -> Tensor:
    """Bilinearly sample ``feature`` at absolute image positions (zeros outside the map).

    A cell ``j`` of a level of stride ``s`` is centred at pixel ``(j + 0.5)·s``, which is exactly the
    ``align_corners=False`` convention of ``grid_sample`` after dividing by ``s · W``.

    Args:
        feature: (B, C, H_m, W_m) the level to sample (any stride).
        positions: (B, H·W, K, 2) absolute ``x, y`` for each of the ``H·W`` output cells.
        stride: stride of ``feature``.
        out_hw: ``(H, W)`` of the output grid.
    Returns:
        (B, C·K, H·W) sampled features, channel-major (index ``c·K + k``), ready for a matmul with a
        (C_out, C, K) kernel flattened to (C_out, C·K).
    """
    b, c, hm, wm = feature.shape
    h, w = out_hw
    k = positions.shape[2]
    size = positions.new_tensor([wm * stride, hm * stride])
    grid = positions / size * 2 - 1  # (B, HW, K, 2)
    grid = grid.permute(0, 2, 1, 3).reshape(b, k * h, w, 2)
    out = F.grid_sample(feature, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(b, c * k, h * w)


class LSNetHead(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_points: int,
        strides: tuple[int, ...] = (8, 16, 32, 64, 128),
        channels: int = 256,
        num_convs: int = 3,
        norm_groups: int = 32,
        feature_mode: str = "PP",
        pyramid_fuse: str = "mean",
        offset_grad_scale: float = 0.1,
        dcn_point_indices: list[int] | None = None,
        task: str = "bbox",
        prior_prob: float = 0.01,
        cpv: bool = False,
        cpv_corner_dim: int = 64,
    ):
        super().__init__()
        if feature_mode not in ("PA", "PE", "PP"):
            raise ValueError(f"feature_mode must be 'PA', 'PE' or 'PP', got {feature_mode!r}")
        if pyramid_fuse not in ("mean", "sum"):
            raise ValueError(f"pyramid_fuse must be 'mean' or 'sum', got {pyramid_fuse!r}")
        self.num_classes = num_classes
        self.num_points = num_points
        self.strides = tuple(strides)
        self.feature_mode = feature_mode
        self.pyramid_fuse = pyramid_fuse
        self.offset_grad_scale = offset_grad_scale
        self.point_indices = (list(dcn_point_indices) if dcn_point_indices is not None
                              else default_dcn_point_indices(task, num_points))
        if self.point_indices is None and num_points != 4:
            raise ValueError("the extreme-point DCN kernel needs num_points=4; give dcn_point_indices")

        def tower() -> nn.Sequential:
            layers: list[nn.Module] = []
            for i in range(num_convs):
                layers += [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1),
                           group_norm(channels, norm_groups), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers)

        if num_convs == 0 and in_channels != channels:
            raise ValueError("head_convs=0 needs head_channels == fpn_channels")
        self.cls_tower = tower()
        self.reg_tower = tower()
        # stage 1
        self.init_out = nn.Conv2d(channels, num_points * 4, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(self.strides)))
        # stage 2: anchor-point convs, the 3x3 kernels of the landmark DCNs (no bias, as a DCN),
        # GroupNorm of their sum, then 1x1 outputs
        self.anchor_conv_cls = nn.Conv2d(channels, channels, 1)
        self.anchor_conv_reg = nn.Conv2d(channels, channels, 1)
        if feature_mode != "PA":
            self.landmark_weight_cls = nn.Parameter(torch.empty(channels, channels, 3, 3))
            self.landmark_weight_reg = nn.Parameter(torch.empty(channels, channels, 3, 3))
            nn.init.normal_(self.landmark_weight_cls, std=0.01)
            nn.init.normal_(self.landmark_weight_reg, std=0.01)
        self.norm_cls = group_norm(channels, norm_groups)
        self.norm_reg = group_norm(channels, norm_groups)
        self.cls_out = nn.Conv2d(channels, num_classes, 1)
        self.refine_out = nn.Conv2d(channels, num_points * 4, 1)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        # Focal-loss prior (RetinaNet): every location starts as background with probability 1 - prior.
        nn.init.constant_(self.cls_out.bias, -math.log((1 - prior_prob) / prior_prob))
        # CPV (corner point verification): corner heatmaps/offsets from the regression tower, and
        # the 1x1 projections of its 6 output maps added to the stage-2 features (lsnet.modeling.cpv)
        self.cpv = CPVBranch(channels, norm_groups, cpv_corner_dim, prior_prob) if cpv else None
        if cpv:
            self.cpv_embed_cls = nn.Conv2d(6, channels, 1)
            self.cpv_embed_reg = nn.Conv2d(6, channels, 1)
            for m in (self.cpv_embed_cls, self.cpv_embed_reg):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def sample_landmarks(self, towers: list[Tensor], level: int, positions: Tensor,
                         out_hw: tuple[int, int]) -> tuple[Tensor, int]:
        """The sampling of steps 3–4 of the module doc: the tower features at the 9 kernel positions
        ``positions`` (B, H·W, 9, 2) of level ``level``, summed over the sampled levels (``level``
        alone for PE; ``level`` and its neighbours for PP).

        Returns:
            (B, C·9, H·W) summed samples and the number of sampled levels.
        """
        if self.feature_mode == "PP":
            sources = [m for m in (level - 1, level, level + 1) if 0 <= m < len(towers)]
        else:
            sources = [level]
        sampled = None
        for m in sources:
            s = sample_features(towers[m], positions, self.strides[m], out_hw)
            sampled = s if sampled is None else sampled.add_(s)
        return sampled, len(sources)

    def _landmark_feature(self, towers: list[Tensor], weight: Tensor, level: int, positions: Tensor,
                          out_hw: tuple[int, int]) -> Tensor:
        """Landmark feature (B, C_out, H·W) of level ``level`` (steps 3–4 of the module doc)."""
        sampled, num_sources = self.sample_landmarks(towers, level, positions, out_hw)
        # The convolution is linear: kernel(mean of sampled levels) = mean of the per-level DCNs, and
        # the mean's 1/num_sources goes on the small kernel rather than on the (B, C·9, H·W) samples.
        kernel = weight.reshape(weight.shape[0], -1)
        if self.pyramid_fuse == "mean" and num_sources > 1:
            kernel = kernel * (1.0 / num_sources)
        # bmm, not matmul: matmul folds a 2-D @ 3-D product by transposing the samples, a full copy
        # of the largest tensor of the head (and another for its gradient).
        return torch.bmm(kernel.expand(sampled.shape[0], -1, -1), sampled)

    def forward(self, feats: list[Tensor]) -> HeadOutputs:
        if len(feats) != len(self.strides):
            raise ValueError(f"head: {len(feats)} feature levels but {len(self.strides)} strides")
        sizes = [tuple(f.shape[-2:]) for f in feats]
        anchors = anchor_points(sizes, self.strides, device=feats[0].device, dtype=feats[0].dtype)
        cls_towers = [self.cls_tower(f) for f in feats]
        reg_towers = [self.reg_tower(f) for f in feats]

        b = feats[0].shape[0]
        n = self.num_points
        cls_all, init_all, refine_all, heat_all, offset_all = [], [], [], [], []
        for level, (reg_t, cls_t) in enumerate(zip(reg_towers, cls_towers)):
            stride = self.strides[level]
            h, w = sizes[level]
            raw = self.init_out(reg_t)  # (B, 4N, H, W)
            raw = raw.permute(0, 2, 3, 1).reshape(b, h * w, n, 4)
            vec_init = stride * torch.exp((self.scales[level] * raw).clamp(max=MAX_LOG_SCALE))

            cls_feat = self.anchor_conv_cls(cls_t).flatten(2)  # (B, C, HW)
            reg_feat = self.anchor_conv_reg(reg_t).flatten(2)
            if self.feature_mode != "PA":
                landmarks = decode_offsets(vec_init, anchors[level])  # (B, HW, N, 2)
                g = self.offset_grad_scale
                landmarks = landmarks * g + landmarks.detach() * (1 - g)
                positions = kernel_points(landmarks, anchors[level], self.point_indices)
                cls_feat = cls_feat + self._landmark_feature(cls_towers, self.landmark_weight_cls, level,
                                                             positions, (h, w))
                reg_feat = reg_feat + self._landmark_feature(reg_towers, self.landmark_weight_reg, level,
                                                             positions, (h, w))
            if self.cpv is not None:
                heat, offsets = self.cpv(reg_t)
                joint = torch.cat([heat, offsets], dim=1).flatten(2)  # (B, 6, HW)
                cls_feat = cls_feat + F.conv1d(joint, self.cpv_embed_cls.weight.squeeze(-1), self.cpv_embed_cls.bias)
                reg_feat = reg_feat + F.conv1d(joint, self.cpv_embed_reg.weight.squeeze(-1), self.cpv_embed_reg.bias)
                heat_all.append(heat.flatten(2).permute(0, 2, 1))
                offset_all.append(offsets.flatten(2).permute(0, 2, 1))
            cls_feat = F.relu(self.norm_cls(cls_feat))
            reg_feat = F.relu(self.norm_reg(reg_feat))

            # 1x1 convs as matmuls on the (B, C, HW) layout
            cls_logits = F.conv1d(cls_feat, self.cls_out.weight.squeeze(-1), self.cls_out.bias)
            refine = F.conv1d(reg_feat, self.refine_out.weight.squeeze(-1), self.refine_out.bias)
            refine = refine.permute(0, 2, 1).reshape(b, h * w, n, 4)
            vec_refine = vec_init.detach() * torch.exp(refine.clamp(-MAX_LOG_SCALE, MAX_LOG_SCALE))

            cls_all.append(cls_logits.permute(0, 2, 1))
            init_all.append(vec_init)
            refine_all.append(vec_refine)

        return HeadOutputs(
            cls_logits=torch.cat(cls_all, dim=1),
            vec_init=torch.cat(init_all, dim=1),
            vec_refine=torch.cat(refine_all, dim=1),
            anchors=torch.cat(anchors, dim=0),
            num_points_per_level=[h * w for h, w in sizes],
            strides=self.strides,
            corner_logits=torch.cat(heat_all, dim=1) if heat_all else None,
            corner_offsets=torch.cat(offset_all, dim=1) if offset_all else None,
            level_sizes=[(int(h), int(w)) for h, w in sizes],
        )
