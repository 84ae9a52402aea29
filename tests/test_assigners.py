"""Sample assigners (lsnet/assigners.py) on hand-built scenes with known answers.

Conventions used in every hand case below: a 64×64 image, level 0 has stride 8 and an 8×8 grid of
points at x, y ∈ {4, 12, 20, 28, 36, 44, 52, 60} (index ``i * 8 + j`` for row i / column j), level 1
has stride 16 and a 4×4 grid at {8, 24, 40, 56} (index ``64 + i * 4 + j``).
"""
from __future__ import annotations

import math
import statistics
from fractions import Fraction

import pytest
import torch

from lsnet.assigners import (
    IGNORED,
    NEGATIVE,
    anchor_points,
    assign_atss,
    assign_centroid,
    atss_candidates,
    box_pyramid_level,
)

STRIDES = [8, 16]
SIZES = [(8, 8), (4, 4)]
COUNTS = [64, 16]


def grid_index(x: float, y: float, level: int = 0) -> int:
    """Index of the anchor point at pixel (x, y) in the two-level 64×64 scene."""
    s = STRIDES[level]
    i, j = int((y - s / 2) / s), int((x - s / 2) / s)
    return (0 if level == 0 else COUNTS[0]) + i * SIZES[level][1] + j


@pytest.fixture
def points() -> torch.Tensor:
    return torch.cat(anchor_points(SIZES, STRIDES))


