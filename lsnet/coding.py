"""Cross-coordinate offsets (paper §3.3) with softened targets (Appendix A).

A landmark ``p`` seen from an anchor point ``p0`` is the vector ``d = p - p0``. It is encoded as four
non-negative magnitudes in the order of :data:`lsnet.structures.COMPONENTS`::

    q = [(dy)^-, (dy)^+, (dx)^-, (dx)^+]      (a)^- = max(-a, 0),  (a)^+ = max(a, 0)

so exactly one of each ``±`` pair is non-zero. The network predicts four independent positive
numbers per landmark; decoding keeps, per axis, the larger of the two with its sign (§A).
"""
from __future__ import annotations

import torch
from torch import Tensor


def encode_offsets(points: Tensor, anchors: Tensor) -> Tensor:
    """Encode landmarks relative to anchor points.

    Args:
        points:  (..., N, 2) landmark ``x, y``.
        anchors: (..., 2) anchor ``x, y``, broadcast over ``N``.
    Returns:
        (..., N, 4) non-negative ``[top, bottom, left, right]`` magnitudes (unsoftened).
    """
    d = points - anchors.unsqueeze(-2)
    dx, dy = d[..., 0], d[..., 1]
    return torch.stack([(-dy).clamp(min=0), dy.clamp(min=0), (-dx).clamp(min=0), dx.clamp(min=0)], dim=-1)


def soften_targets(vectors: Tensor, alpha: float) -> Tensor:
    """Softened targets (Appendix A): the component opposite to the true direction gets
    ``alpha × true magnitude`` instead of 0, so that a prediction on the wrong side still has a
    non-zero overlap with the target and receives a gradient towards a consistent shape.

    Args:
        vectors: (..., 4) unsoftened ``[top, bottom, left, right]`` (one of each pair is 0).
        alpha: softening factor, the paper uses 0.2; ``alpha = 0`` returns the input.
    Returns:
        (..., 4) softened targets.
    """
    if alpha == 0:
        return vectors
    # For each (top, bottom) / (left, right) pair one side is 0, so adding alpha × the partner
    # component fills exactly the empty side: [t + a·b, b + a·t, l + a·r, r + a·l].
    partners = vectors.unflatten(-1, (2, 2)).flip(-1).flatten(-2)
    return vectors + alpha * partners


def decode_offsets(vectors: Tensor, anchors: Tensor) -> Tensor:
    """Decode predicted ``[top, bottom, left, right]`` vectors back to points (Appendix A).

    Per axis the larger of the two components wins and keeps its sign; ties decode to 0 along that
    axis. Softened targets decode to the original point for any ``alpha < 1``.

    Args:
        vectors: (..., N, 4) non-negative components.
        anchors: (..., 2) anchor ``x, y``.
    Returns:
        (..., N, 2) points ``x, y``.
    """
    top, bottom, left, right = vectors.unbind(-1)
    dy = torch.where(bottom > top, bottom, torch.where(top > bottom, -top, torch.zeros_like(top)))
    dx = torch.where(right > left, right, torch.where(left > right, -left, torch.zeros_like(left)))
    return anchors.unsqueeze(-2) + torch.stack([dx, dy], dim=-1)
