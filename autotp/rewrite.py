"""Rewrite: carry out a :class:`~autotp.plan.Plan` on a captured graph for one rank.

Consumes the graph module from :func:`autotp.capture.capture` and the plan made for it;
produces the same graph module, edited so that it computes this rank's part:

1. literal sizes in node arguments become per-rank sizes (``ArgEdit``);
2. replicated inputs that a node needs sharded are sliced locally (``local_chunk`` nodes);
3. ops whose sharded form differs from the op on local tensors get a rank-aware
   implementation (``autotp.local_ops``: a vocabulary-parallel lookup);
4. after each row-parallel matmul (and each Partial lookup) an all-reduce is inserted; a
   matmul's bias, if any, is taken out of it and added once after the reduction
   (``addmm -> mm``, ``linear(x, W, b) -> linear(x, W) + b``);
5. sharded model outputs are all-gathered before they are returned;
6. what only export needed (assertions, no-op casts) is removed (:mod:`autotp.cleanup`);
7. an op that returns a view or a copy as its input's strides allow, where the graph writes in
   place, returns on this rank what it returned in the capture (:mod:`autotp.aliasing`).

Parameters are not touched here: their data is this rank's business and belongs to
:mod:`autotp.loading`. The graph stays a plain fx graph (lint + recompile), so the result has
the original call signature and output type.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from autotp.aliasing import captured_aliasing, keep_captured_aliasing
from autotp.cleanup import cleanup
from autotp.collectives import ALL_GATHER, ALL_REDUCE, AllGather, AllReduce, Communicator
from autotp.errors import AutotpError
from autotp.local_ops import LOCAL_OPS, LOOKUPS
from autotp.placement import Shard, refine, valid_length
from autotp.plan import Plan
from autotp.propagate import arg_at

__all__ = ["rewrite", "RewriteError"]

aten = torch.ops.aten

# A row-parallel matmul with a bias becomes the bias-free op: the bias is added after the
# all-reduce, once, instead of on every rank.
_WITHOUT_BIAS = {aten.addmm.default: aten.mm.default, aten.baddbmm.default: aten.bmm.default}


class RewriteError(AutotpError):
    """The plan does not match the graph (captured from another model or input structure)."""


def _replace_at(args: Any, path: list[int], value: Any) -> Any:
    head, rest = path[0], path[1:]
    items = list(args)
    items[head] = _replace_at(items[head], rest, value) if rest else value
    return tuple(items) if isinstance(args, tuple) else items


def shard_locally(x: torch.Tensor, dim: int, blocks: Any, replicas: int, held_replicas: int, rank: int,
                  padded: bool = False, whole: tuple[int, ...] = (), period: int = 0) -> torch.Tensor:
    """Replicate (or a coarser shard) -> Shard without communication: keep this rank's piece
    (a graph call target)."""
    return refine(x, Shard(dim, blocks, replicas, padded, whole, period), held_replicas, rank)


def real_part(x: torch.Tensor, dim: int, size: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's piece of a padded shard without its padding (a graph call target): what a
    sharded model output returns."""
    return x.narrow(dim, 0, valid_length(Shard(dim, padded=True), size, rank, world_size))


def _nodes(gm: fx.GraphModule, plan: Plan) -> dict[str, fx.Node]:
    by_name = {n.name: n for n in gm.graph.nodes}
    wanted = {e.node for e in plan.edits} | {s.node for s in plan.slices} | {c.node for c in plan.collectives}
    missing = sorted(wanted - by_name.keys())
    if missing:
        raise RewriteError(f"plan names nodes the graph does not have: {missing[:5]}")
    return by_name


def _apply_edits(by_name: dict[str, fx.Node], plan: Plan) -> None:
    for edit in plan.edits:
        node = by_name[edit.node]
        found = arg_at(node, tuple(edit.path))
        if (found.name if isinstance(found, fx.Node) else found) != edit.old:
            raise RewriteError(f"{node.format_node()}: expected {edit.old} at {edit.path}, found {found}")
        new: Any = edit.new
        if isinstance(found, fx.Node):  # a size computed in the graph (batch * heads): divided as it runs
            with node.graph.inserting_before(node):
                new = node.graph.call_function(operator.floordiv, (found, edit.new))
        if isinstance(edit.path[0], str):  # a keyword argument (repeat_interleave's output_size)
            key, rest = edit.path[0], edit.path[1:]
            node.kwargs = {**node.kwargs, key: _replace_at(node.kwargs[key], rest, new) if rest else new}
        else:
            node.args = _replace_at(node.args, edit.path, new)


def _apply_slices(gm: fx.GraphModule, by_name: dict[str, fx.Node], plan: Plan, rank: int) -> None:
    for item in plan.slices:
        node = by_name[item.node]
        source = arg_at(node, tuple(item.path))
        with gm.graph.inserting_before(node):
            shard = item.placement
            held = item.held_replicas or plan.tp_size
            args = (source, shard.dim, shard.blocks, shard.replicas, held, rank)
            args += (shard.padded, shard.whole, shard.period) if shard.padded or shard.whole or shard.period else ()
            piece = gm.graph.call_function(shard_locally, args)
        node.args = _replace_at(node.args, item.path, piece)


