"""Building blocks shared by the neck and the heads: GroupNorm, modulated deformable convolution
(DCNv2) and the pyramid deformable convolution of LSNet (paper §3.4).

The semantics follow the reference code (Duankaiwen/LSNet, ``code/mmdet/ops/dcn``), re-expressed with
``torchvision.ops.deform_conv2d``, whose bilinear sampling is the same as the reference kernel's: a
sample is 0 unless ``-1 < y < H`` and ``-1 < x < W``, and a corner pixel outside the map counts as 0.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import deform_conv2d


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
        return deform_conv2d(x, offset, self.weight, self.bias, padding=(self.kernel - 1) // 2, mask=mask)


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


def pyramid_deform_conv(source: Tensor, offset: Tensor, weight: Tensor, scale_h: float, scale_w: float) -> Tensor:
    """A 3x3 deformable conv whose output grid is another level's (the pyramid DCN, paper §3.4).

    Output ``(h, w)`` (on the base level, ``offset``'s grid) samples tap ``(i, j)`` of ``source`` at
    ``((h − 1 + i)·scale_h + dy, (w − 1 + j)·scale_w + dx)`` in source pixels -- the reference's
    ``PyramidDeformConv`` (``deform_conv_cuda_kernel.cu:281``). No bias, no mask.

    ``deform_conv2d`` only produces outputs on its input's own grid, so both are put on a common
    canvas (the larger of the two sizes, zero-padded -- zeros beyond the source map are exactly the
    "outside" of the bilinear sampling) and the grid scaling is folded into the offset:
    ``(h − 1 + i)·s + d = (h − 1 + i) + [(h − 1 + i)·(s − 1) + d]``.

    Args:
        source: (B, C_in, H_s, W_s) the sampled level.
        offset: (B, 18, H, W) offsets in source pixels, interleaved ``(dy, dx)``.
        weight: (C_out, C_in, 3, 3).
    Returns:
        (B, C_out, H, W).
    """
    b, _, hs, ws = source.shape
    h, w = offset.shape[-2:]
    kernel = weight.shape[-1]
    grid = kernel_grid(kernel, h, w, offset)
    scale = offset.new_tensor([scale_h, scale_w]).repeat(kernel * kernel).view(1, -1, 1, 1)
    offset = offset + grid * (scale - 1)
    ch, cw = max(hs, h), max(ws, w)
    if (ch, cw) != (hs, ws):
        source = nn.functional.pad(source, (0, cw - ws, 0, ch - hs))
    if (ch, cw) != (h, w):
        offset = nn.functional.pad(offset, (0, cw - w, 0, ch - h))
    out = deform_conv2d(source, offset, weight, padding=(kernel - 1) // 2)
    return out[..., :h, :w]


class PyramidDeformConv(nn.Module):
    """:func:`pyramid_deform_conv` with its (C_out, C_in, 3, 3) weight (no bias)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        nn.init.kaiming_uniform_(self.weight, a=1)

    def forward(self, source: Tensor, offset: Tensor, scale_h: float, scale_w: float) -> Tensor:
        return pyramid_deform_conv(source, offset, self.weight, scale_h, scale_w)
