"""Cross-coordinate offsets (paper §3.3) and softened targets (Appendix A): hand values and round trips."""
from __future__ import annotations

import pytest
import torch

from lsnet.coding import decode_offsets, encode_offsets, soften_targets


def test_encode_hand_values():
    anchors = torch.tensor([[1.0, 1.0]])
    points = torch.tensor([[[3.0, -2.0], [1.0, 1.0], [-4.0, 6.0]]])
    # d = (2, -3): 3 towards the top, 2 to the right; d = 0; d = (-5, 5): 5 left, 5 down.
    # component order [top, bottom, left, right]
    expected = torch.tensor([[[3.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [0.0, 5.0, 5.0, 0.0]]])
    assert torch.equal(encode_offsets(points, anchors), expected)


def test_soften_hand_values():
    v = torch.tensor([[3.0, 0.0, 0.0, 2.0], [0.0, 5.0, 5.0, 0.0]])
    # the empty component of each pair gets alpha x the true magnitude
    expected = torch.tensor([[3.0, 0.6, 0.4, 2.0], [1.0, 5.0, 5.0, 1.0]])
    torch.testing.assert_close(soften_targets(v, 0.2), expected, rtol=0, atol=1e-6)
    assert soften_targets(v, 0.0) is v


def test_decode_hand_values_larger_component_wins():
    anchors = torch.tensor([[10.0, 20.0]])
    v = torch.tensor([[[1.0, 4.0, 2.5, 0.5], [3.0, 3.0, 0.0, 0.0]]])
    # dy = +4 (bottom wins), dx = -2.5 (left wins); a tie decodes to 0 along that axis
    assert decode_offsets(v, anchors).tolist() == [[[7.5, 24.0], [10.0, 20.0]]]


def test_decode_encode_round_trip_exact_on_dyadic_values():
    g = torch.Generator().manual_seed(0)
    points = torch.randint(-4096, 4096, (2, 3, 9, 2), generator=g).float() / 8
    anchors = torch.randint(-1024, 1024, (2, 3, 2), generator=g).float() / 4
    v = encode_offsets(points, anchors)
    assert v.shape == (2, 3, 9, 4) and (v >= 0).all()
    # exactly one of each +/- pair is non-zero (or both zero)
    assert ((v[..., 0] * v[..., 1]) == 0).all() and ((v[..., 2] * v[..., 3]) == 0).all()
    assert torch.equal(decode_offsets(v, anchors), points)


def test_decode_encode_round_trip_random_float64():
    g = torch.Generator().manual_seed(1)
    points = torch.randn(100, 36, 2, generator=g, dtype=torch.float64) * 300
    anchors = torch.randn(100, 2, generator=g, dtype=torch.float64) * 300
    torch.testing.assert_close(decode_offsets(encode_offsets(points, anchors), anchors), points, rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.05, 0.2, 0.5, 0.9])
def test_softened_targets_decode_to_the_same_points(alpha):
    g = torch.Generator().manual_seed(2)
    points = torch.randint(-512, 512, (50, 17, 2), generator=g).float() / 4
    anchors = torch.randint(-512, 512, (50, 2), generator=g).float() / 4
    soft = soften_targets(encode_offsets(points, anchors), alpha)
    assert (soft >= 0).all()
    assert torch.equal(decode_offsets(soft, anchors), points)


def test_alpha_one_is_ambiguous():
    # alpha = 1 makes both components equal: the direction is lost (why the paper uses alpha < 1)
    v = soften_targets(encode_offsets(torch.tensor([[[3.0, 0.0]]]), torch.zeros(1, 2)), 1.0)
    assert decode_offsets(v, torch.zeros(1, 2)).tolist() == [[[0.0, 0.0]]]


def test_encode_gradient_flows_to_points():
    points = torch.tensor([[[3.0, -2.0]]], requires_grad=True)
    encode_offsets(points, torch.zeros(1, 2)).sum().backward()
    # |dx| + |dy| -> gradient sign(d)
    assert points.grad.tolist() == [[[1.0, -1.0]]]
