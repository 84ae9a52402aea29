"""The model half of ``lsnet bench gpu``: LSNet-R50 (bbox) and torchvision's FCOS-R50-FPN on one device.

For every (AMP, channels-last) setting and both models, measured in the same run the same way:

- **training**: seconds per iteration of :func:`lsnet.engine.train_one_epoch` (the loop the
  pipeline runs: autocast + GradScaler on CUDA, gradient clipping, SGD, lr schedule) on a batch of
  ``batch_size`` images of ``image_size`` with random objects, after ``warmup`` iterations;
  ``torch.cuda.synchronize()`` before and after the timed iterations; peak memory
  (``torch.cuda.max_memory_allocated``, reset before each setting's warm-up);
- **inference**: images per second at batch 1 (model forward **and** post-processing, as
  mmdetection's FPS), in eval mode under ``torch.inference_mode``, autocast when AMP is on.

Both models are built the way the paper fine-tunes (stem + stage 1 frozen, frozen BatchNorm
statistics), from random weights (nothing is downloaded). Random weights score below the 0.05 test
threshold almost everywhere, which would make post-processing unrealistically cheap, so both run
with score threshold 0: every level hands its 1000 best candidates to NMS, as a trained model does.
torchvision's FCOS also normalises and "resizes" (by a factor 1) inside the model; LSNet gets the
normalised batch, as from the shard reader.

Without CUDA the same code runs on the CPU (where autocast and the scaler are off: the AMP setting
has no effect) at whatever size it is given; :mod:`pipelines.bench.gpu` then uses a toy size.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from lsnet.engine import TrainConfig, TrainState, build_grad_scaler, build_optimizer, train_one_epoch
from lsnet.modeling import ModelConfig, build_model
from lsnet.structures import Batch, ImageMeta
from pipelines.bench.model import _num_params, _random_objects
from pipelines.bench.runner import BenchResult

#: (AMP, channels-last) settings measured by default.
DEFAULT_SETTINGS = ((False, False), (False, True), (True, False), (True, True))


class TorchvisionDetector(nn.Module):
    """A torchvision detection model behind LSNet's call interface, so that the same training loop
    and the same inference call time both: ``model(images, targets, image_sizes)`` -> losses with the
    total under ``"loss"``; ``model(images, image_sizes=...)`` -> detections (post-processed)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images, targets=None, image_sizes=None):
        if targets is not None:
            losses = self.model(list(images), [{"boxes": t.boxes, "labels": t.labels + 1} for t in targets])
            return {**losses, "loss": sum(losses.values())}
        return self.model(list(images))


def build_fcos(backbone: str, num_classes: int, image_hw: tuple[int, int]) -> TorchvisionDetector:
    """torchvision FCOS-ResNet-FPN (P3-P7) with the fine-tuning recipe (stem + layer1 frozen,
    FrozenBatchNorm2d), random weights; its transform keeps ``image_hw`` as is; score threshold 0."""
    resnet = getattr(torchvision.models, backbone)(weights=None, norm_layer=FrozenBatchNorm2d)
    features = _resnet_fpn_extractor(resnet, 3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    fcos = torchvision.models.detection.FCOS(features, num_classes + 1, min_size=min(image_hw),
                                             max_size=max(image_hw), score_thresh=0.0)
    return TorchvisionDetector(fcos)


def build_lsnet(backbone: str, num_classes: int) -> nn.Module:
    """LSNet bbox with the paper's recipe (ModelConfig defaults: frozen stage 1, norm_eval), random
    weights, score threshold 0 (module docstring)."""
    model = build_model(ModelConfig(task="bbox", num_classes=num_classes, backbone=backbone, pretrained=None))
    model.cfg.test.score_thr = 0.0
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: nn.Module, batch: Batch, device: torch.device, amp: bool, channels_last: bool,
            warmup: int, iters: int, infer_warmup: int, infer_iters: int) -> dict:
    """Training s/iter, peak memory and batch-1 inference images/s of ``model`` in one setting."""
    cfg = TrainConfig(amp=amp, channels_last=channels_last, warmup_iters=0, batch_size=len(batch))
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg, global_batch=len(batch))
    scaler = build_grad_scaler(cfg, device)
    state = TrainState()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    if warmup:
        train_one_epoch(model, [batch] * warmup, optimizer, None, scaler, state, cfg=cfg, device=device)
    _sync(device)
    start = time.perf_counter()
    summary = train_one_epoch(model, [batch] * iters, optimizer, None, scaler, state, cfg=cfg, device=device)
    _sync(device)
    train_s = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    one = batch.images[:1]
    if channels_last:
        one = one.contiguous(memory_format=torch.channels_last)
    sizes = [tuple(batch.metas[0].size)]
    model.eval()
    use_amp = amp and device.type == "cuda"

    def infer() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            model(one, image_sizes=sizes)

    for _ in range(infer_warmup):
        infer()
    _sync(device)
    start = time.perf_counter()
    for _ in range(infer_iters):
        infer()
    _sync(device)
    infer_s = (time.perf_counter() - start) / infer_iters
    return {"train_s_per_iter": train_s, "train_peak_mem_gib": peak, "train_nonfinite_steps": summary["nonfinite_steps"],
            "infer_images_per_s": 1.0 / infer_s, "infer_ms": infer_s * 1000}


