"""Layout ops: view/reshape, flatten/unflatten, expand, transpose/permute, (un)squeeze.

The ops that take pieces of a tensor or join them (slice, split, cat, repeat, ...) are in
:mod:`autotp.rules.pieces`.

The view maths (after DTensor's ``_view_ops`` dim maps, but with prefix products instead of a
table): a dimension ``d`` of the input starts at flat position ``P = prod(in[:d])``. The output
dimension ``j`` that starts at the same position (the first with ``prod(out[:j]) == P`` and
``out[j] != 1``; or, a view keeping the count, with ``prod(out[j:]) == prod(in[d:])``, which
decides where only the dims after the shard are static) is where the shard lands:

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
from typing import Any, Optional, Union

import torch
import torch.fx as fx

from autotp.placement import Shard, block_sizes, local_size
from autotp.rules import ArgEdit, Cannot, Inputs, Out, Result, ndim, norm_dim, rule, sizes

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


def shard_src(node: fx.Node, inputs: Inputs) -> Union[Shard, Cannot]:
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
            return Cannot(f"view splits dim of {n} into {m} heads of {inner}: {counts} heads not divisible by tp={world}",
                          replicas=_ranks_per_head(world, *parts))
    elif m % n == 0:
        parts = [p * (m // n) for p in parts]
    else:
        return Cannot(f"view maps a sharded dim of {n} onto {m}")
    return Shard(j, src.blocks if isinstance(src.blocks, int) else tuple(parts), src.replicas)


def _ranks_per_head(world: int, *heads: int) -> Optional[int]:
    """How many ranks would share each head where ``heads`` (per block) do not divide over the
    ranks but share a divisor with them (2 kv heads on 4 ranks: 2); None where they share none."""
    shared = world // math.gcd(world, *heads)
    return shared if shared < world else None


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
    src = shard_src(node, inputs)
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
    if _blocks_split_off(src, n, m, out_sizes[j + 1:]):
        # gate|up viewed as [..., 2, inner], q|k|v as [..., 3, heads, head_dim]: the blocks
        # become dim j, every rank holding its chunk of each: a plain shard of a block's dims,
        # split from the next dim on as any plain shard is
        j += 1
        if not isinstance(out_sizes[j], int):
            return Cannot("sharded dim maps onto a dynamic size")
        placed = _resize(Shard(j, 1, src.replicas), n // m, out_sizes[j], j, inputs.world_size)
    else:
        placed = _resize(src, n, m, j, inputs.world_size)
        # the other reading of the split: m fused blocks (q|k|v), unless ranks sharing a head would do
        shared = _fused_heads(src, n, m, out_sizes[j + 1:], inputs.world_size) \
            if isinstance(placed, Cannot) and placed.replicas is None else None
        if shared is not None:
            return Cannot(f"{placed.reason}; also tried as {m} fused blocks of {n // m}", blocks=(n // m,) * m,
                          replicas=shared if shared > 1 else None, alternative=True)
    if isinstance(placed, Cannot) or shape_path is None:
        return placed
    literals = node.args[shape_path[0]]
    if not first <= j < first + len(literals):
        return placed  # the sharded dim is not among the sizes the node spells out (unflatten of another dim)
    edits = _size_edit(shape_path + (j - first,), literals[j - first], src.chunks(inputs.world_size))
    return edits if isinstance(edits, Cannot) else Out(placed, edits=edits)


def _blocks_split_off(src: Shard, n: int, m: int, after: tuple) -> bool:
    """Whether a view splits a dim of ``n`` held in ``m`` equal blocks into ``(blocks, ...)``,
    the dims after the blocks spanning one block: ``(blocks, block size)`` or ``(blocks,
    heads, head_dim)``."""
    if src.num_blocks != m or m < 2 or src.whole or not after:
        return False
    parts = block_sizes(src, n)
    return len(set(parts)) == 1 and _spans(after, parts[0])


def _fused_heads(src: Shard, n: int, m: int, after: tuple, world: int) -> Optional[int]:
    """Whether a view that cannot shard its leading factor ``m`` (the 3 of ``[..., 3, heads,
    head_dim]``) would shard as ``m`` fused blocks: a one-block shard whose block size the
    next dims span, the first of them (the heads) dividing over the ranks, or over groups of
    ranks that share a head (6 heads on 4 ranks: pairs). Returns how many ranks would share
    each head (1: none), or None where the blocks reading does not apply."""
    if src.num_blocks != 1 or src.whole or n % m or not after or not isinstance(after[0], int) \
            or not _spans(after, n // m):
        return None
    if after[0] % src.chunks(world) == 0:
        return 1
    return _ranks_per_head(world, after[0]) if src.replicas == 1 else None


def _spans(after: tuple, size: Any) -> bool:
    """Whether some leading dims of ``after`` hold exactly ``size`` elements: one block."""
    return any(_same(_prod(after[:k]), size) for k in range(1, len(after) + 1))


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
    src = shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    j = src.dim + ndim(node) - ndim(node.args[0])
    edits = _size_edit((1, j), node.args[1][j], src.chunks(inputs.world_size))
    return edits if isinstance(edits, Cannot) else Out(src.with_dim(j), edits=edits)


@rule(aten.transpose.int, reads=("self",), periodic=True, whole_blocks=True)
def transpose_rule(node: fx.Node, inputs: Inputs) -> Result:
    src = shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    rank = ndim(node)
    d0, d1 = norm_dim(node.args[1], rank), norm_dim(node.args[2], rank)
    swap = {d0: d1, d1: d0}
    return src.with_dim(swap.get(src.dim, src.dim))


@rule(aten.permute.default, reads=("self",), periodic=True, whole_blocks=True)
def permute_rule(node: fx.Node, inputs: Inputs) -> Result:
    src = shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    dims = [norm_dim(d, ndim(node)) for d in node.args[1]]
    return src.with_dim(dims.index(src.dim))


@rule(aten.t.default, aten.numpy_T.default, reads=("self",), periodic=True, whole_blocks=True)
def reverse_dims_rule(node: fx.Node, inputs: Inputs) -> Result:
    src = shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    return src.with_dim(ndim(node) - 1 - src.dim)


@rule(aten.unsqueeze.default, reads=("self",), whole_blocks=True, periodic=True)
def unsqueeze_rule(node: fx.Node, inputs: Inputs) -> Result:
    src = shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    new = norm_dim(node.args[1], ndim(node))
    return src.with_dim(src.dim + 1 if new <= src.dim else src.dim)


@rule(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, reads=("self",), periodic=True, whole_blocks=True)
def squeeze_rule(node: fx.Node, inputs: Inputs) -> Result:
    src = shard_src(node, inputs)
    if isinstance(src, Cannot):
        return src
    in_sizes = sizes(node.args[0])
    if len(node.args) > 1:
        asked = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        asked = [norm_dim(d, len(in_sizes)) for d in asked]
    else:
        asked = list(range(len(in_sizes)))
    removed = [d for d in asked if _same(in_sizes[d], 1)]
    if src.dim in asked and not _never_one(src, in_sizes[src.dim], inputs.world_size):
        return Cannot(f"squeeze names the sharded dim {src.dim} (of size {in_sizes[src.dim]}): a rank's piece of it "
                      f"can be 1, which the op would remove on that rank only")
    return src.with_dim(src.dim - sum(1 for d in removed if d < src.dim))


def _never_one(shard: Shard, size: Any, world_size: int) -> bool:
    """Whether a rank's piece of a dim of ``size`` laid out as ``shard`` is longer than 1 (a
    dynamic size, or a layout whose piece is unknown here, may not be)."""
    if not isinstance(size, int) or shard.period:
        return False
    try:
        return local_size(shard, size, world_size) > 1
    except ValueError:
        return False
