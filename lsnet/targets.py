"""Landmark targets from COCO annotations (paper §3.2, docs/design.md §2–§3).

One call per image, :func:`compute_image_targets`, turns the image's COCO annotations into a record of
numpy arrays -- the row stored in the shards -- holding, for every kept object, its box, extreme
points (bbox task), contours with several point counts (segm task) and keypoints (pose task).
:func:`record_to_targets` then picks one task out of a record as :class:`LandmarkTargets`.

Conventions (every function in this module and in :mod:`lsnet.transforms` follows them):

* **Continuous pixel coordinates**, as COCO: pixel ``(col, row)`` covers ``[col, col+1) x
  [row, row+1)``, the image spans ``[0, W] x [0, H]``. A horizontal flip is ``x' = W - x``.
* **Clockwise** means clockwise *as seen on the screen*, i.e. with ``y`` pointing down: a contour
  goes top -> right -> bottom -> left. Equivalently its shoelace sum
  ``sum(x_i * y_{i+1} - x_{i+1} * y_i)`` computed on the raw ``(x, y)`` values is positive.
* **Coordinate grid.** Every coordinate this module writes is rounded to a multiple of
  :data:`COORD_GRID` (1/256 px). On that grid, with ``|x| < 2**15`` and an integer ``W``, ``W - x``
  is exact in float32, so a horizontal flip is an exact involution (flip twice == identity, bit for
  bit). The rounding moves points by at most 0.002 px.
* Points are clipped to the image, the box is COCO's ``bbox`` clipped to the image (COCO boxes are
  the extent of the polygons, so extreme points lie on the box edges).

Extreme points (N=4, order top, left, bottom, right) follow ExtremeNet, from which the paper takes
them ("a pixel that belongs to the object") and whose procedure the authors' ``gen_coco_lsvr.py``
runs (docs/design.md §2). For the top point: the extremal vertex (smallest ``y``) and the *one run of
consecutive outline vertices* around it whose ``y`` stays within ``tolerance x (box height + 1)`` of
it (the band, 2 % by default; the side counted in pixels as ExtremeNet does); the point is
``(middle of the run's x extent, ymin)``. The same for the other three sides. Since the run is a
connected piece of the outline inside the band, the point lies within the band width of the outline,
on the object -- never between two separate pieces (two legs, two arms) that both reach the band.
Where several vertices reach the extreme, the first one decides (rings in their order). Two walks
(``TargetConfig.extreme_walk``):

* ``"extremenet"`` (default): exactly ExtremeNet's walk over the vertex list padded by one vertex at
  each end, ``[v_{K-1}, v_0, ..., v_{K-1}, v_0]``: a run stops one vertex past the list's start/end,
  and a last vertex that reaches the extreme is found first (at the front) so its run goes forward
  only -- e.g. the bottom point of the rectangle ``(10,20) (50,20) (50,80) (10,80)`` is the corner
  ``(10, 80)``. It is applied per part (the reference concatenates the parts' vertex lists, so its
  run can leave one part for the next or miss a part's closing edge); otherwise it gives the
  reference's points un-floored (the reference floors the run centre to an integer): on tiny_coco
  + coco_mini polygons 99.6 % of extreme points are within 1 px of the reference's, the rest are on
  multi-part objects.
* ``"closed"``: the run follows each ring all the way round (the rectangle's bottom point is then
  ``(30, 80)``).

RLE masks (non-crowd): of the mask pixels inside a side's band, the 8-connected piece holding the first
extremal pixel (raster order); the point is the middle of that piece's extent.

Contour points (N = each of ``TargetConfig.contour_points``): the outline resampled at uniform
arc-length steps, clockwise, sample 0 *exactly* at the outline point nearest to the top-centre
``((x1+x2)/2, y1)`` of the object box (the projection onto the outline, not a rolled vertex).
Multi-part objects (``TargetConfig.multipart``):

* ``"largest"``: only the part with the largest area is used.
* ``"per_part"`` (default): parts smaller than ``min_part_area`` px² are dropped (unless all are),
  every part other than the largest-area one ("main part") costs 3 bridge points (below), the rest
  of the N points is split among the parts proportionally to their perimeters (largest remainder),
  and parts that would get fewer than ``min_points_per_part`` points are dropped (smallest area
  first). The main part is sampled as a single object would be (sample 0 nearest the object box's
  top-centre). Each other part is attached by a *zero-width bridge* between the closest points
  ``p`` (on the main outline) and ``q`` (on the part): the block ``[p, q, q + step, ...,
  q + (n-1) step, q, p]`` (clockwise around the part) is inserted into the main sequence where
  ``p`` lies. Read as one polygon -- which is what the detector outputs -- the sequence walks
  around the main part, out along each bridge, around that part and back, so the bridges enclose
  no area and the polygon's mask is the union of the parts (measured by the §4.4 study in
  :mod:`lsnet.mask_study`). The construction commutes with mirroring, so the horizontal flip of the
  whole sequence, ``new[k] = mirror(old[-k mod N])``, equals the contour computed on the mirrored
  image (:func:`lsnet.transforms.hflip_points`); exact ties (mirror-symmetric shapes) excepted.

Holes are ignored (COCO polygons have none; for RLE masks only outer borders are traced). RLE
masks (non-crowd) are traced with OpenCV through the centres of their border pixels, i.e. up to
half a pixel inside the true border.

Crowd annotations are kept with ``iscrowd = True`` and box-derived placeholder points (extreme =
edge midpoints, contour = the box outline resampled as above, no keypoints): the assigners only use
their boxes, to ignore samples inside them.

Keypoints: the 17 COCO keypoints with their ``v`` flag (0 = not labelled, 1 = labelled but occluded,
2 = visible); unlabelled ones are stored at (0, 0) as in COCO. ``kps_box`` is the box of the
labelled (v > 0) keypoints -- a zero-size box when only one is labelled -- and equals ``box`` when
none is labelled.

Validation: :func:`compute_image_targets` never raises for a bad annotation; it returns a
:class:`Rejection` with the reason instead: ``missing bbox``, ``malformed bbox``, ``non-finite
coordinates in ...``, ``degenerate box (w<=0 or h<=0)``, ``box outside the image`` (empty after
clipping), ``unknown category_id``, ``no valid polygon`` (no part with >= 3 distinct vertices and
non-zero area, or no segmentation), ``malformed polygon``, ``empty mask``, ``RLE size ... does not
match the image size``, ``undecodable RLE``, ``malformed keypoints``. It raises only for programmer
errors (a non-positive image size, an invalid :class:`TargetConfig`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from .structures import TASK_NUM_POINTS, LandmarkTargets

#: All coordinates written by this module are multiples of this (see the module docstring).
COORD_GRID: float = 1.0 / 256.0
#: "per_part" contours: points spent on the bridge to each extra part (p, duplicate q, duplicate p).
BRIDGE_POINTS: int = 3
NUM_KEYPOINTS: int = 17


@dataclass
class TargetConfig:
    """How landmark targets are computed from COCO annotations (see the module docstring)."""

    #: Width of the extreme band as a fraction of the box side (docs/design.md §2: 2 %).
    extreme_tolerance: float = 0.02
    #: Extreme-point vertex run (module docstring): "extremenet" walks the vertex list padded by one
    #: vertex at each end, as ExtremeNet and the authors' script do; "closed" walks round the ring.
    extreme_walk: Literal["extremenet", "closed"] = "extremenet"
    #: Contour point counts to compute; each gives a record column ``contour_{N}`` (paper §4.4).
    contour_points: tuple[int, ...] = (18, 36, 72)
    #: Multi-part objects: "per_part" splits the N points among the parts, "largest" keeps one part.
    multipart: Literal["per_part", "largest"] = "per_part"
    #: Parts with a smaller area (px²) are dropped from contours, unless every part is that small.
    min_part_area: float = 5.0
    #: "per_part": a part must receive at least this many points, else it is dropped.
    min_points_per_part: int = 3

    def __post_init__(self) -> None:
        if not 0 <= self.extreme_tolerance < 0.5:
            raise ValueError(f"extreme_tolerance must be in [0, 0.5), got {self.extreme_tolerance}")
        if not self.contour_points or any(int(n) < 3 for n in self.contour_points):
            raise ValueError(f"contour_points must be point counts >= 3, got {self.contour_points}")
        self.contour_points = tuple(int(n) for n in self.contour_points)
        if self.extreme_walk not in ("extremenet", "closed"):
            raise ValueError(f"extreme_walk must be 'extremenet' or 'closed', got {self.extreme_walk!r}")
        if self.multipart not in ("per_part", "largest"):
            raise ValueError(f"multipart must be 'per_part' or 'largest', got {self.multipart!r}")
        if self.min_points_per_part < 2:
            raise ValueError("min_points_per_part must be >= 2")


@dataclass
class Rejection:
    """An annotation that gives no targets, and why (counted in the shard manifest)."""

    ann_id: int | None
    image_id: int | None
    reason: str


class _Reject(Exception):
    """Internal: an annotation is unusable; turned into a :class:`Rejection`."""


# --------------------------------------------------------------------------------------------------
# Small geometry helpers (float64 numpy).


def snap_to_grid(values: np.ndarray) -> np.ndarray:
    """Round to multiples of :data:`COORD_GRID` (exactly representable in float32 for |v| < 2**15)."""
    return np.round(np.asarray(values, dtype=np.float64) / COORD_GRID) * COORD_GRID


def ring_signed_area(ring: np.ndarray) -> float:
    """Half the shoelace sum of a closed ring (K, 2); > 0 means clockwise on screen (y down)."""
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _clean_ring(ring: np.ndarray) -> np.ndarray:
    """Drop consecutive duplicate vertices (and a closing vertex equal to the first)."""
    if len(ring) == 0:
        return ring
    keep = np.any(ring != np.roll(ring, 1, axis=0), axis=1)
    if not keep.any():  # all vertices identical
        return ring[:1]
    return ring[keep]


def _ring_arclength(ring: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Edge vectors (K, 2), cumulative start positions (K,) and perimeter of a closed ring."""
    edges = np.roll(ring, -1, axis=0) - ring
    lengths = np.hypot(edges[:, 0], edges[:, 1])
    starts = np.concatenate([[0.0], np.cumsum(lengths)[:-1]])
    return edges, starts, float(lengths.sum())


