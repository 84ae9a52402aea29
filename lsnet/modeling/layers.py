"""Building blocks shared by the neck and the heads: GroupNorm, modulated deformable convolution
(DCNv2) and the pyramid deformable convolution of LSNet (paper §3.4).

The semantics follow the reference code (Duankaiwen/LSNet, ``code/mmdet/ops/dcn``): bilinear sampling
where a sample is 0 unless ``-1 < y < H`` and ``-1 < x < W`` and a corner pixel outside the map counts
as 0 -- the same as ``torchvision.ops.deform_conv2d`` and ``grid_sample(padding_mode="zeros")``;
:func:`sampled_conv` computes it as one ``embedding_bag`` (tests check it against ``deform_conv2d``, a
loop and the reference's outputs).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count ≤ ``groups`` dividing ``channels`` (small test heads)."""
    g = max(d for d in range(1, min(groups, channels) + 1) if channels % d == 0)
    return nn.GroupNorm(g, channels)


class ConvNorm(nn.Sequential):
    """``conv -> GroupNorm`` (no conv bias: the norm's shift replaces it), the neck's layer with norm.

    (B, C_in, H, W) -> (B, C_out, H', W'); ``conv`` and ``norm`` name the parameters.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 32):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=(kernel - 1) // 2, bias=False)
        self.norm = group_norm(cout, groups)


class ModulatedDeformConv(nn.Module):
    """DCNv2 (Zhu et al. 2019) with its own offset/mask predictor, 3x3, stride 1, padding 1.

    ``conv_offset`` (a 3x3 conv with bias) gives ``3·k·k`` channels: the first ``2·k·k`` are the
    offsets, interleaved ``(dy, dx)`` per tap (tap ``i·k + j``, row-major), the last ``k·k`` are mask
    logits (sigmoid). Tap ``(i, j)`` of output ``(h, w)`` samples ``(h − 1 + i + dy, w − 1 + j + dx)``
    and is multiplied by its mask -- mmdet's ``ModulatedDeformConvPack`` (reference
    ``lsnet_head.py:1830`` builds its towers of it). The offset conv starts at zero (a plain conv with
    mask 0.5), as mmdet initialises it.

    (B, C_in, H, W) -> (B, C_out, H, W).
    """

    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout))
        nn.init.normal_(self.weight, std=0.01)
        self.conv_offset = nn.Conv2d(cin, 3 * kernel * kernel, kernel, padding=(kernel - 1) // 2)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:
        taps = self.kernel * self.kernel
        out = self.conv_offset(x)
        offset, mask = out[:, : 2 * taps], out[:, 2 * taps:].sigmoid()
        positions = kernel_grid(self.kernel, x.shape[-2], x.shape[-1], x) + offset
        return sampled_conv(x, positions, self.weight, self.bias, mask)


class TowerLayer(nn.Sequential):
    """One tower layer: ``conv -> GroupNorm -> ReLU``; the conv is a DCNv2 (``deformable=True``,
    the reference configs' ``conv_module_type='dcn'``) or a plain 3x3 conv without bias ('norm').

    (B, C_in, H, W) -> (B, C_out, H, W).
    """

    def __init__(self, cin: int, cout: int, groups: int, deformable: bool):
        super().__init__()
        self.conv = ModulatedDeformConv(cin, cout) if deformable else nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        if not deformable:
            nn.init.normal_(self.conv.weight, std=0.01)
        self.norm = group_norm(cout, groups)
        self.relu = nn.ReLU(inplace=True)


def kernel_grid(kernel: int, height: int, width: int, like: Tensor) -> Tensor:
    """``(h − pad + i, w − pad + j)`` of every tap, interleaved ``(y, x)`` per tap: (1, 2·k·k, H, W)."""
    pad = (kernel - 1) // 2
    taps = torch.arange(kernel, dtype=like.dtype, device=like.device) - pad
    ti, tj = torch.meshgrid(taps, taps, indexing="ij")  # (k, k) tap rows / columns
    hs = torch.arange(height, dtype=like.dtype, device=like.device)
    ws = torch.arange(width, dtype=like.dtype, device=like.device)
    y = hs.view(1, 1, height, 1) + ti.reshape(-1, 1, 1, 1)  # (k·k, 1, H, 1)
    x = ws.view(1, 1, 1, width) + tj.reshape(-1, 1, 1, 1)  # (k·k, 1, 1, W)
    grid = torch.stack(torch.broadcast_tensors(y, x), dim=1)  # (k·k, 2, H, W)
    return grid.reshape(1, 2 * kernel * kernel, height, width)


def bilinear_taps(positions: Tensor, height: int, width: int, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The four bilinear corners of every tap, as rows of a channels-last table, with their weights.

    A tap at ``(y, x)`` reads the corners ``(⌊y⌋ + a, ⌊x⌋ + b)``, ``a, b ∈ {0, 1}``, with weights
    ``(1 − |y − y_a|)(1 − |x − x_b|)``; a corner outside the ``height × width`` map gets weight 0 (its row
    index is clamped into the map, so it reads a real row times 0): zero padding per corner, the
    interpolation of the reference kernel and of ``deform_conv2d``. ``mask`` multiplies all four
    weights of its tap (DCNv2's modulation).

    Args:
        positions: (B, 2·K, H, W) interleaved ``(y, x)`` per tap, in source pixels.
        mask: (B, K, H, W) or None.
    Returns:
        ``index`` (B·H·W·K, 4) int64 rows of the (B·height·width, C) table of the source, ordered
        ``(b, h, w, tap)``, and ``weight`` (B·H·W·K, 4) of ``positions``' dtype (differentiable in
        ``positions`` and ``mask``).
    """
    b, k2, h, w = positions.shape
    taps = k2 // 2
    yx = positions.view(b, taps, 2, h, w).permute(0, 3, 4, 1, 2).contiguous()  # (B, H, W, K, 2)
    y, x = yx[..., 0], yx[..., 1]
    fy, fx = y.floor(), x.floor()
    ly, lx = y - fy, x - fx  # the gradient to the positions flows through these (floor has none)
    # integer corners, far-away (and NaN) positions moved just outside the map: weight 0 below
    iy = torch.nan_to_num(fy.detach(), nan=-2.0).clamp_(-2, height).long()
    ix = torch.nan_to_num(fx.detach(), nan=-2.0).clamp_(-2, width).long()
    wy0 = (1 - ly) * ((iy >= 0) & (iy < height))
    wy1 = ly * ((iy >= -1) & (iy < height - 1))
    wx0 = (1 - lx) * ((ix >= 0) & (ix < width))
    wx1 = lx * ((ix >= -1) & (ix < width - 1))
    if mask is not None:
        m = mask.permute(0, 2, 3, 1)  # (B, H, W, K)
        wy0, wy1 = wy0 * m, wy1 * m
    weight = torch.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1], dim=-1)
    base = torch.arange(b, device=positions.device).view(b, 1, 1, 1) * (height * width)
    row0 = base + iy.clamp(0, height - 1) * width
    row1 = base + (iy + 1).clamp_(0, height - 1) * width
    col0, col1 = ix.clamp(0, width - 1), (ix + 1).clamp_(0, width - 1)
    index = torch.stack([row0 + col0, row0 + col1, row1 + col0, row1 + col1], dim=-1)
    return index.reshape(-1, 4), weight.reshape(-1, 4)


