"""Overfit tests: a small LSNet trained on a few synthetic images must fit them (issue 3).

Each task trains a ResNet-18 LSNet with small FPN/head widths on the same few images it is then
evaluated on, with pycocotools (via :func:`lsnet.evaluation.evaluate_coco`). Data:
:func:`lsnet.data.synthetic.write_synthetic_coco` -> :func:`lsnet.targets.compute_image_targets` ->
``LandmarkTargets``. Fixed seeds; the thresholds are asserted, not the time.

The backbone starts from random weights (no network for pretrained ones), so it trains with ordinary
BatchNorm and nothing frozen: frozen BN would freeze random statistics. All images form one batch,
so the BN running statistics used at evaluation converge to the training-batch statistics.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lsnet.data.augment import collate_batch
from lsnet.evaluation import detections_to_coco, evaluate_coco
from lsnet.modeling import ModelConfig, build_model
from lsnet.structures import ImageMeta
from lsnet.targets import TargetConfig, compute_image_targets, record_to_targets


def load_synthetic(root: Path, task: str, num_points: int | None = None):
    """(images (B,3,H,W) normalised+padded, targets, metas, gt json path, category ids)."""
    gt_path = root / "annotations" / ("person_keypoints_train.json" if task == "pose" else "instances_train.json")
    gt = json.loads(gt_path.read_text())
    category_ids = [c["id"] for c in gt["categories"]]
    to_label = {cid: i for i, cid in enumerate(category_ids)}
    anns_by_image: dict[int, list[dict]] = {img["id"]: [] for img in gt["images"]}
    for ann in gt["annotations"]:
        anns_by_image[ann["image_id"]].append(ann)
    items = []
    for img in gt["images"]:
        pixels = np.array(Image.open(root / "images" / img["file_name"]).convert("RGB"))
        h, w = pixels.shape[:2]
        record, _ = compute_image_targets(anns_by_image[img["id"]], h, w, to_label,
                                          TargetConfig(contour_points=(num_points or 36,)))
        meta = ImageMeta(image_id=img["id"], orig_size=(h, w), size=(h, w), scale=(1.0, 1.0))
        items.append((torch.from_numpy(pixels).permute(2, 0, 1), record_to_targets(record, task, num_points), meta))
    batch = collate_batch(items)  # the readers' normalise + pad
    images, targets, metas = batch.images, batch.targets, batch.metas
    return images, targets, metas, gt_path, category_ids


def overfit(task: str, root: Path, steps: int, lr: float = 1e-3, seed: int = 0, log_every: int = 0,
            **model_kw) -> dict[str, float]:
    torch.manual_seed(seed)
    images, targets, metas, gt_path, category_ids = load_synthetic(root, task)
    kw = {"backbone": "resnet18", "fpn_channels": 64, "head_channels": 64, "head_convs": 2, "norm_groups": 16,
              "frozen_stages": -1, "norm_eval": False}
    kw.update(model_kw)
    cfg = ModelConfig(task=task, num_classes=len(category_ids), **kw)
    model = build_model(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        losses = model(images, targets)
        opt.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 35.0)
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(step, {k: round(float(v.detach()), 4) for k, v in losses.items()}, flush=True)
    model.eval()
    with torch.no_grad():
        dets = model(images, image_sizes=[m.size for m in metas])
    results = detections_to_coco(dets, metas, category_ids, task)
    iou_types = {"bbox": ("bbox",), "segm": ("bbox", "segm"), "pose": ("keypoints",)}[task]
    return evaluate_coco(gt_path, results, iou_types=iou_types)


#: 2 images of 128x128 with 2–3 objects each (5 shapes; 3 persons for pose); 100-150 full-batch AdamW
#: steps: 25–45 s per task on a 2-core CPU.
NUM_IMAGES = 2
IMAGE_SIZE = 128
LR = 2e-3


def _dataset(tmp_path_factory, task: str) -> Path:
    from lsnet.data.synthetic import write_synthetic_coco

    root = tmp_path_factory.mktemp(f"overfit_{task}")
    write_synthetic_coco(root, num_images=NUM_IMAGES, image_size=(IMAGE_SIZE, IMAGE_SIZE), seed=0,
                         objects_per_image=(2, 3), person_prob=1.0 if task == "pose" else 0.0)
    return root


#: the authors' network, as the paper-reproducing configs (configs/_base_/coco_r50.yaml). Measured with
#: it (seed 0, 2 threads, 2-core x86_64, load ~3, 2026-12-07): bbox_AP 0.96 after 150 steps (40 s),
#: segm_AP 0.82 after 100 (30 s), kp_AP 1.0 after 150 (48 s); the compact head's values are below.
REFERENCE_NETWORK = {"head": "reference", "fpn_norm": "gn", "fpn_extra_source": "c5", "fpn_relu_before_p7": False}


@pytest.mark.slow
@pytest.mark.parametrize("task, metric, threshold, steps", [
    # compact head (model.head: compact), before the reference head became the one tested here:
    # measured on a 2-core x86_64 CPU, seed 0, 2 threads (1 and 2 threads give slightly different float
    # reductions, hence a margin below the measured values). With model.loss.atss_on "init" (the default
    # since issue 11 item 10) the model fits sooner than with "anchors" (200 steps: bbox 0.960, segm
    # 0.840, pose 0.966), so the steps were cut to keep `make test` inside its 15 minutes:
    ("bbox", "bbox_AP", 0.9, 150),  # init: 1.000 after 150 steps (0.92 after 100: too close); Xeon 1 thread 1.000
    ("segm", "segm_AP", 0.75, 100),  # init: 0.960 after 100 steps (bbox_AP 0.980); Xeon 1 thread 0.980
    # pose is the touchy one: the tall person of image 1000 is the last to fit, and whether it has by
    # step N flips with the float reduction order (Intel Xeon, kp_AP at 100/120/150/200 steps: 1 thread
    # 0.663/1.0/1.0/1.0, 2 threads 0.966/0.663/0.899/0.899); 150 steps pass with both, 100 did not.
    ("pose", "kp_AP", 0.85, 150),
])
def test_overfit_synthetic(tmp_path_factory, task, metric, threshold, steps):
    metrics = overfit(task, _dataset(tmp_path_factory, task), steps, lr=LR, **REFERENCE_NETWORK)
    print(f"{task}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k.endswith(("AP", "AP50", "AP75"))))
    assert metrics[metric] >= threshold, metrics


@pytest.mark.slow
def test_overfit_synthetic_with_cpv(tmp_path_factory):
    """LSNet-CPV (model.cpv, Table 1) on the reference network (CPV as lscpvnet_head.py) fits the two
    images too: the corner and foreground branches train beside the vectors and the test-time corner
    refinement keeps the boxes right. 60 steps (0.28 s each at load 2.3): measured bbox_AP 0.92,
    AP50 1.0, AP75 1.0 (seed 0, 2 threads, twice, 2026-12-07). The compact head's CPV measured 0.94 /
    1.0 (atss_on "init"; 0.98 after 100 steps)."""
    metrics = overfit("bbox", _dataset(tmp_path_factory, "bbox"), 60, lr=LR, cpv=True, **REFERENCE_NETWORK)
    print("bbox cpv: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k.endswith(("AP", "AP50", "AP75"))))
    assert metrics["bbox_AP50"] >= 0.95 and metrics["bbox_AP"] >= 0.75, metrics


#: Paper Table 2 (detection, stage 1 only): each loss / target-style pair trains a stage-1-only model
#: that fits the two images. Measured (150 steps, seed 0, 2 threads, 2-core x86_64, 2026-12-02):
#: bbox AP / AP50 -- GIoU rectangle 1.000 / 1.0, smooth-l1 rectangle 0.887 / 1.0, smooth-l1 extreme
#: points 0.760 / 1.0, cross-IOU extreme points 1.000 / 1.0 (smooth-l1 fits the boxes least tightly).
#: Four more overfit runs (~35 s each) do not fit in `make test`'s 15 minutes beside the others: opt in
#: with LSNET_SLOW_TESTS=1.
TABLE2_VARIANTS = {
    "giou_rectangle": {"target_style": "box", "init_loss": "giou"},
    "smooth_l1_rectangle": {"target_style": "box", "init_loss": "smooth_l1_box"},
    "smooth_l1_extreme": {"target_style": "extreme", "init_loss": "smooth_l1_points"},
    "cross_iou_extreme": {"target_style": "extreme", "init_loss": "cross_iou"},
}
TABLE2_STEPS = 150


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize("variant", list(TABLE2_VARIANTS))
def test_overfit_table2_variants_stage1_only(tmp_path_factory, variant):
    from lsnet.modeling.config import LossConfig

    v = TABLE2_VARIANTS[variant]
    metrics = overfit("bbox", _dataset(tmp_path_factory, "bbox"), TABLE2_STEPS, lr=LR, refine=False,
                      target_style=v["target_style"], loss=LossConfig(init_loss=v["init_loss"]))
    print(f"{variant}: bbox_AP={metrics['bbox_AP']:.3f} AP50={metrics['bbox_AP50']:.3f}")
    assert metrics["bbox_AP50"] >= 0.95 and metrics["bbox_AP"] >= 0.65, metrics
