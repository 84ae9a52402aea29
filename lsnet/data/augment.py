"""Training augmentations and batching (paper §4: single-scale [800, 1333] or multi-scale
[400–960, 1333] resize with random horizontal flip).

Per sample (uint8 in, uint8 out, so the expensive float work is done once per batch):

1. resize keeping the aspect ratio so the short side is ``S`` (drawn uniformly from
   ``scale_range`` in training, ``test_short_side`` otherwise) unless the long side would exceed
   ``max_size``; targets follow (:func:`lsnet.transforms.resize_hflip_targets`: resize and flip
   in one pass);
2. horizontal flip with probability ``flip_prob``; landmarks follow as in
   :func:`lsnet.transforms.hflip_targets` (left/right extreme points and keypoints swap, contours
   stay clockwise with a consistent start point).

The random draws depend only on ``(seed, epoch, index)`` -- not on worker, rank, or order -- so every
reader (map-style, Ray Data streaming, any number of workers) produces the same sample.
:func:`collate_batch` then converts to float, normalises with the ImageNet statistics and zero-pads
to a multiple of :data:`lsnet.structures.SIZE_DIVISOR`.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
import threading
from dataclasses import dataclass, replace

import cv2
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor

from lsnet.structures import IMAGE_MEAN, IMAGE_STD, SIZE_DIVISOR, Batch, ImageMeta, LandmarkTargets
from lsnet.transforms import resize_hflip_targets

# RGB straight from libjpeg-turbo (OpenCV >= 4.10), else BGR + one channel swap. EXIF orientation is
# ignored: COCO annotations are in the stored pixel frame (as PIL and torchvision read it).
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
_IMREAD_FLAGS = (cv2.IMREAD_COLOR if _IMREAD_RGB is None else _IMREAD_RGB) | cv2.IMREAD_IGNORE_ORIENTATION


@dataclass
class AugmentConfig:
    """``scale_range``: (min, max) short side in pixels, or None to keep the stored size.
    ``max_size``: cap on the long side. ``test_short_side``: short side when not training
    (default: ``scale_range[1]``)."""

    scale_range: tuple[int, int] | None = (800, 800)
    max_size: int = 1333
    flip_prob: float = 0.5
    test_short_side: int | None = None

    def __post_init__(self) -> None:
        if self.scale_range is not None:
            lo, hi = self.scale_range
            if not 0 < lo <= hi:
                raise ValueError(f"scale_range must be 0 < min <= max, got {self.scale_range}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")


#: The starts of libjpeg(-turbo)'s warning messages (jerror.h, JWRN_*) that mean damaged data. libjpeg
#: decodes on after them (grey blocks, shifted colours) and only prints them to the C stderr.
JPEG_WARNINGS = ("Corrupt JPEG data", "Premature end of JPEG file", "Invalid SOS parameters",
                 "Inconsistent progression sequence", "Application transferred too many scanlines")
_FD2_LOCK = threading.Lock()
_capture_files: dict[int, int] = {}  # pid -> file descriptor of this process's capture file


def _capture_fd() -> int:
    """A temporary file of this process (not shared with a forked child: its offset would be)."""
    fd = _capture_files.get(os.getpid())
    if fd is None:
        with tempfile.TemporaryFile() as handle:  # already unlinked: our duplicate keeps it open
            fd = _capture_files[os.getpid()] = os.dup(handle.fileno())
    return fd


def _imdecode_with_messages(buffer: np.ndarray) -> tuple[np.ndarray | None, list[str]]:
    """``cv2.imdecode`` with file descriptor 2 redirected to a file for the call: returns the pixels
    and the lines libjpeg printed. Whatever another thread wrote to stderr meanwhile is passed on."""
    with _FD2_LOCK:
        capture = _capture_fd()
        os.ftruncate(capture, 0)
        os.lseek(capture, 0, os.SEEK_SET)
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture, 2)
        try:
            pixels = cv2.imdecode(buffer, _IMREAD_FLAGS)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        size = os.lseek(capture, 0, os.SEEK_END)
        text = os.pread(capture, size, 0).decode("utf-8", "replace") if size else ""
    jpeg, other = [], []
    for line in text.splitlines(keepends=True):
        (jpeg if line.startswith(JPEG_WARNINGS) else other).append(line)
    if other:
        os.write(2, "".join(other).encode())
    return pixels, [line.strip() for line in jpeg]


def decode_jpeg(data, strict: bool = False) -> Tensor:
    """JPEG bytes (bytes / pyarrow Buffer / memoryview) -> uint8 (3, H, W) RGB.

    Decoded in place from the given buffer (a memory-mapped shard needs no copy) by OpenCV's
    libjpeg-turbo: the same pixels as ``torchvision.io.decode_jpeg``, whose image decoding is
    deprecated. The tensor is a channels-last view ``(H, W, 3).permute(2, 0, 1)``.

    ``strict``: a libjpeg warning about damaged data (:data:`JPEG_WARNINGS`, e.g. "Corrupt JPEG data:
    bad Huffman code") is a ``ValueError`` instead of a line on stderr and a garbled image. It costs a
    few system calls per image (stderr is redirected for the call) and decodes one image at a time
    per process.
    """
    buffer = np.frombuffer(data, dtype=np.uint8)
    if strict:
        pixels, warnings = _imdecode_with_messages(buffer)
        if warnings:
            raise ValueError(f"damaged JPEG data ({len(buffer)} bytes): libjpeg: {'; '.join(warnings)}")
    else:
        pixels = cv2.imdecode(buffer, _IMREAD_FLAGS)
    if pixels is None or pixels.ndim != 3:
        raise ValueError(f"cannot decode a {memoryview(data).nbytes}-byte buffer as a colour JPEG")
    if _IMREAD_RGB is None:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
    return torch.from_numpy(pixels).permute(2, 0, 1)


def resized_shape(height: int, width: int, short_side: int | None, max_size: int | None) -> tuple[int, int]:
    """(h, w) with the short side ``short_side`` and the long side at most ``max_size``, aspect kept.

    ``short_side=None`` keeps the size (only ``max_size`` applies).
    """
    scale = 1.0 if short_side is None else short_side / min(height, width)
    if max_size is not None:
        scale = min(scale, max_size / max(height, width))
    if scale == 1.0:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


def uniforms(seed: int, epoch: int, index: int) -> tuple[float, float]:
    """Two uniform numbers in [0, 1) that are a pure, portable function of ``(seed, epoch, index)``.

    A keyed hash rather than a seeded generator: ~1 µs instead of ~10 µs per sample, and identical on
    every platform, process and reader.
    """
    digest = hashlib.blake2b(b"%d,%d,%d" % (seed, epoch, index), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64, int.from_bytes(digest[8:], "little") / 2.0**64


def sample_params(cfg: AugmentConfig, train: bool, seed: int, epoch: int, index: int) -> tuple[int | None, bool]:
    """``(short_side, flip)`` of sample ``index``: a pure function of ``(seed, epoch, index)``."""
    if not train:
        short = cfg.test_short_side or (cfg.scale_range[1] if cfg.scale_range else None)
        return short, False
    draw_short, draw_flip = uniforms(seed, epoch, index)  # both always drawn: stable if a setting changes
    short = None
    if cfg.scale_range is not None:
        lo, hi = cfg.scale_range
        short = lo + min(int(draw_short * (hi - lo + 1)), hi - lo)
    return short, bool(draw_flip < cfg.flip_prob)


def augment_sample(image: Tensor, targets: LandmarkTargets, meta: ImageMeta, cfg: AugmentConfig, *,
                   task: str, train: bool, seed: int = 0, epoch: int = 0, index: int = 0,
                   ) -> tuple[Tensor, LandmarkTargets, ImageMeta]:
    """Resize (+ flip in training) one uint8 (3, H, W) image with its targets and meta."""
    short, flip = sample_params(cfg, train, seed, epoch, index)
    h, w = image.shape[-2:]
    nh, nw = resized_shape(h, w, short, cfg.max_size)
    resize = (nh, nw) != (h, w)
    # A horizontal flip commutes with the resize (the bilinear sampling grid is mirror-symmetric;
    # tests/test_shards.py checks the pixels are identical), so flip whichever image is smaller.
    flip_first = flip and nh * nw >= h * w
    if flip_first:
        image = image.flip(-1)
    if resize:
        # uint8 bilinear with antialias has a fast SIMD path in torch and matches float results to
        # +-1 grey level; down-scaling without antialias would alias thin structures. (resize_image
        # is TF.resize's tensor kernel, called directly: per-sample dispatch is not free.)
        image = TF.resize_image(image, [nh, nw], antialias=True)
    if flip and not flip_first:
        image = image.flip(-1)
    if resize or flip:
        targets = resize_hflip_targets(targets, (nw / w, nh / h) if resize else None, nw if flip else None, task)
        meta = replace(meta, size=(nh, nw), scale=(meta.scale[0] * nw / w, meta.scale[1] * nh / h),
                       flipped=meta.flipped != flip)
    return image, targets, meta


_MEAN = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGE_STD).view(3, 1, 1)


def collate_batch(items: list[tuple[Tensor, LandmarkTargets, ImageMeta]],
                  size_divisor: int = SIZE_DIVISOR) -> Batch:
    """Samples -> :class:`lsnet.structures.Batch`: float, normalised, zero-padded (bottom/right) to a
    multiple of ``size_divisor``. Padding needs no change of coordinates."""
    if not items:
        raise ValueError("collate_batch needs at least one sample")
    h = max(img.shape[-2] for img, _, _ in items)
    w = max(img.shape[-1] for img, _, _ in items)
    h = int(math.ceil(h / size_divisor) * size_divisor)
    w = int(math.ceil(w / size_divisor) * size_divisor)
    images = torch.zeros(len(items), 3, h, w)
    for i, (img, _, _) in enumerate(items):
        ih, iw = img.shape[-2:]
        region = images[i, :, :ih, :iw]
        region.copy_(img)
        region.sub_(_MEAN).div_(_STD)
    return Batch(images=images, targets=[t for _, t, _ in items], metas=[m for _, _, m in items])
