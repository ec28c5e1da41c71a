"""Ops that take pieces of a tensor or join them: slice, narrow, select, split, unbind,
getitem, cat, stack, repeat, repeat_interleave, flip/roll, gather and
index_select/index_copy/index_add.

Along another dim than the sharded one they keep the shard (moved where the op adds or drops
dims). Along the sharded dim a piece is kept only where it is made of whole blocks of a fused
layout (phi3's q|k|v slices, a split of gate|up), and a join of sharded pieces becomes a fused
layout whose blocks are the pieces. Blocks every rank holds whole stay whole in the pieces.
"""

from __future__ import annotations

import operator
from itertools import accumulate
from typing import Any, Optional, Union

import torch
import torch.fx as fx

from autotp.placement import Placement, Replicate, Shard, block_sizes, divides, local_size
from autotp.rules import ArgEdit, Cannot, Inputs, Out, Redistribute, Result, ndim, norm_dim, rule, sizes
from autotp.rules.view import shard_src

aten = torch.ops.aten


def _block_span(src: Shard, n: int, start: int, end: int) -> Optional[tuple[int, int, list[int]]]:
    """If ``[start, end)`` covers whole blocks of a ``src``-sharded dim: (first, last, sizes)."""
    parts = block_sizes(src, n)
    bounds = [0, *accumulate(parts)]
    if start in bounds and end in bounds and start < end:
        first, last = bounds.index(start), bounds.index(end)
        return first, last, parts[first:last]
    return None


def _refined(src: Shard, n: int, cuts: list[int]) -> tuple[int, ...]:
    """Block sizes of a dim of ``n`` whose boundaries are the current ones plus ``cuts``."""
    bounds = sorted({0, n, *accumulate(block_sizes(src, n)), *(c for c in cuts if 0 < c < n)})
    return tuple(b - a for a, b in zip(bounds, bounds[1:]))


def _sub_shard(src: Shard, dim: int, picked: list[int]) -> Shard:
    """The shard of a piece made of the blocks ``picked`` (their sizes) of ``src``."""
    if isinstance(src.blocks, int):
        return Shard(dim, len(picked), src.replicas)
    return Shard(dim, tuple(picked) if len(picked) > 1 else 1, src.replicas)


