"""Feature pyramid P3–P7 (strides 8, 16, 32, 64, 128; Lin et al. 2017, paper §3.1).

P3–P5: 1x1 lateral convs on C3–C5, top-down nearest-neighbour upsampling and addition, then a 3x3
conv. P6: a stride-2 3x3 conv on P5 (``extra_source="p5"``, as torchvision's FCOS and mmdet's ATSS
configs) or on C5 (``"c5"``, RetinaNet); P7: a stride-2 3x3 conv on ReLU(P6). No normalisation in
the FPN (the head towers carry GroupNorm).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def _init_conv(conv: nn.Conv2d) -> None:
    nn.init.kaiming_uniform_(conv.weight, a=1)  # torchvision FPN / mmdet "caffe2_xavier" style
    nn.init.zeros_(conv.bias)


class FPN(nn.Module):
    def __init__(self, in_channels: list[int], out_channels: int = 256, extra_source: str = "p5"):
        super().__init__()
        if len(in_channels) != 3:
            raise ValueError(f"FPN expects C3, C4, C5, got {len(in_channels)} inputs")
        if extra_source not in ("p5", "c5"):
            raise ValueError(f"FPN extra_source must be 'p5' or 'c5', got {extra_source!r}")
        self.extra_source = extra_source
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        p6_in = out_channels if extra_source == "p5" else in_channels[-1]
        self.p6 = nn.Conv2d(p6_in, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                _init_conv(m)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        """``[C3, C4, C5]`` -> ``[P3, P4, P5, P6, P7]``, each (B, out_channels, H_l, W_l)."""
        laterals = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="nearest")
        outs = [conv(x) for conv, x in zip(self.output, laterals)]
        p6 = self.p6(outs[-1] if self.extra_source == "p5" else feats[-1])
        p7 = self.p7(F.relu(p6))
        return outs + [p6, p7]
