"""Guards for inference (issue 24, rows 9-11), through the public post-processing and test-time
augmentation functions: which FPN level a CPV-refined detection belongs to at the level boundaries,
which IoU the TTA vote groups by, and where a flipped, rescaled pass puts its own box."""
from __future__ import annotations

import pytest
import torch

from lsnet.modeling import HeadOutputs, ModelConfig
from lsnet.modeling.inference import boxes_from_points, postprocess, predict_with_tta

# ------------------------------------------------------------------------------------------------
# row 9: CPV refines the boxes of P4-P7 detections -- also the first cell of a level

SIZES, STRIDES, NUM = [(4, 4), (2, 2)], (8, 16), [16, 4]


def _anchors() -> torch.Tensor:
    return torch.cat([torch.stack(torch.meshgrid((torch.arange(w) + 0.5) * s, (torch.arange(h) + 0.5) * s,
                                                 indexing="xy"), -1).reshape(-1, 2) for (h, w), s in zip(SIZES, STRIDES)])


def _vectors_to_box(anchor: torch.Tensor, box=(10.0, 10.0, 30.0, 30.0)) -> torch.Tensor:
    """(4, 4) ``[top, bottom, left, right]`` vectors from ``anchor`` to the extreme points of ``box``."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    rows = []
    for px, py in ((cx, y1), (x1, cy), (cx, y2), (x2, cy)):  # top, left, bottom, right
        dx, dy = px - anchor[0].item(), py - anchor[1].item()
        rows.append([max(-dy, 0.0), max(dy, 0.0), max(-dx, 0.0), max(dx, 0.0)])
    return torch.tensor(rows)


def _cpv_outputs(point: int) -> HeadOutputs:
    """One confident detection at flat index ``point`` whose landmarks span x, y 10..30 in a 32x32
    image; P3's corner maps hold a top-left peak at cell (1, 1) (+0.25 cell in x) and a bottom-right
    peak at cell (3, 3): a refined box is [14, 12, 28, 28]."""
    anchors = _anchors()
    cls = torch.full((1, 20, 1), -10.0)
    cls[0, point] = 4.0
    vec = torch.zeros(1, 20, 4, 4)
    vec[0, point] = _vectors_to_box(anchors[point])
    heat = [torch.full((2, h, w), -5.0) for h, w in SIZES]
    offsets = [torch.zeros(4, h, w) for h, w in SIZES]
    heat[0][0, 1, 1] = 5.0
    offsets[0][0, 1, 1] = 0.25
    heat[0][1, 3, 3] = 5.0
    flat = lambda maps: torch.cat([m.flatten(1).T for m in maps])[None]
    return HeadOutputs(cls, vec, vec, anchors, NUM, STRIDES, flat(heat), flat(offsets), SIZES)


REFINED, KEPT = torch.tensor([14.0, 12.0, 28.0, 28.0]), torch.tensor([10.0, 10.0, 30.0, 30.0])


@pytest.mark.parametrize("point, level, box", [(16, 1, REFINED),  # the first cell of P4 (anchor 8, 8)
                                               (19, 1, REFINED),  # the last cell of P4
                                               (15, 0, KEPT),  # the last cell of P3: never refined
                                               (0, 0, KEPT)])
def test_cpv_refines_every_cell_of_the_upper_levels_and_none_of_p3(point, level, box):
    cfg = ModelConfig(task="bbox", num_classes=1, cpv=True)
    dets = postprocess(_cpv_outputs(point), [(32, 32)], cfg, (32, 32))[0]
    assert len(dets) == 1
    torch.testing.assert_close(dets.boxes[0], box)
    torch.testing.assert_close(boxes_from_points(dets.points)[0], KEPT)  # the landmarks never move


class _Outputs(torch.nn.Module):
    """A "model" whose raw outputs are fixed (any input)."""

    def __init__(self, cfg, out):
        super().__init__()
        self.cfg, self.out = cfg, out

    def forward_raw(self, x):
        return self.out


@pytest.mark.parametrize("point, box", [(16, REFINED), (15, KEPT)])
def test_cpv_refines_the_same_levels_in_the_tta_path(point, box):
    """(second path of row 9) a single unflipped TTA pass gives the plain post-processing's boxes."""
    cfg = ModelConfig(task="bbox", num_classes=1, cpv=True)
    dets = predict_with_tta(_Outputs(cfg, _cpv_outputs(point)), torch.zeros(1, 3, 32, 32), [(32, 32)], flip=False,
                            scales=(1.0,), merge="vote")[0]
    assert len(dets) == 1
    torch.testing.assert_close(dets.boxes[0], box)


