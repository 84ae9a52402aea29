"""Ablation table specs (``jobs/ablations/TABLE.yaml``), validated on load.

::

    name: table2
    title: "Table 2: regression losses (detection, stage 1 only)"
    task: bbox
    metric: bbox_AP                   # the number in the table (final evaluation of each variant)
    paper_source: "LSNet (ICCV 2021) Table 2, COCO val2017, R-50, 12 epochs"
    tolerance: 0.05                   # |ours - previous run of the same table/scale| beyond this: regression
    base_overrides: [model.refine=false]       # applied to every variant
    variants:
      - {name: giou_rectangle, label: "GIoU, rectangle", paper: 34.6,
         overrides: [model.target_style=box, model.loss.init_loss=giou]}
    scales:
      tiny:  {config: configs/tiny_bbox.yaml, dataset: synthetic, schedule: "3 epochs", overrides: [...]}
      small: {config: ..., dataset: coco_mini, ...}
      full:  {config: configs/bbox_r50_1x.yaml, dataset: coco2017, ...}

A variant of ``kind: mask_upper_bound`` trains nothing: its number is the mask AP of the ground-truth
masks quantised to ``num_points`` contour points (paper §4.4, :mod:`lsnet.mask_study`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lsnet.config import ConfigError, from_dict, read_yaml_mapping
from pipelines.paths import REPO_ROOT

ABLATION_DIR = REPO_ROOT / "jobs" / "ablations"


class AblationSpecError(ConfigError):
    """An ablation spec does not parse or validate (one line: ``FILE: problem``)."""


@dataclass
class DatasetSpec:
    """Where a scale's data comes from; prepared (and cached) by :mod:`pipelines.ablations.data`."""

    source: Literal["synthetic", "coco", "shards"] = "synthetic"
    #: synthetic: images / size / seed; person_prob 1.0 for pose
    num_images: int = 8
    image_size: int = 64
    seed: int = 0
    person_prob: float = 0.0
    #: coco: annotation JSON + image dir (val_* optional: None = evaluate on the training images)
    ann: str | None = None
    images: str | None = None
    val_ann: str | None = None
    val_images: str | None = None
    #: shards: existing shard directories
    train_shards: str | None = None
    val_shards: str | None = None
    max_size: int = 128
    contour_points: list[int] = field(default_factory=lambda: [18, 36, 72])


@dataclass
class ScaleSpec:
    config: str
    dataset_name: str
    data: DatasetSpec = field(default_factory=DatasetSpec)
    schedule: str = ""  # how long, in words, for the report ("3 epochs of 4 steps")
    overrides: list[str] = field(default_factory=list)
    #: flag a variant order that disagrees with the paper's (only meaningful at full scale)
    check_paper_ranking: bool = False
    address: str | None = None  # Ray address for the variants' training runs (None: local)


@dataclass
class VariantSpec:
    name: str
    label: str = ""
    overrides: list[str] = field(default_factory=list)
    paper: float | None = None
    kind: Literal["train", "mask_upper_bound"] = "train"
    num_points: int | None = None  # mask_upper_bound


@dataclass
class AblationSpec:
    name: str
    title: str
    task: Literal["bbox", "segm", "pose"]
    metric: str
    variants: list[VariantSpec]
    scales: dict[str, ScaleSpec]
    paper_source: str = ""
    tolerance: float = 0.05
    higher_is_better: bool = True
    base_overrides: list[str] = field(default_factory=list)
    experiment: str = "lsnet-ablations"
    notes: str = ""

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        if not names:
            raise ConfigError("variants: at least one variant")
        if len(set(names)) != len(names):
            raise ConfigError(f"variants: duplicate names in {names}")
        bad = sorted(set(self.scales) - {"tiny", "small", "full"})
        if bad:
            raise ConfigError(f"scales: unknown scale {bad[0]!r} (tiny, small, full)")
        for scale, s in self.scales.items():
            path = Path(s.config)
            if not (path if path.is_absolute() else REPO_ROOT / path).is_file():
                raise ConfigError(f"scales.{scale}.config: file not found: {s.config}")
        for v in self.variants:
            if v.kind == "mask_upper_bound" and not v.num_points:
                raise ConfigError(f"variants.{v.name}: mask_upper_bound needs num_points")
            for item in v.overrides:
                if "=" not in item:
                    raise ConfigError(f"variants.{v.name}.overrides: {item!r} is not key=value")
        if self.tolerance < 0:
            raise ConfigError(f"tolerance must be >= 0, got {self.tolerance}")

    def scale(self, scale: str, source: str = "") -> ScaleSpec:
        if scale not in self.scales:
            raise AblationSpecError(f"{source or self.name}: no scale {scale!r} (has: {', '.join(self.scales)})")
        return self.scales[scale]


def resolve_ablation_path(table: str) -> Path:
    path = Path(table)
    if path.suffix in (".yaml", ".yml"):
        return path
    return ABLATION_DIR / f"{table}.yaml"


def load_ablation_spec(table: str | Path) -> AblationSpec:
    """``table2`` (-> jobs/ablations/table2.yaml) or a path; errors are one line naming the file."""
    path = resolve_ablation_path(str(table))
    known = ", ".join(sorted(p.stem for p in ABLATION_DIR.glob("*.yaml")))
    data = read_yaml_mapping(path, AblationSpecError, "ablation spec", missing_hint=f" (known tables: {known})")
    try:
        return from_dict(AblationSpec, data)
    except ConfigError as err:
        raise AblationSpecError(f"{path}: {err}") from None
