"""The LSNet head as the authors' code builds it (``code/mmdet/models/dense_heads/lsnet_head.py``).

One head serves every task; a task is a list of *landmark branches* (:class:`BranchSpec`) plus the
branch whose DCN sampling points the classifier uses (``task_branches``):

==========  ========================================  ==============  ===============
task        branches (N landmarks + centre)           classifier at   box from
==========  ========================================  ==============  ===============
bbox        bbox (4 extremes, + 4 free points)        bbox            bbox extremes
segm        segm (36 contour points)                  segm            segm hull
pose_bbox   bbox (4, + 4 free) and pose (17)          pose            bbox extremes
pose_kbox   pose (17)                                 pose            pose hull
==========  ========================================  ==============  ===============

Per FPN level ``l`` (stride ``s``) and branch (``lsnet_head.py:502-755``):

1. **Towers**: ``stacked_convs`` × [DCNv2 3x3 -> GroupNorm -> ReLU], one for the classifier, one per
   branch (:class:`lsnet.modeling.layers.TowerLayer`).
2. **Stage 1**: ``raw = init_out(relu(init_conv(tower)))``; ``init = softplus(raw[:, :4(N+1)])``: 4
   non-negative magnitudes per point, ``[up, down, left, right]`` (y first), in units of ``s``, from
   the point ``(w·s, h·s)`` -- for the N landmarks and the object's centre (last). A bbox branch has
   ``2F`` more raw channels: F free learned sampling points ``(dy, dx)``, already signed.
3. **Kernel points**: the signed point of a pair is ``−first`` if ``first >= second`` else
   ``+second`` (:func:`signed_points`). The 9 DCN taps are the branch's kernel landmarks
   (bbox: all 4; segm: 0, 5, …, 35; pose: 1, 3, …, 15) + the centre (+ the free points), as
   ``(dy, dx)`` on the level's grid; the DCN offset is that minus the regular 3x3 grid. The gradient
   reaching stage 1 through the offset is scaled by ``gradient_mul`` (0.1).
4. **Pyramid DCN** (:class:`PyramidFusion`): three source levels (``[l, l−1, l+1]``; P3 takes
   ``[0, 1, 2]``, P7 ``[4, 3, 2]``), each sampled by a pyramid deformable conv on the base level's
   grid scaled by the size ratio; the three results are concatenated (3C), 1x1 conv + ReLU, plus a
   3x3 conv of the level's own tower feature, GroupNorm, ReLU.
   ``offset_scaling="compound"`` reproduces the reference's *in-place* scaling of the offset
   (``lsnet_head.py:626-629``): the second neighbour's offset gets the product of both ratios (P3's
   P5 tap: 0.125 instead of 0.25). ``"exact"``: each source level's offset is scaled by its own ratio.
5. **Stage 2**: ``refine = softplus(refine_out(fusion) + init.detach())``; the classifier's logits
   ``cls_out(fusion of the cls tower at the classifier branch's points)``. Free points are not refined.

Outputs are per level, in the reference's layout: ``cls_scores`` (B, C, H, W) logits and, per branch,
``<name>_init`` / ``<name>_refine`` (B, 4(N+1), H, W).

**CPV** (``cpv=True``, bbox only; ``lscpvnet_head.py:287-386``): :class:`lsnet.modeling.cpv.ReferenceCPV`
runs on the box branch's tower; its foreground embedding is added to the classifier's and the box
branch's towers (stage 1 sees the sum), and its 6 corner maps (2 heat logits, 4 offsets) are
concatenated to both sums, so the pyramid DCN and the 3x3 anchor conv of both fusions take C + 6
channels. Extra outputs: ``hem_score`` (B, 2, H, W), ``hem_offset`` (B, 4, H, W), ``sem_score``
(B, num_classes, H, W).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsnet.modeling.cpv import ReferenceCPV
from lsnet.modeling.head import HeadOutputs
from lsnet.modeling.layers import PyramidDeformConv, TowerLayer, group_norm

#: one-line meanings of the ``offset_scaling`` switch (config ``model.pyramid_offset_scaling``)
OFFSET_SCALING = {
    "compound": "the reference: the offset is scaled in place, so the 2nd neighbour's factor compounds",
    "exact": "each source level's offset is scaled by its own size ratio",
}


@dataclass(frozen=True)
class BranchSpec:
    """One landmark branch: ``name`` keys its outputs (``<name>_init``/``<name>_refine``)."""

    name: str
    num_landmarks: int
    #: landmarks (indices into the N) whose signed points, then the centre, are DCN taps
    kernel_landmarks: tuple[int, ...]
    #: learned free sampling points filling the remaining taps (bbox: 4)
    num_free_points: int = 0

    @property
    def num_vectors(self) -> int:
        """Points with a 4-channel vector: the landmarks + the centre."""
        return self.num_landmarks + 1


@dataclass(frozen=True)
class TaskLayout:
    """The branches of a task, the one the classifier samples with, and where boxes come from."""

    branches: tuple[BranchSpec, ...]
    cls_branch: str
    #: the branch whose points give the box: by its extremes (points 0..3 = top, left, bottom,
    #: right) when it has free points (a bbox branch), else by the hull (min/max) of its points
    box_branch: str
    landmark_branch: str


def task_branches(task: str, num_vectors: int, num_kernel_points: int = 9) -> TaskLayout:
    """The reference's tasks (``lsnet_head.py:93-258``, kernel points ``:372-400``).

    ``num_vectors`` is the reference's landmark count (bbox 4, segm 36, pose 17).
    """
    taps = num_kernel_points - 1  # the centre is the last tap of a landmark kernel

    def box_branch(n: int) -> BranchSpec:
        free = num_kernel_points - n - 1
        if free < 0:
            raise ValueError(f"bbox branch: {n} points + centre exceed {num_kernel_points} kernel points")
        return BranchSpec("bbox", n, tuple(range(n)), free)

    def contour_branch(name: str, n: int, start: int, step: int, spread: bool = False) -> BranchSpec:
        kernel = tuple(range(start, n, step))
        if spread and len(kernel) != taps:
            # an N the reference's rule does not fit (it would fail): ``taps`` points spread evenly
            kernel = tuple(k * n // taps for k in range(taps))
        if len(kernel) != taps:
            raise ValueError(f"{name} branch: {len(kernel)} kernel landmarks ({kernel}) + centre != "
                             f"{num_kernel_points} kernel points")
        return BranchSpec(name, n, kernel)

    if task == "bbox":
        b = box_branch(num_vectors)
        return TaskLayout((b,), "bbox", "bbox", "bbox")
    if task == "segm":  # every ceil(N / 8)-th contour point: 0, 5, ..., 35 for N = 36
        s = contour_branch("segm", num_vectors, 0, math.ceil(num_vectors / taps), spread=True)
        return TaskLayout((s,), "segm", "segm", "segm")
    if task == "pose_bbox":  # keypoints 1, 3, ..., 15; the box branch beside them (4 extremes + 4 free)
        p = contour_branch("pose", num_vectors, 1, 2)
        return TaskLayout((box_branch(4), p), "pose", "bbox", "pose")
    if task == "pose_kbox":
        p = contour_branch("pose", num_vectors, 1, 2)
        return TaskLayout((p,), "pose", "pose", "pose")
    raise ValueError(f"unknown LSNet head task {task!r} (bbox, segm, pose_bbox, pose_kbox)")


def signed_points(vectors: Tensor) -> Tensor:
    """Signed ``(dy, dx)`` per point from ``[up, down, left, right]`` magnitudes.

    A pair ``(neg, pos)`` gives ``−neg`` if ``neg >= pos`` (a tie is negative) else ``+pos``
    (``lsnet_head.py:321-330``).

    Args:
        vectors: (B, 4K, H, W).
    Returns:
        (B, 2K, H, W) interleaved ``(dy, dx)``.
    """
    b, c, h, w = vectors.shape
    pairs = vectors.reshape(b, c // 2, 2, h, w)
    neg, pos = pairs[:, :, 0], pairs[:, :, 1]
    return torch.where(neg >= pos, -neg, pos)


def pyramid_sources(level: int, num_levels: int) -> list[int]:
    """The three levels sampled for ``level``: itself and its neighbours; a border level takes two on
    the same side (``lsnet_head.py:603-613``)."""
    if level == 0:
        return [0, 1, 2]
    if level == num_levels - 1:
        return [level, level - 1, level - 2]
    return [level, level - 1, level + 1]


def pyramid_offsets(offset: Tensor, sizes: list[tuple[int, int]], level: int,
                    scaling: str) -> list[tuple[int, Tensor, float, float]]:
    """``(source, offset in source pixels, scale_h, scale_w)`` for each source level of ``level``.

    The scale is the ratio of the map sizes (not of the strides; ``lsnet_head.py:622-625``).
    ``"compound"`` multiplies the running offset (the reference's in-place ``*=``), ``"exact"`` the
    original one.
    """
    h, w = sizes[level]
    out = []
    running = offset
    for src in pyramid_sources(level, len(sizes)):
        sh, sw = sizes[src][0] / h, sizes[src][1] / w
        base = running if scaling == "compound" else offset
        factor = offset.new_tensor([sh, sw]).repeat(offset.shape[1] // 2).view(1, -1, 1, 1)
        scaled = base * factor
        running = scaled
        out.append((src, scaled, sh, sw))
    return out


class PyramidFusion(nn.Module):
    """Pyramid DCN features of one level (paper §3.4, ``lsnet_head.py:744-755``).

    ``relu(norm(relu(fuse(cat_k sample(feats[src_k], offset_k))) + anchor_conv(feats[l])))``:
    (3 sources × (B, C, H_src, W_src), offsets (B, 18, H, W)) -> (B, C, H, W).
    """

    def __init__(self, in_channels: int, channels: int, groups: int, num_sources: int = 3):
        super().__init__()
        self.num_sources = num_sources
        if num_sources:  # 0: Table 3's "PA" (anchor-point feature only)
            self.sample = PyramidDeformConv(in_channels, channels)
            self.fuse = nn.Conv2d(num_sources * channels, channels, 1)
            nn.init.normal_(self.fuse.weight, std=0.01)
            nn.init.zeros_(self.fuse.bias)
            nn.init.kaiming_normal_(self.sample.weight, mode="fan_out", nonlinearity="relu")
        self.anchor_conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.norm = group_norm(channels, groups)
        nn.init.normal_(self.anchor_conv.weight, std=0.01)
        nn.init.zeros_(self.anchor_conv.bias)

    def forward(self, feats: list[Tensor], level: int, sources: list[tuple[int, Tensor, float, float]]) -> Tensor:
        x = self.anchor_conv(feats[level])
        if self.num_sources:
            sampled = [self.sample(feats[src], off, sh, sw) for src, off, sh, sw in sources[: self.num_sources]]
            x = F.relu(self.fuse(torch.cat(sampled, dim=1))) + x
        return F.relu(self.norm(x))


def _tower(num_convs: int, cin: int, channels: int, groups: int, deformable: bool) -> nn.Sequential:
    return nn.Sequential(*(TowerLayer(cin if i == 0 else channels, channels, groups, deformable)
                           for i in range(num_convs)))


class LandmarkBranch(nn.Module):
    """Tower, stage 1, kernel points and stage 2 of one :class:`BranchSpec`."""

    def __init__(self, spec: BranchSpec, in_channels: int, channels: int, num_convs: int, groups: int,
                 deformable: bool, pyramid_levels: int = 3, extra_fusion_channels: int = 0):
        super().__init__()
        self.spec = spec
        self.tower = _tower(num_convs, in_channels, channels, groups, deformable)
        self.init_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.init_out = nn.Conv2d(channels, 4 * spec.num_vectors + 2 * spec.num_free_points, 1)
        # CPV: the fusion sees the tower with the 6 corner maps concatenated (lscpvnet_head.py:135-179)
        self.fusion = PyramidFusion(channels + extra_fusion_channels, channels, groups, pyramid_levels)
        self.refine_out = nn.Conv2d(channels, 4 * spec.num_vectors, 1)
        for m in (self.init_conv, self.init_out, self.refine_out):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
        kernel = list(spec.kernel_landmarks) + [spec.num_landmarks]  # + the centre
        self.register_buffer("kernel_index", torch.tensor(kernel), persistent=False)

    def stage1(self, tower: Tensor) -> tuple[Tensor, Tensor]:
        """(B, C, H, W) -> ``init`` (B, 4(N+1), H, W) and the DCN taps (B, 2·taps, H, W) ``(dy, dx)``."""
        raw = self.init_out(F.relu(self.init_conv(tower)))
        nv = 4 * self.spec.num_vectors
        init = F.softplus(raw[:, :nv])
        b, _, h, w = init.shape
        kernel = init.reshape(b, self.spec.num_vectors, 4, h, w).index_select(1, self.kernel_index)
        taps = torch.cat([signed_points(kernel.reshape(b, -1, h, w)), raw[:, nv:]], dim=1)
        return init, taps


class ReferenceHead(nn.Module):
    """The LSNet head of the reference code (module doc). ``feats`` P3..P7 -> dict of per-level lists.

    Args:
        layout: :func:`task_branches`.
        in_channels: FPN channels; ``channels``: the towers' and point features' (the reference's
            ``feat_channels`` = ``point_feat_channels``).
        deformable_towers: DCNv2 tower convs (``conv_module_type='dcn'``) or plain ones (``'norm'``).
        pyramid_levels: levels whose landmark features are fused: 3 (the reference; Table 3 "PP"),
            1 (the object's level only, "PE"), 0 (anchor-point feature only, "PA").
        offset_scaling: :data:`OFFSET_SCALING`.
        gradient_mul: gradient factor of stage 1 through the DCN offsets.
        cpv: corner point verification as ``lscpvnet_head.py`` (module doc; bbox layouts only).
        cpv_corner_dim: channels of the corner pools' first convs (the reference's ``corner_dim``).
    """

    #: channels CPV concatenates to the towers ahead of the fusions: 2 heat logits + 4 offsets
    CPV_MAPS = 6

    def __init__(self, layout: TaskLayout, num_classes: int, in_channels: int = 256, channels: int = 256,
                 num_convs: int = 3, norm_groups: int = 32, deformable_towers: bool = True,
                 offset_scaling: str = "compound", gradient_mul: float = 0.1, prior_prob: float = 0.01,
                 strides: tuple[int, ...] = (8, 16, 32, 64, 128), pyramid_levels: int = 3,
                 cpv: bool = False, cpv_corner_dim: int = 64):
        super().__init__()
        if offset_scaling not in OFFSET_SCALING:
            raise ValueError(f"offset_scaling must be one of {sorted(OFFSET_SCALING)}, got {offset_scaling!r}")
        if num_convs == 0 and in_channels != channels:
            raise ValueError("head_convs=0 needs head_channels == fpn_channels")
        self.layout = layout
        self.num_classes = num_classes
        self.strides = tuple(strides)
        self.offset_scaling = offset_scaling
        self.gradient_mul = gradient_mul
        self.cls_tower = _tower(num_convs, in_channels, channels, norm_groups, deformable_towers)
        if pyramid_levels not in (0, 1, 3):
            raise ValueError(f"pyramid_levels must be 3 (PP), 1 (PE) or 0 (PA), got {pyramid_levels}")
        if cpv and (len(layout.branches) != 1 or layout.box_branch != "bbox"):
            raise ValueError("CPV (corner point verification) is built for the bbox task only")
        extra = self.CPV_MAPS if cpv else 0
        self.cls_fusion = PyramidFusion(channels + extra, channels, norm_groups, pyramid_levels)
        self.cls_out = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.cls_out.weight, std=0.01)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - prior_prob) / prior_prob))
        self.branches = nn.ModuleDict({
            spec.name: LandmarkBranch(spec, in_channels, channels, num_convs, norm_groups, deformable_towers,
                                      pyramid_levels, extra if spec.name == layout.box_branch else 0)
            for spec in layout.branches})
        self.cpv = (ReferenceCPV(channels, num_classes, norm_groups, cpv_corner_dim, deformable_towers, prior_prob)
                    if cpv else None)

    def anchors(self, sizes: list[tuple[int, int]], like: Tensor) -> Tensor:
        """The points of all levels (:func:`level_points`), concatenated: (P, 2)."""
        return torch.cat([level_points(h, w, s, like) for (h, w), s in zip(sizes, self.strides)])

    def forward(self, feats: list[Tensor]) -> dict[str, list[Tensor]]:
        if len(feats) != len(self.strides):
            raise ValueError(f"head: {len(feats)} feature levels but {len(self.strides)} strides")
        sizes = [tuple(f.shape[-2:]) for f in feats]
        cls_feats = [self.cls_tower(f) for f in feats]
        towers = {name: [branch.tower(f) for f in feats] for name, branch in self.branches.items()}
        out: dict[str, list[Tensor]] = {"cls_scores": []}
        for name in self.branches:
            out[f"{name}_init"], out[f"{name}_refine"] = [], []
        # what the fusions sample: the towers, or with CPV the towers + embedding with the corner maps
        fusion_in = {name: towers[name] for name in self.branches}
        cls_fusion_in = cls_feats
        if self.cpv is not None:
            box = self.layout.box_branch
            for key in ("hem_score", "hem_offset", "sem_score"):
                out[key] = []
            cls_fusion_in, fusion_in[box], stage1_in = [], [], []
            for level in range(len(feats)):  # lscpvnet_head.py:287-341
                embedding, foreground, heat, offsets = self.cpv(towers[box][level])
                corner_maps = torch.cat([heat, offsets], dim=1)
                cls_fusion_in.append(torch.cat([cls_feats[level] + embedding, corner_maps], dim=1))
                stage1_in.append(towers[box][level] + embedding)
                fusion_in[box].append(torch.cat([stage1_in[-1], corner_maps], dim=1))
                out["hem_score"].append(heat)
                out["hem_offset"].append(offsets)
                out["sem_score"].append(foreground)
            towers = {**towers, box: stage1_in}
        g = self.gradient_mul
        for level, (h, w) in enumerate(sizes):
            sources = {}
            for name, branch in self.branches.items():
                init, taps = branch.stage1(towers[name][level])
                taps = taps * g + taps.detach() * (1 - g)
                base = _regular_grid(taps.shape[1] // 2, taps)
                sources[name] = pyramid_offsets(taps - base, sizes, level, self.offset_scaling)
                raw = branch.refine_out(branch.fusion(fusion_in[name], level, sources[name]))
                out[f"{name}_init"].append(init)
                out[f"{name}_refine"].append(F.softplus(raw + init.detach()))
            fused = self.cls_fusion(cls_fusion_in, level, sources[self.layout.cls_branch])
            out["cls_scores"].append(self.cls_out(fused))
        return out


def _regular_grid(taps: int, like: Tensor) -> Tensor:
    """The regular ``k x k`` kernel's ``(i − pad, j − pad)``, interleaved (y, x): (1, 2·taps, 1, 1)."""
    k = math.isqrt(taps)
    if k * k != taps or k % 2 == 0:
        raise ValueError(f"the DCN needs an odd square number of kernel points, got {taps}")
    r = torch.arange(k, dtype=like.dtype, device=like.device) - (k - 1) // 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    return torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=1).reshape(1, -1, 1, 1)


def head_outputs(out: dict[str, list[Tensor]], layout: TaskLayout, strides: tuple[int, ...],
                 center_vector: bool) -> HeadOutputs:
    """The reference layout -> :class:`HeadOutputs` (the contract of targets, assigners and losses).

    Per level (B, 4K, H, W) in stride units -> (B, H·W, K, 4) ``[top, bottom, left, right]`` in pixels
    (the reference's ``[up, down, left, right]``, times the stride), levels concatenated; anchors are
    the reference's points ``(w·s, h·s)``. The landmark branch's N vectors come first, then a
    separate box branch's 4 (pose with the box branch, ``ModelConfig.num_box_points``); with
    ``center_vector`` each branch's centre follows its landmarks (N+1, then 4+1).
    """
    names = [layout.landmark_branch] + [b.name for b in layout.branches if b.name != layout.landmark_branch]
    specs = {b.name: b for b in layout.branches}
    sizes = [tuple(t.shape[-2:]) for t in out["cls_scores"]]

    def flat(key: str, name: str) -> Tensor:
        keep = specs[name].num_vectors if center_vector else specs[name].num_landmarks
        parts = []
        for level, t in enumerate(out[f"{name}_{key}"]):
            b, _, h, w = t.shape
            v = t.permute(0, 2, 3, 1).reshape(b, h * w, -1, 4)[:, :, :keep]
            parts.append(v * strides[level])
        return torch.cat(parts, dim=1)

    like = out["cls_scores"][0]
    anchors = torch.cat([level_points(h, w, s, like) for (h, w), s in zip(sizes, strides)])
    logits = torch.cat([t.flatten(2).transpose(1, 2) for t in out["cls_scores"]], dim=1)

    def cat_levels(key: str) -> Tensor | None:  # CPV maps: (B, P, C) like the logits
        return torch.cat([t.flatten(2).transpose(1, 2) for t in out[key]], dim=1) if key in out else None

    return HeadOutputs(
        cls_logits=logits,
        vec_init=torch.cat([flat("init", n) for n in names], dim=2),
        vec_refine=torch.cat([flat("refine", n) for n in names], dim=2),
        anchors=anchors,
        num_points_per_level=[h * w for h, w in sizes],
        strides=tuple(strides),
        level_sizes=[(int(h), int(w)) for h, w in sizes],
        corner_logits=cat_levels("hem_score"),
        corner_offsets=cat_levels("hem_offset"),
        foreground_logits=out.get("sem_score"),
    )


def level_points(height: int, width: int, stride: int, like: Tensor) -> Tensor:
    """The reference's points ``(x, y) = (w·s, h·s)`` of a level (mmdet ``PointGenerator``; no
    half-stride shift), row-major: (H·W, 2)."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=like.dtype, device=like.device),
                            torch.arange(width, dtype=like.dtype, device=like.device), indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1) * stride
