"""Feature pyramid P3–P7 (strides 8, 16, 32, 64, 128; Lin et al. 2017, paper §3.1).

P3–P5: 1x1 lateral convs on C3–C5, top-down nearest-neighbour upsampling (to the finer level's exact
size) and addition, then a 3x3 conv. P6: a stride-2 3x3 conv on P5 (``extra_source="p5"``, as
torchvision's FCOS) or on C5 (``"c5"``: mmdet's ``add_extra_convs='on_input'``, the reference LSNet
configs); P7: a stride-2 3x3 conv on P6, after a ReLU when ``relu_before_p7`` (torchvision) and
directly (the reference: mmdet's ``relu_before_extra_convs=False``).

``norm="gn"``: every conv is ``conv (no bias) -> GroupNorm`` and nothing else (the reference configs'
``norm_cfg=GN(32)`` on the neck, ``code/configs/lsnet/lsnet_bbox_r50_fpn_1x_coco.py``; mmdet
``necks/fpn.py``); ``"none"``: plain convs with bias.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lsnet.modeling.layers import ConvNorm


def _init_conv(conv: nn.Conv2d) -> None:
    nn.init.kaiming_uniform_(conv.weight, a=1)  # torchvision FPN / mmdet "caffe2_xavier" style
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class FPN(nn.Module):
    def __init__(self, in_channels: list[int], out_channels: int = 256, extra_source: str = "p5",
                 norm: str = "none", relu_before_p7: bool = True, norm_groups: int = 32):
        super().__init__()
        if len(in_channels) != 3:
            raise ValueError(f"FPN expects C3, C4, C5, got {len(in_channels)} inputs")
        if extra_source not in ("p5", "c5"):
            raise ValueError(f"FPN extra_source must be 'p5' or 'c5', got {extra_source!r}")
        if norm not in ("none", "gn"):
            raise ValueError(f"FPN norm must be 'none' or 'gn', got {norm!r}")
        self.extra_source = extra_source
        self.relu_before_p7 = relu_before_p7

        def conv(cin: int, k: int, stride: int = 1) -> nn.Module:
            if norm == "gn":
                return ConvNorm(cin, out_channels, k, stride, norm_groups)
            return nn.Conv2d(cin, out_channels, k, stride=stride, padding=(k - 1) // 2)

        self.lateral = nn.ModuleList(conv(c, 1) for c in in_channels)
        self.output = nn.ModuleList(conv(out_channels, 3) for _ in in_channels)
        self.p6 = conv(out_channels if extra_source == "p5" else in_channels[-1], 3, stride=2)
        self.p7 = conv(out_channels, 3, stride=2)
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
        p7 = self.p7(F.relu(p6) if self.relu_before_p7 else p6)
        return outs + [p6, p7]
