"""Configuration of the LSNet model: backbone, FPN, head, loss and test-time settings.

Loaded from YAML with :func:`lsnet.config.from_dict` (``model:`` section of an experiment config),
e.g.::

    model:
      task: segm
      num_classes: 80
      backbone: resnet50
      pretrained: ResNet50_Weights.IMAGENET1K_V1    # or /path/to/resnet50.pth, or null
      feature_mode: PP
      loss: {beta: 1.0, gamma: 2.0}
      test: {score_thr: 0.05, nms_iou: 0.6}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lsnet.config import check_range
from lsnet.structures import TASK_NUM_POINTS

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnext101_64x4d",
             "res2net50_26w_4s", "res2net101_26w_4s", "res2net50d", "res2net101d")
#: Strides of P3..P7 (paper §3.1: FPN P3–P7, strides 8…128).
FPN_STRIDES = (8, 16, 32, 64, 128)


@dataclass
class LossConfig:
    """L = L_cls + beta · L_vec1 + gamma · L_vec2 (paper §3.2), each normalised by its positives."""

    beta: float = 1.0  # weight of the stage-1 (initial) vector loss
    gamma: float = 2.0  # weight of the stage-2 (refined) vector loss
    alpha: float = 0.2  # softening of the cross-IOU targets (Appendix A)
    vector_loss_form: Literal["paper", "reference"] = "paper"  # lsnet.losses.vector_loss(form=...)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    centroid_scale: float = 4.0  # stage-1 assigner: object side ~ scale × stride on its level
    #: pose with a box branch (ModelConfig.pose_box_vectors): weights of the stage-1 / stage-2 box
    #: vector losses, as the reference's obj-box pose configs (0.1 / 0.2 beside 1 / 2 for keypoints)
    box_beta: float = 0.1
    box_gamma: float = 0.2
    atss_topk: int = 9  # stage-2 assigner (ATSS)
    atss_anchor_scale: float = 8.0
    #: the loss of each stage's vectors (paper Table 2): "cross_iou" (lsnet.losses.vector_loss),
    #: "giou" / "smooth_l1_box" on the box of the landmarks, "smooth_l1_points" on the landmarks;
    #: the smooth-l1 losses are normalised by 4 x the stride of the positive's level.
    init_loss: Literal["cross_iou", "giou", "smooth_l1_box", "smooth_l1_points"] = "cross_iou"
    refine_loss: Literal["cross_iou", "giou", "smooth_l1_box", "smooth_l1_points"] = "cross_iou"
    smooth_l1_beta: float = 1.0 / 9
    #: what ATSS measures its IoUs with: "anchors" = a fixed square of atss_anchor_scale x stride per
    #: point (ATSS's own anchor); "init" = the box of the point's stage-1 landmarks (detached), as the
    #: reference's refine stage does. Default "init", measured (issue 11 item 10; tests/test_overfit.py
    #: setting, 1 thread): after 100 steps bbox AP 0.96 / 0.96 / 0.96 / 0.96 / 0.956 / 0.967 vs
    #: 0.82 / 0.88 / 0.88 / 0.90 / 0.925 / 0.906 with anchors (6 seed/data pairs), segm AP 1.0 vs 0.68;
    #: after 200 steps bbox 1.0 / 1.0 vs 1.0 / 0.98, segm 0.98 vs 0.78, pose 1.0 vs 0.966.
    atss_on: Literal["anchors", "init"] = "init"
    #: CPV (model.cpv): weights of the corner heatmap focal loss and of the corner offset smooth-l1
    #: (the reference's LSNet-CPV config), and the min-overlap of the heatmaps' Gaussian radius
    cpv_heatmap_weight: float = 0.25
    cpv_offset_weight: float = 1.0
    cpv_gaussian_iou: float = 0.7
    #: CPV on the reference head: weight of RepPoints v2's foreground ("sem") focal loss (the
    #: reference's LSNet-CPV configs: ``loss_sem`` loss_weight 0.1)
    cpv_foreground_weight: float = 0.1

    def __post_init__(self) -> None:
        for name in ("beta", "gamma", "focal_gamma"):
            check_range(getattr(self, name), name, ge=0)
        check_range(self.alpha, "alpha", ge=0, lt=1)
        check_range(self.focal_alpha, "focal_alpha", ge=0, le=1)
        check_range(self.centroid_scale, "centroid_scale", gt=0)
        check_range(self.atss_topk, "atss_topk", ge=1)
        check_range(self.atss_anchor_scale, "atss_anchor_scale", gt=0)
        check_range(self.cpv_heatmap_weight, "cpv_heatmap_weight", ge=0)
        check_range(self.cpv_offset_weight, "cpv_offset_weight", ge=0)
        check_range(self.cpv_gaussian_iou, "cpv_gaussian_iou", gt=0, lt=1)
        check_range(self.cpv_foreground_weight, "cpv_foreground_weight", ge=0)


@dataclass
class TestConfig:
    """Post-processing (paper §4: NMS IoU 0.6) and test-time augmentation (:mod:`lsnet.modeling.inference`).

    With ``scales`` (or ``flip``) set, the model's own inference -- hence evaluation in training
    runs, ``lsnet test`` and ``lsnet predict`` -- is :func:`lsnet.modeling.inference.predict_with_tta`. The
    paper's multi-scale test ("we refer to ATSS", the † rows) is ``_base_/atss_ms_test.yaml``: the 12
    ATSS shorter sides 400…1800 as factors of the 800-px test size, flip, ATSS's per-scale size
    ranges and its box voting.
    """

    score_thr: float = 0.05
    pre_nms_topk: int = 1000  # per FPN level, per image
    nms_iou: float = 0.6
    max_dets: int = 100
    #: horizontal-flip test-time augmentation
    flip: bool = False
    #: resize factors of the test image (None: single scale)
    scales: list[float] | None = None
    #: per scale ``[min, max]``: a pass keeps only detections whose box area in *its own* (resized)
    #: frame lies in ``[min², max²]`` (ATSS's scale ranges); None keeps all
    scale_ranges: list[list[float]] | None = None
    #: how the passes' detections are merged: "vote" = per pass NMS, then ATSS's soft box voting;
    #: "nms" = one class-aware NMS over all passes' candidates
    merge: Literal["nms", "vote"] = "vote"
    #: IoU with the best box of a class from which a detection joins its vote
    vote_iou: float = 0.66
    #: detections kept per image after the vote (merge "vote"; None: ``max_dets``); each pass keeps
    #: ``max_dets`` before it.
    #: The reference's multi-scale test keeps 1000 (``mmdet/models/detectors/lsnet.py:355-365``,
    #: ``lscpvnet.py:273-283``): the ``_mstest`` configs. COCO scores up to 100 per image *and class*.
    vote_max_dets: int | None = None
    #: with model.cpv: move the box corners of P4–P7 detections to the verified corners (False keeps
    #: the boxes of the landmarks; the corner maps still feed the stage-2 features)
    cpv_refine: bool = True

    def __post_init__(self) -> None:
        check_range(self.score_thr, "score_thr", ge=0, le=1)
        check_range(self.pre_nms_topk, "pre_nms_topk", ge=1)
        check_range(self.nms_iou, "nms_iou", gt=0, le=1)
        check_range(self.max_dets, "max_dets", ge=1)
        check_range(self.vote_iou, "vote_iou", gt=0, le=1)
        if self.vote_max_dets is not None:
            check_range(self.vote_max_dets, "vote_max_dets", ge=1)
        if self.merge not in ("nms", "vote"):
            raise ValueError(f"model.test.merge must be 'nms' or 'vote', got {self.merge!r}")
        if self.scales is not None:
            self.scales = [float(s) for s in self.scales]
            if not self.scales or any(s <= 0 for s in self.scales):
                raise ValueError(f"model.test.scales must be a non-empty list of factors > 0, got {self.scales}")
            if len(set(self.scales)) != len(self.scales):  # a pass run twice weighs its boxes double in the vote
                raise ValueError(f"model.test.scales lists a factor more than once: {self.scales}")
        if self.scale_ranges is not None:
            n = len(self.scales) if self.scales is not None else 1
            ranges = [[float(v) for v in r] for r in self.scale_ranges]
            if len(ranges) != n or any(len(r) != 2 or not 0 <= r[0] < r[1] for r in ranges):
                raise ValueError(f"model.test.scale_ranges: need {n} pairs [min, max] with 0 <= min < max "
                                 f"(one per scale), got {self.scale_ranges}")
            self.scale_ranges = ranges

    @property
    def augmented(self) -> bool:
        """Whether inference is test-time augmented (flip or scales given)."""
        return self.flip or self.scales is not None


@dataclass
class ModelConfig:
    task: Literal["bbox", "segm", "pose"] = "bbox"
    num_classes: int = 80
    #: landmarks per object; None -> the task's default (4 extreme points / 36 contour points / 17 keypoints).
    num_points: int | None = None

    # --- backbone (lsnet.modeling.backbone) ---
    #: torchvision ResNet/ResNeXt, or Res2Net from timm (res2net101d = the reference's R2-101 v1d)
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnext101_64x4d", "res2net50_26w_4s",
                      "res2net101_26w_4s", "res2net50d", "res2net101d"] = "resnet50"
    #: torchvision weights enum name ("ResNet50_Weights.IMAGENET1K_V1"), "timm" (Res2Net: timm's
    #: ImageNet weights), a local checkpoint path, or None.
    pretrained: str | None = None
    #: -1: nothing frozen; 0: the stem; k >= 1: the stem and stages 1..k (paper/mmdet: 1).
    frozen_stages: int = 1
    #: BatchNorm statistics and affine parameters frozen (FrozenBatchNorm2d), as for detection fine-tuning.
    norm_eval: bool = True
    #: with norm_eval: mmdet's norm_eval instead -- BatchNorm statistics frozen, its weight/bias trained
    #: (the reference configs); False: FrozenBatchNorm2d (statistics and affine fixed).
    norm_affine_trains: bool = False
    #: ResNet stages (3, 4, 5 = c3..c5) whose 3x3 convs become deformable convolutions.
    dcn_stages: list[int] = field(default_factory=list)
    #: "v1" deformable conv (DCN), "v2" modulated (DCNv2, the reference configs' choice).
    dcn_type: Literal["v1", "v2"] = "v1"

    # --- FPN (lsnet.modeling.fpn) ---
    fpn_channels: int = 256
    #: P6 is computed from P5 ("p5", torchvision FCOS/ATSS) or from C5 ("c5", RetinaNet).
    fpn_extra_source: Literal["p5", "c5"] = "p5"
    #: "gn": every FPN conv is conv -> GroupNorm(norm_groups) (the reference configs); "none": plain convs.
    fpn_norm: Literal["none", "gn"] = "none"
    #: ReLU on P6 before the P7 conv (torchvision); the reference has none (mmdet relu_before_extra_convs=False).
    fpn_relu_before_p7: bool = True
    strides: tuple[int, ...] = FPN_STRIDES

    # --- head ---
    #: "reference": the authors' head tensor for tensor (lsnet.modeling.reference_head: DCNv2 towers,
    #: softplus vectors in stride units with a centre point, 3-level concat pyramid DCN);
    #: "compact": our lighter head (lsnet.modeling.head: plain towers, exp vectors, mean pyramid DCN).
    head: Literal["reference", "compact"] = "compact"
    #: reference head: the centre point's vector is part of HeadOutputs (N+1 vectors, centre last)
    #: for a loss that trains it; False leaves it out (it is still a DCN tap).
    center_vector: bool = False
    #: reference head: "compound" = the reference's in-place offset scaling (the 2nd neighbour level's
    #: factor compounds); "exact" = each pyramid level's offset scaled by its own size ratio.
    pyramid_offset_scaling: Literal["compound", "exact"] = "compound"
    #: reference head: tower convs are DCNv2 (the reference configs' conv_module_type='dcn') or plain.
    deformable_towers: bool = True
    head_channels: int = 256
    head_convs: int = 3  # 3x3 conv + GroupNorm + ReLU layers in each shared tower
    norm_groups: int = 32  # GroupNorm groups (reduced automatically when channels are not divisible)
    #: Table 3 ablation: "PA" anchor-point features only, "PE" + landmark features (DCN) on the
    #: object's level, "PP" + the same landmarks on the adjacent FPN levels (pyramid DCN, §3.4).
    feature_mode: Literal["PA", "PE", "PP"] = "PP"
    #: how the pyramid DCN fuses the 2–3 sampled levels.
    pyramid_fuse: Literal["mean", "sum"] = "mean"
    #: gradient reaching the stage-1 vectors through the DCN sampling positions is scaled by this.
    dcn_offset_grad_scale: float = 0.1
    #: which 9 landmarks drive the DCN kernel for N != 4 (None: sampled uniformly, see head.py).
    dcn_point_indices: list[int] | None = None
    #: pose only, consumed by the data side (record_to_targets): assign samples by the box of the
    #: labelled keypoints ("kps") or by the object box ("obj").
    pose_box: Literal["kps", "obj"] = "kps"
    #: pose only: also predict the person box as 4 more vectors (to the box's edge midpoints, in the
    #: extreme-point order top, left, bottom, right) with their own cross-IOU loss (weights
    #: loss.box_beta / box_gamma); detections take their box from them. An obj-box person's box is not
    #: the box of its keypoints (or it has none labelled), so None = on for "obj", off for "kps" --
    #: as the reference, which has the box branch in its obj-box pose head only.
    pose_box_vectors: bool | None = None
    #: bbox only (Table 2): the 4 landmarks are the extreme points ("extreme") or the midpoints of
    #: the box edges ("box": the rectangle itself, top/left/bottom/right like the extreme points).
    target_style: Literal["extreme", "box"] = "extreme"
    #: False: stage-1-only model (Table 2) — no refinement loss, detections from the stage-1 vectors.
    refine: bool = True
    #: bbox only: CPV, corner point verification (Table 1's LSNet-CPV rows, lsnet.modeling.cpv):
    #: corner heatmaps + offsets whose maps join the stage-2 features and move the box corners of
    #: P4–P7 detections at test time. Off as the paper's main LSNet rows. With head=reference it is
    #: built as the authors' lscpvnet_head.py (foreground branch, maps concatenated before the DCNs).
    cpv: bool = False

    loss: LossConfig = field(default_factory=LossConfig)
    test: TestConfig = field(default_factory=TestConfig)

    @property
    def num_box_points(self) -> int:
        """Landmarks the head predicts after the task's N for the person box (0 or 4)."""
        return 4 if self.pose_box_vectors else 0

    def __post_init__(self) -> None:
        if self.num_points is None:
            self.num_points = TASK_NUM_POINTS[self.task]
        if self.loss.atss_on not in ("anchors", "init"):
            raise ValueError(f"model.loss.atss_on must be 'anchors' or 'init', got {self.loss.atss_on!r}")
        if self.pose_box_vectors is None:
            self.pose_box_vectors = self.task == "pose" and self.pose_box == "obj"
        if self.pose_box_vectors and self.task != "pose":
            raise ValueError("model.pose_box_vectors is for the pose task only")
        if self.task == "bbox" and self.num_points != 4:
            raise ValueError(f"model.num_points: the bbox task uses the 4 extreme points, got {self.num_points}")
        if self.task == "pose" and self.num_points != 17:
            raise ValueError(f"model.num_points: the pose task uses the 17 COCO keypoints, got {self.num_points}")
        if self.head not in ("reference", "compact"):
            raise ValueError(f"model.head must be 'reference' or 'compact', got {self.head!r}")
        if self.pyramid_offset_scaling not in ("compound", "exact"):
            raise ValueError(f"model.pyramid_offset_scaling must be 'compound' or 'exact', got "
                             f"{self.pyramid_offset_scaling!r}")
        if self.fpn_norm not in ("none", "gn"):
            raise ValueError(f"model.fpn_norm must be 'none' or 'gn', got {self.fpn_norm!r}")
        if self.head == "compact" and self.center_vector:
            raise ValueError("model.center_vector needs model.head=reference (the compact head has no centre)")
        if self.cpv and self.task != "bbox":
            raise ValueError(f"model.cpv: corner point verification is for the bbox task, not {self.task!r}")
        if self.target_style == "box" and self.task != "bbox":
            raise ValueError(f"model.target_style: 'box' is a bbox target, not for task {self.task!r}")
        if self.num_points < 4:
            raise ValueError(f"model.num_points must be >= 4, got {self.num_points}")
        if self.num_classes < 1:
            raise ValueError(f"model.num_classes must be >= 1, got {self.num_classes}")
        if tuple(self.strides) != FPN_STRIDES:
            raise ValueError(f"model.strides: LSNet uses P3–P7 with strides {FPN_STRIDES}, got {tuple(self.strides)}")
        self.strides = tuple(self.strides)
        if self.backbone not in BACKBONES:
            raise ValueError(f"model.backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.dcn_type not in ("v1", "v2"):
            raise ValueError(f"model.dcn_type must be 'v1' (DCN) or 'v2' (modulated DCNv2), got {self.dcn_type!r}")
        bad = [s for s in self.dcn_stages if s not in (3, 4, 5)]
        if bad:
            raise ValueError(f"model.dcn_stages: stages are 3, 4, 5 (c3..c5), got {list(self.dcn_stages)}")
        if not -1 <= self.frozen_stages <= 4:
            raise ValueError(f"model.frozen_stages must be in -1..4, got {self.frozen_stages}")
        if self.dcn_point_indices is not None:
            idx = list(self.dcn_point_indices)
            if len(idx) != 9 or not all(0 <= i < self.num_points for i in idx):
                raise ValueError(f"model.dcn_point_indices: need 9 indices in [0, {self.num_points}), got {idx}")
        if self.head_convs < 0 or self.head_channels < 1 or self.fpn_channels < 1:
            raise ValueError("model.head_convs must be >= 0 and channel counts >= 1")
