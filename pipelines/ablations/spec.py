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
#: the scales a table may define, smallest first (`signal`: the CPU scale where the paper's claims resolve)
SCALES = ("tiny", "signal", "small", "full")


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
    #: synthetic: held-out images drawn with ``seed + 1`` (0: evaluate on the training images)
    num_val_images: int = 0
    #: synthetic: fewest and most objects per image
    objects_per_image: list[int] = field(default_factory=lambda: [1, 3])
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
    #: K: every trained variant runs with train.seed = 0 .. K-1 (model init and data order), each seed
    #: one trial of the table's search; the report gives mean ± 95 % t interval and paired tests
    seeds: int = 1


@dataclass
class VariantSpec:
    name: str
    label: str = ""
    overrides: list[str] = field(default_factory=list)
    paper: float | None = None
    kind: Literal["train", "mask_upper_bound"] = "train"
    num_points: int | None = None  # mask_upper_bound


@dataclass
class CurveClaimSpec:
    """A claim the paper reads off a training curve (Figure 4: cross-IOU's positive IoU rises faster):
    ``variant``'s per-step ``metric`` is higher (``higher_is_better``) than every other variant's."""

    variant: str
    metric: str = "pos_iou"
    higher_is_better: bool = True


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
    curve_claim: CurveClaimSpec | None = None
    #: orders the paper states without numbers, ``[better, worse]`` (e.g. Appendix A: alpha 0.2 over 0),
    #: tested like the pairs it ranks by number
    paper_claims: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        if not names:
            raise ConfigError("variants: at least one variant")
        if len(set(names)) != len(names):
            raise ConfigError(f"variants: duplicate names in {names}")
        bad = sorted(set(self.scales) - set(SCALES))
        if bad:
            raise ConfigError(f"scales: unknown scale {bad[0]!r} ({', '.join(SCALES)})")
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
        for scale, s in self.scales.items():
            if s.seeds < 1:
                raise ConfigError(f"scales.{scale}.seeds must be >= 1, got {s.seeds}")
            d = s.data
            if len(d.objects_per_image) != 2 or not 1 <= d.objects_per_image[0] <= d.objects_per_image[1]:
                raise ConfigError(f"scales.{scale}.data.objects_per_image: expected [fewest, most] with "
                                  f"1 <= fewest <= most, got {d.objects_per_image}")
            if d.num_val_images < 0:
                raise ConfigError(f"scales.{scale}.data.num_val_images must be >= 0, got {d.num_val_images}")
        for claim in self.paper_claims:
            if len(claim) != 2 or not set(claim) <= set(names) or claim[0] == claim[1]:
                raise ConfigError(f"paper_claims: {claim} is not [better variant, worse variant]")
        if self.curve_claim is not None and self.curve_claim.variant not in names:
            raise ConfigError(f"curve_claim.variant: no variant {self.curve_claim.variant!r}")
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