def nearest_arc_position(ring: np.ndarray, query: np.ndarray) -> float:
    """Arc-length position (from vertex 0) of the point of closed ring (K, 2) nearest to ``query``."""
    edges, starts, _ = _ring_arclength(ring)
    sq = np.sum(edges * edges, axis=1)
    t = np.clip(np.sum((query - ring) * edges, axis=1) / np.maximum(sq, 1e-300), 0.0, 1.0)
    closest = ring + t[:, None] * edges
    dist2 = np.sum((closest - query) ** 2, axis=1)
    i = int(np.argmin(dist2))
    return float(starts[i] + t[i] * math.sqrt(sq[i]))


def sample_ring(ring: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Points of closed ring (K, 2) at arc-length ``positions`` (P,) (taken modulo the perimeter)."""
    edges, starts, perimeter = _ring_arclength(ring)
    s = np.mod(positions, perimeter)
    idx = np.clip(np.searchsorted(starts, s, side="right") - 1, 0, len(ring) - 1)
    lengths = np.hypot(edges[idx, 0], edges[idx, 1])
    t = np.clip((s - starts[idx]) / np.maximum(lengths, 1e-300), 0.0, 1.0)
    return ring[idx] + t[:, None] * edges[idx]


def resample_ring(ring: np.ndarray, num_points: int, anchor: np.ndarray) -> np.ndarray:
    """Resample a closed ring at ``num_points`` uniform arc-length steps, clockwise on screen.

    Args:
        ring: (K, 2) vertices (any orientation; made clockwise here).
        num_points: number of samples ``n``.
        anchor: (2,) sample 0 is the ring point nearest to it; sample ``k`` lies ``k * perimeter / n``
            further along the ring.
    Returns:
        (num_points, 2) points.
    """
    if ring_signed_area(ring) < 0:
        ring = ring[::-1]
    s0 = nearest_arc_position(ring, anchor)
    _, _, perimeter = _ring_arclength(ring)
    return sample_ring(ring, s0 + np.arange(num_points, dtype=np.float64) * (perimeter / num_points))


def box_ring(box: np.ndarray) -> np.ndarray:
    """The outline of box ``x1, y1, x2, y2`` as a clockwise ring (4, 2)."""
    x1, y1, x2, y2 = box
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float64)


def _run_centre(ring_values: list[np.ndarray], ring_other: list[np.ndarray], threshold: float,
                lowest: bool, walk: str) -> tuple[float, float]:
    """Extreme value along one axis and the centre of its vertex run along the other axis.

    Args:
        ring_values: per ring (K_i,) the vertices' coordinate along the band axis (y for top/bottom).
        ring_other: per ring (K_i,) the coordinate along the other axis.
        threshold: band width (px): a vertex is in the band when it lies within it of the extreme.
        lowest: True for the minimum (top/left), False for the maximum (bottom/right).
        walk: "closed" walks around the ring; "extremenet" walks the ring's vertex list padded by
            one vertex at each end (see :func:`extreme_points_from_rings`).
    Returns:
        ``(extreme, centre)``: the extreme coordinate and the middle of the other coordinate over the
        run of consecutive in-band vertices that contains the extremal vertex (the first one in
        vertex order -- rings in their given order -- when several reach the extreme; "extremenet":
        first in the padded list, i.e. a ring's last vertex wins if it reaches the extreme).
    """
    sign = 1.0 if lowest else -1.0
    keys = [sign * v for v in ring_values]  # the band is always "key <= extreme key + threshold"
    best = min(float(k.min()) for k in keys)
    ring = next(i for i, k in enumerate(keys) if float(k.min()) == best)
    key, other = keys[ring], ring_other[ring]
    if walk == "extremenet":
        # The vertex list with one vertex of wrap at each end, [v_{K-1}, v_0, ..., v_{K-1}, v_0],
        # walked from the first extremal entry: a last vertex that reaches the extreme is found first,
        # at the front, so its run only goes forward (as the reference script does).
        key = np.concatenate([key[-1:], key, key[:1]])
        other = np.concatenate([other[-1:], other, other[:1]])
    n = len(key)
    start = int(np.flatnonzero(key == best)[0])
    inside = key <= best + threshold
    if walk == "extremenet":  # no wrap beyond the padding
        outside = np.flatnonzero(~inside)
        hi = outside[outside > start]
        lo = outside[outside < start]
        run = np.arange(int(lo[-1]) + 1 if len(lo) else 0, int(hi[0]) if len(hi) else n)
    elif inside.all():
        run = np.arange(n)
    else:  # walk both ways around the ring from the extremal vertex while still in the band
        after = int(np.argmin(np.roll(inside, -start)))  # steps forward to the first vertex out of the band
        before = int(np.argmin(np.roll(inside[::-1], start + 1)))  # the same backward
        run = (start + np.arange(-before + 1, after)) % n
    values = other[run]
    return sign * best, 0.5 * (float(values.min()) + float(values.max()))


def extreme_points_from_rings(rings: list[np.ndarray], tolerance: float, walk: str = "extremenet") -> np.ndarray:
    """Extreme points (4, 2) top, left, bottom, right of an object made of closed rings (vertices).

    ExtremeNet's rule (see the module docstring): from the extremal vertex, the run of consecutive
    vertices of its ring within ``tolerance x (side + 1 px)`` of the extreme; the point is the middle
    of that run along the side, at the extreme. ``walk="extremenet"`` walks the vertex list padded by
    one vertex at each end, as ExtremeNet and the reference script do; ``"closed"`` follows the ring
    all the way round. Exact, not floored. Each point lies within the band width of the outline.
    """
    xs = [r[:, 0] for r in rings]
    ys = [r[:, 1] for r in rings]
    allv = np.concatenate(rings)
    # the side counted in pixels as ExtremeNet does (max - min + 1)
    tol_x = tolerance * (float(allv[:, 0].max() - allv[:, 0].min()) + 1.0)
    tol_y = tolerance * (float(allv[:, 1].max() - allv[:, 1].min()) + 1.0)
    ymin, top_x = _run_centre(ys, xs, tol_y, True, walk)
    ymax, bottom_x = _run_centre(ys, xs, tol_y, False, walk)
    xmin, left_y = _run_centre(xs, ys, tol_x, True, walk)
    xmax, right_y = _run_centre(xs, ys, tol_x, False, walk)
    return np.array([[top_x, ymin], [xmin, left_y], [bottom_x, ymax], [xmax, right_y]], dtype=np.float64)


def extreme_points_from_mask(mask: np.ndarray, tolerance: float) -> np.ndarray:
    """Extreme points (4, 2) of a binary mask (H, W), pixels as unit squares (continuous coordinates).

    The mask analogue of the vertex run: of the mask pixels inside a side's band, the 8-connected
    piece that holds the first extremal pixel (the leftmost of the top/bottom row, the topmost of the
    left/right column); the point is the middle of that piece's extent along the side.
    """
    import cv2

    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    ymin, ymax = float(rows[0]), float(rows[-1] + 1)
    xmin, xmax = float(cols[0]), float(cols[-1] + 1)
    tol_y, tol_x = tolerance * (ymax - ymin), tolerance * (xmax - xmin)

    def piece_middle(band: np.ndarray, seed_row: int) -> float:
        """Middle of the column extent of the piece of ``band`` (rows, W) holding row ``seed_row``'s first pixel."""
        _, labels = cv2.connectedComponents(band.astype(np.uint8), connectivity=8)
        seed = labels[seed_row, int(np.flatnonzero(band[seed_row])[0])]
        pixels = np.flatnonzero((labels == seed).any(axis=0))
        return 0.5 * (float(pixels.min()) + float(pixels.max()) + 1.0)

    # A row r belongs to the top band when its square [r, r+1) reaches into [ymin, ymin + tol)
    # (the first row always does, also for tol = 0); likewise for the other three sides.
    r, c = np.arange(mask.shape[0]), np.arange(mask.shape[1])
    top_rows = np.flatnonzero((r >= ymin) & (r < max(ymin + tol_y, ymin + 1e-9)))
    bottom_rows = np.flatnonzero((r < ymax) & (r + 1 > min(ymax - tol_y, ymax - 1e-9)))
    left_cols = np.flatnonzero((c >= xmin) & (c < max(xmin + tol_x, xmin + 1e-9)))
    right_cols = np.flatnonzero((c < xmax) & (c + 1 > min(xmax - tol_x, xmax - 1e-9)))
    top = (piece_middle(mask[top_rows], 0), ymin)
    bottom = (piece_middle(mask[bottom_rows], len(bottom_rows) - 1), ymax)
    left = (xmin, piece_middle(mask[:, left_cols].T, 0))
    right = (xmax, piece_middle(mask[:, right_cols].T, len(right_cols) - 1))
    return np.array([top, left, bottom, right], dtype=np.float64)


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer allocation of ``total`` proportional to ``shares`` (Hamilton's method, stable ties)."""
    exact = shares / shares.sum() * total
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def _closest_arc_positions(ring_a: np.ndarray, ring_b: np.ndarray) -> tuple[float, float]:
    """Arc positions ``(s_a, s_b)`` of the closest pair of points of two closed rings' outlines.

    The closest pair always has a vertex of one ring at one end, so vertex-to-edge distances both
    ways suffice.
    """
    best = (np.inf, 0.0, 0.0)
    for src, dst, src_is_a in ((ring_b, ring_a, False), (ring_a, ring_b, True)):
        edges, starts, _ = _ring_arclength(dst)
        sq = np.sum(edges * edges, axis=1)
        rel = src[:, None, :] - dst[None, :, :]  # (V, E, 2)
        t = np.clip(np.sum(rel * edges[None], axis=-1) / np.maximum(sq, 1e-300), 0.0, 1.0)
        d2 = np.sum((dst[None] + t[..., None] * edges[None] - src[:, None, :]) ** 2, axis=-1)
        v, e = np.unravel_index(int(np.argmin(d2)), d2.shape)
        if d2[v, e] < best[0]:
            s_dst = float(starts[e] + t[v, e] * math.sqrt(sq[e]))
            s_src = float(_ring_arclength(src)[1][v])
            best = (float(d2[v, e]), s_src, s_dst) if src_is_a else (float(d2[v, e]), s_dst, s_src)
    return best[1], best[2]


def contour_points(rings: list[np.ndarray], num_points: int, box: np.ndarray, multipart: str,
                   min_part_area: float = 5.0, min_points_per_part: int = 3) -> np.ndarray:
    """Contour landmarks (num_points, 2) of an object made of closed rings (see module docstring).

    Args:
        rings: list of (K_i, 2) closed rings (K_i >= 3, non-zero area), any orientation.
        num_points: N.
        box: (4,) object box ``x1, y1, x2, y2``; sample 0 is the outline point nearest its top-centre.
        multipart: "per_part" or "largest".
    """
    rings = [r if ring_signed_area(r) > 0 else r[::-1] for r in rings]  # clockwise on screen
    areas = np.array([ring_signed_area(r) for r in rings])
    order = np.argsort(-areas, kind="stable")
    rings = [rings[i] for i in order]
    areas = areas[order]
    big = areas >= min_part_area
    if big.any():  # tiny parts go, unless the object is only tiny parts
        rings = [r for r, keep in zip(rings, big) if keep]
    top_centre = np.array([(box[0] + box[2]) / 2.0, box[1]])
    if multipart == "largest" or len(rings) == 1:
        return resample_ring(rings[0], num_points, top_centre)

    perimeters = np.array([_ring_arclength(r)[2] for r in rings])
    keep = np.ones(len(rings), dtype=bool)
    while True:  # drop the smallest parts until every kept part gets enough points
        counts = np.zeros(len(rings), dtype=np.int64)
        # every extra part costs BRIDGE_POINTS points (see below) besides its own samples
        budget = num_points - BRIDGE_POINTS * (int(keep.sum()) - 1)
        if budget > 0:
            counts[keep] = _largest_remainder(perimeters[keep], budget)
        starving = keep & (counts < min_points_per_part)
        if not starving.any() or keep.sum() == 1:
            break
        keep[np.flatnonzero(starving)[-1]] = False  # parts are sorted by area: drop the smallest
    if keep.sum() == 1:
        return resample_ring(rings[0], num_points, top_centre)

    # Main part: n_A samples at offsets k * step from its point nearest the box's top-centre.
    main = rings[0]
    n_main = int(counts[0])
    perimeter_main = perimeters[0]
    step_main = perimeter_main / n_main
    s0 = nearest_arc_position(main, top_centre)
    main_points = sample_ring(main, s0 + step_main * np.arange(n_main))
    # Every other part hangs off the main part by a zero-width bridge between their closest points
    # p (on the main part) and q (on the part): its block [p, q, n samples clockwise from q ..., q, p]
    # is inserted into the main sequence where p lies, so as one polygon the bridge encloses nothing.
    inserts: list[tuple[int, float, float, np.ndarray]] = []
    for i in np.flatnonzero(keep)[1:]:
        s_main, s_part = _closest_arc_positions(main, rings[i])
        rel = float(np.mod(s_main - s0, perimeter_main))
        centre = (rings[i].min(axis=0) + rings[i].max(axis=0)) / 2.0
        k = rel / step_main
        g = round(k)
        if abs(k - g) < 1e-9 * n_main:
            # The bridge starts exactly at main sample g (often sample 0: the anchor and the bridge
            # are the same vertex). Put the block on the side of a_g where the part lies along the
            # direction of travel; mirroring flips both, so the flip rule still holds.
            tangent = main_points[(g + 1) % n_main] - main_points[(g - 1) % n_main]
            ahead = float(np.dot(centre - main_points[g % n_main], tangent)) >= 0
            gap = g % n_main if ahead else (g - 1) % n_main
        else:
            gap = min(int(k), n_main - 1)  # the block goes after main sample `gap`
        if rel < gap * step_main - 1e-9 * perimeter_main:
            rel += perimeter_main  # before sample 0 = at the very end of the sequence
        n = int(counts[i])
        bridge_main = sample_ring(main, np.array([s_main]))
        ring_samples = sample_ring(rings[i], s_part + perimeters[i] / n * np.arange(n))
        block = np.concatenate([bridge_main, ring_samples, ring_samples[:1], bridge_main])
        inserts.append((gap, rel, float(centre[0]), block))
    # Several blocks in one gap: in the order of their bridge along the main outline, then by x.
    inserts.sort(key=lambda item: (item[0], item[1], item[2]))
    pieces, start = [], 0
    for gap, _, _, block in inserts:
        pieces.append(main_points[start: gap + 1])
        pieces.append(block)
        start = gap + 1
    pieces.append(main_points[start:])
    return np.concatenate(pieces)


# --------------------------------------------------------------------------------------------------
# Parsing one COCO annotation.


def _finite_array(values: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise _Reject(f"malformed {what}") from None
    if not np.all(np.isfinite(arr)):
        raise _Reject(f"non-finite coordinates in {what}")
    return arr


def _decode_rle(seg: dict, height: int, width: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    size = seg.get("size")
    counts = seg.get("counts")
    if not (isinstance(size, (list, tuple)) and len(size) == 2) or counts is None:
        raise _Reject("malformed RLE segmentation (needs 'size' [h, w] and 'counts')")
    if [int(size[0]), int(size[1])] != [height, width]:
        raise _Reject(f"RLE size {list(size)} does not match the image size [{height}, {width}]")
    try:
        if isinstance(counts, list):
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
        return mask_utils.decode(rle).astype(bool)
    except Exception as err:  # noqa: BLE001 -- pycocotools raises assorted errors for corrupt counts
        raise _Reject(f"undecodable RLE segmentation ({type(err).__name__})") from None


def _mask_rings(mask: np.ndarray) -> list[np.ndarray]:
    """Outer borders of the mask's connected components, through border-pixel centres."""
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    rings = []
    for c in contours:
        ring = _clean_ring(c.reshape(-1, 2).astype(np.float64) + 0.5)
        if len(ring) >= 3 and abs(ring_signed_area(ring)) > 0:
            rings.append(ring)
    return rings


def _polygon_rings(seg: list, height: int, width: int) -> list[np.ndarray]:
    """Valid rings (>= 3 distinct vertices, non-zero area) of a COCO polygon list, clipped to the image."""
    rings = []
    for part in seg:
        arr = _finite_array(part, "polygon")
        if arr.ndim != 1 or arr.size % 2:
            raise _Reject("malformed polygon (needs a flat list of x, y pairs)")
        ring = _clean_ring(_clip_points(arr.reshape(-1, 2), height, width))
        if len(ring) >= 3 and abs(ring_signed_area(ring)) > 0:
            rings.append(ring)
    return rings


def _parse_box(ann: dict, height: int, width: int) -> np.ndarray:
    if "bbox" not in ann:
        raise _Reject("missing bbox")
    bbox = _finite_array(ann["bbox"], "bbox")
    if bbox.shape != (4,):
        raise _Reject(f"malformed bbox {ann['bbox']!r} (needs [x, y, w, h])")
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        raise _Reject("degenerate box (w<=0 or h<=0)")
    box = np.array([max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)])
    if box[2] <= box[0] or box[3] <= box[1]:
        raise _Reject("box outside the image")
    return box


def _parse_keypoints(ann: dict, height: int, width: int, box: np.ndarray):
    points = np.zeros((NUM_KEYPOINTS, 2))
    vis = np.zeros(NUM_KEYPOINTS, dtype=np.int8)
    raw = ann.get("keypoints")
    if raw is None or (isinstance(raw, list) and len(raw) == 0):
        return points, vis, box.copy()
    arr = _finite_array(raw, "keypoints")
    if arr.shape != (NUM_KEYPOINTS * 3,):
        raise _Reject(f"malformed keypoints (needs {NUM_KEYPOINTS * 3} numbers, got {arr.size})")
    arr = arr.reshape(NUM_KEYPOINTS, 3)
    v = arr[:, 2]
    if not np.all(np.isin(v, (0, 1, 2))):
        raise _Reject("malformed keypoints (visibility flags must be 0, 1 or 2)")
    labelled = v > 0
    vis = v.astype(np.int8)
    points[labelled] = _clip_points(arr[labelled, :2], height, width)
    if not labelled.any():
        return points, vis, box.copy()
    lp = points[labelled]
    kps_box = np.array([lp[:, 0].min(), lp[:, 1].min(), lp[:, 0].max(), lp[:, 1].max()])
    return points, vis, kps_box


def _edge_midpoints(box: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    return np.array([[cx, y1], [x1, cy], [cx, y2], [x2, cy]])


def _object_targets(ann: dict, height: int, width: int, config: TargetConfig) -> dict[str, Any]:
    """Targets of one annotation (float64), or raise :class:`_Reject`."""
    box = _parse_box(ann, height, width)
    iscrowd = bool(ann.get("iscrowd", 0))
    seg = ann.get("segmentation")
    extreme = contours = None
    if iscrowd:
        # Crowd regions only tell the assigners where to ignore samples: box-derived placeholders.
        extreme = _edge_midpoints(box)
        rings = [box_ring(box)]
    elif isinstance(seg, dict):
        mask = _decode_rle(seg, height, width)
        if not mask.any():
            raise _Reject("empty mask")
        extreme = extreme_points_from_mask(mask, config.extreme_tolerance)
        # A mask of only 1-px-thin strokes has no area-enclosing border through pixel centres.
        rings = _mask_rings(mask) or [box_ring(box)]
    elif isinstance(seg, list) and len(seg) > 0:
        rings = _polygon_rings(seg, height, width)
        if not rings:
            raise _Reject("no valid polygon (every part has < 3 distinct points or zero area)")
        extreme = extreme_points_from_rings(rings, config.extreme_tolerance, config.extreme_walk)
    else:
        raise _Reject("no valid polygon (missing or empty segmentation)")
    contours = {
        n: contour_points(rings, n, box, config.multipart, config.min_part_area, config.min_points_per_part)
        for n in config.contour_points
    }
    if iscrowd:
        keypoints, kps_vis, kps_box = np.zeros((NUM_KEYPOINTS, 2)), np.zeros(NUM_KEYPOINTS, np.int8), box.copy()
    else:
        keypoints, kps_vis, kps_box = _parse_keypoints(ann, height, width, box)
    area = ann.get("area")
    if area is None or not np.isfinite(_finite_array(area, "area")):
        area = (box[2] - box[0]) * (box[3] - box[1])
    return {"box": box, "area": float(area), "iscrowd": iscrowd, "extreme": extreme, "contours": contours,
            "keypoints": keypoints, "keypoint_vis": kps_vis, "kps_box": kps_box}


def _clip_points(points: np.ndarray, height: int, width: int) -> np.ndarray:
    """A copy of points (..., 2) ``x, y`` clipped to the image ``[0, W] x [0, H]``."""
    out = points.copy()
    out[..., 0] = np.clip(out[..., 0], 0, width)
    out[..., 1] = np.clip(out[..., 1], 0, height)
    return out


def empty_record(config: TargetConfig) -> dict[str, np.ndarray]:
    """A record with zero objects (all columns present, first dimension 0)."""
    record = {
        "ann_id": np.zeros(0, np.int64), "category_id": np.zeros(0, np.int64), "label": np.zeros(0, np.int64),
        "box": np.zeros((0, 4), np.float32), "area": np.zeros(0, np.float32), "iscrowd": np.zeros(0, bool),
        "extreme": np.zeros((0, 4, 2), np.float32),
    }
    for n in config.contour_points:
        record[f"contour_{n}"] = np.zeros((0, n, 2), np.float32)
    record.update({"keypoints": np.zeros((0, NUM_KEYPOINTS, 2), np.float32),
                   "keypoint_vis": np.zeros((0, NUM_KEYPOINTS), np.int8), "kps_box": np.zeros((0, 4), np.float32)})
    return record


def compute_image_targets(anns: list[dict], image_height: int, image_width: int,
                          category_to_label: dict[int, int], config: TargetConfig | None = None,
                          ) -> tuple[dict[str, np.ndarray], list[Rejection]]:
    """Landmark targets of every usable annotation of one image.

    Args:
        anns: the image's COCO annotation dicts (``id``, ``image_id``, ``category_id``, ``bbox``,
            ``segmentation`` polygon list or RLE, ``iscrowd``, ``area``, optional ``keypoints``).
        image_height, image_width: image size in pixels.
        category_to_label: COCO ``category_id`` -> contiguous label ``0..C-1``.
        config: :class:`TargetConfig` (defaults if None).
    Returns:
        ``(record, rejections)``: ``record`` maps column names to arrays over the M kept objects
        (``ann_id`` (M,) int64, ``category_id`` (M,) int64, ``label`` (M,) int64, ``box`` (M,4)
        float32 xyxy, ``area`` (M,) float32, ``iscrowd`` (M,) bool, ``extreme`` (M,4,2) float32,
        ``contour_{N}`` (M,N,2) float32 per N, ``keypoints`` (M,17,2) float32, ``keypoint_vis``
        (M,17) int8, ``kps_box`` (M,4) float32); ``rejections`` lists the annotations left out.
        Never raises for a bad annotation.
    """
    config = config or TargetConfig()
    if image_height <= 0 or image_width <= 0:
        raise ValueError(f"image size must be positive, got {image_height}x{image_width}")
    kept: list[tuple[dict, dict]] = []
    rejections: list[Rejection] = []
    for ann in anns:
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        try:
            if not isinstance(ann, dict):
                raise _Reject(f"annotation is a {type(ann).__name__}, not a mapping")
            if ann.get("category_id") not in category_to_label:
                raise _Reject(f"unknown category_id {ann.get('category_id')!r}")
            kept.append((ann, _object_targets(ann, image_height, image_width, config)))
        except _Reject as err:
            rejections.append(Rejection(ann_id, image_id, str(err)))
        except Exception as err:  # noqa: BLE001 -- a bad annotation must never stop preprocessing
            rejections.append(Rejection(ann_id, image_id, f"unexpected {type(err).__name__}: {err}"))
    if not kept:
        return empty_record(config), rejections

    def column(key: str) -> np.ndarray:
        return np.stack([t[key] for _, t in kept])

    def coords(values: np.ndarray) -> np.ndarray:
        return snap_to_grid(_clip_points(values, image_height, image_width)).astype(np.float32)

    record = {
        "ann_id": np.array([int(a.get("id", -1)) for a, _ in kept], np.int64),
        "category_id": np.array([int(a["category_id"]) for a, _ in kept], np.int64),
        "label": np.array([int(category_to_label[a["category_id"]]) for a, _ in kept], np.int64),
        "box": snap_to_grid(column("box")).astype(np.float32),
        "area": np.array([t["area"] for _, t in kept], np.float32),
        "iscrowd": np.array([t["iscrowd"] for _, t in kept], bool),
        "extreme": coords(column("extreme")),
    }
    for n in config.contour_points:
        record[f"contour_{n}"] = coords(np.stack([t["contours"][n] for _, t in kept]))
    record["keypoints"] = coords(column("keypoints"))
    record["keypoint_vis"] = column("keypoint_vis").astype(np.int8)
    record["kps_box"] = snap_to_grid(column("kps_box")).astype(np.float32)
    return record, rejections


_X_COLUMNS_XY = ("extreme", "keypoints")


def scale_record(record: dict[str, np.ndarray], sx: float, sy: float) -> dict[str, np.ndarray]:
    """A copy of ``record`` with every coordinate scaled (after resizing the image by ``sx``, ``sy``).

    Boxes and points are multiplied (x by ``sx``, y by ``sy``) and snapped to :data:`COORD_GRID`;
    ``area`` is multiplied by ``sx * sy``; other columns are copied unchanged.
    """
    if not (sx > 0 and sy > 0 and math.isfinite(sx) and math.isfinite(sy)):
        raise ValueError(f"scale factors must be positive and finite, got {sx}, {sy}")
    out = {}
    for key, value in record.items():
        if key in ("box", "kps_box"):
            out[key] = snap_to_grid(value.astype(np.float64) * np.array([sx, sy, sx, sy])).astype(np.float32)
        elif key in _X_COLUMNS_XY or key.startswith("contour_"):
            out[key] = snap_to_grid(value.astype(np.float64) * np.array([sx, sy])).astype(np.float32)
        elif key == "area":
            out[key] = (value.astype(np.float64) * (sx * sy)).astype(np.float32)
        else:
            out[key] = value.copy() if isinstance(value, np.ndarray) else value
    return out


def record_to_targets(record: dict[str, np.ndarray], task: str, num_points: int | None = None,
                      pose_box: str = "kps") -> LandmarkTargets:
    """The :class:`LandmarkTargets` of one task from a record (see :func:`compute_image_targets`).

    - ``bbox``: points = extreme points (N=4), all visible, boxes = object boxes.
    - ``segm``: points = ``contour_{num_points}`` (default 36), all visible.
    - ``pose``: points = keypoints (N=17), visible = ``v > 0``; boxes = ``kps_box`` (``pose_box="kps"``)
      or the object box (``"obj"``). ``"kps"`` drops persons without labelled keypoints (crowd
      regions stay); ``"obj"`` keeps them as positives with every landmark invisible.
    """
    if task not in TASK_NUM_POINTS:
        raise ValueError(f"unknown task {task!r} (expected one of {sorted(TASK_NUM_POINTS)})")
    boxes = record["box"]
    keep = np.ones(len(boxes), dtype=bool)
    if task == "bbox":
        if num_points not in (None, 4):
            raise ValueError(f"bbox targets have 4 extreme points, got num_points={num_points}")
        points = record["extreme"]
        visible = np.ones(points.shape[:2], dtype=bool)
    elif task == "segm":
        n = num_points or TASK_NUM_POINTS["segm"]
        key = f"contour_{n}"
        if key not in record:
            have = sorted(k for k in record if k.startswith("contour_"))
            raise KeyError(f"record has no {key} (has {have}); add {n} to TargetConfig.contour_points")
        points = record[key]
        visible = np.ones(points.shape[:2], dtype=bool)
    else:
        if num_points not in (None, NUM_KEYPOINTS):
            raise ValueError(f"pose targets have {NUM_KEYPOINTS} keypoints, got num_points={num_points}")
        if pose_box not in ("kps", "obj"):
            raise ValueError(f"pose_box must be 'kps' or 'obj', got {pose_box!r}")
        points = record["keypoints"]
        visible = record["keypoint_vis"] > 0
        if pose_box == "kps":
            # kps-box: a person without labelled keypoints has no keypoint box -> not a sample
            keep = visible.any(axis=1) | record["iscrowd"]
            boxes = np.where(record["iscrowd"][:, None], record["box"], record["kps_box"])
        # obj-box keeps every person (paper §4.5, App. B): one without labelled keypoints stays a
        # positive, assigned by its object box, all landmarks invisible (no keypoint loss)
    return LandmarkTargets(
        boxes=torch.from_numpy(np.ascontiguousarray(boxes[keep], dtype=np.float32)),
        labels=torch.from_numpy(np.ascontiguousarray(record["label"][keep], dtype=np.int64)),
        points=torch.from_numpy(np.ascontiguousarray(points[keep], dtype=np.float32)),
        visible=torch.from_numpy(np.ascontiguousarray(visible[keep], dtype=bool)),
        iscrowd=torch.from_numpy(np.ascontiguousarray(record["iscrowd"][keep], dtype=bool)),
    )


# The centre vector (model.center_vector), as the reference (Duankaiwen/LSNet, paths under code/):
#   bbox: tools/gen_coco_lsvr.py:108-110 appends the COCO box centre as a 5th "extreme point"
#         (mmdet/models/dense_heads/lsnet_head.py:1689-1690 does the same when a record has none);
#   segm: lsnet_head.py:1741-1754, the centre of the box of the regressed polygon (also its penalty box);
#   pose: lsnet_head.py:1773-1774 (obj-box: the person box), 1791-1815 (kps-box: the box of the
#         labelled keypoints). Its loss ignores visibility: mmdet/models/losses/cross_iou_loss.py:92-94.


def centre_landmarks(targets: LandmarkTargets, task: str) -> torch.Tensor:
    """(M, 2) the centre each object's last vector points to when ``model.center_vector`` is on.

    As the reference: the centre of the box the object is regressed against --

    - ``bbox``: of the object box (the reference appends the COCO box centre to the 4 extreme
      points when it converts the annotations);
    - ``segm``: of the box spanned by the N contour points (the reference's polygon box, which is
      also the box of its CIoU-style penalty), not of the COCO box;
    - ``pose``: of ``targets.boxes``, i.e. the person box for obj-box and the box of the labelled
      keypoints for kps-box (:func:`record_to_targets` puts the right one there).
    """
    if task not in TASK_NUM_POINTS:
        raise ValueError(f"unknown task {task!r} (expected one of {sorted(TASK_NUM_POINTS)})")
    if task == "segm":
        box = torch.cat([targets.points.amin(dim=1), targets.points.amax(dim=1)], dim=1)
    else:
        box = targets.boxes
    return (box[:, :2] + box[:, 2:]) / 2


def with_centre_landmark(targets: LandmarkTargets, task: str) -> LandmarkTargets:
    """``targets`` with the centre (:func:`centre_landmarks`) appended as landmark ``N``, always visible.

    The layout of the vectors a ``model.center_vector`` head predicts: the N landmarks, then the
    centre, last (V = N + 1). The centre carries a loss for every positive, also for a person whose
    keypoints are all unlabelled: the reference masks only the keypoint pairs by visibility
    (``mmdet/models/losses/cross_iou_loss.py:92-94``). Boxes, labels and crowd flags are unchanged.
    Call it after augmentation (flips permute the N landmarks; the centre needs no permutation).
    """
    centre = centre_landmarks(targets, task).to(targets.points.dtype)
    always = torch.ones(targets.visible.shape[0], 1, dtype=torch.bool, device=targets.visible.device)
    return LandmarkTargets(targets.boxes, targets.labels, torch.cat([targets.points, centre[:, None]], dim=1),
                           torch.cat([targets.visible, always], dim=1), targets.iscrowd)