def run(image_size: tuple[int, int] | list[int] = (800, 1333), batch_size: int = 2, warmup: int = 5,
        iters: int = 20, infer_warmup: int = 10, infer_iters: int = 50, backbone: str = "resnet50",
        num_classes: int = 80, num_objects: int = 8, settings=DEFAULT_SETTINGS, seed: int = 0,
        device: str | None = None) -> BenchResult:
    """Rows ``{model, amp, channels_last, train_s_per_iter, train_peak_mem_gib, infer_images_per_s,
    infer_ms, *_vs_fcos}`` for every setting and both models (module docstring)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    h, w = (int(v) for v in image_size)
    torch.manual_seed(seed)
    lsnet_targets, _ = _random_objects(batch_size, min(h, w), num_objects, num_classes, seed)
    metas = [ImageMeta(image_id=i + 1, orig_size=(h, w), size=(h, w), scale=(1.0, 1.0)) for i in range(batch_size)]
    batch = Batch(torch.randn(batch_size, 3, h, w), lsnet_targets, metas).to(device)
    builders: dict[str, Callable[[], nn.Module]] = {
        f"lsnet_{backbone}_bbox": lambda: build_lsnet(backbone, num_classes),
        f"fcos_{backbone}_fpn (torchvision)": lambda: build_fcos(backbone, num_classes, (h, w)),
    }
    rows = []
    for amp, channels_last in (tuple(bool(v) for v in s) for s in settings):
        for name, build in builders.items():
            torch.manual_seed(seed)
            model = build()
            row = {"model": name, "params_M": _num_params(model) / 1e6,
                   "amp": ("on" if device.type == "cuda" else "on (no effect on CPU)") if amp else "off",
                   "channels_last": "on" if channels_last else "off"}
            row.update(measure(model, batch, device, amp, channels_last, warmup, iters, infer_warmup, infer_iters))
            rows.append(row)
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
        lsnet_row, fcos_row = rows[-2], rows[-1]
        lsnet_row["train_vs_fcos"] = lsnet_row["train_s_per_iter"] / fcos_row["train_s_per_iter"]
        lsnet_row["infer_vs_fcos"] = fcos_row["infer_images_per_s"] / lsnet_row["infer_images_per_s"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    notes = [(f"{where}: {batch_size}x3x{h}x{w} training batch ({num_objects} random objects per image), "
              f"{warmup} warm-up + {iters} timed iterations; inference at batch 1, {infer_warmup} warm-up + "
              f"{infer_iters} timed passes (forward + post-processing, score threshold 0)"),
             ("both models: random weights, stem + stage 1 frozen, frozen BatchNorm (the paper's fine-tuning "
              "recipe); *_vs_fcos = LSNet time / FCOS time in the same setting")]
    columns = ["model", "amp", "channels_last", "train_s_per_iter", "train_peak_mem_gib", "infer_images_per_s",
               "infer_ms", "train_vs_fcos", "infer_vs_fcos"]
    return BenchResult(rows=rows, columns=columns, notes=notes)
