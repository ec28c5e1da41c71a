"""Scaled dot-product attention with sharded heads.

Heads are independent: with q, k and v sharded alike on the heads dim (``-3`` of ``(...,
heads, seq, head_dim)``), each rank computes attention for its heads. In blocks too
(``Shard(1, blocks=2)``: diffllama's two groups of heads, jetmoe's keys repeated per expert),
as long as all three hold the same heads: any set of whole heads pairs up alike. The mask
broadcasts over heads (size 1 there) or is sliced like the query heads. Dropout draws a random
mask: refused.

Grouped-query attention (``enable_gqa`` with fewer kv heads ``Hkv`` than query heads ``Hq``):
query head ``h`` reads kv head ``h // G``, ``G = Hq / Hkv``. On a rank holding query heads
``[qs, qs + nq)`` and kv heads ``[ks, ks + nk)``, the local call pairs local query head ``i``
with local kv head ``i // (nq / nk)``; that is right when ``(qs + i) // G == ks + i // (nq / nk)``
for every ``i``. :func:`_gqa_consistent` checks exactly that, for every rank; kv heads shared by
groups of ranks (``replicas``) are how 2 kv heads serve 4 ranks.
"""

from __future__ import annotations

from typing import Any, Iterator, Union

import torch
import torch.fx as fx

from autotp.placement import Replicate, Shard, divides
from autotp.rules import Cannot, Inputs, Out, Redistribute, Result, finest, ndim, refinable, rule, sizes

aten = torch.ops.aten


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _gqa_consistent(hq: int, hkv: int, q: Shard, kv: Shard, world: int) -> bool:
    """Whether every rank's local query heads read, through a local ``enable_gqa`` call, the
    kv heads they read globally (see the module docstring)."""
    if not (divides(q, hq, world) and divides(kv, hkv, world)):
        return False
    group, nq, nk = hq // hkv, hq // q.chunks(world), hkv // kv.chunks(world)
    if nq % nk:
        return False
    local_group = nq // nk
    for rank in range(world):
        qs, ks = (rank // q.replicas) * nq, (rank // kv.replicas) * nk
        if any((qs + i) // group != ks + i // local_group for i in range(nq)):
            return False
    return True


def _choices(held: Any, dim: int, world: int) -> Iterator[Shard]:
    """Layouts a local slice can give a value held as ``held``: itself first, then finer ones."""
    if isinstance(held, Shard):
        yield held
    top = held.replicas if isinstance(held, Shard) else world
    for replicas in range(top - 1, 0, -1):
        if top % replicas == 0:
            yield Shard(dim, 1, replicas)


def _gqa_layout(node: fx.Node, inputs: Inputs, heads_dim: int) -> Union[tuple[Shard, Shard], Cannot]:
    """Layouts of the query and of k/v for grouped-query attention, refinable from what is held."""
    q, k, v = node.args[:3]
    if any(isinstance(inputs[a], Shard) and inputs[a].blocks != 1 for a in (q, k, v)):
        return Cannot("grouped-query attention with heads in blocks: which kv head a query head reads is "
                      "only checked for contiguous heads")
    kv_held = [inputs[a] for a in (k, v) if isinstance(inputs[a], Shard)]
    kv_now = finest(kv_held) if kv_held else Replicate()
    if isinstance(kv_now, Cannot):
        return kv_now
    hq, hkv, world = sizes(q)[heads_dim], sizes(k)[heads_dim], inputs.world_size
    for q_shard in _choices(inputs[q], heads_dim, world):
        for kv_shard in _choices(kv_now, heads_dim, world):
            if _gqa_consistent(hq, hkv, q_shard, kv_shard, world):
                return q_shard, kv_shard
    return Cannot(f"grouped-query attention with {hq} query and {hkv} kv heads: no layout over {world} ranks "
                  f"pairs every query head with its kv head")


def _layouts(node: fx.Node, inputs: Inputs, heads_dim: int) -> Union[tuple[Shard, Shard], Cannot]:
    """The layouts the query and k/v must take."""
    q, k = node.args[:2]
    if _arg(node, 7, "enable_gqa", False) and sizes(q)[heads_dim] != sizes(k)[heads_dim]:
        return _gqa_layout(node, inputs, heads_dim)
    held = [inputs[a] for a in node.args[:3] if isinstance(inputs[a], Shard)]
    want = finest(held) if held else Shard(heads_dim)
    return want if isinstance(want, Cannot) else (want, want)


def _mask_move(node: fx.Node, inputs: Inputs, want: Shard) -> Union[tuple[Redistribute, ...], Cannot]:
    """The mask broadcasts over heads, or is sliced like the query heads."""
    mask = _arg(node, 3, "attn_mask", None)
    if not isinstance(mask, fx.Node):
        return ()
    mask_heads = ndim(mask) - (ndim(node) - want.dim)
    p = inputs[mask]
    if mask_heads < 0:
        return Cannot("attention mask sharded without a heads dim") if not isinstance(p, Replicate) else ()
    mask_want = want.with_dim(mask_heads)
    if p == mask_want or (sizes(mask)[mask_heads] == 1 and isinstance(p, Replicate)):
        return ()
    if len(node.args) <= 3 or not refinable(p, mask_want, sizes(mask)[mask_heads], inputs.world_size):
        return Cannot(f"attention mask is {p} with {sizes(mask)[mask_heads]} heads")
    return (Redistribute((3,), mask_want),)


@rule(aten.scaled_dot_product_attention.default, reads=("query", "key", "value", "attn_mask"))
def sdpa_rule(node: fx.Node, inputs: Inputs) -> Result:
    if _arg(node, 4, "dropout_p", 0.0):
        return Cannot("attention dropout draws a random mask")
    heads_dim = ndim(node) - 3
    if heads_dim < 0:
        return Cannot("attention without a heads dim")
    for i, arg in enumerate(node.args[:3]):
        p = inputs[arg]
        if not isinstance(p, (Shard, Replicate)) or (isinstance(p, Shard) and p.dim != heads_dim):
            return Cannot(f"attention operand {i} is {p}, only heads (Shard({heads_dim})) can be sharded")
    layouts = _layouts(node, inputs, heads_dim)
    if isinstance(layouts, Cannot):
        return layouts
    q_want, kv_want = layouts
    moves = []
    for i, (arg, want) in enumerate(zip(node.args[:3], (q_want, kv_want, kv_want))):
        if inputs[arg] == want:
            continue
        if not refinable(inputs[arg], want, sizes(arg)[heads_dim], inputs.world_size):
            return Cannot(f"attention operand {i} has {sizes(arg)[heads_dim]} heads, not divisible as {want} "
                          f"over tp={inputs.world_size}")
        moves.append(Redistribute((i,), want))
    mask = _mask_move(node, inputs, q_want)
    if isinstance(mask, Cannot):
        return mask
    return Out(q_want, tuple(moves) + mask)
