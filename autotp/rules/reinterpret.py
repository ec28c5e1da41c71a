"""Ops that reshape or reinterpret a tensor without moving elements across its sharded dim.

- ``view_as(x, other)`` / ``reshape_as(x, other)``: ``x`` viewed (or reshaped: the same values) in ``other``'s shape, which each rank reads from its own
  ``other``: the view's placement comes from the view maths (``view.py``), and ``other`` must
  be laid out the same way (a whole ``other`` is sliced to it locally). A whole ``x`` viewed
  as a sharded ``other`` (a gate projection viewed as the attention's heads) is sliced locally
  to the layout of ``x`` that the view maths maps to ``other``'s, where one does.
- ``view_as_complex`` / ``view_as_real``: pairs of floats in the last dim are one complex
  number (complex rotary embeddings). Every other dim keeps its shard; the last one of a float
  tensor cannot be sharded (its pairs would split).
- ``constant_pad_nd`` / ``pad``: every mode pads a dim by reading along that dim only, so a
  shard of a dim that is not padded passes through (Mamba and linear-attention blocks pad
  the sequence of channel-sharded values). A padded sharded dim is refused.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from autotp.placement import Replicate, Shard, divides
from autotp.rules import Cannot, Inputs, Out, Redistribute, Result, ndim, refinable, rule, sizes
from autotp.rules.view import reshape_placement

aten = torch.ops.aten


def _shard_or_whole(node: fx.Node, inputs: Inputs) -> Result:
    """The input's placement if it is whole or a shard; a partial sum is refused."""
    held = inputs[node.args[0]]
    return held if isinstance(held, (Replicate, Shard)) else Cannot(f"{node.target} of a {held} input")


@rule(aten.view_as.default, aten.reshape_as.default, reads=("self", "other"), periodic=True)
def view_as_rule(node: fx.Node, inputs: Inputs) -> Result:
    x, other = node.args[0], node.args[1]
    held, shape_of = inputs[x], inputs[other]
    if isinstance(held, Replicate):
        if isinstance(shape_of, Replicate):
            return Replicate()
        before = _viewed_as(node, shape_of, inputs.world_size) if isinstance(shape_of, Shard) else None
        if before is None:
            return Cannot(f"view_as of a whole tensor into a {shape_of} shape that no layout of it views as")
        return Out(shape_of, (Redistribute((0,), before),))
    placed = reshape_placement(node, inputs)
    if isinstance(placed, Cannot) or shape_of == placed:
        return placed
    if not refinable(shape_of, placed, sizes(other)[placed.dim], inputs.world_size):
        return Cannot(f"view_as reads the shape of {other.name}, which is {shape_of}, not {placed}")
    return Out(placed, (Redistribute((1,), placed),))


def _viewed_as(node: fx.Node, shape_of: Shard, world: int) -> Optional[Shard]:
    """The layout of ``x`` that the view maths (not a hand inversion) maps to ``shape_of``
    exactly, with no literal to change: the one to slice a whole ``x`` to."""
    x = node.args[0]
    if shape_of.period or shape_of.padded or shape_of.whole:  # pieces no plain slice of x is known to view as
        return None
    for dim in range(ndim(x)):
        for tried in dict.fromkeys((Shard(dim, shape_of.blocks, shape_of.replicas), Shard(dim, 1, shape_of.replicas))):
            if not divides(tried, sizes(x)[dim], world):
                continue
            answer = reshape_placement(node, Inputs({x: tried}, world))
            if isinstance(answer, Out) and not (answer.edits or answer.redistribute):
                answer = answer.placement
            if answer == shape_of:
                return tried
    return None


@rule(aten.view_as_real.default, reads=("self",))
def view_as_real_rule(node: fx.Node, inputs: Inputs) -> Result:
    return _shard_or_whole(node, inputs)  # a new last dim (real, imaginary) is appended


@rule(aten.view_as_complex.default, reads=("self",))
def view_as_complex_rule(node: fx.Node, inputs: Inputs) -> Result:
    held = _shard_or_whole(node, inputs)
    if isinstance(held, Shard) and held.dim == ndim(node.args[0]) - 1:
        return Cannot("view_as_complex reads pairs along the sharded last dim")
    return held


@rule(aten.constant_pad_nd.default, aten.pad.default, reads=("self",))
def pad_rule(node: fx.Node, inputs: Inputs) -> Result:
    held = _shard_or_whole(node, inputs)
    if not isinstance(held, Shard):
        return held
    amounts = node.args[1]  # (before, after) pairs from the last dim backwards
    last = ndim(node.args[0]) - 1
    padded = {last - i // 2 for i, amount in enumerate(amounts) if not (isinstance(amount, int) and amount == 0)}
    return Cannot(f"pad widens the sharded dim {held.dim}") if held.dim in padded else held
