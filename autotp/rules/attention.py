"""Scaled dot-product attention with sharded heads.

Heads are independent: with q, k and v all sharded on the heads dim (``-3`` of ``(..., heads,
seq, head_dim)``), each rank computes attention for its heads. With grouped-query attention
(``enable_gqa``), q head ``h`` reads kv head ``h // (Hq / Hkv)``; contiguous shards of both keep
that pairing on every rank when both head counts divide by the world size. The mask broadcasts
over heads (size 1 there) or is sliced like the heads.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from autotp.placement import Shard
from autotp.rules import Cannot, Inputs, Out, Redistribute, Result, finest, ndim, refinable, rule, sizes

aten = torch.ops.aten


@rule(aten.scaled_dot_product_attention.default, reads=("query", "key", "value", "attn_mask"))
def sdpa_rule(node: fx.Node, inputs: Inputs) -> Result:
    qkv = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    heads_dim = ndim(node) - 3
    if heads_dim < 0:
        return Cannot("attention without a heads dim")
    held = [inputs[a] for a in qkv if isinstance(inputs[a], Shard)]
    if any(p.dim != heads_dim or p.blocks != 1 for p in held):
        bad = next(p for p in held if p.dim != heads_dim or p.blocks != 1)
        return Cannot(f"attention operand is {bad}, only heads (Shard({heads_dim})) can be sharded")
    # kv heads shared by several ranks (more replicas) are sliced to the heads each rank reads
    want = finest(held) if held else Shard(heads_dim)
    moves = []
    for i, arg in enumerate(qkv):
        p = inputs[arg]
        if p == want:
            continue
        if not refinable(p, want, sizes(arg)[heads_dim], inputs.world_size):
            return Cannot(f"attention operand {i} has {sizes(arg)[heads_dim]} heads, not divisible by tp={inputs.world_size}")
        moves.append(Redistribute((i,), want))
    if isinstance(mask, fx.Node):
        mask_heads = ndim(mask) - 3
        p = inputs[mask]
        mask_want = want.with_dim(mask_heads) if mask_heads >= 0 else None
        if mask_want is not None and p != mask_want and sizes(mask)[mask_heads] != 1:
            if not refinable(p, mask_want, sizes(mask)[mask_heads], inputs.world_size):
                return Cannot(f"attention mask is {p}")
            path = (3,) if len(node.args) > 3 else None
            if path is None:
                return Cannot("attention mask passed by keyword with full heads")
            moves.append(Redistribute(path, mask_want))
        elif mask_heads < 0 and isinstance(p, Shard):
            return Cannot("attention mask sharded without a heads dim")
    return Out(want, tuple(moves))
