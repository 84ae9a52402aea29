"""Outline geometry of COCO objects: extreme points and contour points (paper §3.1, §4.4;
docs/design.md §2), in float64 numpy.

The coordinate conventions are those of :mod:`lsnet.targets` (continuous pixel coordinates,
clockwise on screen, every written coordinate on the :data:`COORD_GRID`), which parses the
annotations and calls these functions for every object.

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
"""
from __future__ import annotations

import math

import numpy as np

#: All coordinates written by lsnet.targets / lsnet.transforms are multiples of this (lsnet.targets).
COORD_GRID: float = 1.0 / 256.0
#: "per_part" contours: points spent on the bridge to each extra part (p, duplicate q, duplicate p).
BRIDGE_POINTS: int = 3


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
