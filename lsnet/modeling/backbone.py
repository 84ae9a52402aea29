"""ResNet / ResNeXt backbones from torchvision and Res2Net from timm, returning C3, C4, C5 (strides 8, 16, 32).

Options used by the paper's training recipe (mmdetection defaults, docs/design.md §1):

- ``frozen_stages``: the stem (and stages 1..k) get no gradient and keep their BatchNorm in eval mode.
- ``norm_eval``: every BatchNorm is a :class:`torchvision.ops.FrozenBatchNorm2d` — statistics and
  affine parameters are fixed, the usual choice with detection batch sizes of 1–2 images per GPU.
  With ``norm_affine_trains`` it is mmdet's ``norm_eval`` instead (the reference configs'
  ``norm_eval=True`` with ``requires_grad=True``): ordinary BatchNorm kept in eval mode (running
  statistics fixed) whose weight and bias train (outside the frozen stages).
- ``dcn_stages``: the 3x3 convolution of every residual block of stages c3–c5 (for Res2Net: each of
  the block's 3x3 convolutions of its scales, as mmdetection's Res2Net does) becomes a deformable
  convolution whose offsets come from a zero-initialised 3x3 conv. ``dcn_type="v1"``: DCN, equal to
  the original (possibly pretrained) convolution at initialisation. ``"v2"``: modulated DCN (DCNv2,
  what the reference configs use): the same conv also predicts a per-kernel-point mask
  ``sigmoid(m)`` (torchvision's ``deform_conv2d(mask=...)``); zero-initialised like mmcv's
  ``ModulatedDeformConv2dPack``, so it starts as 0.5 x the original convolution.
- Res2Net (``res2net50_26w_4s``, ``res2net101_26w_4s``; ``res2net50d``/``res2net101d`` = the v1d
  deep-stem variant the reference's R2-101 weights are) comes from ``timm``; frozen stages and frozen
  BN work the same way (the stem is timm's ``conv1, bn1, act1, maxpool``).
- ``pretrained``: a torchvision weights enum name (``"ResNet50_Weights.IMAGENET1K_V1"``), resolved with
  :func:`torchvision.models.get_weight` (download or torch hub cache); for Res2Net ``"timm"`` (timm's
  ImageNet weights from the Hugging Face hub or its cache); or a local checkpoint file (``.pth``/
  ``.pt``/``.bin`` loaded with ``torch.load(weights_only=True)``, ``.safetensors``) in the library's
  key layout; ``None`` = random initialisation.
"""
from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import DeformConv2d, FrozenBatchNorm2d

from lsnet.errors import LsnetError

#: name -> torchvision constructor
_CONSTRUCTORS = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnext101_64x4d": torchvision.models.resnext101_64x4d,
}
#: Res2Net variants built by timm (26w_4s = base width 26, 4 scales, as the paper's R2-101)
TIMM_BACKBONES = ("res2net50_26w_4s", "res2net101_26w_4s", "res2net50d", "res2net101d")


class PretrainedWeightsError(LsnetError, RuntimeError):
    """Pretrained weights were asked for but cannot be loaded."""


class DeformableConv(nn.Module):
    """A deformable replacement of a (3x3) convolution: offsets (and, for v2, masks) from a zero-initialised conv.

    The deformable convolution takes over the weights of ``conv`` (so pretrained weights are kept).
    ``modulated=False`` (DCN): all offsets are 0 at initialisation, so it starts as exactly ``conv``.
    ``modulated=True`` (DCNv2): the offset conv also predicts ``K`` mask logits (channels
    ``[2K offsets | K masks]``, ``K = kh * kw``); mask = sigmoid(logit) = 0.5 at initialisation.
    """

    def __init__(self, conv: nn.Conv2d, modulated: bool = False):
        super().__init__()
        kh, kw = conv.kernel_size
        self.modulated = modulated
        self.num_kernel_points = kh * kw
        self.offset = nn.Conv2d(conv.in_channels, (3 if modulated else 2) * kh * kw, conv.kernel_size,
                                stride=conv.stride, padding=conv.padding, dilation=conv.dilation, bias=True)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.conv = DeformConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                                 padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                                 bias=conv.bias is not None)
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.offset(x)
        if not self.modulated:
            return self.conv(x, out)
        k2 = 2 * self.num_kernel_points
        return self.conv(x, out[:, :k2], out[:, k2:].sigmoid())


def _is_path(pretrained: str) -> bool:
    return (Path(pretrained).suffix in (".pth", ".pt", ".bin", ".ckpt", ".safetensors") or "/" in pretrained
            or "\\" in pretrained)


def _unwrap_state_dict(state: dict, source: str) -> dict[str, Tensor]:
    """Accept a bare backbone state dict or a training checkpoint ({"model"|"state_dict": ...})."""
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"pretrained checkpoint {source}: not a state dict of tensors")
    out = {}
    for name, value in state.items():
        for prefix in ("module.", "backbone.body.", "backbone."):
            name = name.removeprefix(prefix)
        out[name] = value
    return out


def load_pretrained_state_dict(pretrained: str) -> dict[str, Tensor]:
    """The backbone state dict named by ``pretrained`` (weights enum name or local path).

    Raises :class:`PretrainedWeightsError` with the weight's URL and how to supply a local file when
    the weights cannot be downloaded (no network) and are not in the torch hub cache.
    """
    if _is_path(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise PretrainedWeightsError(f"pretrained checkpoint {path} does not exist (model.pretrained)")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path), device="cpu")
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError) as err:  # corrupt or unsafe file
            raise PretrainedWeightsError(f"pretrained checkpoint {path} cannot be loaded: {err}") from None
        return _unwrap_state_dict(state, str(path))
    try:
        weights = torchvision.models.get_weight(pretrained)
    except (ValueError, KeyError, AttributeError):
        raise PretrainedWeightsError(
            f"model.pretrained={pretrained!r} is neither a torchvision weights name "
            f"(e.g. 'ResNet50_Weights.IMAGENET1K_V1') nor a path to a checkpoint file (.pth)") from None
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
        raise PretrainedWeightsError(
            f"pretrained weights {pretrained} are not available: downloading {weights.url} failed ({err}). "
            f"Without network access, download that file elsewhere and either put it in {hub_dir}/ "
            f"or set model.pretrained to its local path (e.g. model.pretrained=/data/{Path(weights.url).name}); "
            f"model.pretrained=null trains from random initialisation.") from None