def boxes(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def flags(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


def positives(labels: torch.Tensor) -> dict[int, int]:
    idx = torch.nonzero(labels >= 0).flatten()
    return {int(i): int(labels[i]) for i in idx}


# ---------------------------------------------------------------------------------------------
# anchor_points


def test_anchor_points_are_cell_centres_row_major():
    (pts,) = anchor_points([(2, 3)], [8])
    expected = [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]
    assert pts.dtype == torch.float32
    assert pts.tolist() == expected


def test_anchor_points_per_level_shapes_and_device():
    lv = anchor_points([(100, 152), (50, 76), (0, 5)], [8, 16, 32], device="cpu")
    assert [tuple(p.shape) for p in lv] == [(100 * 152, 2), (50 * 76, 2), (0, 2)]
    # Last point of level 1 = centre of cell (49, 75).
    assert lv[1][-1].tolist() == [75.5 * 16, 49.5 * 16]
    with pytest.raises(ValueError, match="strides"):
        anchor_points([(2, 2)], [8, 16])


# ---------------------------------------------------------------------------------------------
# Level choice (mmdet PointAssigner rule: floor((log2(w/4) + log2(h/4)) / 2) = log2 of the stride)


def test_box_pyramid_level_log2_rule():
    strides = [8, 16, 32, 64, 128]
    gt = boxes(
        [0, 0, 32, 32],       # sqrt(wh)/4 = 8     -> 2^3 -> stride 8    -> level 0
        [0, 0, 63, 63],       # 15.75 -> log2 3.98 -> floor 3            -> level 0
        [0, 0, 64, 64],       # 16    -> 2^4       -> stride 16          -> level 1
        [0, 0, 64, 16],       # (log2 16 + log2 4)/2 = 3 -> stride 8 (geometric mean, not max side)
        [0, 0, 256, 1024],    # (6 + 8)/2 = 7 -> stride 128               -> level 4
        [0, 0, 4096, 4096],   # 10 -> clamped to the coarsest level       -> level 4
        [0, 0, 2, 2],         # -1 -> clamped to the finest level         -> level 0
        [5, 5, 5, 9],         # zero width (clamped to 1e-6), finest      -> level 0
        [0, 0, 127, 129],     # sqrt(127*129)=127.996 -> /4 < 32 -> 4.99 -> stride 16 -> level 1
    )
    assert box_pyramid_level(gt, strides).tolist() == [0, 0, 1, 0, 4, 4, 0, 0, 1]
    # scale moves everything by log2(scale): scale 8 halves the exponent's argument.
    assert box_pyramid_level(boxes([0, 0, 64, 64]), strides, scale=8).tolist() == [0]


def test_box_pyramid_level_gaps_and_bad_strides():
    # Exponent 4 (64 px box) has no stride-16 level here: largest level not above it = stride 8.
    assert box_pyramid_level(boxes([0, 0, 64, 64], [0, 0, 128, 128]), [8, 32]).tolist() == [0, 1]
    with pytest.raises(ValueError, match="powers of two"):
        box_pyramid_level(boxes([0, 0, 8, 8]), [8, 12])
    with pytest.raises(ValueError, match="increasing"):
        box_pyramid_level(boxes([0, 0, 8, 8]), [16, 8])


# ---------------------------------------------------------------------------------------------
# Stage 1: assign_centroid


def test_centroid_picks_level_and_nearest_point(points):
    gt = boxes(
        # A: 20x16, sqrt(320)/4 = 4.47 -> exponent 2 -> clamped to stride 8. Centre (20, 26):
        #    x = 20 is a grid column; y = 26 is nearer row 28 (|2|) than row 20 (|6|) -> point (20, 28).
        [10, 18, 30, 34],
        # B: 64x64 -> exponent 4 -> stride 16. Centre (32, 32) is equidistant from (24,24), (40,24),
        #    (24,40), (40,40); the tie goes to the lowest index (row-major first) -> (24, 24).
        [0, 0, 64, 64],
    )
    labels = assign_centroid(points, COUNTS, STRIDES, gt, flags(False, False))
    assert labels.dtype == torch.int64 and labels.shape == (80,)
    assert positives(labels) == {grid_index(20, 28): 0, grid_index(24, 24, level=1): 1}
    assert (labels[labels < 0] == NEGATIVE).all()


def test_centroid_conflict_nearer_centre_wins_and_loser_gets_nothing(points):
    gt = boxes(
        [14, 14, 30, 30],  # C: 16x16 at (22, 22): nearest point (20, 20), normalised dist sqrt(2)*2/16 = 0.177
        [4, 4, 36, 36],    # D: 32x32 at (20, 20): exactly on (20, 20), distance 0 -> D wins
    )
    labels = assign_centroid(points, COUNTS, STRIDES, gt, flags(False, False))
    # Listed first or second, the nearer object keeps the point; C has no positive at all (the
    # reference does not fall back to C's second-nearest point).
    assert positives(labels) == {grid_index(20, 20): 1}
    labels = assign_centroid(points, COUNTS, STRIDES, gt.flip(0), flags(False, False))
    assert positives(labels) == {grid_index(20, 20): 0}


def test_centroid_conflict_uses_size_normalised_distance(points):
    gt = boxes(
        # E: 62x8 at (33, 28): sqrt(496)/4 = 5.6 -> stride 8; nearest point (36, 28), dx = 3:
        #    Euclidean 3, normalised 3/62 = 0.048.
        [2, 24, 64, 32],
        # F: 16x16 at (36, 29): nearest point (36, 28), dy = 1: Euclidean 1, normalised 1/16 = 0.0625.
        [28, 21, 44, 37],
    )
    # Euclidean distance would give the point to F; the reference's normalised distance gives it to E.
    labels = assign_centroid(points, COUNTS, STRIDES, gt, flags(False, False))
    assert positives(labels) == {grid_index(36, 28): 0}


def test_centroid_crowd_is_never_positive_and_its_points_are_ignored(points):
    gt = boxes(
        [0, 0, 32, 32],    # crowd region covering the 4x4 top-left points (x, y in {4, 12, 20, 28})
        [12, 12, 28, 28],  # normal object at (20, 20), 16x16 -> stride 8 -> point (20, 20)
        [40, 40, 56, 56],  # a second crowd region whose centre (48, 48) is not a grid point
    )
    labels = assign_centroid(points, COUNTS, STRIDES, gt, flags(True, False, True))
    assert positives(labels) == {grid_index(20, 20): 1}  # inside the crowd region, still positive
    lvl0 = labels[:64].view(8, 8)
    # 16 points inside crowd 0 minus the positive one are ignored.
    assert (lvl0[:4, :4] == IGNORED).sum() == 15
    # Crowd 2 covers x, y in {44, 52} on level 0 and (40,40) on level 1 (40 lies inside [40, 56]: edge included).
    assert (lvl0[5:7, 5:7] == IGNORED).all()
    assert labels[grid_index(40, 40, level=1)] == IGNORED
    # Level 1: crowd 0 covers (8,8), (24,8), (8,24), (24,24); crowd 2 covers (40|56, 40|56).
    assert int((labels[64:] == IGNORED).sum()) == 4 + 4
    assert int((labels == IGNORED).sum()) == 15 + 4 + 8
    assert not (labels == 0).any() and not (labels == 2).any()


def test_centroid_empty_inputs(points):
    labels = assign_centroid(points, COUNTS, STRIDES, boxes(), flags())
    assert labels.dtype == torch.int64 and (labels == NEGATIVE).all() and labels.shape == (80,)
    none = assign_centroid(torch.zeros(0, 2), [0, 0], STRIDES, boxes([0, 0, 8, 8]), flags(False))
    assert none.shape == (0,) and none.dtype == torch.int64
    # A lone crowd box (0,0,16,16) covers (4|12, 4|12) on level 0 and (8, 8) on level 1.
    only_crowd = assign_centroid(points, COUNTS, STRIDES, boxes([0, 0, 16, 16]), flags(True))
    assert not (only_crowd >= 0).any() and int((only_crowd == IGNORED).sum()) == 5


def test_centroid_object_on_a_level_without_points(points):
    # 64x64 box belongs to stride 16, but that level is empty (e.g. a feature map of size 0).
    pts0 = points[:64]
    labels = assign_centroid(pts0, [64, 0], STRIDES, boxes([0, 0, 64, 64], [12, 12, 28, 28]),
                             flags(False, False))
    assert positives(labels) == {grid_index(20, 20): 1}


def test_centroid_rejects_inconsistent_inputs(points):
    with pytest.raises(ValueError, match="sums to 79"):
        assign_centroid(points, [64, 15], STRIDES, boxes([0, 0, 8, 8]), flags(False))
    with pytest.raises(ValueError, match="gt_ignore"):
        assign_centroid(points, COUNTS, STRIDES, boxes([0, 0, 8, 8]), flags(False, True))
    with pytest.raises(ValueError, match="gt_boxes"):
        assign_centroid(points, COUNTS, STRIDES, torch.zeros(2, 5), flags(False, True))


# ---------------------------------------------------------------------------------------------
# Stage 2: assign_atss


def test_atss_threshold_by_hand_single_level(points):
    """gt (12,16,44,40): 32x24 centred on grid point (28,28); anchors 16x16 (anchor_scale 2).

    The 9 nearest points are (28,28), 4 at distance 8 and 4 at 8*sqrt(2), all with anchor boxes
    inside the gt box horizontally:
      (28,28), (20,28), (36,28): anchor 16x16 entirely inside the gt  -> IoU 256/768 = 1/3
      (28,20), (28,36) and the 4 diagonals: 16x12 overlap            -> IoU 192/(256+768-192) = 3/13
    mean = (3*1/3 + 6*3/13)/9 = 31/117; deviations +8/117 (x3), -4/117 (x6);
    sample std (Bessel, as torch.std in the ATSS code) = sqrt((3*64 + 6*16)/8)/117 = 6/117;
    threshold = 37/117 = 0.3162 (the population std would give 0.3133).
    Positives: IoU 1/3 >= 37/117 and inside -> the middle row (20,28), (28,28), (36,28).
    """
    gt = boxes([12, 16, 44, 40])
    cand, iou, thr = atss_candidates(points[:64], [64], [8], gt, topk=9, anchor_scale=2)
    assert cand.shape == (9, 1)
    assert sorted(iou.flatten().tolist()) == pytest.approx(sorted([1 / 3] * 3 + [3 / 13] * 6))
    assert thr.item() == pytest.approx(37 / 117, abs=1e-6)
    labels = assign_atss(points[:64], [64], [8], gt, flags(False), topk=9, anchor_scale=2)
    assert positives(labels) == {grid_index(20, 28): 0, grid_index(28, 28): 0, grid_index(36, 28): 0}


def test_atss_candidates_pool_across_levels(points):
    """Same gt, topk=2, both levels. Candidates (ties in distance go to the lower point index):
      level 0: (28,28) d=0, IoU 1/3; then 4 points at d=8 -> lowest index (28,20), IoU 3/13
      level 1 (anchors 32x32): (24,24) d^2=32, anchor (8,8,40,40) ∩ gt = 28x24 -> 672/1120 = 3/5;
               then (40,24) and (24,40) tie at d^2=160 -> (40,24), anchor (24,8,56,40): 20x24=480
               -> 480/(1024+768-480) = 15/41.
    threshold = mean + sample std of {1/3, 3/13, 3/5, 15/41} = 0.3825 + 0.1560 = 0.5385:
    only (24,24) on level 1 passes, and it lies inside the gt.
    """
    gt = boxes([12, 16, 44, 40])
    cand, iou, thr = atss_candidates(points, COUNTS, STRIDES, gt, topk=2, anchor_scale=2)
    # Within a level, candidates are listed by increasing point index.
    assert cand.flatten().tolist() == [grid_index(28, 20), grid_index(28, 28),
                                       grid_index(24, 24, 1), grid_index(40, 24, 1)]
    hand = [Fraction(3, 13), Fraction(1, 3), Fraction(3, 5), Fraction(15, 41)]
    assert iou.flatten().tolist() == pytest.approx([float(v) for v in hand])
    expected_thr = float(sum(hand) / 4) + statistics.stdev([float(v) for v in hand])
    assert thr.item() == pytest.approx(expected_thr, abs=1e-6)
    labels = assign_atss(points, COUNTS, STRIDES, gt, flags(False), topk=2, anchor_scale=2)
    assert positives(labels) == {grid_index(24, 24, 1): 0}


def test_atss_centre_must_be_strictly_inside(points):
    """gt (20,20,36,36) with 32x32 anchors: every one of the 9 candidates' anchor contains the gt,
    so all IoUs are 256/1024 = 0.25, std = 0 and the threshold is exactly 0.25 (IoU >= thr passes).
    But 8 of the 9 points lie on the gt's edges (x or y in {20, 36}): only (28,28) is strictly inside."""
    gt = boxes([20, 20, 36, 36])
    _, iou, thr = atss_candidates(points[:64], [64], [8], gt, topk=9, anchor_scale=4)
    assert (iou == 0.25).all() and thr.item() == 0.25
    labels = assign_atss(points[:64], [64], [8], gt, flags(False), topk=9, anchor_scale=4)
    assert positives(labels) == {grid_index(28, 28): 0}


def test_atss_point_matching_two_objects_goes_to_higher_iou(points):
    """gt0 = the 32x24 box of the hand case (positives: middle row (20..36, 28), IoU 1/3 each).
    gt1 = (20,20,36,36), 16x16 on (28,28): its centre anchor has IoU 1 and is its only positive
    (neighbours 1/3 and 1/7 stay below its threshold 0.594). Point (28,28) is positive for both and
    goes to gt1 (IoU 1 > 1/3) in either order; gt0 keeps (20,28) and (36,28)."""
    gt = boxes([12, 16, 44, 40], [20, 20, 36, 36])
    labels = assign_atss(points[:64], [64], [8], gt, flags(False, False), topk=9, anchor_scale=2)
    assert positives(labels) == {grid_index(20, 28): 0, grid_index(28, 28): 1, grid_index(36, 28): 0}
    labels = assign_atss(points[:64], [64], [8], gt.flip(0), flags(False, False), topk=9, anchor_scale=2)
    assert positives(labels) == {grid_index(20, 28): 1, grid_index(28, 28): 0, grid_index(36, 28): 1}


def test_atss_objects_without_candidates_inside(points):
    gt = boxes(
        [0, 22, 64, 26],   # thin strip between rows y=20 and y=28: no point strictly inside
        [13, 13, 14, 14],  # 1 px box between grid points
        [30, 30, 30, 30],  # zero-area box: IoU 0 with everything (no 0/0)
        [12, 16, 44, 40],  # the hand-case object: positives (20,28), (28,28), (36,28), unaffected
    )
    labels = assign_atss(points[:64], [64], [8], gt, flags(False, False, False, False), anchor_scale=2)
    _, iou, thr = atss_candidates(points[:64], [64], [8], gt, anchor_scale=2)
    assert torch.isfinite(iou).all() and torch.isfinite(thr).all()
    assert iou[:, 2].eq(0).all()
    assert positives(labels) == {grid_index(20, 28): 3, grid_index(28, 28): 3, grid_index(36, 28): 3}
    # Same with the default anchors on both levels: no crash, the degenerate objects get nothing.
    labels = assign_atss(points, COUNTS, STRIDES, gt[:3], flags(False, False, False))
    assert not (labels >= 0).any()


def test_atss_crowd_region_ignored(points):
    gt = boxes(
        [0, 0, 32, 32],    # crowd, listed first: never a candidate, its label 0 never appears
        [12, 16, 44, 40],  # the hand-case object: positives (20,28), (28,28), (36,28)
    )
    labels = assign_atss(points[:64], [64], [8], gt, flags(True, False), topk=9, anchor_scale=2)
    assert positives(labels) == {grid_index(20, 28): 1, grid_index(28, 28): 1, grid_index(36, 28): 1}
    lvl0 = labels.view(8, 8)
    # Points with x, y in {4, 12, 20, 28} lie in the crowd box; (20,28) and (28,28) are positive,
    # the other 14 are ignored. Nothing outside the crowd box is ignored.
    assert int((lvl0[:4, :4] == IGNORED).sum()) == 14
    assert int((labels == IGNORED).sum()) == 14
    # Identical to the assignment without the crowd box, apart from the ignored points.
    alone = assign_atss(points[:64], [64], [8], gt[1:], flags(False), topk=9, anchor_scale=2)
    assert torch.equal(torch.where(labels == IGNORED, NEGATIVE, labels), torch.where(alone >= 0, alone + 1, alone))


def test_atss_empty_inputs(points):
    labels = assign_atss(points, COUNTS, STRIDES, boxes(), flags())
    assert labels.dtype == torch.int64 and labels.shape == (80,) and (labels == NEGATIVE).all()
    none = assign_atss(torch.zeros(0, 2), [0, 0], STRIDES, boxes([0, 0, 8, 8]), flags(False))
    assert none.shape == (0,) and none.dtype == torch.int64
    only_crowd = assign_atss(points, COUNTS, STRIDES, boxes([0, 0, 16, 16]), flags(True))
    assert not (only_crowd >= 0).any() and int((only_crowd == IGNORED).sum()) == 5
    # An empty level contributes no candidate: the answer is that of level 0 alone (the hand case).
    labels = assign_atss(points[:64], [64, 0], STRIDES, boxes([12, 16, 44, 40]), flags(False), anchor_scale=2)
    assert positives(labels) == {grid_index(20, 28): 0, grid_index(28, 28): 0, grid_index(36, 28): 0}
    # A level with fewer points than topk contributes all of them: 4 on level 1 (2x2 grid) + 9 on level 0.
    lvl1 = torch.tensor([[8.0, 8.0], [24.0, 8.0], [8.0, 24.0], [24.0, 24.0]])
    cand, _, _ = atss_candidates(torch.cat([points[:64], lvl1]), [64, 4], STRIDES, boxes([12, 16, 44, 40]))
    assert cand.shape == (13, 1) and cand[9:, 0].tolist() == [64, 65, 66, 67]


def test_atss_custom_anchor_boxes_match_squares(points):
    # Passing the squares explicitly gives the same answer as anchor_scale (the hook the reference's
    # refine stage uses with stage-1 predicted boxes).
    half = torch.tensor([8.0] * 64 + [16.0] * 16)[:, None]
    squares = torch.cat([points - half, points + half], 1)
    gt = boxes([12, 16, 44, 40], [20, 20, 36, 36], [0, 0, 64, 64])
    ig = flags(False, False, False)
    assert torch.equal(assign_atss(points, COUNTS, STRIDES, gt, ig, anchor_scale=2),
                       assign_atss(points, COUNTS, STRIDES, gt, ig, anchor_boxes=squares))
    with pytest.raises(ValueError, match="anchor_boxes"):
        assign_atss(points, COUNTS, STRIDES, gt, ig, anchor_boxes=squares[:5])


# ---------------------------------------------------------------------------------------------
# Pose: obj-box vs kps-box is the caller's choice of gt_boxes


def test_pose_obj_box_and_kps_box_give_different_positives():
    # A 128x256 (w x h) image, strides 8..128. A person whose object box spans 48x192 px but whose
    # labelled keypoints only cover the upper body (e.g. legs occluded): kps-box 24x72. The caller
    # picks which box goes into gt_boxes (LandmarkTargets.boxes is built from one or the other).
    strides = [8, 16, 32, 64, 128]
    sizes = [(256 // s, 128 // s) for s in strides]
    counts = [h * w for h, w in sizes]
    offset = [sum(counts[:k]) for k in range(len(counts))]
    pts = torch.cat(anchor_points(sizes, strides))
    obj_box = boxes([40, 0, 88, 192])
    keypoints = torch.tensor([[64, 24], [52, 40], [76, 40], [54, 70], [74, 70], [58, 96], [70, 96]],
                             dtype=torch.float32)
    kps_box = torch.cat([keypoints.min(0).values, keypoints.max(0).values])[None]
    assert kps_box.tolist() == [[52, 24, 76, 96]]
    # Stage 1: obj-box sqrt(48*192)/4 = 24 -> exponent 4 -> stride 16; kps-box sqrt(24*72)/4 = 10.4 -> stride 8.
    assert box_pyramid_level(obj_box, strides).tolist() == [1]
    assert box_pyramid_level(kps_box, strides).tolist() == [0]
    crowd = flags(False)
    init_obj = positives(assign_centroid(pts, counts, strides, obj_box, crowd))
    init_kps = positives(assign_centroid(pts, counts, strides, kps_box, crowd))
    # obj-box centre (64, 96) is equidistant from the stride-16 points x in {56, 72}, y in {88, 104}:
    # ties go to the lowest index -> (56, 88) = row 5, column 3 of the 8-column level 1.
    assert list(init_obj) == [offset[1] + 5 * 8 + 3]
    # kps-box centre (64, 60): x ties between 60 and 68 -> 60 (column 7); y = 60 is row 7 -> (60, 60).
    assert list(init_kps) == [offset[0] + 7 * 16 + 7]
    # Stage 2: the obj-box positives are all on level 1, the kps-box ones all on level 0.
    refine_obj = positives(assign_atss(pts, counts, strides, obj_box, crowd))
    refine_kps = positives(assign_atss(pts, counts, strides, kps_box, crowd))
    assert refine_obj and refine_kps
    assert all(offset[1] <= i < offset[2] for i in refine_obj)
    assert all(i < offset[1] for i in refine_kps)
    # Every kps-box positive lies inside the (smaller) keypoint box; some obj-box positive does not.
    def inside(i: int, b: torch.Tensor) -> bool:
        return bool((pts[i] > b[0, :2]).all() and (pts[i] < b[0, 2:]).all())

    assert all(inside(i, kps_box) for i in refine_kps)
    assert not all(inside(i, kps_box) for i in refine_obj)


# ---------------------------------------------------------------------------------------------
# Against straightforward per-object loops (the algorithms written the slow, obvious way)


def _slow_centroid(points, counts, strides, gt, ignore, scale=4.0):
    lvl_exp = [int(math.log2(s)) for s in strides]
    starts = [sum(counts[:k]) for k in range(len(counts))]
    owner, owner_dist = {}, {}
    for m in range(gt.shape[0]):
        if ignore[m]:
            continue
        x1, y1, x2, y2 = gt[m].tolist()
        w, h = max(x2 - x1, 1e-6), max(y2 - y1, 1e-6)
        e = math.floor((math.log2(w / scale) + math.log2(h / scale)) / 2)
        k = max(i for i in range(len(strides)) if lvl_exp[i] <= max(e, lvl_exp[0]))
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        best, best_d = None, math.inf
        for p in range(starts[k], starts[k] + counts[k]):
            px, py = points[p].tolist()
            d = math.hypot((px - cx) / w, (py - cy) / h)
            if d < best_d:
                best, best_d = p, d
        if best is not None and best_d < owner_dist.get(best, math.inf):
            owner[best], owner_dist[best] = m, best_d
    return owner


def _slow_atss(points, counts, strides, gt, topk, anchor_scale):
    starts = [sum(counts[:k]) for k in range(len(counts))]
    best = {}
    for m in range(gt.shape[0]):
        x1, y1, x2, y2 = gt[m].tolist()
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        cands, ious = [], []
        for k, s in enumerate(strides):
            idx = list(range(starts[k], starts[k] + counts[k]))
            idx.sort(key=lambda p: (points[p, 0].item() - cx) ** 2 + (points[p, 1].item() - cy) ** 2)
            for p in idx[:topk]:
                px, py = points[p].tolist()
                r = anchor_scale * s / 2
                iw = max(0.0, min(x2, px + r) - max(x1, px - r))
                ih = max(0.0, min(y2, py + r) - max(y1, py - r))
                inter = iw * ih
                cands.append(p)
                ious.append(inter / ((2 * r) ** 2 + (x2 - x1) * (y2 - y1) - inter))
        thr = statistics.mean(ious) + statistics.stdev(ious)
        for p, v in zip(cands, ious):
            px, py = points[p].tolist()
            is_pos = v >= thr - 1e-6 and min(px - x1, py - y1, x2 - px, y2 - py) > 0.01
            if is_pos and v > best.get(p, (-1.0, None))[0]:
                best[p] = (v, m)
    return {p: m for p, (v, m) in best.items()}


def _random_scene(generator, num_objects, image=256):
    xy = torch.rand(num_objects, 2, generator=generator) * image
    wh = torch.exp(torch.empty(num_objects, 2).uniform_(math.log(4), math.log(image), generator=generator))
    return torch.cat([xy - wh / 2, xy + wh / 2], 1)


def test_vectorised_assigners_match_slow_loops():
    g = torch.Generator().manual_seed(7)
    strides = [8, 16, 32, 64]
    sizes = [(256 // s, 256 // s) for s in strides]
    counts = [h * w for h, w in sizes]
    pts = torch.cat(anchor_points(sizes, strides))
    for _ in range(3):
        gt = _random_scene(g, 12)
        none = torch.zeros(12, dtype=torch.bool)
        assert positives(assign_centroid(pts, counts, strides, gt, none)) == _slow_centroid(pts, counts, strides, gt, none)
        fast = positives(assign_atss(pts, counts, strides, gt, none, topk=9, anchor_scale=8.0))
        assert fast == _slow_atss(pts, counts, strides, gt, topk=9, anchor_scale=8.0)
        assert len(fast) > 0


def test_permuting_objects_permutes_labels():
    g = torch.Generator().manual_seed(3)
    strides = [8, 16, 32]
    sizes = [(128 // s, 128 // s) for s in strides]
    counts = [h * w for h, w in sizes]
    pts = torch.cat(anchor_points(sizes, strides))
    gt = _random_scene(g, 10, image=128)
    ignore = torch.zeros(10, dtype=torch.bool)
    ignore[4] = True
    perm = torch.randperm(10, generator=g)
    for assign in (assign_centroid, assign_atss):
        a = assign(pts, counts, strides, gt, ignore)
        b = assign(pts, counts, strides, gt[perm], ignore[perm])
        # label m in a must equal label j in b with perm[j] == m
        mapped = torch.where(b >= 0, perm[b.clamp(min=0)], b)
        assert torch.equal(a, mapped)


# ---------------------------------------------------------------------------------------------
# Size sanity: 100 objects x ~22k points (a 1024x1024 image, strides 8..128)


def test_many_objects_many_points():
    g = torch.Generator().manual_seed(0)
    strides = [8, 16, 32, 64, 128]
    sizes = [(1024 // s, 1024 // s) for s in strides]
    counts = [h * w for h, w in sizes]
    pts = torch.cat(anchor_points(sizes, strides))
    assert pts.shape[0] == 21824
    gt = _random_scene(g, 100, image=1024)
    ignore = torch.zeros(100, dtype=torch.bool)
    ignore[::10] = True

    init = assign_centroid(pts, counts, strides, gt, ignore)
    pos = init[init >= 0]
    assert pos.unique().numel() == pos.numel()  # at most one positive per object
    assert not ignore[pos].any()
    assert pos.numel() >= 80  # 90 non-crowd objects, a few may lose a contested point

    refine = assign_atss(pts, counts, strides, gt, ignore)
    p_idx = torch.nonzero(refine >= 0).flatten()
    owner = refine[p_idx]
    assert not ignore[owner].any()
    assert owner.unique().numel() >= 80
    # every positive point lies strictly inside its object
    b = gt[owner]
    assert ((pts[p_idx] > b[:, :2]).all() and (pts[p_idx] < b[:, 2:]).all())
    # at most topk * levels positives per object
    assert torch.bincount(owner, minlength=100).max() <= 9 * len(strides)
    assert set(refine.unique().tolist()) <= set(range(100)) | {NEGATIVE, IGNORED}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(1)
    strides = [8, 16, 32, 64, 128]
    sizes = [(512 // s, 640 // s) for s in strides]
    counts = [h * w for h, w in sizes]
    pts = torch.cat(anchor_points(sizes, strides))
    gt = _random_scene(g, 50, image=512)
    ignore = torch.rand(50, generator=g) < 0.1
    for assign in (assign_centroid, assign_atss):
        cpu = assign(pts, counts, strides, gt, ignore)
        gpu = assign(pts.cuda(), counts, strides, gt.cuda(), ignore.cuda())
        assert gpu.device.type == "cuda" and gpu.dtype == torch.int64
        assert torch.equal(cpu, gpu.cpu())


def test_atss_single_candidate_has_zero_std(points):
    # One level, topk=1: the only candidate is the nearest point; with one value the sample std is
    # undefined (torch.std gives NaN), we take 0 so the threshold is that IoU and the point passes.
    gt = boxes([12, 16, 44, 40])
    cand, iou, thr = atss_candidates(points[:64], [64], [8], gt, topk=1, anchor_scale=2)
    assert cand.flatten().tolist() == [grid_index(28, 28)]
    assert thr.item() == pytest.approx(1 / 3) and thr.item() == iou.item()
    labels = assign_atss(points[:64], [64], [8], gt, flags(False), topk=1, anchor_scale=2)
    assert positives(labels) == {grid_index(28, 28): 0}
