"""The drawing of the synthetic dataset (:mod:`lsnet.data.synthetic`): concave and multi-part shapes,
stick-figure persons with COCO keypoints, textured backgrounds, and the polygon -> mask / RLE / box
conversions of their annotations."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw


def _rect(w: float, h: float) -> np.ndarray:
    return np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]])


def _regular(n: int, r: float, phase: float = 0.0) -> np.ndarray:
    t = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _c_shape(rng: np.random.Generator) -> list[np.ndarray]:
    """An annulus sector (a 'C'): outer arc one way, inner arc back. Concave, not star-shaped."""
    gap = rng.uniform(0.5, 1.1)  # opening angle (rad), centred on +x
    thickness = rng.uniform(0.35, 0.5)
    t = np.linspace(gap / 2, 2 * math.pi - gap / 2, 20)
    outer = np.stack([0.5 * np.cos(t), 0.5 * np.sin(t)], 1)
    inner = np.stack([(0.5 - thickness / 2) * np.cos(t[::-1]), (0.5 - thickness / 2) * np.sin(t[::-1])], 1)
    return [np.concatenate([outer, inner])]


def _u_shape(rng: np.random.Generator) -> list[np.ndarray]:
    arm = rng.uniform(0.22, 0.32)  # arm width
    base = rng.uniform(0.22, 0.32)  # base height
    w, h = 0.5, 0.5
    return [np.array([[-w, -h], [-w + arm, -h], [-w + arm, h - base], [w - arm, h - base],
                      [w - arm, -h], [w, -h], [w, h], [-w, h]])]


def _l_shape(rng: np.random.Generator) -> list[np.ndarray]:
    arm = rng.uniform(0.25, 0.4)
    w, h = 0.5 * rng.uniform(0.7, 1.0), 0.5
    return [np.array([[-w, -h], [-w + arm, -h], [-w + arm, h - arm], [w, h - arm], [w, h], [-w, h]])]


def _twin(rng: np.random.Generator) -> list[np.ndarray]:
    """Two separate blobs in one annotation (a multi-part object, like an occluded COCO object)."""
    r = rng.uniform(0.18, 0.24)
    sides = int(rng.integers(4, 9))
    return [_regular(sides, r) + [-0.5 + r, 0.0], _regular(sides, r, 0.3) + [0.5 - r, 0.0]]


def shape_polygons(name: str, rng: np.random.Generator) -> list[np.ndarray]:
    if name == "square":
        return [_rect(1.0, rng.uniform(0.6, 1.0))]
    if name == "disk":
        return [_regular(28, 0.5)]
    if name == "triangle":
        return [np.array([[0.0, -0.5], [0.5, 0.45], [-0.5, 0.45]]) * [rng.uniform(0.7, 1.0), 1.0]]
    if name == "c_shape":
        return _c_shape(rng)
    if name == "u_shape":
        return _u_shape(rng)
    if name == "l_shape":
        return _l_shape(rng)
    if name == "twin":
        return _twin(rng)
    raise ValueError(f"unknown synthetic shape {name!r}")


def rotate_polygons(polys: list[np.ndarray], angle: float) -> list[np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    return [p @ rot.T for p in polys]


def person_keypoints(rng: np.random.Generator, height: float) -> np.ndarray:
    """(17, 2) keypoints of a stick figure facing the camera, head top at y=0, centred on x=0.

    Facing the camera, the person's *left* side is on the image's right (larger x), as in COCO.
    """
    h = height
    kp = np.zeros((17, 2))
    head = np.array([0.0, 0.08 * h])
    kp[0] = head + [0, 0.02 * h]  # nose
    kp[1] = head + [0.025 * h, -0.01 * h]  # left eye
    kp[2] = head + [-0.025 * h, -0.01 * h]
    kp[3] = head + [0.05 * h, 0.0]  # left ear
    kp[4] = head + [-0.05 * h, 0.0]
    kp[5] = [0.11 * h, 0.2 * h]  # left shoulder
    kp[6] = [-0.11 * h, 0.2 * h]
    kp[11] = [0.07 * h, 0.53 * h]  # left hip
    kp[12] = [-0.07 * h, 0.53 * h]
    for side, sign in ((0, 1.0), (1, -1.0)):  # 0: left (x > 0), 1: right
        arm = rng.uniform(0.15, 1.4)  # angle from straight down, outward
        fore = arm + rng.uniform(-0.6, 0.9)
        elbow = kp[5 + side] + 0.15 * h * np.array([sign * math.sin(arm), math.cos(arm)])
        kp[7 + side] = elbow
        kp[9 + side] = elbow + 0.13 * h * np.array([sign * math.sin(fore), math.cos(fore)])
        leg = rng.uniform(0.0, 0.4)
        shin = leg + rng.uniform(-0.25, 0.25)
        knee = kp[11 + side] + 0.23 * h * np.array([sign * math.sin(leg), math.cos(leg)])
        kp[13 + side] = knee
        kp[15 + side] = knee + 0.23 * h * np.array([sign * math.sin(shin), math.cos(shin)])
    return kp


def person_polygons(kp: np.ndarray, height: float, image_hw: tuple[int, int], offset: np.ndarray):
    """Silhouette of a stick figure: head disk, torso, thick limbs -> traced outer outline(s).

    The parts overlap, so the union is rasterised once and its outer boundary traced; the figure is
    then *painted from that traced polygon*, which makes the stored polygon the exact rendered outline.
    """
    import cv2  # opencv comes with mmcv-lite

    h_img, w_img = image_hw
    mask = Image.new("L", (w_img, h_img), 0)
    draw = ImageDraw.Draw(mask)
    pts = kp + offset
    width = max(2.0, 0.045 * height)

    def thick(a, b):
        d = np.asarray(b) - np.asarray(a)
        n = np.array([-d[1], d[0]]) / (np.linalg.norm(d) + 1e-9) * width / 2
        quad = np.array([a + n, b + n, b - n, a - n])
        draw.polygon([tuple(p) for p in quad], fill=1)

    head_c = pts[0] - [0, 0.02 * height]
    draw.polygon([tuple(p) for p in _regular(16, 0.075 * height) + head_c], fill=1)
    draw.polygon([tuple(pts[i]) for i in (5, 6, 12, 11)], fill=1)
    thick(head_c, (pts[5] + pts[6]) / 2)
    for a, b in ((5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15), (12, 14), (14, 16)):
        thick(pts[a], pts[b])
    contours, _ = cv2.findContours(np.asarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        # A 0.7 px tolerance keeps the outline faithful while cutting the staircase vertices.
        c = cv2.approxPolyDP(c, 0.7, True).reshape(-1, 2).astype(np.float64)
        if len(c) >= 3:
            # Boundary pixels in the same coordinate convention PIL drew the parts with; the figure
            # is redrawn from these vertices, so stored polygon and pixels agree.
            polys.append(c)
    return polys


def background_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Grey-brown texture: low-frequency waves + pixel noise, unsaturated so objects stand out."""
    base = rng.uniform(80, 140, size=3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    waves = np.zeros((h, w), np.float32)
    for _ in range(3):
        fx, fy, ph = rng.uniform(0.01, 0.08), rng.uniform(0.01, 0.08), rng.uniform(0, 2 * math.pi)
        waves += 8 * np.sin(fx * xx + fy * yy + ph)
    noise = rng.normal(0, 10, size=(h, w, 1)).astype(np.float32)
    img = base[None, None, :] + waves[..., None] + noise
    return np.clip(img, 0, 255).astype(np.uint8)


def boxes_overlap(a, b, margin: float) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _polygon_rle(polys: list[np.ndarray], h: int, w: int) -> dict:
    from pycocotools import mask as mask_utils

    return mask_utils.merge(mask_utils.frPyObjects([p.reshape(-1).tolist() for p in polys], h, w))


def polygon_area(polys: list[np.ndarray], h: int, w: int) -> float:
    from pycocotools import mask as mask_utils

    return float(mask_utils.area(_polygon_rle(polys, h, w)))


def polygon_mask(polys: list[np.ndarray], h: int, w: int) -> np.ndarray:
    from pycocotools import mask as mask_utils

    return mask_utils.decode(_polygon_rle(polys, h, w)).astype(bool)


def polygons_to_coco(polys: list[np.ndarray]) -> list[list[float]]:
    return [[round(float(v), 2) for v in p.reshape(-1)] for p in polys]


def polygons_bbox(polys: list[np.ndarray]) -> list[float]:
    allp = np.concatenate(polys)
    x1, y1 = allp.min(0)
    x2, y2 = allp.max(0)
    return [round(float(x1), 2), round(float(y1), 2), round(float(x2 - x1), 2), round(float(y2 - y1), 2)]
