"""``lsnet bench model``: LSNet R-50 (bbox) beside torchvision's FCOS R-50-FPN, CPU, same run.

Measures, at the same input size and batch (default 512×512, batch 2):

- the time of one training step (forward with targets, backward, SGD step) and of one inference
  forward (eval mode, ``torch.inference_mode``, post-processing included) of both models;
- the same two timings of LSNet with CPV (``model.cpv``, the Table 1 LSNet-CPV rows) on the compact
  and on the reference head, the cost of its corner branch (``with_cpv``; its rows do not enter the
  checks);
- parameter counts of both and of the three task models (bbox N=4 / segm N=36 with 80 classes,
  pose N=17 with 1 class).

Both models start from random weights (``fcos_resnet50_fpn(weights=None, weights_backbone=None)``,
which then uses trainable BatchNorm in every stage). LSNet is timed with the same backbone treatment
(nothing frozen, BatchNorm training); the paper's fine-tuning recipe (stem + stage 1 frozen, frozen
BN) only has fewer trainable parameters and a cheaper backward. FCOS's internal transform is set to
``min_size = max_size = image_size`` so it does not resize the input.

Timings alternate between the two models, and the checks use the **minimum** over ``repeats``
(the least disturbed run, as ``timeit`` does): on a shared machine the load comes in bursts that
would otherwise decide the ratio. Medians are reported beside them.
"""
from __future__ import annotations

import statistics
import time

import torch
import torchvision

from lsnet.assigners import anchor_points
from lsnet.modeling import ModelConfig, build_model
from lsnet.modeling.head import LSNetHead
from lsnet.structures import LandmarkTargets
from pipelines.bench.runner import BenchResult


def _random_objects(batch: int, size: int, num_objects: int, num_classes: int, seed: int):
    """Boxes with their extreme points (on the box edges) for both models."""
    g = torch.Generator().manual_seed(seed)
    lsnet_targets, fcos_targets = [], []
    for _ in range(batch):
        wh = torch.rand(num_objects, 2, generator=g) * size * 0.45 + size * 0.05
        xy = torch.rand(num_objects, 2, generator=g) * (size - wh)
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(0, num_classes, (num_objects,), generator=g)
        x1, y1, x2, y2 = boxes.unbind(1)
        t = torch.rand(num_objects, 4, generator=g)  # where on each edge the extreme point lies
        points = torch.stack([
            torch.stack([x1 + t[:, 0] * wh[:, 0], y1], 1), torch.stack([x1, y1 + t[:, 1] * wh[:, 1]], 1),
            torch.stack([x1 + t[:, 2] * wh[:, 0], y2], 1), torch.stack([x2, y1 + t[:, 3] * wh[:, 1]], 1),
        ], dim=1)
        lsnet_targets.append(LandmarkTargets(boxes, labels, points, torch.ones(num_objects, 4, dtype=torch.bool),
                                             torch.zeros(num_objects, dtype=torch.bool)))
        fcos_targets.append({"boxes": boxes, "labels": labels + 1})  # torchvision: 0 = background
    return lsnet_targets, fcos_targets


