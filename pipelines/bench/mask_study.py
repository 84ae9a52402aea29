"""``lsnet bench mask_study``: the paper's §4.4 upper bound on a COCO JSON (tiny_coco by default).

Ground-truth masks quantised to N-point contour polygons under the three multi-part protocols (per
part, in total with bridges, largest part only) and to a 36-ray polar representation, rasterised and
evaluated as predictions with pycocotools (see :mod:`lsnet.mask_study`).
"""

from __future__ import annotations

import itertools
from pathlib import Path

from lsnet.mask_study import mask_study
from pipelines.bench.runner import BenchResult
from pipelines.paths import REPO_ROOT

#: Paper §4.4, COCO val2017 (the per-part protocol, see lsnet.mask_study; no polar number).
PAPER_MASK_AP = {18: 0.890, 36: 0.974, 72: 0.992}
#: what each protocol is (lsnet.mask_study.PROTOCOLS)
PROTOCOL_NAMES = {
    "per_part": "N per part (paper footnote, authors' sampler)",
    "total": "N in total, bridges (our model's output)",
    "largest": "N on the largest part (reference training)",
}


def run(
    annotations: list[str] = ("data/tiny_coco/annotations/instances_train2017.json",),
    num_points: list[int] = (18, 36, 72),
    polar_rays: int = 36,
    protocols: list[str] = ("per_part", "total", "largest"),
) -> BenchResult:
    rows, checks, notes = [], {}, []
    for ann in ([annotations] if isinstance(annotations, str) else annotations):
        path = Path(ann)
        path = path if path.is_absolute() else (REPO_ROOT / path).resolve()
        if not path.exists():
            from lsnet.data.fetch import missing_data_message

            raise SystemExit(f"mask_study: {missing_data_message(ann) or f'annotation file {path} not found'}")
        dataset = f"{path.parent.parent.name}/{path.stem}"
        study = mask_study(path, tuple(num_points), polar_rays, protocols=tuple(protocols), include_gt=True)
        res = study["results"]
        for protocol in protocols:
            for n in num_points:
                r = res[f"{protocol}_{n}"]
                rows.append({"dataset": dataset, "protocol": PROTOCOL_NAMES[protocol], "N": n,
                             "mask_AP": r["AP"], "AP50": r["AP50"], "AP75": r["AP75"], "mean_IoU": r["mean_iou"],
                             "paper_AP": PAPER_MASK_AP.get(n) if protocol == "per_part" else None})
        if polar_rays:
            r = res[f"polar_{polar_rays}"]
            rows.append({"dataset": dataset, "protocol": "polar rays (mass centre)", "N": polar_rays,
                         "mask_AP": r["AP"], "AP50": r["AP50"], "AP75": r["AP75"], "mean_IoU": r["mean_iou"],
                         "paper_AP": None})
        for protocol in protocols:
            aps = [res[f"{protocol}_{n}"]["AP"] for n in sorted(num_points)]
            checks[f"{dataset}: {protocol} AP increases with N"] = {
                "value": [round(a, 4) for a in aps], "target": "strictly increasing",
                "ok": all(a < b for a, b in itertools.pairwise(aps))}
        if {"per_part", "total", "largest"} <= set(protocols):
            n = min(num_points)
            order = [res[f"{p}_{n}"]["AP"] for p in ("largest", "total", "per_part")]
            checks[f"{dataset}: largest <= total <= per_part (N={n})"] = {
                "value": [round(a, 4) for a in order], "target": "non-decreasing",
                "ok": order[0] <= order[1] <= order[2]}
        checks[f"{dataset}: gt polygons give AP 1"] = {"value": res["gt"]["AP"], "target": 1.0,
                                                       "ok": res["gt"]["AP"] == 1.0}
        notes.append(f"{dataset}: {study['num_instances']} non-crowd instances ({study['num_multipart']} "
                     "multi-part), one prediction (score 1) each")
    notes.append("paper_AP: §4.4 on COCO val2017 (89.0 / 97.4 / 99.2) = the per-part protocol (paper footnote; "
                 "the authors' sampler gives 90.7 / 98.2 / 99.7 on tiny_coco)")
    return BenchResult(rows=rows, columns=["dataset", "protocol", "N", "mask_AP", "AP50", "AP75", "mean_IoU",
                                           "paper_AP"], checks=checks, notes=notes)
