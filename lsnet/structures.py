"""The one landmark representation that flows from the shards to the loss and out to evaluation.

docs/design.md §3: every object is a box, a label and ``N`` landmark points with visibility. Extreme
points (N=4), contour points (N=18/36/72) and COCO keypoints (N=17) all share this shape; the task
only decides ``N`` and how the points are produced and consumed.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

#: Tasks and their default number of landmarks (paper §3.2).
TASK_NUM_POINTS: dict[str, int] = {"bbox": 4, "segm": 36, "pose": 17}

#: Order of the four non-negative components of a cross-coordinate vector (paper §3.3 and
#: Appendix A): ``(dy)^-, (dy)^+, (dx)^-, (dx)^+`` = towards top, bottom, left, right.
#: This is also the layout of the authors' reference tensors (the golden vectors under tests/data).
COMPONENTS: tuple[str, str, str, str] = ("top", "bottom", "left", "right")

#: Extreme points are stored in this order (paper Fig. 1).
EXTREME_POINT_NAMES: tuple[str, str, str, str] = ("top", "left", "bottom", "right")
#: Horizontal flip swaps left and right extreme points; top/bottom stay.
EXTREME_FLIP_INDEX: tuple[int, int, int, int] = (0, 3, 2, 1)

COCO_KEYPOINT_NAMES: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
#: Index of each keypoint's mirror image under a horizontal flip.
COCO_KEYPOINT_FLIP_INDEX: tuple[int, ...] = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)
#: COCO person skeleton as 0-based index pairs (for drawing).
COCO_SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
    (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)


@dataclass
class LandmarkTargets:
    """Ground truth of one image for one task, in the pixel frame of the image tensor it goes with.

    Shapes (``M`` objects, ``N`` landmarks per object):

    - ``boxes``   (M, 4) float32, ``x1, y1, x2, y2``. For pose this is the box used for sample
      assignment: the object box ('obj-box') or the box of labelled keypoints ('kps-box').
    - ``labels``  (M,) int64, contiguous class index ``0..C-1``.
    - ``points``  (M, N, 2) float32, ``x, y``.
    - ``visible`` (M, N) bool; landmarks with ``visible == False`` carry no loss (keypoints v == 0).
    - ``iscrowd`` (M,) bool; crowd regions are ignored by the assigners, never positives.
    """

    boxes: Tensor
    labels: Tensor
    points: Tensor
    visible: Tensor
    iscrowd: Tensor

    def __post_init__(self) -> None:
        m = self.boxes.shape[0]
        if self.boxes.shape != (m, 4):
            raise ValueError(f"boxes must be (M, 4), got {tuple(self.boxes.shape)}")
        if self.points.dim() != 3 or self.points.shape[0] != m or self.points.shape[2] != 2:
            raise ValueError(f"points must be (M={m}, N, 2), got {tuple(self.points.shape)}")
        if self.visible.shape != self.points.shape[:2]:
            raise ValueError(f"visible must be {tuple(self.points.shape[:2])}, got {tuple(self.visible.shape)}")
        if self.labels.shape != (m,) or self.iscrowd.shape != (m,):
            raise ValueError("labels and iscrowd must be (M,)")

    @property
    def num_points(self) -> int:
        return self.points.shape[1]

    def __len__(self) -> int:
        return self.boxes.shape[0]

    @property
    def centers(self) -> Tensor:
        """(M, 2) box centres: the anchor point each object is regressed from (paper §3.1)."""
        return (self.boxes[:, :2] + self.boxes[:, 2:]) / 2

    @classmethod
    def empty(cls, num_points: int) -> LandmarkTargets:
        return cls(
            boxes=torch.zeros(0, 4),
            labels=torch.zeros(0, dtype=torch.int64),
            points=torch.zeros(0, num_points, 2),
            visible=torch.zeros(0, num_points, dtype=torch.bool),
            iscrowd=torch.zeros(0, dtype=torch.bool),
        )

    def to(self, device: torch.device | str) -> LandmarkTargets:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __getitem__(self, index) -> LandmarkTargets:
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)})


#: ImageNet statistics (RGB, 0–255 scale) that torchvision backbones were trained with.
IMAGE_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
IMAGE_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
#: Batched images are zero-padded (after normalisation) to a multiple of this.
SIZE_DIVISOR: int = 32


@dataclass
class ImageMeta:
    """Where an image tensor came from, to map predictions back to COCO (original-pixel) coordinates.

    ``current = original * scale`` (then mirrored if ``flipped``); ``size`` is the valid region of
    the image inside its zero-padded batch tensor.
    """

    image_id: int
    orig_size: tuple[int, int]  # (h, w) of the original image
    size: tuple[int, int]  # (h, w) after resizing, before padding
    scale: tuple[float, float]  # (sx, sy)
    flipped: bool = False


@dataclass
class Batch:
    """What the data readers yield and the engine consumes.

    - ``images``  (B, 3, H, W) float32, normalised with IMAGE_MEAN/IMAGE_STD, zero-padded to SIZE_DIVISOR.
    - ``targets`` B × :class:`LandmarkTargets` in the pixel frame of ``images``.
    - ``metas``   B × :class:`ImageMeta`.
    """

    images: Tensor
    targets: list[LandmarkTargets]
    metas: list[ImageMeta]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.images.to(device, non_blocking=True), [t.to(device) for t in self.targets], self.metas)

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class Detections:
    """Predictions for one image, in the pixel frame of the image the model saw.

    ``boxes`` (K, 4) xyxy; ``scores`` (K,); ``labels`` (K,) int64 0..C-1; ``points`` (K, N, 2);
    ``point_scores`` (K, N) or None (per-keypoint confidence for pose).
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    points: Tensor
    point_scores: Tensor | None = None

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def to(self, device: torch.device | str) -> Detections:
        ps = None if self.point_scores is None else self.point_scores.to(device)
        return Detections(self.boxes.to(device), self.scores.to(device), self.labels.to(device),
                          self.points.to(device), ps)