def _landmark_sampling(head: LSNetHead, batch: int, image_size: int, train: bool, seed: int) -> tuple[float, float]:
    """Wall and process-CPU seconds of the head's landmark sampling alone (both towers, every level,
    the pyramid's neighbours included: :meth:`LSNetHead.sample_landmarks`), on tower-shaped random
    features and random kernel positions near each anchor point; with ``train`` also its backward (to the
    features and the positions). This is the part of LSNet's extra cost over FCOS that no
    rearrangement of the head removes, so it bounds what the speed work can reach."""
    g = torch.Generator().manual_seed(seed)
    channels = head.landmark_weight_cls.shape[1]
    sizes = [(image_size // s, image_size // s) for s in head.strides]
    towers = {name: [torch.randn(batch, channels, h, w, generator=g).requires_grad_(train) for h, w in sizes]
              for name in ("cls", "reg")}
    # Kernel positions within two strides of their anchor point, as the landmarks of the head
    # (uniform positions over the whole image would measure cache misses a real head does not have).
    positions = [(anchors[:, None, :] + (torch.rand(batch, h * w, 9, 2, generator=g) * 4 - 2) * s).requires_grad_(train)
                 for (h, w), s, anchors in zip(sizes, head.strides, anchor_points(sizes, head.strides))]
    cpu, start = time.process_time(), time.perf_counter()
    with torch.set_grad_enabled(train):
        for level, (h, w) in enumerate(sizes):
            for name in ("cls", "reg"):
                sampled, _ = head.sample_landmarks(towers[name], level, positions[level], (h, w))
                if train:
                    sampled.backward(torch.ones_like(sampled))
    return time.perf_counter() - start, time.process_time() - cpu


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _lsnet_task_params() -> list[dict]:
    rows = []
    for task, classes in (("bbox", 80), ("segm", 80), ("pose", 1)):
        # norm_eval=False: BatchNorm affine weights count as parameters, as in the FCOS count
        model = build_model(ModelConfig(task=task, num_classes=classes, norm_eval=False))
        rows.append({"model": f"lsnet_r50_{task} (params)", "classes": classes, "num_points": model.cfg.num_points,
                     "params_M": _num_params(model) / 1e6})
    return rows


def _models(image_size: int, with_cpv: bool) -> dict[str, torch.nn.Module]:
    """The models compared: today's compact LSNet head, FCOS, the authors' network (and CPV)."""
    fcos = torchvision.models.detection.fcos_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=image_size, max_size=image_size)
    models = {
        "lsnet_r50_bbox": build_model(ModelConfig(task="bbox", num_classes=80, frozen_stages=-1, norm_eval=False)),
        "fcos_r50_fpn": fcos,
        # the authors' network (configs/_base_/coco_r50.yaml): reference head, GN FPN, P6 from C5
        "lsnet_r50_bbox_reference": build_model(ModelConfig(
            task="bbox", num_classes=80, frozen_stages=-1, norm_eval=False, head="reference", fpn_norm="gn",
            fpn_extra_source="c5", fpn_relu_before_p7=False)),
    }
    if with_cpv:
        models["lsnet_r50_bbox_cpv"] = build_model(ModelConfig(task="bbox", num_classes=80, frozen_stages=-1,
                                                               norm_eval=False, cpv=True))
        # CPV as the authors' lscpvnet_head.py (configs/bbox_cpv_*.yaml): reference head + centre vector
        models["lsnet_r50_bbox_cpv_reference"] = build_model(ModelConfig(
            task="bbox", num_classes=80, frozen_stages=-1, norm_eval=False, head="reference", fpn_norm="gn",
            fpn_extra_source="c5", fpn_relu_before_p7=False, cpv=True, center_vector=True))
    return models


def _timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``fn(*args)``."""
    cpu, start = time.process_time(), time.perf_counter()
    fn(*args)
    return time.perf_counter() - start, time.process_time() - cpu


def _measure(models: dict, images: torch.Tensor, lsnet_targets, fcos_targets, warmup: int, repeats: int,
             seed: int) -> tuple[dict, dict, dict, dict]:
    """Train step and inference of every model, alternating so that machine load hits every model
    alike: ``(wall, cpu)`` lists per ``(model, "train"|"infer")``, and the same for the compact head's
    landmark sampling alone per ``"train"|"infer"``."""
    fcos_images = list(images)  # FCOS takes a list of (3, H, W) images
    optimizers = {name: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
                  for name, m in models.items()}

    def train_step(name: str) -> None:
        model = models[name].train()
        if name.startswith("lsnet"):
            loss = model(images, lsnet_targets)["loss"]
        else:
            loss = sum(model(fcos_images, fcos_targets).values())
        optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[name].step()

    def infer(name: str) -> None:
        model = models[name].eval()
        with torch.inference_mode():
            model(images) if name.startswith("lsnet") else model(fcos_images)

    batch_size, image_size = images.shape[0], images.shape[-1]
    times = {(name, kind): [] for name in models for kind in ("train", "infer")}
    cpu_times = {key: [] for key in times}
    sampling, sampling_cpu = {"train": [], "infer": []}, {"train": [], "infer": []}
    for i in range(warmup + repeats):
        for name, model in models.items():
            measured = {"train": _timed(train_step, name), "infer": _timed(infer, name)}
            if i < warmup:
                continue
            for kind, (wall, cpu) in measured.items():
                times[(name, kind)].append(wall)
                cpu_times[(name, kind)].append(cpu)
            if name == "lsnet_r50_bbox":
                for kind in ("train", "infer"):
                    wall, cpu = _landmark_sampling(model.head, batch_size, image_size, kind == "train", seed)
                    sampling[kind].append(wall)
                    sampling_cpu[kind].append(cpu)
    return times, cpu_times, sampling, sampling_cpu


def _model_rows(models: dict, times: dict, cpu_times: dict) -> list[dict]:
    best = {key: min(v) for key, v in times.items()}
    cpu_best = {key: min(v) for key, v in cpu_times.items()}
    rows = []
    for name, model in models.items():
        rows.append({
            "model": name,
            "params_M": _num_params(model) / 1e6,
            "trainable_M": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
            "train_step_s": best[(name, "train")],
            "infer_s": best[(name, "infer")],
            "train_vs_fcos": best[(name, "train")] / best[("fcos_r50_fpn", "train")],
            "infer_vs_fcos": best[(name, "infer")] / best[("fcos_r50_fpn", "infer")],
            "train_cpu_s": cpu_best[(name, "train")],
            "infer_cpu_s": cpu_best[(name, "infer")],
            "train_cpu_vs_fcos": cpu_best[(name, "train")] / cpu_best[("fcos_r50_fpn", "train")],
            "infer_cpu_vs_fcos": cpu_best[(name, "infer")] / cpu_best[("fcos_r50_fpn", "infer")],
            "train_median_s": statistics.median(times[(name, "train")]),
            "infer_median_s": statistics.median(times[(name, "infer")]),
            "train_all_s": [round(t, 4) for t in times[(name, "train")]],
            "infer_all_s": [round(t, 4) for t in times[(name, "infer")]],
        })
    return rows


def _sampling_rows(times: dict, cpu_times: dict, sampling: dict, sampling_cpu: dict) -> list[dict]:
    """The landmark sampling alone, and what LSNet would cost beside FCOS without it (the bound)."""
    best = {key: min(v) for key, v in times.items()}
    cpu_best = {key: min(v) for key, v in cpu_times.items()}
    samp = {kind: min(v) for kind, v in sampling.items()}
    samp_cpu = {kind: min(v) for kind, v in sampling_cpu.items()}
    fcos = {kind: best[("fcos_r50_fpn", kind)] for kind in ("train", "infer")}
    fcos_cpu = {kind: cpu_best[("fcos_r50_fpn", kind)] for kind in ("train", "infer")}
    rest = {kind: best[("lsnet_r50_bbox", kind)] - samp[kind] for kind in ("train", "infer")}
    rest_cpu = {kind: cpu_best[("lsnet_r50_bbox", kind)] - samp_cpu[kind] for kind in ("train", "infer")}
    return [
        {"model": "lsnet_r50_bbox landmark sampling alone (both towers, 5 levels + pyramid neighbours)",
         "train_step_s": samp["train"], "infer_s": samp["infer"],
         "train_vs_fcos": samp["train"] / fcos["train"], "infer_vs_fcos": samp["infer"] / fcos["infer"],
         "train_cpu_s": samp_cpu["train"], "infer_cpu_s": samp_cpu["infer"],
         "train_cpu_vs_fcos": samp_cpu["train"] / fcos_cpu["train"],
         "infer_cpu_vs_fcos": samp_cpu["infer"] / fcos_cpu["infer"]},
        {"model": "lsnet_r50_bbox minus its landmark sampling",
         "train_step_s": rest["train"], "infer_s": rest["infer"],
         "train_vs_fcos": rest["train"] / fcos["train"], "infer_vs_fcos": rest["infer"] / fcos["infer"],
         "train_cpu_vs_fcos": rest_cpu["train"] / fcos_cpu["train"],
         "infer_cpu_vs_fcos": rest_cpu["infer"] / fcos_cpu["infer"]},
    ]


def _checks(times: dict, cpu_times: dict, train_target: float, infer_target: float) -> dict[str, dict]:
    def ratio(model: str, kind: str, table: dict) -> float:
        return min(table[(model, kind)]) / min(table[("fcos_r50_fpn", kind)])

    def check(value: float, target: float, label: str | None = None) -> dict:
        return {"value": round(value, 3), "target": label or f"<= {target}", "ok": value <= target}

    return {
        "train_step_vs_fcos": check(ratio("lsnet_r50_bbox", "train", times), train_target),
        "inference_vs_fcos": check(ratio("lsnet_r50_bbox", "infer", times), infer_target),
        # the same ratios in process CPU seconds (less sensitive to other jobs on a shared machine)
        "train_step_cpu_vs_fcos": check(ratio("lsnet_r50_bbox", "train", cpu_times), train_target),
        "inference_cpu_vs_fcos": check(ratio("lsnet_r50_bbox", "infer", cpu_times), infer_target),
        # the paper's own cost ratio: FCOS 22.7 FPS / LSNet 12.7 FPS (mmdet, V100) = 1.79x
        "reference_inference_vs_fcos": check(ratio("lsnet_r50_bbox_reference", "infer", times), 1.79,
                                             "<= 1.79 (the paper's ratio)"),
    }


def run(image_size: int = 512, batch_size: int = 2, num_objects: int = 5, warmup: int = 1, repeats: int = 3,
        num_threads: int | None = None, seed: int = 0, train_target: float = 1.3,
        infer_target: float = 1.2, with_cpv: bool = True) -> BenchResult:
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    images = torch.randn(batch_size, 3, image_size, image_size)
    lsnet_targets, fcos_targets = _random_objects(batch_size, image_size, num_objects, 80, seed)
    models = _models(image_size, with_cpv)
    times, cpu_times, sampling, sampling_cpu = _measure(models, images, lsnet_targets, fcos_targets, warmup,
                                                        repeats, seed)
    rows = _model_rows(models, times, cpu_times) + _sampling_rows(times, cpu_times, sampling, sampling_cpu)
    frozen = build_model(ModelConfig(task="bbox", num_classes=80))
    rows.append({"model": "lsnet_r50_bbox (paper recipe: frozen stem+stage 1, frozen BN)",
                 "params_M": _num_params(frozen) / 1e6,
                 "trainable_M": sum(p.numel() for p in frozen.parameters() if p.requires_grad) / 1e6})
    rows += _lsnet_task_params()
    checks = _checks(times, cpu_times, train_target, infer_target)
    notes = [
        (f"CPU, {torch.get_num_threads()} threads, input {batch_size}x3x{image_size}x{image_size}, "
         f"{num_objects} objects per image; times are the minimum of {repeats} alternating runs after "
         f"{warmup} warm-up (medians in train_median_s / infer_median_s; process CPU seconds, "
         f"less sensitive to other load, in train_cpu_s / infer_cpu_s)"),
        ("lsnet_r50_bbox: nothing frozen, BatchNorm trained, like fcos_resnet50_fpn without weights; "
         "the paper's recipe freezes the stem + stage 1 and BN (fewer trainable parameters, cheaper backward)"),
        ("'landmark sampling alone': the bilinear sampling of both towers at the 9 kernel positions on "
         "every level and its pyramid neighbours (LSNetHead.sample_landmarks; with its backward for "
         "train_step_s), on random tower-shaped inputs, timed in the same alternating loop. FCOS has "
         "no counterpart: it is the floor of LSNet's extra cost; 'minus its landmark sampling' is "
         "what the rest of LSNet costs beside FCOS."),
        ("params_M of the task rows count BatchNorm affine weights (norm_eval=False) like FCOS; "
        "FrozenBatchNorm2d keeps them as buffers"),
    ]
    columns = ["model", "params_M", "trainable_M", "train_step_s", "infer_s", "train_vs_fcos", "infer_vs_fcos",
               "train_cpu_s", "infer_cpu_s", "train_cpu_vs_fcos", "infer_cpu_vs_fcos", "classes", "num_points"]
    return BenchResult(rows=rows, columns=columns, checks=checks, notes=notes)
