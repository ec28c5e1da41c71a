"""Ops whose result depends on a dim's length being 1 or on strides, over 4 heads: at tp 4 a rank
holds one head, so ``squeeze`` would remove a dim the whole value keeps, and a transposed piece
counts as contiguous, so ``contiguous()`` / ``reshape`` return a view where the whole value's
call copies (an in-place write then reaches the projection it came from). Also an explicit copy
(``to(..., copy=True)``) that a later in-place op relies on. Each must be refused or exact.

Every module is ``x -> a -> op -> b`` as in :mod:`zoo.hidden`, with ``a`` projecting to 4 heads
of 12."""

from __future__ import annotations

import torch
import torch.nn as nn

from zoo.hidden import Op, Projected

HEADS, WIDTH = 4, 48


def _heads(h: torch.Tensor) -> torch.Tensor:
    """``[B, T, 48] -> [B, 4, T, 12]``: a transposed (not contiguous) view."""
    return h.unflatten(-1, (HEADS, WIDTH // HEADS)).transpose(1, 2)


def _merged(a: torch.Tensor) -> torch.Tensor:
    return a.transpose(1, 2).flatten(2)


def _contiguous_written(h: torch.Tensor, b: nn.Module) -> torch.Tensor:
    a = _heads(h).contiguous()  # a copy of h: the write below must not reach h
    a.add_(1.0)
    return b(h) + b(_merged(a))


def _reshape_written(h: torch.Tensor, b: nn.Module) -> torch.Tensor:
    y = _heads(h).reshape(h.shape[0], HEADS, -1)  # a copy of h, as above
    y.mul_(2.0)
    return b(h) + b(_merged(y.unflatten(-1, (h.shape[1], WIDTH // HEADS))))


def _copying_cast_written(h: torch.Tensor, b: nn.Module) -> torch.Tensor:
    y = h.to(torch.float32, copy=True)  # same dtype: only copy=True makes it a copy
    y.mul_(2.0)
    return b(h + y)


OPS: dict[str, Op] = {
    "SqueezeHeads": lambda h, b: b(_merged(_heads(h).squeeze(1))),  # 4 heads: nothing to squeeze
    "SqueezeHeadsInPlace": lambda h, b: b(_merged(_heads(h).squeeze_(1))),
    "SqueezeAll": lambda h, b: b(torch.squeeze(h)),  # a projects to 4 columns: nothing to squeeze
    "ContiguousWritten": _contiguous_written,
    "ReshapeWritten": _reshape_written,
    "CopyingCastWritten": _copying_cast_written,
}

WIDTHS = {"SqueezeAll": HEADS}  # (a's output, b's input); WIDTH for the others
MODULES = [type(name, (Projected,), {"op": staticmethod(op), "width": WIDTHS.get(name, WIDTH),
                                     "out_width": WIDTHS.get(name, WIDTH)}) for name, op in OPS.items()]
