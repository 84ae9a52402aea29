"""COCO evaluation: detections -> COCO records -> the 12/10 COCO numbers, against hand-computed values."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from lsnet.errors import InputError
from lsnet.evaluation import (
    detections_to_coco,
    evaluate_coco,
    evaluate_coco_detailed,
    metric_names,
    polygon_to_rle,
)
from lsnet.structures import Detections, ImageMeta

# Two images, two categories; every object is a triangle (a polygon that is not its own box, so a
# box-derived mask could not score IoU 1) with 17 keypoints inside it.
IMAGES = [{"id": 7, "height": 120, "width": 160, "file_name": "a.jpg"},
          {"id": 9, "height": 100, "width": 200, "file_name": "b.jpg"}]
# Category ids are deliberately not ``label + 1`` (3 and 7), so that an off-by-one in the
# label -> category mapping cannot score.
BOXES = {7: [(10, 20, 70, 90, 3), (80, 10, 150, 60, 7)], 9: [(20, 30, 120, 95, 3), (130, 5, 190, 50, 3)]}


def _triangle(x1, y1, x2, y2):
    return np.array([[x1, y1], [x2, y1], [(x1 + x2) / 2, y2]], dtype=np.float64)


def _keypoints(x1, y1, x2, y2):
    t = np.linspace(0.1, 0.9, 17)
    return np.stack([x1 + t * (x2 - x1), y1 + t[::-1] * (y2 - y1)], axis=1)


def _synthetic_gt() -> dict:
    anns = []
    for image_id, objects in BOXES.items():
        for x1, y1, x2, y2, cat in objects:
            tri = _triangle(x1, y1, x2, y2)
            kps = _keypoints(x1, y1, x2, y2)
            anns.append({
                "id": len(anns) + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1) / 2,
                "segmentation": [tri.reshape(-1).tolist()],
                "keypoints": np.concatenate([kps, np.full((17, 1), 2.0)], 1).reshape(-1).tolist(),
                "num_keypoints": 17,
            })
    cats = [{"id": 3, "name": "thing", "keypoints": [f"k{i}" for i in range(17)], "skeleton": []},
            {"id": 7, "name": "other", "keypoints": [f"k{i}" for i in range(17)], "skeleton": []}]
    return {"images": IMAGES, "annotations": anns, "categories": cats}


CATEGORY_IDS = [3, 7]  # contiguous label -> COCO id


def _perfect_detections(task: str, scale=(1.0, 1.0)):
    """Detections equal to the ground truth, expressed in a frame resized by ``scale``."""
    sx, sy = scale
    dets, metas = [], []
    for img in IMAGES:
        objects = BOXES[img["id"]]
        boxes = torch.tensor([o[:4] for o in objects], dtype=torch.float32)
        if task == "segm":
            points = torch.tensor(np.stack([_triangle(*o[:4]) for o in objects]), dtype=torch.float32)
        elif task == "pose":
            points = torch.tensor(np.stack([_keypoints(*o[:4]) for o in objects]), dtype=torch.float32)
        else:
            points = torch.zeros(len(objects), 4, 2)
        factor = torch.tensor([sx, sy])
        dets.append(Detections(
            boxes=boxes * factor.repeat(2), scores=torch.linspace(0.9, 0.5, len(objects)),
            labels=torch.tensor([CATEGORY_IDS.index(o[4]) for o in objects]), points=points * factor,
            point_scores=torch.full((len(objects), points.shape[1]), 0.7) if task == "pose" else None,
        ))
        h, w = img["height"], img["width"]
        metas.append(ImageMeta(image_id=img["id"], orig_size=(h, w), size=(round(h * sy), round(w * sx)),
                               scale=(sx, sy)))
    return dets, metas


@pytest.mark.parametrize("task,iou_type", [("bbox", "bbox"), ("segm", "segm"), ("segm", "bbox"),
                                           ("pose", "keypoints")])
def test_perfect_predictions_give_ap_one(task, iou_type):
    dets, metas = _perfect_detections(task, scale=(0.5, 0.25))
    results = detections_to_coco(dets, metas, CATEGORY_IDS, task)
    metrics = evaluate_coco(_synthetic_gt(), results, iou_types=[iou_type])
    prefix = {"bbox": "bbox", "segm": "segm", "keypoints": "kp"}[iou_type]
    assert set(metrics) == set(metric_names(iou_type))
    assert metrics[f"{prefix}_AP"] == pytest.approx(1.0)
    assert metrics[f"{prefix}_AP50"] == pytest.approx(1.0)
    assert metrics[f"{prefix}_AP75"] == pytest.approx(1.0)


def test_metric_names_are_the_contract():
    assert metric_names("bbox") == ["bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APs", "bbox_APm", "bbox_APl",
                                    "bbox_AR1", "bbox_AR10", "bbox_AR100", "bbox_ARs", "bbox_ARm", "bbox_ARl"]
    assert metric_names("keypoints") == ["kp_AP", "kp_AP50", "kp_AP75", "kp_APm", "kp_APl",
                                         "kp_AR", "kp_AR50", "kp_AR75", "kp_ARm", "kp_ARl"]


def _single_category_gt(num_objects: int) -> dict:
    # 40x40 boxes (area 1600: "medium") spread over one 400x100 image.
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 1600.0,
             "bbox": [10.0 + 90 * i, 10.0, 40.0, 40.0], "segmentation": []} for i in range(num_objects)]
    return {"images": [{"id": 1, "height": 100, "width": 400}], "annotations": anns,
            "categories": [{"id": 1, "name": "thing"}]}


def test_half_of_the_objects_found_gives_known_ap():
    gt = _single_category_gt(4)
    found = [{"image_id": 1, "category_id": 1, "bbox": gt["annotations"][i]["bbox"], "score": s}
             for i, s in ((0, 0.9), (1, 0.8))]
    m = evaluate_coco(gt, found)
    # Precision 1 up to recall 0.5, nothing beyond: 51 of the 101 recall thresholds (0, 0.01, .., 0.5).
    assert m["bbox_AP"] == pytest.approx(51 / 101)
    assert m["bbox_AP50"] == pytest.approx(51 / 101)
    assert m["bbox_APm"] == pytest.approx(51 / 101)
    assert m["bbox_APs"] == -1 and m["bbox_APl"] == -1  # no ground truth of those sizes
    assert m["bbox_AR1"] == pytest.approx(0.25)
    assert m["bbox_AR100"] == pytest.approx(0.5)

    # A false positive scored above both hits: precision 1/2 at recall 1/4, 2/3 at recall 1/2;
    # COCO's interpolated precision (max to the right) is then 2/3 for every recall <= 1/2.
    fp = {"image_id": 1, "category_id": 1, "bbox": [370.0, 60.0, 20.0, 20.0], "score": 0.95}
    m = evaluate_coco(gt, found + [fp])
    assert m["bbox_AP"] == pytest.approx(51 / 101 * 2 / 3)
    assert m["bbox_AR1"] == pytest.approx(0.0)  # the single top-scored detection is the miss
    assert m["bbox_AR100"] == pytest.approx(0.5)


def test_box_shifted_to_iou_between_thresholds():
    # IoU exactly 0.6 (40x40 box shifted by 10 px: overlap 30*40 / (2*1600 - 1200) = 0.6) counts at
    # thresholds 0.50, 0.55, 0.60 and not above: AP = 3/10 over the 10 IoU thresholds.
    gt = _single_category_gt(1)
    x, y, w, h = gt["annotations"][0]["bbox"]
    m = evaluate_coco(gt, [{"image_id": 1, "category_id": 1, "bbox": [x + 10, y, w, h], "score": 0.5}])
    assert m["bbox_AP50"] == pytest.approx(1.0)
    assert m["bbox_AP75"] == pytest.approx(0.0)
    assert m["bbox_AP"] == pytest.approx(0.3)


def test_empty_results_do_not_crash():
    m = evaluate_coco(_synthetic_gt(), [], iou_types=["bbox", "segm", "keypoints"])
    assert len(m) == 12 + 12 + 10
    assert m["bbox_AP"] == 0.0 and m["segm_AR100"] == 0.0 and m["kp_AP"] == 0.0
    # No ground truth in that area range -> -1, exactly as pycocotools reports it.
    assert m["bbox_APs"] == -1.0


def test_in_memory_results_equal_results_json(tmp_path):
    dets, metas = _perfect_detections("segm")
    results = detections_to_coco(dets, metas, CATEGORY_IDS, "segm")
    # Spoil a few so that the numbers are not all 1.
    results[0]["category_id"] = 7
    results[1]["bbox"][0] += 15
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    gt_path = tmp_path / "gt.json"
    gt_path.write_text(json.dumps(_synthetic_gt()))
    before = json.dumps(results)
    gt = _synthetic_gt()
    in_memory = evaluate_coco(gt, results, iou_types=("bbox", "segm"))
    from_files = evaluate_coco(gt_path, path, iou_types=("bbox", "segm"))
    assert in_memory == from_files
    assert json.dumps(results) == before  # the caller's records are not modified
    assert gt == _synthetic_gt()  # nor the ground-truth dict
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(gt_path))
    # A COCO object is reused as is: evaluating it twice gives the same numbers.
    assert evaluate_coco(coco, results, ("bbox", "segm")) == in_memory
    assert evaluate_coco(coco, results, ("segm", "bbox")) == in_memory
    assert in_memory["bbox_AP"] < 1.0


def test_coordinates_map_back_through_meta_scale():
    sx, sy = 0.5, 0.25
    box = torch.tensor([[10.0, 20.0, 70.0, 90.0]])
    tri = torch.tensor(_triangle(10, 20, 70, 90), dtype=torch.float32)[None]
    kps = torch.tensor(_keypoints(10, 20, 70, 90), dtype=torch.float32)[None]
    meta = ImageMeta(image_id=7, orig_size=(120, 160), size=(30, 80), scale=(sx, sy))
    factor = torch.tensor([sx, sy])

    def det(points, point_scores=None):
        return Detections(box * factor.repeat(2), torch.tensor([0.8]), torch.tensor([1]), points * factor,
                          point_scores)

    (rec,) = detections_to_coco([det(torch.zeros(1, 4, 2))], [meta], CATEGORY_IDS, "bbox")
    assert rec == {"image_id": 7, "category_id": 7, "bbox": [10.0, 20.0, 60.0, 70.0], "score": pytest.approx(0.8)}

    (rec,) = detections_to_coco([det(tri)], [meta], CATEGORY_IDS, "segm")
    assert rec["segmentation"]["size"] == [120, 160]
    expected = mask_utils.decode(polygon_to_rle(tri[0].numpy(), 120, 160))
    assert np.array_equal(mask_utils.decode(rec["segmentation"]), expected)
    assert expected.sum() > 1000  # a real triangle, ~ 60*70/2 px

    scores = torch.linspace(0.1, 0.9, 17)[None]
    (rec,) = detections_to_coco([det(kps, scores)], [meta], CATEGORY_IDS, "pose")
    k = np.array(rec["keypoints"]).reshape(17, 3)
    np.testing.assert_allclose(k[:, :2], kps[0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(k[:, 2], scores[0].numpy(), rtol=1e-6)
    assert rec["score"] == pytest.approx(0.8)


def test_boxes_are_clipped_to_the_original_image():
    meta = ImageMeta(image_id=7, orig_size=(120, 160), size=(240, 320), scale=(2.0, 2.0))
    d = Detections(torch.tensor([[-10.0, 20.0, 400.0, 300.0]]), torch.tensor([0.5]), torch.tensor([0]),
                   torch.zeros(1, 4, 2))
    (rec,) = detections_to_coco([d], [meta], CATEGORY_IDS, "bbox")
    assert rec["bbox"] == [0.0, 10.0, 160.0, 110.0]


def test_bad_inputs_are_clear_errors(tmp_path):
    gt = _synthetic_gt()
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_coco(gt, [{"image_id": 12345, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}])
    with pytest.raises(ValueError, match="no 'segmentation'"):
        evaluate_coco(gt, [{"image_id": 7, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1.0}], ["segm"])
    with pytest.raises(InputError, match="missing.json"):
        evaluate_coco(tmp_path / "missing.json", [])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        evaluate_coco(gt, bad)
    with pytest.raises(InputError, match="truncated"):
        evaluate_coco(gt, _write(tmp_path / "trunc.json", '[{"image_id": 7, "categ'))
    with pytest.raises(InputError, match="no 'annotations' list"):
        evaluate_coco({"images": [], "categories": []}, [])
    d = Detections(torch.zeros(1, 4), torch.ones(1), torch.tensor([5]), torch.zeros(1, 4, 2))
    with pytest.raises(ValueError, match="label 5"):
        detections_to_coco([d], [ImageMeta(7, (10, 10), (10, 10), (1.0, 1.0))], CATEGORY_IDS, "bbox")


def test_per_category_table():
    gt = _single_category_gt(4)
    gt["categories"].append({"id": 3, "name": "unused"})
    found = [{"image_id": 1, "category_id": 1, "bbox": gt["annotations"][0]["bbox"], "score": 0.9}]
    ev = evaluate_coco_detailed(gt, found)
    rows = {r["category_id"]: r for r in ev.per_category["bbox"]}
    assert rows[1]["name"] == "thing" and rows[1]["num_gt"] == 4
    assert rows[1]["AP"] == pytest.approx(26 / 101)  # recall 1/4 at precision 1
    assert rows[3]["AP"] == -1.0 and rows[3]["num_gt"] == 0


def _write(path, text):
    path.write_text(text)
    return path


def test_unknown_category_ids_are_an_error_or_counted_with_ignore_unknown(tmp_path, capsys):
    """A result with a category_id the ground truth does not have can never match: before, AP 0.000
    without a word; now an error naming the ids, or dropped and counted with --ignore-unknown."""
    from pipelines.cli import main

    gt = _synthetic_gt()
    ann = gt["annotations"][0]
    good = {"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": ann["bbox"], "score": 0.9}
    stray = dict(good, category_id=999)
    with pytest.raises(InputError, match=r"1 of 2 result records have a category_id .*\[999\]"):
        evaluate_coco(gt, [good, stray])
    both = evaluate_coco_detailed(gt, [good, stray], ignore_unknown=True)
    alone = evaluate_coco_detailed(gt, [good])
    assert both.num_ignored == 1 and alone.num_ignored == 0
    assert both.metrics == alone.metrics
    gt_path = _write(tmp_path / "gt.json", json.dumps(gt))
    res_path = _write(tmp_path / "res.json", json.dumps([good, stray]))
    assert main(["evaluate", "--gt", str(gt_path), "--results", str(res_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lsnet evaluate: error: 1 of 2 result records") and "999" in err[0]
    assert main(["evaluate", "--gt", str(gt_path), "--results", str(res_path), "--ignore-unknown"]) == 0
    assert "ignored 1 result records whose category_id" in capsys.readouterr().err


def test_evaluate_cli_prints_a_table(tmp_path, capsys):
    from pipelines.cli import main

    dets, metas = _perfect_detections("bbox")
    (tmp_path / "gt.json").write_text(json.dumps(_synthetic_gt()))
    (tmp_path / "res.json").write_text(json.dumps(detections_to_coco(dets, metas, CATEGORY_IDS, "bbox")))
    rc = main(["evaluate", "--gt", str(tmp_path / "gt.json"), "--results", str(tmp_path / "res.json"),
               "--iou-types", "bbox", "--per-category", "--out", str(tmp_path / "m.json")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "AP50" in out and "1.000" in out and "thing" in out
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["bbox_AP"] == pytest.approx(1.0)


def _perturbed(gt: dict, seed: int) -> list[dict]:
    """Jittered, partly mislabelled, partly missing ground truth with random (tied) scores."""
    rng = np.random.default_rng(seed)
    out = []
    for ann in gt["annotations"] * 3:
        x, y, w, h = ann["bbox"]
        j = rng.normal(0, 0.1, 4)
        box = [x + j[0] * w, y + j[1] * h, w * (1 + j[2]), h * (1 + j[3])]
        img = next(i for i in gt["images"] if i["id"] == ann["image_id"])
        poly = _triangle(box[0], box[1], box[0] + box[2], box[1] + box[3])
        kps = np.array(ann["keypoints"]).reshape(17, 3)
        kps[:, :2] += rng.normal(0, 3, (17, 2))
        out.append({"image_id": ann["image_id"], "category_id": int(rng.choice(CATEGORY_IDS)), "bbox": box,
                    "score": float(np.round(rng.random(), 1)),
                    "segmentation": polygon_to_rle(poly, img["height"], img["width"]),
                    "keypoints": kps.reshape(-1).tolist()})
    return out


def test_faster_backend_matches_pycocotools():
    pytest.importorskip("faster_coco_eval", reason="optional fast path: faster-coco-eval is not installed")
    gt = _synthetic_gt()
    for seed in range(3):
        results = _perturbed(gt, seed)
        ref = evaluate_coco_detailed(gt, results, ["bbox", "segm", "keypoints"])
        fast = evaluate_coco_detailed(gt, results, ["bbox", "segm", "keypoints"], backend="faster")
        assert fast.backend == "faster-coco-eval"
        assert ref.metrics.keys() == fast.metrics.keys()
        for key in ref.metrics:
            assert fast.metrics[key] == pytest.approx(ref.metrics[key], abs=1e-9), key
        for iou_type, rows in ref.per_category.items():
            for a, b in zip(rows, fast.per_category[iou_type]):
                assert b["AP"] == pytest.approx(a["AP"], abs=1e-9)


def _gt_as_results(coco: COCO, kind: str) -> list[dict]:
    out = []
    for ann in coco.dataset["annotations"]:
        if ann["iscrowd"] or (kind == "keypoints" and ann.get("num_keypoints", 0) == 0):
            continue  # crowds are ignored regions; persons without keypoints are ignored for OKS
        rec = {"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": ann["bbox"], "score": 1.0}
        if kind == "segm":
            rle = coco.annToRLE(ann)
            rec["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        if kind == "keypoints":
            rec["keypoints"] = ann["keypoints"]
        out.append(rec)
    return out


@pytest.mark.tiny_coco
def test_tiny_coco_ground_truth_as_results_gives_ap_one(tiny_coco_dir):
    instances = tiny_coco_dir / "annotations" / "instances_train2017.json"
    keypoints = tiny_coco_dir / "annotations" / "person_keypoints_train2017.json"
    with contextlib.redirect_stdout(io.StringIO()):
        coco, coco_kp = COCO(str(instances)), COCO(str(keypoints))
    m = evaluate_coco(instances, _gt_as_results(coco, "segm"), iou_types=["bbox", "segm"])
    m.update(evaluate_coco(keypoints, _gt_as_results(coco_kp, "keypoints"), iou_types=["keypoints"]))
    for key in ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP75", "kp_AP", "kp_AP50", "kp_AR"):
        assert m[key] == pytest.approx(1.0), key
