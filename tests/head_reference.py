"""Reference outputs of a tiny LSNet for the speed work of issue 13 (``test_head_equality.py``).

The head, loss and post-processing were optimised without changing results. This module builds a
fixed tiny model (ResNet-18, 64 channels, 128 px, weights set deterministically by parameter name)
and fixed inputs, and computes what must stay equal: the head outputs, the three losses, the
gradients of a few parameters after one backward pass, and the detections.

``python tests/head_reference.py`` (from the repository root, ``PYTHONPATH=$PWD``) wrote
``tests/data/head_reference.pt`` with the code *before* the optimisation (commit ef49d20); the test
recomputes the same quantities with the current code and compares.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import torch

from lsnet.modeling import ModelConfig, build_model
from lsnet.structures import LandmarkTargets

REFERENCE_FILE = Path(__file__).resolve().parent / "data" / "head_reference.pt"
TASKS = ("bbox", "segm", "pose")
NUM_CLASSES = 5
IMAGE_SIZE = 128
#: parameters whose gradients are recorded (a strided sample of each, plus the full norm)
GRAD_PARAMS = ("head.scales", "head.init_out.weight", "head.landmark_weight_cls", "head.landmark_weight_reg",
               "head.anchor_conv_reg.weight", "head.cls_tower.0.weight", "head.reg_tower.0.weight",
               "head.cls_out.bias", "head.refine_out.weight", "fpn.output.0.weight", "backbone.layer4.1.conv2.weight")
GRAD_SAMPLES = 64
#: every VECTOR_STEP-th component of the (flattened) head vectors is recorded
VECTOR_STEP = 7


def build_case(task: str) -> torch.nn.Module:
    """The tiny model with weights that depend only on each parameter's name and shape.

    Weights ~ N(0, 1/fan_in) (so activations neither vanish nor explode through the random
    backbone), biases ~ N(0, 0.1²); class logits then spread over (0, 1) after the sigmoid, so the
    score threshold, the per-level top-k (``pre_nms_topk=50``) and NMS all act.
    """
    cfg = ModelConfig(task=task, num_classes=NUM_CLASSES if task != "pose" else 1, backbone="resnet18",
                      fpn_channels=64, head_channels=64, head_convs=2, norm_groups=32)
    cfg.loss.atss_on = "anchors"  # recorded before the default became "init" (issue 11 item 10)
    cfg.test.pre_nms_topk = 50
    model = build_model(cfg)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            g = torch.Generator().manual_seed(zlib.crc32(f"{task}/{name}".encode()))
            fan_in = p[0].numel() if p.dim() > 1 else 1
            std = (1.0 / fan_in) ** 0.5 if p.dim() > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std)
        model.head.scales.copy_(torch.tensor([0.9, 1.0, 1.1, 0.8, 1.2]) * 0.3)
    return model


def _targets(task: str, num_points: int, g: torch.Generator, num_objects: int, size: tuple[int, int],
             crowd: bool) -> LandmarkTargets:
    """Random boxes with landmarks on an inscribed ellipse (extreme points for bbox); the last
    object is a crowd region when ``crowd``; for pose a few keypoints are unlabelled."""
    h, w = size
    wh = torch.rand(num_objects, 2, generator=g) * torch.tensor([w, h]) * 0.6 + 8
    xy = torch.rand(num_objects, 2, generator=g) * (torch.tensor([w, h]) - wh)
    boxes = torch.cat([xy, xy + wh], dim=1)
    centre, half = xy + wh / 2, wh / 2
    if task == "bbox":
        angles = torch.tensor([0.0, -torch.pi / 2, torch.pi, torch.pi / 2])  # top, left, bottom, right
    else:
        angles = torch.linspace(0, 2 * torch.pi, num_points + 1)[:-1]
    points = torch.stack([centre[:, None, 0] + half[:, None, 0] * torch.sin(angles),
                          centre[:, None, 1] - half[:, None, 1] * torch.cos(angles)], dim=-1)
    visible = torch.ones(num_objects, num_points, dtype=torch.bool)
    if task == "pose":
        visible &= torch.rand(num_objects, num_points, generator=g) > 0.2
    labels = torch.randint(0, NUM_CLASSES if task != "pose" else 1, (num_objects,), generator=g)
    iscrowd = torch.zeros(num_objects, dtype=torch.bool)
    iscrowd[-1] = crowd
    return LandmarkTargets(boxes, labels, points, visible, iscrowd)


def inputs(task: str, num_points: int):
    """Two images (96x128 and 128x80 valid regions, zero-padded to 128x128) and their targets."""
    g = torch.Generator().manual_seed(1234)
    images = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    sizes = [(96, 128), (128, 80)]
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
    targets = [_targets(task, num_points, g, 4, sizes[0], crowd=True),
               _targets(task, num_points, g, 6, sizes[1], crowd=False)]
    return images, sizes, targets


def compute(task: str) -> dict[str, torch.Tensor]:
    """Everything the optimisation must keep equal, for one task."""
    model = build_case(task)
    images, sizes, targets = inputs(task, model.cfg.num_points)
    rec: dict[str, torch.Tensor] = {}

    model.train()
    out = model.forward_raw(images)
    rec["cls_logits"] = out.cls_logits.detach().clone()
    rec["vec_init"] = out.vec_init.detach().flatten()[::VECTOR_STEP].clone()  # a sample keeps the file small
    rec["vec_refine"] = out.vec_refine.detach().flatten()[::VECTOR_STEP].clone()
    losses = model(images, targets)
    for k, v in losses.items():
        rec[k] = v.detach().clone()
    model.zero_grad(set_to_none=True)
    losses["loss"].backward()
    params = dict(model.named_parameters())
    for name in GRAD_PARAMS:
        grad = params[name].grad.flatten()
        step = max(1, grad.numel() // GRAD_SAMPLES)
        rec[f"grad/{name}"] = grad[::step][:GRAD_SAMPLES].clone()
        rec[f"gradnorm/{name}"] = grad.norm().clone()

    model.eval()
    with torch.inference_mode():
        dets = model(images, image_sizes=sizes)
    for i, d in enumerate(dets):
        rec[f"det{i}/boxes"], rec[f"det{i}/scores"] = d.boxes.clone(), d.scores.clone()
        rec[f"det{i}/labels"], rec[f"det{i}/points"] = d.labels.clone(), d.points.clone()
        if d.point_scores is not None:
            rec[f"det{i}/point_scores"] = d.point_scores.clone()
    return rec


def main() -> None:
    torch.set_num_threads(1)
    ref = {task: compute(task) for task in TASKS}
    REFERENCE_FILE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ref, REFERENCE_FILE)
    print(f"wrote {REFERENCE_FILE} ({REFERENCE_FILE.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