def _drop_input_guards(gm: fx.GraphModule) -> None:
    """Export guards the captured (global) input shapes; a graph fed this rank's part of an
    input must not check them. The runtime builds those inputs itself."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.validate_inputs = False


def _apply_local_ops(by_name: dict[str, fx.Node], plan: Plan, rank: int) -> None:
    for item in plan.local_ops:
        node = by_name[item.node]
        node.target = LOCAL_OPS[item.op]
        # a lookup checks its ids against the whole table (no rank owns an id outside it)
        whole = {"whole_rows": _whole_rows(node.args[0])} if item.op in LOOKUPS else {}
        node.kwargs = {**node.kwargs, **whole, "rank": rank, "world_size": plan.tp_size}


def _whole_rows(table: Any) -> Optional[int]:
    """The rows of the whole table a lookup reads (its captured size), if known and static."""
    value = table.meta.get("val") if isinstance(table, fx.Node) else None
    rows = value.shape[0] if isinstance(value, torch.Tensor) and value.dim() > 0 else None
    return rows if isinstance(rows, int) else None


def _apply_all_gathers(gm: fx.GraphModule, by_name: dict[str, fx.Node], plan: Plan) -> None:
    for coll in plan.collectives:
        if coll.kind != "all_gather":
            continue
        node = by_name[coll.node]
        with gm.graph.inserting_before(node):
            args = (arg_at(node, tuple(coll.path)), coll.dim, coll.replicas) + ((coll.size,) if coll.size else ())
            whole = gm.graph.call_module(ALL_GATHER, args)
        node.args = _replace_at(node.args, coll.path, whole)


def _cut_padding(gm: fx.GraphModule, by_name: dict[str, fx.Node], plan: Plan, rank: int) -> None:
    """A padded model output left sharded: each rank returns its real elements only."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    for item in plan.sharded_outputs:
        if item.placement.padded:
            with gm.graph.inserting_before(output):
                real = gm.graph.call_function(real_part, (arg_at(output, tuple(item.path)), item.placement.dim,
                                                          item.size, rank, plan.tp_size))
            output.args = _replace_at(output.args, item.path, real)


def _take_bias(node: fx.Node, path: list[int]) -> tuple[Any, Any, Any]:
    """Remove the bias from a row-parallel matmul node: ``(bias, beta, alpha)``, where the
    node computed ``beta * bias + alpha * (x @ W)`` (``addmm``'s scalars; 1 for ``linear``)."""
    bias = arg_at(node, tuple(path))
    if node.target in _WITHOUT_BIAS:  # addmm(b, x, W, beta=, alpha=) -> mm(x, W)
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        node.target = _WITHOUT_BIAS[node.target]
        node.args, node.kwargs = node.args[1:3], {}
        return bias, beta, alpha
    node.args = _replace_at(node.args, path, None)  # linear(x, W, b): drop the trailing bias
    return bias, 1, 1


def _add_after(graph: fx.Graph, reduced: fx.Node, bias: Any, beta: Any, alpha: Any) -> fx.Node:
    """``beta * bias + alpha * reduced`` after the all-reduce (``beta == 0`` ignores the bias,
    NaNs included, as addmm does)."""
    with graph.inserting_after(reduced):
        last = reduced if alpha == 1 else graph.call_function(aten.mul.Tensor, (reduced, alpha))
    if bias is None or beta == 0:
        return last
    with graph.inserting_after(last):
        scaled = bias if beta == 1 else graph.call_function(aten.mul.Tensor, (bias, beta))
    with graph.inserting_after(scaled if scaled is not bias else last):
        # in the reduced sum's dtype, as the matmul added it: under autocast the matmul ran in
        # bfloat16 and took its bias in bfloat16 too, where a plain add would promote to the bias's float32
        cast = graph.call_function(aten.type_as.default, (scaled, last))
    with graph.inserting_after(cast):
        return graph.call_function(aten.add.Tensor, (last, cast))


def _apply_all_reduces(gm: fx.GraphModule, by_name: dict[str, fx.Node], plan: Plan) -> None:
    graph = gm.graph
    for coll in plan.collectives:
        if coll.kind != "all_reduce":
            continue
        node = by_name[coll.node]
        bias, beta, alpha = _take_bias(node, coll.bias_path) if coll.bias_path else (None, 1, 1)
        users = list(node.users)
        with graph.inserting_after(node):
            reduced = graph.call_module(ALL_REDUCE, (node,))
        last = _add_after(graph, reduced, bias, beta, alpha)
        for user in users:
            user.replace_input_with(node, last)


def rewrite(
    gm: fx.GraphModule,
    plan: Plan,
    rank: int,
    *,
    comm: Optional[Communicator] = None,
) -> fx.GraphModule:
    """Edit ``gm`` in place so that it computes rank ``rank``'s part of ``plan``.

    Args:
        gm: the graph module the plan was made for (same model, same input structure).
        plan: a plan for ``plan.tp_size`` ranks.
        rank: this rank, in ``[0, plan.tp_size)``.
        comm: how the inserted collectives communicate (default: the whole world over the
            process group).

    Returns:
        ``gm``, rewritten and recompiled.

    Raises:
        RewriteError: the plan names nodes or literals that are not in ``gm``.
    """
    if not 0 <= rank < plan.tp_size:
        raise ValueError(f"rank {rank} is outside tp_size {plan.tp_size}")
    by_name = _nodes(gm, plan)
    aliasing = captured_aliasing(gm.graph)  # read from the capture's values, before any edit
    _apply_edits(by_name, plan)
    _apply_slices(gm, by_name, plan, rank)
    _apply_local_ops(by_name, plan, rank)
    if plan.sharded_inputs:
        _drop_input_guards(gm)
    comm = comm or Communicator(None, plan.tp_size)
    gm.add_module(ALL_REDUCE, AllReduce(comm))
    gm.add_module(ALL_GATHER, AllGather(comm))
    _apply_all_reduces(gm, by_name, plan)
    _apply_all_gathers(gm, by_name, plan)
    _cut_padding(gm, by_name, plan, rank)
    cleanup(gm)
    keep_captured_aliasing(gm, aliasing)
    return gm