# ------------------------------------------------------------------------------------------------
# row 10: the TTA vote groups by model.test.vote_iou


class _FixedBoxStub(torch.nn.Module):
    """One confident detection whose box is (16, 16, 48, 48) in *whatever frame it is given*: a pass at
    scale 1.25 maps it back to (12.8, 12.8, 38.4, 38.4), IoU 0.426 with the scale-1 pass's."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def forward_raw(self, x):
        b = x.shape[0]
        vec = _vectors_to_box(torch.zeros(2), (16.0, 16.0, 48.0, 48.0))[None, None].expand(b, 1, 4, 4).clone()
        logits = torch.full((b, 1, 1), 10.0)
        return HeadOutputs(logits, vec, vec, torch.zeros(1, 2), [1], (8,))


SCORE = torch.sigmoid(torch.tensor(10.0)).item()
IOU = 22.4**2 / (32**2 + 25.6**2 - 22.4**2)


@pytest.mark.parametrize("vote_iou, nms_iou, voted", [(0.3, 0.6, True), (0.6, 0.3, False)])
def test_tta_vote_groups_by_vote_iou(vote_iou, nms_iou, voted):
    cfg = ModelConfig(task="bbox", num_classes=1)
    cfg.test.vote_iou, cfg.test.nms_iou = vote_iou, nms_iou
    dets = predict_with_tta(_FixedBoxStub(cfg), torch.ones(1, 3, 64, 64), [(64, 64)], flip=False,
                            scales=(1.0, 1.25), merge="vote")[0]
    assert len(dets) == 2
    if voted:  # one group: its score-weighted mean box, and the other member with a decayed score
        torch.testing.assert_close(dets.boxes, torch.tensor([[14.4, 14.4, 43.2, 43.2], [12.8, 12.8, 38.4, 38.4]]))
        torch.testing.assert_close(dets.scores, torch.tensor([SCORE, SCORE * (1 - IOU)]))
    else:  # two groups of one, kept as they are
        torch.testing.assert_close(dets.boxes, torch.tensor([[16.0, 16.0, 48.0, 48.0], [12.8, 12.8, 38.4, 38.4]]))
        torch.testing.assert_close(dets.scores, torch.tensor([SCORE, SCORE]))


# ------------------------------------------------------------------------------------------------
# row 11: a flipped pass at another scale mirrors its own box (CPV / pose box branch) in its frame


class _FractionStub(torch.nn.Module):
    """One confident detection at fixed fractions (x 0.2..0.5, y 0.25..0.7) of the valid region."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def forward_raw(self, x):
        b = x.shape[0]
        vec = torch.zeros(b, 1, 4, 4)
        for i in range(b):
            valid = x[i].abs().sum(0) > 1e-3
            h, w = valid.any(1).sum().item(), valid.any(0).sum().item()
            vec[i, 0] = _vectors_to_box(torch.zeros(2), (0.2 * w, 0.25 * h, 0.5 * w, 0.7 * h))
        return HeadOutputs(torch.full((b, 1, 1), 10.0), vec, vec, torch.zeros(1, 2), [1], (8,))


@pytest.mark.parametrize("scale", [0.5, 1.5])
def test_flipped_rescaled_pass_maps_its_own_box_back_like_its_points(scale):
    """With CPV on (here without corner maps, so the box is the landmarks'), each pass's box is mapped
    back on its own, not re-derived from the points: it must land where the points land. The flipped
    pass sees the mirrored image, so its detection comes back at the mirrored fractions."""
    cfg = ModelConfig(task="bbox", num_classes=1, cpv=True)
    images = torch.zeros(1, 3, 96, 128)
    images[0, :, :96, :128] = 1.0
    dets = predict_with_tta(_FractionStub(cfg), images, [(96, 128)], flip=True, scales=(scale,), merge="nms")[0]
    assert len(dets) == 2
    torch.testing.assert_close(dets.boxes, boxes_from_points(dets.points), atol=1e-3, rtol=0)
    got = sorted(dets.boxes.tolist())
    expected = [[0.2 * 128, 0.25 * 96, 0.5 * 128, 0.7 * 96], [0.5 * 128, 0.25 * 96, 0.8 * 128, 0.7 * 96]]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), atol=2.0, rtol=0)
