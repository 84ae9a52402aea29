"""Resize / flip / pad transforms of landmark targets: hand values, exact involution, equivariance."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from lsnet.outline import COORD_GRID, ring_signed_area
from lsnet.structures import COCO_KEYPOINT_FLIP_INDEX, COCO_KEYPOINT_NAMES, LandmarkTargets
from lsnet.targets import TargetConfig, compute_image_targets, record_to_targets
from lsnet.transforms import (
    flip_permutation,
    hflip_boxes,
    hflip_points,
    hflip_targets,
    resize_hflip_targets,
    resize_targets,
    snap,
    translate_targets,
)

W, H = 203, 150  # odd width: the mirror axis is not on a pixel boundary

U_SHAPE = [20.0, 30.0, 60.0, 30.0, 60.0, 100.0, 100.0, 100.0, 100.0, 30.0, 150.0, 30.0, 140.0, 130.0, 20.0, 130.0]
L_SHAPE = [10.3, 5.7, 40.1, 5.7, 40.1, 60.2, 90.9, 60.2, 90.9, 95.5, 10.3, 95.5]
BLOB = [120.0, 10.0, 190.0, 14.0, 185.0, 60.0, 160.0, 40.0, 130.0, 66.0]
SMALL = [5.0, 110.0, 15.0, 112.0, 14.0, 128.0, 3.0, 125.0]
# Two equal legs: the bottom extreme is a tie between them. Mirroring keeps the vertex order, so the
# tie goes to the same vertex in the mirrored annotation: flip(targets) == targets(mirror) still holds.
TABLE = [30.0, 20.0, 130.0, 20.0, 130.0, 40.0, 120.0, 40.0, 120.0, 120.0, 110.0, 120.0, 110.0, 40.0,
         50.0, 40.0, 50.0, 120.0, 40.0, 120.0, 40.0, 40.0, 30.0, 40.0]


def make_ann(seg, ann_id=1, keypoints=None, bbox=None):
    if bbox is None:
        pts = np.concatenate([np.asarray(p, dtype=float).reshape(-1, 2) for p in seg])
        x1, y1 = pts.min(0)
        x2, y2 = pts.max(0)
        bbox = [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]
    ann = {"id": ann_id, "image_id": 1, "category_id": 1, "bbox": bbox, "segmentation": seg, "iscrowd": 0, "area": 1.0}
    if keypoints is not None:
        ann["keypoints"] = keypoints
    return ann


def mirror_ann(ann, width=W):
    """The same annotation on the horizontally mirrored image (x' = W - x)."""
    out = dict(ann)
    if isinstance(ann["segmentation"], list):
        out["segmentation"] = [[width - v if i % 2 == 0 else v for i, v in enumerate(p)] for p in ann["segmentation"]]
    else:
        m = mask_utils.decode(ann["segmentation"])[:, ::-1]
        rle = mask_utils.encode(np.asfortranarray(m))
        out["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
    x, y, w, h = ann["bbox"]
    out["bbox"] = [width - x - w, y, w, h]
    if "keypoints" in ann:
        kps = np.asarray(ann["keypoints"], dtype=float).reshape(17, 3)
        labelled = kps[:, 2] > 0
        kps[labelled, 0] = width - kps[labelled, 0]
        # a labeller of the mirrored image calls the person's (now image-left) left eye "right eye"
        out["keypoints"] = kps[list(COCO_KEYPOINT_FLIP_INDEX)].reshape(-1).tolist()
    return out


def record(anns, config=None):
    rec, rej = compute_image_targets(anns, H, W, {1: 0}, config or TargetConfig())
    assert rej == []
    return rec


def random_targets(m, n, seed=0, grid=True):
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(m, n, 2, generator=g) * torch.tensor([W, H])
    boxes = torch.cat([pts.min(1).values, pts.max(1).values], dim=1)
    if grid:
        pts = torch.round(pts / COORD_GRID) * COORD_GRID
        boxes = torch.round(boxes / COORD_GRID) * COORD_GRID
    return LandmarkTargets(boxes=boxes, labels=torch.arange(m), points=pts,
                           visible=torch.rand(m, n, generator=g) > 0.3, iscrowd=torch.zeros(m, dtype=torch.bool))


def assert_targets_equal(a: LandmarkTargets, b: LandmarkTargets):
    for name in ("boxes", "labels", "points", "visible", "iscrowd"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_flip_boxes_and_extreme_points_hand_values():
    t = LandmarkTargets(
        boxes=torch.tensor([[10.0, 20.0, 50.0, 80.0]]), labels=torch.tensor([3]),
        points=torch.tensor([[[30.0, 20.0], [10.0, 50.0], [30.0, 80.0], [50.0, 60.0]]]),
        visible=torch.ones(1, 4, dtype=torch.bool), iscrowd=torch.tensor([False]))
    f = hflip_targets(t, 100, "bbox")
    assert f.boxes.tolist() == [[50.0, 20.0, 90.0, 80.0]]
    # top, left, bottom, right: the old right extreme (50, 60) is the new left one at (50, 60)
    assert f.points.tolist() == [[[70.0, 20.0], [50.0, 60.0], [70.0, 80.0], [90.0, 50.0]]]
    assert f.labels.tolist() == [3]


def test_flip_keypoints_swaps_left_and_right():
    pts = torch.zeros(1, 17, 2)
    vis = torch.zeros(1, 17, dtype=torch.bool)
    left_eye, right_eye = COCO_KEYPOINT_NAMES.index("left_eye"), COCO_KEYPOINT_NAMES.index("right_eye")
    pts[0, left_eye] = torch.tensor([40.0, 10.0])  # the person's left eye is on the image's right
    vis[0, left_eye] = True
    pts[0, 0] = torch.tensor([35.0, 12.0])
    vis[0, 0] = True
    f = hflip_points(pts, 64, "pose")
    assert f[0, right_eye].tolist() == [24.0, 10.0] and f[0, 0].tolist() == [29.0, 12.0]
    t = LandmarkTargets(torch.tensor([[0.0, 0, 64, 64]]), torch.tensor([0]), pts, vis, torch.tensor([False]))
    ft = hflip_targets(t, 64, "pose")
    assert ft.visible[0].nonzero().flatten().tolist() == [0, right_eye]


def test_flip_contour_hand_values():
    # Rectangle [10,50] x [20,80], 8 samples clockwise from the top-centre.
    pts = torch.tensor([[[30, 20], [50, 25], [50, 50], [50, 75], [30, 80], [10, 75], [10, 50], [10, 25]]],
                       dtype=torch.float32)
    f = hflip_points(pts, 60, "segm")
    # mirrored rectangle [10, 50] again (60 - 50 = 10): the same sequence
    assert torch.equal(f, pts)
    assert flip_permutation(5, "segm") == [0, 4, 3, 2, 1]


@pytest.mark.parametrize("task, n", [("bbox", 4), ("segm", 18), ("segm", 36), ("segm", 72), ("pose", 17)])
def test_flip_twice_is_exactly_the_identity(task, n):
    t = random_targets(5, n, seed=n)
    assert_targets_equal(hflip_targets(hflip_targets(t, W, task), W, task), t)
    # also after a resize (which snaps to the grid), and for the raw point function
    r = resize_targets(t, 1.37, 0.61)
    assert_targets_equal(hflip_targets(hflip_targets(r, 1.37 * W, task), 1.37 * W, task), r)
    assert torch.equal(hflip_points(hflip_points(t.points, W, task), W, task), t.points)


@pytest.mark.parametrize("task, n", [("bbox", 4), ("segm", 36), ("pose", 17)])
@pytest.mark.parametrize("scale", [(1.37, 0.61), (0.3, 0.3), (2.0, 2.0000001)])
def test_one_pass_resize_flip_equals_resize_then_flip_and_the_torch_primitives(task, n, scale):
    """The readers' one-pass transform == the resize, then the flip, bit for bit (also for off-grid
    input and for no objects), and its flip agrees with the torch primitives used on predictions."""
    for t in (random_targets(6, n, seed=n), random_targets(6, n, seed=n + 1, grid=False), random_targets(0, n)):
        width = round(W * scale[0])
        resized = resize_hflip_targets(t, scale, None, task)
        assert torch.equal(resized.boxes, snap(t.boxes * torch.tensor([*scale, *scale])))
        assert torch.equal(resized.points, snap(t.points * torch.tensor(scale)))
        both = resize_hflip_targets(t, scale, width, task)
        assert_targets_equal(both, resize_hflip_targets(resized, None, width, task))
        assert torch.equal(both.boxes, hflip_boxes(resized.boxes, width))
        assert torch.equal(both.points, hflip_points(resized.points, width, task))
    with pytest.raises(ValueError, match="positive"):
        resize_hflip_targets(t, (0.0, 1.0), None, task)


def test_flip_of_off_grid_floats_is_not_guaranteed_exact_but_close():
    # Documented limitation: W - (W - x) can round for arbitrary float32 x; the grid avoids it.
    x = torch.tensor([[[0.1, 0.2]] * 4])
    twice = hflip_points(hflip_points(x, 640, "bbox"), 640, "bbox")
    assert not torch.equal(twice, x)
    torch.testing.assert_close(twice, x, atol=1e-4, rtol=0)


@pytest.mark.parametrize("walk", ["extremenet", "closed"])
@pytest.mark.parametrize("multipart", ["per_part", "largest"])
@pytest.mark.parametrize("seg", [[U_SHAPE], [L_SHAPE], [L_SHAPE, BLOB], [U_SHAPE, BLOB, SMALL], [TABLE]],
                         ids=["U", "L", "L+blob", "U+blob+small", "table"])
def test_flip_of_targets_equals_targets_of_mirrored_annotation(seg, multipart, walk):
    config = TargetConfig(multipart=multipart, extreme_walk=walk)
    rec = record([make_ann(seg)], config)
    rec_mirror = record([mirror_ann(make_ann(seg))], config)
    for task, n in (("bbox", None), ("segm", 18), ("segm", 36), ("segm", 72)):
        flipped = hflip_targets(record_to_targets(rec, task, n), W, task)
        direct = record_to_targets(rec_mirror, task, n)
        torch.testing.assert_close(flipped.boxes, direct.boxes, atol=COORD_GRID, rtol=0)
        torch.testing.assert_close(flipped.points, direct.points, atol=COORD_GRID, rtol=0)
        if task == "segm":
            assert ring_signed_area(flipped.points[0].double().numpy()) > 0  # still clockwise


def test_flip_of_mask_targets_equals_targets_of_mirrored_mask():
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[20:90, 30:50] = 1
    mask[70:90, 50:120] = 1  # an L, plus a separate blob
    mask[10:30, 150:170] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    ann = make_ann({"size": rle["size"], "counts": rle["counts"].decode()}, bbox=[30.0, 10.0, 140.0, 80.0])
    rec, rec_mirror = record([ann]), record([mirror_ann(ann)])
    for task, n in (("bbox", None), ("segm", 36)):
        flipped = hflip_targets(record_to_targets(rec, task, n), W, task)
        torch.testing.assert_close(flipped.points, record_to_targets(rec_mirror, task, n).points,
                                   atol=COORD_GRID, rtol=0)


def test_mask_extreme_tie_is_not_flip_consistent_but_stays_on_the_object():
    """Documented limitation: a mask's tie (two equal feet) goes to the leftmost piece in raster order,
    which mirroring does not preserve: flip(targets) has the bottom point on the mirrored right foot,
    targets(mirror) on the left foot. Both are on a foot; training flips targets, never recomputes."""
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[20:40, 30:130] = 1
    mask[40:120, 40:50] = 1
    mask[40:120, 110:120] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    ann = make_ann({"size": rle["size"], "counts": rle["counts"].decode()}, bbox=[30.0, 20.0, 100.0, 100.0])
    flipped = hflip_targets(record_to_targets(record([ann]), "bbox"), W, "bbox").points[0, 2]
    direct = record_to_targets(record([mirror_ann(ann)]), "bbox").points[0, 2]
    assert flipped.tolist() == [W - 45.0, 120.0] and direct.tolist() == [W - 115.0, 120.0]


def test_flip_of_keypoint_targets_equals_targets_of_mirrored_annotation():
    g = np.random.default_rng(0)
    kps = np.concatenate([g.uniform(20, 120, (17, 2)).round(2), g.integers(0, 3, (17, 1))], axis=1)
    ann = make_ann([L_SHAPE], keypoints=kps.reshape(-1).tolist())
    rec, rec_mirror = record([ann]), record([mirror_ann(ann)])
    for pose_box in ("kps", "obj"):
        flipped = hflip_targets(record_to_targets(rec, "pose", pose_box=pose_box), W, "pose")
        direct = record_to_targets(rec_mirror, "pose", pose_box=pose_box)
        assert torch.equal(flipped.visible, direct.visible)
        vis = direct.visible
        torch.testing.assert_close(flipped.points[vis], direct.points[vis], atol=COORD_GRID, rtol=0)
        torch.testing.assert_close(flipped.boxes, direct.boxes, atol=COORD_GRID, rtol=0)


def test_resize_hand_values_and_snapping():
    t = LandmarkTargets(torch.tensor([[10.0, 20.0, 50.0, 80.0]]), torch.tensor([0]),
                        torch.tensor([[[30.0, 20.0], [10.0, 50.0], [30.0, 80.0], [50.0, 50.0]]]),
                        torch.ones(1, 4, dtype=torch.bool), torch.tensor([False]))
    r = resize_targets(t, 0.5, 2.0)
    assert r.boxes.tolist() == [[5.0, 40.0, 25.0, 160.0]]
    assert r.points.tolist() == [[[15.0, 40.0], [5.0, 100.0], [15.0, 160.0], [25.0, 100.0]]]
    r3 = resize_targets(t, 1 / 3, 1.0)
    assert r3.boxes[0, 0].item() == round(10 / 3 * 256) / 256  # snapped to the 1/256 grid
    with pytest.raises(ValueError):
        resize_targets(t, 0.0, 1.0)


def test_padding_is_a_translation_only_at_left_top():
    t = random_targets(3, 17)
    p = translate_targets(t, 4.0, 6.0)
    assert torch.equal(p.points - t.points, torch.tensor([4.0, 6.0]).expand_as(t.points))
    assert torch.equal(p.boxes - t.boxes, torch.tensor([4.0, 6.0, 4.0, 6.0]).expand_as(t.boxes))
    assert torch.equal(p.visible, t.visible) and torch.equal(p.labels, t.labels)
    # Padding W -> W + 4 on the left, then flipping the padded image, equals flipping first:
    # x' = (W + 4) - (x + 4) = W - x.
    left_padded = translate_targets(t, 4.0, 0.0)
    assert torch.equal(hflip_targets(left_padded, W + 4, "pose").points, hflip_targets(t, W, "pose").points)
    assert torch.equal(hflip_boxes(hflip_boxes(t.boxes, W), W), t.boxes)


def test_unknown_task_and_wrong_point_count_raise():
    with pytest.raises(ValueError, match="unknown task"):
        hflip_points(torch.zeros(1, 4, 2), 10, "mask")
    with pytest.raises(ValueError, match="17 keypoints"):
        hflip_points(torch.zeros(1, 4, 2), 10, "pose")
    assert len(hflip_targets(LandmarkTargets.empty(36), 10, "segm")) == 0
