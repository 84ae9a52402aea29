"""``lsnet bench mask_study``: the paper's §4.4 upper bound on a COCO JSON (tiny_coco by default).

Ground-truth masks quantised to N-point contour polygons (our targets) and to a 36-ray polar
representation, rasterised and evaluated as predictions with pycocotools (see :mod:`lsnet.mask_study`).
"""

from __future__ import annotations

import itertools
from pathlib import Path

from lsnet.bench import REPO_ROOT, BenchResult
from lsnet.mask_study import mask_study

#: Paper §4.4, COCO val2017 (contours only; the paper gives no polar number).
PAPER_MASK_AP = {18: 0.890, 36: 0.974, 72: 0.992}


def run(
    annotations: str = "../shared/data/tiny_coco/annotations/instances_train2017.json",
    num_points: list[int] = (18, 36, 72),
    polar_rays: int = 36,
    multipart: list[str] = ("per_part", "largest"),
) -> BenchResult:
    path = Path(annotations)
    path = path if path.is_absolute() else (REPO_ROOT / path).resolve()
    if not path.exists():
        raise SystemExit(f"mask_study: annotation file {path} not found")
    rows = []
    by_name: dict[tuple[str, str], dict] = {}
    num_instances = 0
    for i, mode in enumerate(multipart):
        # The polar representation does not depend on the multi-part mode: compute it once.
        study = mask_study(
            path, tuple(num_points), polar_rays if i == 0 else None, multipart=mode, include_gt=i == 0
        )
        num_instances = study["num_instances"]
        for name, res in study["results"].items():
            kind, _, n = name.partition("_")
            representation = {
                "contour": f"contour ({mode})",
                "polar": "polar (mass centre)",
                "gt": "gt polygon",
            }[kind]
            n_value = int(n) if n else None
            row = {
                "representation": representation,
                "N": n_value,
                "mask_AP": res["AP"],
                "AP50": res["AP50"],
                "AP75": res["AP75"],
                "mean_IoU": res["mean_iou"],
                "paper_AP": PAPER_MASK_AP.get(n_value) if kind == "contour" else None,
            }
            rows.append(row)
            by_name[(kind, mode if kind == "contour" else "", n_value)] = res
    checks = {}
    main = multipart[0]
    aps = [by_name[("contour", main, n)]["AP"] for n in sorted(num_points)]
    checks[f"contour AP increases with N ({main})"] = {
        "value": [round(a, 4) for a in aps],
        "target": "strictly increasing",
        "ok": all(a < b for a, b in itertools.pairwise(aps)),
    }
    if polar_rays and polar_rays in num_points:
        polar = by_name[("polar", "", polar_rays)]["AP"]
        contour = by_name[("contour", main, polar_rays)]["AP"]
        checks[f"polar{polar_rays} < contour{polar_rays}"] = {
            "value": [round(polar, 4), round(contour, 4)],
            "target": "polar < contour",
            "ok": polar < contour,
        }
    if ("gt", "", None) in by_name:
        checks["gt polygons give AP 1"] = {
            "value": by_name[("gt", "", None)]["AP"],
            "target": 1.0,
            "ok": by_name[("gt", "", None)]["AP"] == 1.0,
        }
    notes = [
        f"{num_instances} non-crowd instances of {path.name}; one prediction (score 1) per instance",
        "paper_AP: §4.4 on COCO val2017 (89.0 / 97.4 / 99.2); tiny_coco has many small objects",
    ]
    return BenchResult(
        rows=rows,
        columns=["representation", "N", "mask_AP", "AP50", "AP75", "mean_IoU", "paper_AP"],
        checks=checks,
        notes=notes,
    )
