"""Layout ops: view/reshape, expand, transpose/permute, (un)squeeze, slice, split, cat, getitem.

The view maths (after DTensor's ``_view_ops`` dim maps, but with prefix products instead of a
table): a dimension ``d`` of the input starts at flat position ``P = prod(in[:d])``. The output
dimension ``j`` that starts at the same position (the first with ``prod(out[:j]) == P`` and
``out[j] != 1``) is where the shard lands:

- ``out[j] == in[d]``: the dim is carried over unchanged;
- ``out[j]`` divides ``in[d]``: the dim splits into ``(out[j], rest)``, e.g. hidden into
  ``(heads, head_dim)``; the shard moves to ``heads``, which must divide by the world size
  (per block, for fused projections);
- ``in[d]`` divides ``out[j]``: the dim merges with the dims *after* it, e.g. ``(heads,
  head_dim)`` back into hidden; the shard stays contiguous;
- no output dim starts at ``P``: the dim merges with dims *before* it (``(batch, heads)`` into
  one): every rank holds a strided piece, its chunk of every block (``Shard(d, period=heads)``).
  A view of such a shard sees its dim as two (the blocks, and the sharded dim within them)
  and runs the same maths: ``[batch * heads, ...]`` back to ``[batch, heads, ...]`` is a plain
  shard again.

Literal sizes at the sharded position are rewritten to their per-rank value (``ArgEdit``); a
``-1`` needs nothing, a symbolic size there means we cannot tell, so ``Cannot``; except at a
strided shard's dim, where it is a whole number of blocks (``batch * heads``) and the rewrite
divides it by the ranks as the graph runs.
"""

from __future__ import annotations

import math
import operator
from itertools import accumulate
from typing import Any, Optional, Union

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from autotp.placement import Placement, Replicate, Shard, block_sizes, divides, local_size
from autotp.rules import (
    ArgEdit,
    Cannot,
    Inputs,
    Out,
    Redistribute,
    Result,
    ndim,
    norm_dim,
    rule,
    sizes,
)

aten = torch.ops.aten
_END = 2**63 - 1  # the "to the end" sentinel export writes into slice nodes


def _prod(values) -> Any:
    out: Any = 1
    for v in values:
        out = out * v
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    import sympy  # only for dynamic sizes; symbolic tracing has imported it already

    return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) == 0


def _aligned_dim(out_sizes: tuple, before: Any, after: Any) -> Optional[int]:
    """The output dim that starts where the sharded input dim starts: as many elements before
    it, or (a view keeps the count) as many from it on. The second decides when only the
    dims after the shard are static (an SSD scan cuts a padded sequence into chunks of 256:
    ``[b, S, heads, d]`` as ``[b, S // 256, 256, heads, d]``, a product sympy cannot prove)."""
    for j in range(len(out_sizes)):
        if not _same(out_sizes[j], 1) and (_same(_prod(out_sizes[:j]), before) or _same(_prod(out_sizes[j:]), after)):
            return j
    return None


def _shard_src(node: fx.Node, inputs: Inputs) -> Union[Shard, Cannot]:
    src = inputs[node.args[0]]
    return src if isinstance(src, Shard) else Cannot(f"input placement {src} not supported")