def _local_bound(bound: int, world: int) -> int:
    """A slice bound on block boundaries, per rank (negative bounds count from the end)."""
    return -((-bound) // world) if bound < 0 else bound // world


@rule(aten.slice.Tensor, reads=("self",), whole_blocks=True)
def slice_rule(node: fx.Node, inputs: Inputs) -> Result:
    """Slices of other dims pass; on the sharded dim only whole fused blocks (phi3's q|k|v),
    and none of a dim with blocks held whole."""
    src = shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    args = list(node.args) + [None] * (5 - len(node.args))
    rank = ndim(node)
    dim = norm_dim(args[1] if args[1] is not None else 0, rank)
    if dim != src.dim:
        return src
    if src.whole:
        return Cannot(f"slice of a dim with blocks held whole ({src})")
    start, end, step = args[2] or 0, args[3], args[4] or 1
    n = sizes(node.args[0])[dim]
    if not all(isinstance(v, int) for v in (start, end if end is not None else 0, step)):
        return Cannot("symbolic slice bounds on a sharded dim")
    start = start + n if start < 0 else start
    end = n if end is None or end >= n else (end + n if end < 0 else end)
    if step != 1:
        return _every_kth(src, n, start, end, step, inputs.world_size)
    if start == 0 and end == n:
        return src
    span = _block_span(src, n, start, end)
    if span is None:
        hint = _refined(src, n, [start, end])
        return Cannot(f"slice [{start}:{end}] cuts through the blocks of a sharded dim of {n}", hint)
    chunks = src.chunks(inputs.world_size)
    edits = [ArgEdit((2,), args[2], _local_bound(args[2], chunks))] if args[2] else []
    if args[3] is not None and args[3] < n:
        edits.append(ArgEdit((3,), args[3], _local_bound(args[3], chunks)))
    return Out(_sub_shard(src, dim, span[2]), edits=tuple(edits))


def _every_kth(src: Shard, n: Any, start: int, end: int, step: int, world: int) -> Result:
    """``x[start::step]`` over a whole sharded dim (gpt-oss's interleaved gate|up: ``[..., ::2]``
    and ``[..., 1::2]``): where each rank's chunk of every block is a whole number of steps, its
    own ``[start::step]`` is its chunk of every block of the result, which keeps the layout."""
    chunk = n // src.num_blocks // src.chunks(world) if isinstance(n, int) and isinstance(src.blocks, int) else 0
    if not (0 <= start < step and end == n and chunk and chunk % step == 0):
        return Cannot(f"strided slice [{start}:{end}:{step}] of a sharded dim of {n}")
    return src


@rule(aten.narrow.default, reads=("self",))
def narrow_rule(node: fx.Node, inputs: Inputs) -> Result:
    src = shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    dim, start, length = norm_dim(node.args[1], ndim(node)), node.args[2], node.args[3]
    if dim != src.dim:
        return src
    n = sizes(node.args[0])[dim]
    if not (isinstance(start, int) and isinstance(length, int)):
        return Cannot("symbolic narrow of a sharded dim")
    span = _block_span(src, n, start, start + length)
    if span is None:
        hint = _refined(src, n, [start, start + length])
        return Cannot(f"narrow [{start}:{start + length}] cuts through the blocks of a sharded dim", hint)
    chunks = src.chunks(inputs.world_size)
    edits = (ArgEdit((2,), start, start // chunks), ArgEdit((3,), length, length // chunks))
    return Out(_sub_shard(src, dim, span[2]), edits=edits)


@rule(aten.select.int, reads=("self",))
def select_rule(node: fx.Node, inputs: Inputs) -> Result:
    src = shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    dim = norm_dim(node.args[1], ndim(node.args[0]))
    if dim == src.dim:  # with the dim's elements as blocks, a view may have made it another dim
        n, index = sizes(node.args[0])[dim], node.args[2]
        hint = _refined(src, n, [index % n, index % n + 1]) if isinstance(n, int) and isinstance(index, int) else None
        return Cannot("select on the sharded dim", hint)
    return src.with_dim(src.dim - (1 if dim < src.dim else 0))


def _split_outputs(node: fx.Node, src: Shard, dim: int) -> Union[list[Placement], Cannot]:
    """Placements of the pieces of a split along the sharded dim: each must be whole blocks.
    A piece made only of blocks every rank holds whole is ``Replicate()``; one with some keeps
    them whole."""
    n = sizes(node.args[0])[dim]
    pieces = [int(v.shape[dim]) for v in node.meta["val"]]
    out, start = [], 0
    for size in pieces:
        span = _block_span(src, n, start, start + size)
        if span is None:
            hint = _refined(src, n, list(accumulate(pieces)))
            return Cannot(f"split into {pieces} cuts through the blocks {block_sizes(src, n)} of a sharded dim", hint)
        picked = range(span[0], span[1])
        whole = tuple(b - span[0] for b in picked if b in src.whole)
        if len(whole) == len(picked):
            out.append(Replicate())
        else:  # some blocks held whole stay so in the piece (a mamba x|B|C on its way to the conv)
            piece = _sub_shard(src, dim, span[2])
            out.append(Shard(dim, piece.blocks, piece.replicas, whole=whole) if whole else piece)
        start += size
    return out


@rule(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, reads=("self",), whole_blocks=True)
def split_rule(node: fx.Node, inputs: Inputs) -> Result:
    src = shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    dim = norm_dim(node.args[2] if len(node.args) > 2 else 0, ndim(node.args[0]))
    count = len(node.meta["val"])
    if dim != src.dim:
        return tuple([src] * count)
    pieces = _split_outputs(node, src, dim)
    if isinstance(pieces, Cannot):
        return pieces
    chunks = src.chunks(inputs.world_size)
    if src.whole and node.target is not aten.split_with_sizes.default:
        return Cannot(f"{node.target} of {src}: its pieces are not all of one size on every rank")
    if node.target is aten.split.Tensor:
        edits: tuple = (ArgEdit((1,), node.args[1], node.args[1] // chunks),)
    elif node.target is aten.split_with_sizes.default:  # a piece held whole keeps its size
        edits = tuple(ArgEdit((1, i), s, local_size(p, s, inputs.world_size))
                      for i, (s, p) in enumerate(zip(node.args[1], pieces)) if isinstance(p, Shard))
    else:  # chunk(n) recomputes its pieces from the local size
        edits = ()
    return Out(tuple(pieces), edits=edits)


@rule(aten.unbind.int, reads=("self",))
def unbind_rule(node: fx.Node, inputs: Inputs) -> Result:
    src = shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, ndim(node.args[0]))
    if dim == src.dim:  # as with select: each element a block of its own, a view may make it another dim
        n = sizes(node.args[0])[dim]
        hint = _refined(src, n, list(range(1, n))) if isinstance(n, int) else None
        return Cannot("unbind along the sharded dim", hint)
    shifted = src.with_dim(src.dim - (1 if dim < src.dim else 0))
    return tuple([shifted] * len(node.meta["val"]))


@rule(operator.getitem, reads=())
def getitem_rule(node: fx.Node, inputs: Inputs) -> Result:
    src = inputs[node.args[0]]
    if isinstance(src, tuple):
        return src[node.args[1]]
    return Cannot("getitem on a sharded value")


def _empty_1d(t: fx.Node) -> bool:
    from torch.fx.experimental.symbolic_shapes import statically_known_true  # sympy: planning only

    shape = t.meta["val"].shape
    return len(shape) == 1 and statically_known_true(shape[0] == 0)


@rule(aten.cat.default, aten.concatenate.default, aten.concat.default, reads=("tensors",))  # the latter two: aliases
def cat_rule(node: fx.Node, inputs: Inputs) -> Result:
    """Concatenating along the sharded dim makes a fused dim: the pieces become its blocks."""
    # torch.cat skips 1-D empty tensors (a lazily initialised cache starts as one); the check
    # must not guard on a size only the data decides (tokens routed to each expert)
    tensors = [t for t in node.args[0] if not _empty_1d(t)]
    if ndim(node) > 1 and any(ndim(t) == 1 for t in tensors):
        return Cannot("cat of a 1-D input that may be empty")
    dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, ndim(node))
    shards = {inputs[t] for t in tensors if isinstance(inputs[t], Shard)}
    if any(not isinstance(inputs[t], (Shard, Replicate)) for t in tensors):
        return Cannot("cat of a non-Shard, non-Replicate input")
    dims = {s.dim for s in shards}
    if len(dims) != 1:
        return Cannot(f"cat of inputs sharded on different dims {sorted(dims)}")
    sharded_dim = dims.pop()
    world = inputs.world_size
    if sharded_dim != dim:
        if len(shards) != 1:
            return Cannot("cat of inputs with different blocks")
        shard = shards.pop()
        moves = []
        for i, t in enumerate(node.args[0]):
            if t in tensors and isinstance(inputs[t], Replicate):
                if not divides(shard, sizes(t)[sharded_dim], world):
                    return Cannot("replicated cat input does not split over the ranks")
                moves.append(Redistribute((0, i), shard))
        return Out(shard, tuple(moves))
    if len({s.replicas for s in shards}) != 1:
        return Cannot("cat of pieces shared by different numbers of ranks")
    replicas = next(iter(shards)).replicas
    parts, moves = [], []
    for i, t in enumerate(node.args[0]):
        if t not in tensors:
            continue
        p, n = inputs[t], sizes(t)[dim]
        if isinstance(p, Replicate):
            p = Shard(dim, 1, replicas)
            moves.append(Redistribute((0, i), p))
        if not divides(p, n, world):
            return Cannot("cat input does not split over the ranks")
        parts.extend(block_sizes(p, n))
    blocks = len(parts) if len(set(parts)) == 1 else tuple(parts)
    return Out(Shard(dim, blocks, replicas), tuple(moves))


@rule(aten.repeat.default, reads=("self",))
def repeat_rule(node: fx.Node, inputs: Inputs) -> Result:
    """Tiling: new leading dims shift the shard; tiling the sharded dim k times makes k copies
    of its blocks, and a rank that tiles its own chunk of each holds its chunk of every copy
    (``Shard(d, blocks=k*b)``: jetmoe's keys repeated once per expert)."""
    src = shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    times = list(node.args[1])
    dim = src.dim + len(times) - ndim(node.args[0])
    factor = times[dim]
    if not isinstance(factor, int) or factor < 1:
        return Cannot(f"repeat of the sharded dim {factor} times")
    if factor == 1:
        return src.with_dim(dim)
    if src.whole or src.period or src.padded:
        return Cannot(f"repeat of the sharded dim of {src}")
    return Shard(dim, src.blocks * factor, src.replicas)  # a tuple of block sizes repeats, a count multiplies


@rule(aten.repeat_interleave.self_int, reads=("self",))
def repeat_interleave_rule(node: fx.Node, inputs: Inputs) -> Result:
    """GQA's kv-head repeat: repeating each head in place keeps rank r's heads contiguous."""
    src = shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if dim is None:
        return Cannot("repeat_interleave over the flattened tensor")
    along_shard = norm_dim(dim, ndim(node)) == src.dim
    if along_shard and src.blocks != 1:
        return Cannot("repeat_interleave of a fused sharded dim")
    path: tuple = (3,) if len(node.args) > 3 else ("output_size",)
    total = node.args[3] if len(node.args) > 3 else node.kwargs.get("output_size")
    if total is None or not along_shard:  # the output size of another dim is every rank's
        return src
    # the size of the repeated sharded dim, given as a literal: this rank's share of it
    chunks = src.chunks(inputs.world_size)
    if not isinstance(total, int) or total % chunks:
        return Cannot(f"repeat_interleave's output_size {total} does not split over the ranks")
    return Out(src, edits=(ArgEdit(path, total, total // chunks),))


@rule(aten.flip.default, aten.roll.default, reads=("self",))
@rule(aten.index_select.default, reads=("self", "index"))
def other_dim_rule(node: fx.Node, inputs: Inputs) -> Result:
    """Ops that act along the dims in ``args[1]`` (roll: ``args[2]``) only, keeping the shape."""
    src = shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    if isinstance(inputs[node.args[-1]], Shard) and node.target is aten.index_select.default:
        return Cannot("index_select with a sharded index")
    raw = node.args[2] if node.target is aten.roll.default else node.args[1]
    dims = raw if isinstance(raw, (list, tuple)) else [raw]
    if src.dim in [norm_dim(d, ndim(node)) for d in dims]:
        return Cannot(f"{node.target} along the sharded dim")
    return src


def _alike_off_dim(node: fx.Node, inputs: Inputs, operands: list[tuple[tuple[int, ...], fx.Node]], dim: int) -> Result:
    """Operands that meet elementwise in every dim but ``dim``: sharded alike on another dim
    they stay sharded; a replicated one is sliced locally."""
    placed = [inputs[value] for _, value in operands]
    if any(not isinstance(p, (Shard, Replicate)) for p in placed):
        return Cannot(f"{node.target} of {', '.join(map(str, placed))}")
    shards = {p for p in placed if isinstance(p, Shard)}
    if not shards:
        return Replicate()
    if len(shards) != 1 or len({ndim(value) for _, value in operands}) != 1:
        return Cannot(f"{node.target} of values sharded differently")
    shard = shards.pop()
    if shard.dim == norm_dim(dim, ndim(node)):
        return Cannot(f"{node.target} along the sharded dim")
    moves = []
    for (path, value), placement in zip(operands, placed):
        if isinstance(placement, Replicate):
            if not divides(shard, sizes(value)[shard.dim], inputs.world_size):
                return Cannot(f"replicated {node.target} input does not split over the ranks")
            moves.append(Redistribute(path, shard))
    return Out(shard, tuple(moves))


@rule(aten.index_copy.default, aten.index_add.default, reads=("self", "index", "source"))
def index_write_rule(node: fx.Node, inputs: Inputs) -> Result:
    """``self`` with the slices ``index`` picks along ``dim`` replaced by ``source`` (a static
    KV cache written in place), or ``source`` added to them (experts' outputs summed back
    into token order): every other dim is elementwise."""
    target, dim, index, source = node.args[:4]
    if not isinstance(inputs[index], Replicate):
        return Cannot(f"{node.target} with a sharded index")
    return _alike_off_dim(node, inputs, [((0,), target), ((3,), source)], dim)


@rule(aten.gather.default, reads=("self", "index"))
def gather_rule(node: fx.Node, inputs: Inputs) -> Result:
    """``out[..., i, ...] = self[..., index[..., i, ...], ...]`` along ``dim``: elementwise in
    every other dim where ``index`` is as long as ``self``."""
    source, dim, index = node.args[:3]
    sharded = {p.dim for p in (inputs[source], inputs[index]) if isinstance(p, Shard)}
    if ndim(source) == ndim(index) and any(sizes(source)[d] != sizes(index)[d] for d in sharded):
        return Cannot("gather by an index shorter than its input on the sharded dim")
    return _alike_off_dim(node, inputs, [((0,), source), ((2,), index)], dim)


@rule(aten.stack.default, reads=("tensors",))
def stack_rule(node: fx.Node, inputs: Inputs) -> Result:
    """Stacking inserts a new dim; inputs sharded alike stay sharded (shifted past it)."""
    tensors = node.args[0]
    new = norm_dim(node.args[1] if len(node.args) > 1 else 0, ndim(node))
    shards = {inputs[t] for t in tensors if isinstance(inputs[t], Shard)}
    if len(shards) != 1 or any(not isinstance(inputs[t], (Shard, Replicate)) for t in tensors):
        return Cannot("stack of inputs sharded differently")
    shard = shards.pop()
    moves = []
    for i, t in enumerate(tensors):
        if isinstance(inputs[t], Replicate):
            if not divides(shard, sizes(t)[shard.dim], inputs.world_size):
                return Cannot("replicated stack input does not split over the ranks")
            moves.append(Redistribute((0, i), shard))
    return Out(shard.with_dim(shard.dim + 1 if new <= shard.dim else shard.dim), tuple(moves))
