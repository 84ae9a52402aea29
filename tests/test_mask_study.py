"""§4.4 study: GT masks quantised to N-point contours / polar rays, evaluated with pycocotools."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lsnet.mask_study import PROTOCOLS, mask_study, per_part_polygons, polar_points


def test_polar_points_hand_values():
    square = np.array([[-10.0, -10.0], [10.0, -10.0], [10.0, 10.0], [-10.0, 10.0]])
    pts = polar_points([square], np.zeros(2), 4)
    # ray k at angle 2πk/4 from +x, clockwise on screen (y down): right, down, left, up
    np.testing.assert_allclose(pts, [[10, 0], [0, 10], [-10, 0], [0, -10]], atol=1e-9)
    # 8 rays: the diagonals end at the corners
    np.testing.assert_allclose(polar_points([square], np.zeros(2), 8)[1], [10, 10], atol=1e-9)


def test_polar_points_take_the_farthest_crossing_and_misses_give_the_centre():
    # A U opening upwards; from (50, 60) the upward ray crosses nothing (the gap) -> length 0,
    # the ray to the right crosses the right arm twice (x = 60 and x = 100) -> the farther one.
    u = np.array([[20.0, 30.0], [40.0, 30.0], [40.0, 80.0], [60.0, 80.0], [60.0, 30.0], [100.0, 30.0],
                  [100.0, 100.0], [20.0, 100.0]])
    centre = np.array([50.0, 60.0])
    pts = polar_points([u], centre, 4)
    np.testing.assert_allclose(pts[0], [100, 60])
    np.testing.assert_allclose(pts[3], [50, 60])  # upwards: no crossing


def _u_shape(x, y, s):
    """A U opening upwards of size s at (x, y) (concave: arms 0.3 s wide, a 0.4 s gap)."""
    return [x, y, x + 0.3 * s, y, x + 0.3 * s, y + 0.7 * s, x + 0.7 * s, y + 0.7 * s, x + 0.7 * s, y,
            x + s, y, x + s, y + s, x, y + s]


def _c_shape(x, y, s):
    """A C opening to the right."""
    return [x, y, x + s, y, x + s, y + 0.25 * s, x + 0.3 * s, y + 0.25 * s, x + 0.3 * s, y + 0.75 * s,
            x + s, y + 0.75 * s, x + s, y + s, x, y + s]


def _write_coco(path, objects_per_image, size=160):
    images, anns = [], []
    for image_id, objects in enumerate(objects_per_image, start=1):
        images.append({"id": image_id, "width": size, "height": size, "file_name": f"{image_id}.jpg"})
        for parts, iscrowd in objects:
            pts = np.concatenate([np.asarray(p).reshape(-1, 2) for p in parts])
            x1, y1 = pts.min(0)
            x2, y2 = pts.max(0)
            area = sum(0.5 * abs(np.dot(p[:, 0], np.roll(p[:, 1], -1)) - np.dot(np.roll(p[:, 0], -1), p[:, 1]))
                       for p in (np.asarray(q).reshape(-1, 2) for q in parts))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "iscrowd": iscrowd,
                         "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                         "segmentation": [list(map(float, p)) for p in parts], "area": float(area)})
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "thing"}]}))
    return path


@pytest.fixture()
def concave_coco(tmp_path):
    return _write_coco(tmp_path / "concave.json", [
        [([_u_shape(10, 10, 90)], 0), ([_c_shape(100, 100, 50)], 0)],
        [([_c_shape(5, 20, 120)], 0), ([_u_shape(130, 5, 25)], 0)],
        [([_u_shape(20, 40, 60), _c_shape(100, 40, 40)], 0), ([_c_shape(0, 120, 30)], 1)],
    ])


def test_mask_study_orders_representations_on_concave_shapes(concave_coco):
    study = mask_study(concave_coco, num_points=(18, 36, 72), polar_rays=36, include_gt=True)
    res = study["results"]
    assert study["num_images"] == 3 and study["num_instances"] == 5  # the crowd C is not a prediction
    assert study["num_multipart"] == 1
    assert res["gt"]["AP"] == 1.0 and res["gt"]["mean_iou"] == 1.0
    for protocol in PROTOCOLS:
        iou = {n: res[f"{protocol}_{n}"]["mean_iou"] for n in (18, 36, 72)}
        assert iou[18] < iou[36] < iou[72] <= 1.0, protocol
    iou = {n: res[f"total_{n}"]["mean_iou"] for n in (18, 36, 72)}
    assert res["total_18"]["AP"] <= res["total_36"]["AP"] <= res["total_72"]["AP"]
    assert iou[72] > 0.97
    # rays from the mass centre cannot follow the arms of a U or a C: they fill the cavity
    assert res["polar_36"]["mean_iou"] < iou[36] - 0.05
    assert res["polar_36"]["AP"] < res["total_36"]["AP"]


def test_the_three_multipart_protocols(concave_coco):
    res = mask_study(concave_coco, num_points=(18, 72), polar_rays=None)["results"]
    assert "polar_36" not in res
    # with enough points, the largest part (which loses the C of the U + C object) is worst; at 18
    # points the bridged total (15 points shared by a U and a C) can lose as much as dropping the C
    assert res["largest_72"]["mean_iou"] < min(res["total_72"]["mean_iou"], res["per_part_72"]["mean_iou"])
    assert res["largest_18"]["mean_iou"] < res["per_part_18"]["mean_iou"]
    with pytest.raises(ValueError, match="unknown mask-study protocol"):
        mask_study(concave_coco, num_points=(18,), protocols=("all",))


def test_per_part_polygons_hand_values():
    square = np.array([[0.0, 0.0], [0.0, 8.0], [8.0, 8.0], [8.0, 0.0]])  # counter-clockwise on screen
    tiny = np.array([[20.0, 20.0], [22.0, 20.0], [22.0, 22.0]])  # area 2 px²: dropped
    small = np.array([[30.0, 0.0], [34.0, 0.0], [34.0, 4.0], [30.0, 4.0]])
    polys = per_part_polygons([square, tiny, small], 4)
    assert len(polys) == 2
    # clockwise from the first vertex, every perimeter / 4 (= a corner here)
    np.testing.assert_allclose(polys[0], [[8, 0], [8, 8], [0, 8], [0, 0]])  # reversed: from the last vertex
    np.testing.assert_allclose(per_part_polygons([small], 8)[0][:3], [[30, 0], [32, 0], [34, 0]])
    assert len(per_part_polygons([tiny], 4)) == 1  # only tiny parts: the largest one stays


@pytest.mark.tiny_coco
def test_mask_study_on_a_tiny_coco_subset(tiny_coco_dir, tmp_path):
    data = json.loads((tiny_coco_dir / "annotations" / "instances_train2017.json").read_text())
    keep = {img["id"] for img in data["images"][:8]}
    data["images"] = [img for img in data["images"] if img["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    path = tmp_path / "subset.json"
    path.write_text(json.dumps(data))
    res = mask_study(path, num_points=(18, 72), polar_rays=36, include_gt=True)["results"]
    assert res["gt"]["AP"] == 1.0
    assert 0.6 < res["total_18"]["AP"] < res["total_72"]["AP"] <= 1.0
    assert res["largest_18"]["AP"] <= res["total_18"]["AP"] <= res["per_part_18"]["AP"]
    assert res["polar_36"]["mean_iou"] < res["total_72"]["mean_iou"]
