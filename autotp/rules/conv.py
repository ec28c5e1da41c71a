"""Grouped convolutions: a channel shard that keeps whole groups on every rank.

A convolution with ``groups`` > 1 (depthwise when each channel is its own group) maps each
group of input channels to its own group of output channels and mixes nothing across groups.
A rank that holds whole groups of the input computes its groups of the output with its rows
of the weight and bias: no communication, and ``groups`` becomes the local count. This is the
short causal conv of Mamba and linear-attention blocks, whose channels arrive sharded from a
column-parallel projection (as a fused ``x|B|C`` in several blocks, each kept whole-grouped).

Everything else is refused: a sharded length or batch, a partial input, a chunk that would
cut a group (an input without a batch dim has its channels first), a transposed convolution (its weight is laid out ``[in, out / groups, ...]``),
and ``groups == 1``, where every output channel reads every input channel.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from autotp.placement import Replicate, Shard, block_sizes, local_size
from autotp.rules import (ArgEdit, Cannot, Inputs, Out, Redistribute, Result, ndim, refinable, rule,
                          schema_tensor_args, sizes)

aten = torch.ops.aten

# op -> position of ``groups`` in its arguments (the schema's), and of ``transposed`` if it has one
GROUPED_CONVS = {
    aten.conv1d.default: (6, None),
    aten.conv1d.padding: (6, None),
    aten.conv2d.default: (6, None),
    aten.conv2d.padding: (6, None),
    aten.conv3d.default: (6, None),
    aten.conv3d.padding: (6, None),
    aten.convolution.default: (8, 6),
}


def _out_blocks(held: Shard, parts: list[int], per_group_in: int, per_group_out: int):
    """The output channels' blocks: each input block of ``p`` channels gives ``p / per_group_in``
    groups of ``per_group_out`` output channels."""
    if per_group_in == per_group_out:
        return held.blocks
    out = tuple(p // per_group_in * per_group_out for p in parts)
    return out if isinstance(held.blocks, tuple) else held.blocks


def conv_rule(node: fx.Node, inputs: Inputs) -> Result:
    groups_at, transposed_at = GROUPED_CONVS[node.target]
    x, weight = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 and isinstance(node.args[2], fx.Node) else None
    held = inputs[x]
    channels = ndim(x) - (ndim(weight) - 1)  # 1, or 0 for an input without a batch dim
    if isinstance(held, Replicate):
        sharded = [a.name for a in (weight, bias) if a is not None and not isinstance(inputs[a], Replicate)]
        return Cannot(f"convolution {sharded[0]} is sharded, its input whole") if sharded else Replicate()
    if not isinstance(held, Shard) or held.dim != channels:
        return Cannot(f"convolution input is {held}: only its channels (dim {channels}) may be sharded")
    if transposed_at is not None and node.args[transposed_at]:
        return Cannot("transposed convolution: its weight is laid out [in, out / groups, ...]")
    groups = node.args[groups_at] if len(node.args) > groups_at else 1
    c_in, c_out = sizes(x)[channels], sizes(node)[channels]
    if not all(isinstance(v, int) for v in (groups, c_in, c_out)) or groups < 2:
        return Cannot("a convolution with groups == 1 mixes every input channel into every output channel")
    per_group_in, per_group_out, chunks = c_in // groups, c_out // groups, held.chunks(inputs.world_size)
    try:
        parts = block_sizes(held, c_in)
    except ValueError as exc:
        return Cannot(f"convolution input channels: {exc}")
    if any(p % (per_group_in if b in held.whole else chunks * per_group_in) for b, p in enumerate(parts)):
        return Cannot(f"a rank's chunk of {list(parts)} channels would cut a group of {per_group_in}")
    # blocks every rank holds whole (a mamba x|B|C whose B and C are shared by all heads) stay so
    want = Shard(0, _out_blocks(held, parts, per_group_in, per_group_out), held.replicas, whole=held.whole)
    moves = []
    for pos, arg in ((1, weight), (2, bias)):
        if arg is None or inputs[arg] == want:
            continue
        if not refinable(inputs[arg], want, sizes(arg)[0], inputs.world_size):
            return Cannot(f"convolution {arg.name} of {sizes(arg)[0]} rows does not split as {want}")
        moves.append(Redistribute((pos,), want))
    edit = ArgEdit((groups_at,), groups, local_size(held, c_in, inputs.world_size) // per_group_in)
    return Out(want.with_dim(channels), tuple(moves), edits=(edit,))


for _op in GROUPED_CONVS:
    rule(_op, reads=schema_tensor_args(_op), whole_blocks=True)(conv_rule)
