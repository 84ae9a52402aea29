"""What changes the shard bytes (:class:`PreprocessConfig`), the constants of the job and its error."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from lsnet.errors import LsnetError
from lsnet.targets import TargetConfig

#: Test hook: ``"N"`` exits the process (os._exit) right after the N-th shard of this run is written;
#: ``"N:before_rename"`` exits after the N-th shard's temp file is written but before its rename.
CRASH_ENV = "LSNET_PREPROCESS_CRASH_AFTER_SHARDS"


#: Planned bytes per stored pixel (JPEG q90 4:2:0 measured 0.25 B/px on tiny_coco, 0.37 on the noisy
#: synthetic images); only shard sizes depend on it.
BYTES_PER_PIXEL_ESTIMATE = 0.35


#: Rejections that depend on the image files being there, not on the data: a rerun redoes such shards.
RETRYABLE_REJECTIONS = ("missing_file", "unreadable_file")


#: A job that rejects more than this fraction of its images fails (after writing its manifest).
DEFAULT_MAX_REJECT_FRACTION = 0.5


ROW_OVERHEAD_BYTES = 4096


#: Rows per write group of :class:`ShardWriter` (part of the byte layout: fixed, not a setting).
SHARD_WRITE_GROUP_ROWS = 64


#: Pillow's ``subsampling`` codes.
JPEG_SUBSAMPLING = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}


EXTRA_FIELDS = (("shard", pa.int32()), ("reject_code", pa.string()), ("reject_reason", pa.string()),
                 ("ann_rejections", pa.string()))


class PreprocessError(LsnetError, ValueError):
    """The input cannot be preprocessed at all (malformed JSON, broken category list, ...)."""


@dataclass
class PreprocessConfig:
    """Everything that changes the shard bytes (recorded in the manifest and in every plan hash)."""

    max_size: int = 1333
    jpeg_quality: int = 90
    #: Chroma subsampling of the stored JPEGs: "4:2:0" decodes ~1.3-1.4x faster than "4:4:4" at the
    #: same quality (libjpeg-turbo upsamples the half-resolution chroma planes cheaply).
    jpeg_subsampling: str = "4:2:0"
    #: Store the original bytes of an RGB JPEG that needs no resize (no generation loss, but the
    #: reader then decodes whatever quality / chroma layout the source has).
    keep_original_jpeg: bool = False
    shard_size_mb: float = 256.0
    max_rows_per_shard: int | None = None
    target: TargetConfig = field(default_factory=TargetConfig)

    def __post_init__(self) -> None:
        if self.max_size < 16:
            raise ValueError(f"max_size must be >= 16, got {self.max_size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.jpeg_subsampling not in JPEG_SUBSAMPLING:
            raise ValueError(f"jpeg_subsampling must be one of {sorted(JPEG_SUBSAMPLING)}, got {self.jpeg_subsampling!r}")
        if not self.shard_size_mb > 0:
            raise ValueError(f"shard_size_mb must be > 0, got {self.shard_size_mb}")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"]["contour_points"] = list(self.target.contour_points)
        return d