def _build_timm(name: str, pretrained: str | None, norm_eval: bool) -> nn.Module:
    """A timm Res2Net (classifier kept; unused), with timm's or a local file's weights, BN frozen if asked."""
    try:
        import timm
        from timm.layers import freeze_batch_norm_2d
        from timm.models import _builder as timm_builder
    except ImportError:
        raise PretrainedWeightsError(f"backbone {name} needs the timm package (pip install timm)") from None
    net = timm.create_model(name, pretrained=False)
    if pretrained == "timm":
        source = net.pretrained_cfg.get("hf_hub_id") or net.pretrained_cfg.get("url")
        try:
            timm_builder.load_pretrained(net, pretrained_cfg=net.pretrained_cfg)
        except Exception as err:  # noqa: BLE001 -- hub/network errors come in many types
            raise PretrainedWeightsError(
                f"pretrained weights of {name} are not available: timm could not fetch {source} "
                f"({type(err).__name__}). Without network access, download its pytorch_model.bin or "
                f"model.safetensors elsewhere and set model.pretrained to the local file (e.g. "
                f"model.pretrained=/data/{name}.safetensors); model.pretrained=null trains from random "
                f"initialisation.") from None
    elif pretrained is not None:
        _load_backbone_weights(net, pretrained, name)
    if norm_eval:  # BatchNorm -> FrozenBatchNorm2d (fixed statistics and affine), as for torchvision
        net = freeze_batch_norm_2d(net)
    return net


def _load_backbone_weights(net: nn.Module, pretrained: str, name: str) -> None:
    """Load a weights name/file into ``net``; every backbone key must be there (the classifier aside)."""
    state = load_pretrained_state_dict(pretrained)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatch: weights of another architecture
        raise PretrainedWeightsError(f"pretrained weights {pretrained} do not fit {name}: {err}") from None
    missing = [k for k in missing if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
    # keys of another depth (e.g. layer1.2.* of a resnet34); other modules of a detection
    # checkpoint (fpn.*, head.*) are ignored
    unexpected = [k for k in unexpected if k.startswith(("conv1.", "bn1.", "layer"))]
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"pretrained weights {pretrained} do not fit {name}: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")


class ResNetBackbone(nn.Module):
    """ResNet/ResNeXt (torchvision) or Res2Net (timm) without the classifier; ``forward`` returns ``[C3, C4, C5]``."""

    def __init__(self, name: str = "resnet50", pretrained: str | None = None, frozen_stages: int = 1,
                 norm_eval: bool = True, dcn_stages: list[int] | tuple[int, ...] = (), dcn_type: str = "v1",
                 norm_affine_trains: bool = False):
        super().__init__()
        if name not in _CONSTRUCTORS and name not in TIMM_BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(_CONSTRUCTORS) + list(TIMM_BACKBONES)}")
        if dcn_type not in ("v1", "v2"):
            raise ValueError(f"dcn_type must be 'v1' or 'v2', got {dcn_type!r}")
        if name in TIMM_BACKBONES:
            net = _build_timm(name, pretrained, norm_eval and not norm_affine_trains)
            self.stem = nn.Sequential(net.conv1, net.bn1, net.act1, net.maxpool)
        else:
            if pretrained == "timm":
                raise PretrainedWeightsError(f"model.pretrained='timm' is for the timm backbones {TIMM_BACKBONES}")
            norm_layer = FrozenBatchNorm2d if norm_eval and not norm_affine_trains else nn.BatchNorm2d
            net = _CONSTRUCTORS[name](weights=None, norm_layer=norm_layer)
            if pretrained is not None:
                _load_backbone_weights(net, pretrained, name)
            self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        for stage in dcn_stages:  # stage 3 = layer2 (c3), 4 = layer3, 5 = layer4
            for block in getattr(self, f"layer{stage - 1}"):
                if hasattr(block, "convs"):  # Res2Net's Bottle2neck: one 3x3 conv per scale
                    for i, conv in enumerate(block.convs):
                        block.convs[i] = DeformableConv(conv, modulated=dcn_type == "v2")
                else:  # the 3x3 conv is conv2 in both BasicBlock and Bottleneck
                    block.conv2 = DeformableConv(block.conv2, modulated=dcn_type == "v2")
        self.out_channels = [self._stage_channels(getattr(self, f"layer{i}")) for i in (2, 3, 4)]
        self.frozen_stages = frozen_stages
        #: mmdet's norm_eval: BatchNorm statistics fixed (eval mode), affine parameters trained
        self.bn_eval = norm_eval and norm_affine_trains
        self._freeze()

    @staticmethod
    def _stage_channels(layer: nn.Sequential) -> int:
        last = layer[-1]
        return (last.bn3 if hasattr(last, "bn3") else last.bn2).weight.shape[0]

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.stem] + [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNetBackbone:
        super().train(mode)
        for module in self._frozen_modules():  # frozen stages also keep their BN statistics
            module.eval()
        if self.bn_eval:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.layer1(self.stem(x))
        c3 = self.layer2(x)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]