def _resize(src: Shard, n: int, m: int, j: int, world: int) -> Union[Shard, Cannot]:
    """Shard of a dim of size ``n`` landing on an output dim of size ``m`` (split or merge).

    When the heads do not divide into the shard's chunks but do divide the world size (2 kv
    heads on 4 ranks), the answer hints how many ranks should share each head."""
    parts = block_sizes(src, n)
    chunks = src.chunks(world)
    if m == n:
        return src.with_dim(j)
    if n % m == 0:
        inner = n // m
        if any(p % inner for p in parts):
            return Cannot(f"view splits a fused dim of {n} into {m} x {inner}, across its blocks {parts}")
        parts = [p // inner for p in parts]
        if any(p % chunks for p in parts):
            counts = parts if len(parts) > 1 else parts[0]
            shared = world // math.gcd(world, *parts)
            return Cannot(f"view splits dim of {n} into {m} heads of {inner}: {counts} heads not divisible by tp={world}",
                          replicas=shared if shared < world else None)
    elif m % n == 0:
        parts = [p * (m // n) for p in parts]
    else:
        return Cannot(f"view maps a sharded dim of {n} onto {m}")
    return Shard(j, src.blocks if isinstance(src.blocks, int) else tuple(parts), src.replicas)


def _size_edit(path: tuple[int, ...], literal: Any, chunks: int) -> Union[tuple, Cannot]:
    if isinstance(literal, fx.Node):
        return Cannot("a symbolic size sits at the sharded position of a view")
    if literal == -1:
        return ()
    return (ArgEdit(path, literal, literal // chunks),)


def _unfolded(in_sizes: tuple, src: Shard) -> tuple[tuple, Shard]:
    """A strided shard's dim seen as two, its blocks and the sharded dim within them: the view
    maths then runs on a plain shard (``[batch * heads, ...]`` is ``[batch, heads, ...]``)."""
    d = src.dim
    return in_sizes[:d] + (_quotient(in_sizes[d], src.period), src.period) + in_sizes[d + 1:], Shard(d + 1)


def _quotient(a: Any, b: Any) -> Any:
    """``a / b`` for sizes: an int where it is a whole number, a sympy expression for dynamic
    sizes, None for ints that do not divide."""
    if isinstance(a, int) and isinstance(b, int):
        return a // b if a % b == 0 else None
    import sympy  # dynamic sizes only; symbolic tracing has imported it already

    q = sympy.simplify(sympy.sympify(a) / sympy.sympify(b))
    return int(q) if q.is_Integer else q


def _merged_before(node: fx.Node, in_sizes: tuple, out_sizes: tuple, src: Shard, world: int,
                   shape_path: Optional[tuple[int, ...]], first: int) -> Result:
    """The sharded dim merged with dims before it (and maybe after it) into one output dim:
    ``[batch, heads, ...]`` viewed as ``[batch * heads, ...]``, or ``[batch, seq, heads *
    head_dim]`` as ``[batch * seq * heads, head_dim]``. Each rank's elements are its chunk of
    every block of the merged dims from the sharded one on: a strided shard."""
    why = Cannot(f"view merges sharded dim {src.dim} with the dims before it (strided shards)")
    if src.blocks != 1 or src.replicas != 1 or src.padded or src.whole:
        return why
    d = src.dim
    for j in range(len(out_sizes)):
        start, end = _prod(out_sizes[:j]), _prod(out_sizes[: j + 1])
        if not any(_same(_prod(in_sizes[:k]), start) for k in range(d)):
            continue  # output dim j does not start at an input dim before the sharded one
        e = next((e for e in range(d, len(in_sizes)) if _same(_prod(in_sizes[: e + 1]), end)), None)
        if e is not None:
            period = _prod(in_sizes[d: e + 1])
        else:  # it ends inside the sharded dim: its heads go into dim j, each head's elements after
            period = _quotient(end, _prod(in_sizes[:d]))
            n = in_sizes[d]
            if not (isinstance(period, int) and isinstance(n, int) and 1 < period < n and n % period == 0
                    and period % src.chunks(world) == 0):
                continue
        if not isinstance(period, int):
            return Cannot(f"view merges sharded dim {d} with dims of dynamic size before and after it")
        placed = Shard(j, period=period)
        if shape_path is None:
            return placed
        literals = node.args[shape_path[0]]
        if not first <= j < first + len(literals):
            return placed
        literal, path, chunks = literals[j - first], shape_path + (j - first,), src.chunks(world)
        if isinstance(literal, fx.Node):  # batch * heads as a symbolic product: a whole number of blocks
            return Out(placed, edits=(ArgEdit(path, literal.name, chunks),))  # divided at run time
        edits = _size_edit(path, literal, chunks)
        return edits if isinstance(edits, Cannot) else Out(placed, edits=edits)
    return why


def _reshape(node: fx.Node, inputs: Inputs, shape_path: Optional[tuple[int, ...]], first: int) -> Result:
    """Shared by view/reshape/flatten/unflatten: ``shape_path`` holds the output sizes from dim ``first``."""
    src = _shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    in_sizes, out_sizes = sizes(node.args[0]), sizes(node)
    if src.period:
        in_sizes, src = _unfolded(in_sizes, src)
    n = in_sizes[src.dim]
    j = _aligned_dim(out_sizes, _prod(in_sizes[: src.dim]), _prod(in_sizes[src.dim:]))
    if j is None:
        return _merged_before(node, in_sizes, out_sizes, src, inputs.world_size, shape_path, first)
    m = out_sizes[j]
    if not isinstance(m, int):
        return Cannot("sharded dim maps onto a dynamic size")
    placed = _resize(src, n, m, j, inputs.world_size)
    if isinstance(placed, Cannot) or shape_path is None:
        return placed
    literals = node.args[shape_path[0]]
    if not first <= j < first + len(literals):
        return placed  # the sharded dim is not among the sizes the node spells out (unflatten of another dim)
    edits = _size_edit(shape_path + (j - first,), literals[j - first], src.chunks(inputs.world_size))
    return edits if isinstance(edits, Cannot) else Out(placed, edits=edits)


@rule(aten.view.default, aten.reshape.default, aten._unsafe_view.default, reads=("self",), periodic=True)
def view_rule(node: fx.Node, inputs: Inputs) -> Result:
    return _reshape(node, inputs, (1,), 0)


def reshape_placement(node: fx.Node, inputs: Inputs) -> Result:
    """Where viewing the node's first argument in the node's own shape puts its shard (no
    literal sizes to localise): flatten, and view_as (rules/reinterpret.py)."""
    return _reshape(node, inputs, None, 0)


@rule(aten.flatten.using_ints, reads=("self",))
def flatten_rule(node: fx.Node, inputs: Inputs) -> Result:
    return reshape_placement(node, inputs)


@rule(aten.unflatten.int, reads=("self",))
def unflatten_rule(node: fx.Node, inputs: Inputs) -> Result:
    return _reshape(node, inputs, (2,), norm_dim(node.args[1], ndim(node.args[0])))


@rule(aten.expand.default, reads=("self",))
def expand_rule(node: fx.Node, inputs: Inputs) -> Result:
    """New dims are prepended; the sharded dim keeps its size, so its literal is localised."""
    src = _shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    j = src.dim + ndim(node) - ndim(node.args[0])
    edits = _size_edit((1, j), node.args[1][j], src.chunks(inputs.world_size))
    return edits if isinstance(edits, Cannot) else Out(src.with_dim(j), edits=edits)


@rule(aten.transpose.int, reads=("self",), periodic=True, whole_blocks=True)
def transpose_rule(node: fx.Node, inputs: Inputs) -> Result:
    src = _shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    rank = ndim(node)
    d0, d1 = norm_dim(node.args[1], rank), norm_dim(node.args[2], rank)
    swap = {d0: d1, d1: d0}
    return src.with_dim(swap.get(src.dim, src.dim))


@rule(aten.permute.default, reads=("self",), periodic=True, whole_blocks=True)
def permute_rule(node: fx.Node, inputs: Inputs) -> Result:
    src = _shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    dims = [norm_dim(d, ndim(node)) for d in node.args[1]]
    return src.with_dim(dims.index(src.dim))


@rule(aten.t.default, aten.numpy_T.default, reads=("self",), periodic=True, whole_blocks=True)
def reverse_dims_rule(node: fx.Node, inputs: Inputs) -> Result:
    src = _shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    return src.with_dim(ndim(node) - 1 - src.dim)


@rule(aten.unsqueeze.default, reads=("self",), whole_blocks=True, periodic=True)
def unsqueeze_rule(node: fx.Node, inputs: Inputs) -> Result:
    src = _shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    new = norm_dim(node.args[1], ndim(node))
    return src.with_dim(src.dim + 1 if new <= src.dim else src.dim)


@rule(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, reads=("self",), periodic=True, whole_blocks=True)
def squeeze_rule(node: fx.Node, inputs: Inputs) -> Result:
    src = _shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    in_sizes = sizes(node.args[0])
    if len(node.args) > 1:
        asked = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        asked = [norm_dim(d, len(in_sizes)) for d in asked]
    else:
        asked = list(range(len(in_sizes)))
    removed = [d for d in asked if _same(in_sizes[d], 1)]
    return src.with_dim(src.dim - sum(1 for d in removed if d < src.dim))


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
    src = _shard_src(node, inputs)
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
        return Cannot("strided slice of a sharded dim")
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


@rule(aten.narrow.default, reads=("self",))
def narrow_rule(node: fx.Node, inputs: Inputs) -> Result:
    src = _shard_src(node, inputs)
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
    src = _shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    dim = norm_dim(node.args[1], ndim(node.args[0]))
    if dim == src.dim:
        return Cannot("select on the sharded dim")
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
    src = _shard_src(node, inputs)
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
    src = _shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    dim = norm_dim(node.args[1] if len(node.args) > 1 else 0, ndim(node.args[0]))
    if dim == src.dim:
        return Cannot("unbind along the sharded dim")
    shifted = src.with_dim(src.dim - (1 if dim < src.dim else 0))
    return tuple([shifted] * len(node.meta["val"]))


@rule(operator.getitem, reads=())
def getitem_rule(node: fx.Node, inputs: Inputs) -> Result:
    src = inputs[node.args[0]]
    if isinstance(src, tuple):
        return src[node.args[1]]
    return Cannot("getitem on a sharded value")


def _empty_1d(t: fx.Node) -> bool:
    shape = t.meta["val"].shape
    return len(shape) == 1 and statically_known_true(shape[0] == 0)


@rule(aten.cat.default, reads=("tensors",))
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
    src = _shard_src(node, inputs)
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
    src = _shard_src(node, inputs)
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
    src = _shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    if isinstance(inputs[node.args[-1]], Shard) and node.target is aten.index_select.default:
        return Cannot("index_select with a sharded index")
    raw = node.args[2] if node.target is aten.roll.default else node.args[1]
    dims = raw if isinstance(raw, (list, tuple)) else [raw]
    if src.dim in [norm_dim(d, ndim(node)) for d in dims]:
        return Cannot(f"{node.target} along the sharded dim")
    return src


@rule(aten.index_copy.default, aten.index_add.default, reads=("self", "index", "source"))
def index_write_rule(node: fx.Node, inputs: Inputs) -> Result:
    """``self`` with the slices ``index`` picks along ``dim`` replaced by ``source`` (a static
    KV cache written in place), or ``source`` added to them (experts' outputs summed back
    into token order): every other dim is elementwise, so ``self`` and ``source`` sharded
    alike on another dim stay sharded; a replicated one of the two is sliced locally."""
    target, dim, index, source = node.args[:4]
    if not isinstance(inputs[index], Replicate):
        return Cannot(f"{node.target} with a sharded index")
    placed = [inputs[target], inputs[source]]
    if any(not isinstance(p, (Shard, Replicate)) for p in placed):
        return Cannot(f"{node.target} of {placed[0]} and {placed[1]}")
    shards = {p for p in placed if isinstance(p, Shard)}
    if not shards:
        return Replicate()
    if len(shards) != 1 or ndim(source) != ndim(target):
        return Cannot(f"{node.target} of values sharded differently")
    shard = shards.pop()
    if shard.dim == norm_dim(dim, ndim(node)):
        return Cannot(f"{node.target} along the sharded dim")
    moves = []
    for path, value, placement in (((0,), target, placed[0]), ((3,), source, placed[1])):
        if isinstance(placement, Replicate):
            if not divides(shard, sizes(value)[shard.dim], inputs.world_size):
                return Cannot(f"replicated {node.target} input does not split over the ranks")
            moves.append(Redistribute(path, shard))
    return Out(shard, tuple(moves))


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