def sampled_conv(source: Tensor, positions: Tensor, weight: Tensor, bias: Tensor | None = None,
                 mask: Tensor | None = None) -> Tensor:
    """A deformable convolution given its absolute sampling positions.

    ``source`` is sampled bilinearly at each tap's position (zeros outside, each corner outside the map
    counting 0: exactly the reference kernel's and ``deform_conv2d``'s interpolation), optionally
    multiplied by ``mask``, and contracted with ``weight`` in one matrix product.

    The sampling is one ``embedding_bag`` over the source in channels-last rows: each tap is a bag of
    its four corner rows with the bilinear weights (times the mask) as per-sample weights
    (:func:`bilinear_taps`), which gives the (B·H·W, K·C_in) column matrix directly in the layout the
    matrix product wants. On 2 CPU threads this is 2-3x faster than ``grid_sample`` + a separate mask
    product (and than ``torchvision.ops.deform_conv2d``, whose CPU im2col is single-threaded), in the
    backward too; and the output grid can be any level's (the pyramid DCN) without a padded canvas.

    The result is returned in channels-last memory (a (B, C_out, H, W) view of (B, H, W, C_out));
    convolutions, GroupNorm and the next :func:`sampled_conv` (whose table is then a free view) take it
    as it is.

    Args:
        source: (B, C_in, H_s, W_s).
        positions: (B, 2·K, H, W) interleaved ``(y, x)`` per tap, in ``source`` pixels.
        weight: (C_out, C_in, k, k) with ``k·k = K``; bias (C_out,); mask (B, K, H, W).
    Returns:
        (B, C_out, H, W).
    """
    b, c, hs, ws = source.shape
    _, k2, h, w = positions.shape
    taps = k2 // 2
    table = source.permute(0, 2, 3, 1).reshape(b * hs * ws, c)
    index, corner_weight = bilinear_taps(positions, hs, ws, mask)
    cols = nn.functional.embedding_bag(index, table, per_sample_weights=corner_weight.to(table.dtype), mode="sum")
    kernel = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], taps * c)  # (C_out, K·C_in), tap-major
    out = nn.functional.linear(cols.view(b * h * w, taps * c), kernel, bias)
    return out.view(b, h, w, -1).permute(0, 3, 1, 2)


def pyramid_deform_conv(source: Tensor, offset: Tensor, weight: Tensor, scale_h: float, scale_w: float) -> Tensor:
    """A 3x3 deformable conv whose output grid is another level's (the pyramid DCN, paper §3.4).

    Output ``(h, w)`` (on the base level, ``offset``'s grid) samples tap ``(i, j)`` of ``source`` at
    ``((h − 1 + i)·scale_h + dy, (w − 1 + j)·scale_w + dx)`` in source pixels -- the reference's
    ``PyramidDeformConv`` (``deform_conv_cuda_kernel.cu:281``). No bias, no mask.

    The sampling positions are built explicitly and sampled by :func:`sampled_conv`.

    Args:
        source: (B, C_in, H_s, W_s) the sampled level.
        offset: (B, 18, H, W) offsets in source pixels, interleaved ``(dy, dx)``.
        weight: (C_out, C_in, 3, 3).
    Returns:
        (B, C_out, H, W).
    """
    h, w = offset.shape[-2:]
    kernel = weight.shape[-1]
    scale = offset.new_tensor([scale_h, scale_w]).repeat(kernel * kernel).view(1, -1, 1, 1)
    return sampled_conv(source, kernel_grid(kernel, h, w, offset) * scale + offset, weight)


class PyramidDeformConv(nn.Module):
    """:func:`pyramid_deform_conv` with its (C_out, C_in, 3, 3) weight (no bias)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        nn.init.kaiming_uniform_(self.weight, a=1)

    def forward(self, source: Tensor, offset: Tensor, scale_h: float, scale_w: float) -> Tensor:
        return pyramid_deform_conv(source, offset, self.weight, scale_h, scale_w)
