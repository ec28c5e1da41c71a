"""Matmul family, driven by einsum-like specs (as PyTorch's ``_matrix_ops.py``).

Each op is described by the labels of its operands' dims and of its output, e.g. ``mm`` is
``mk,kn->mn`` and ``linear`` is ``...k,nk->...n``. If a label is sharded on some operand:

- every other operand that has the label must be sharded the same way; a replicated one is
  sliced locally (for a weight, the planner turns that slice into a sharded parameter);
- if the output has the label, the output is sharded there (column-parallel: ``n``; or a
  batch/head dim flowing through);
- if the label is contracted (``k``), every rank holds a partial sum: the output is
  ``Partial()`` (row-parallel), and the propagator inserts the all-reduce. A bias must then be
  added once, after the reduction, so the rule reports where it sits.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.fx as fx

from autotp.placement import Partial, Placement, Replicate, Shard
from autotp.rules import (Cannot, Inputs, Out, Redistribute, Result, finest, ndim, refinable, rule,
                          schema_tensor_args, sizes)

aten = torch.ops.aten

Spec = list[str]


def _batch(count: int) -> Spec:
    return [f"b{i}" for i in range(count)]


def _linear_specs(node: fx.Node) -> tuple[list[Spec], Spec]:
    lead = _batch(ndim(node.args[0]) - 1)
    return [lead + ["k"], ["n", "k"]], lead + ["n"]


def _matmul_specs(node: fx.Node) -> tuple[list[Spec], Spec]:
    a, b = ndim(node.args[0]), ndim(node.args[1])
    if a < 2 or b < 2:
        raise ValueError("matmul with a 1-D operand")
    out = ndim(node)
    batch = _batch(out - 2)
    return [batch[out - a:] + ["m", "k"], batch[out - b:] + ["k", "n"]], batch + ["m", "n"]


def _grouped_specs(node: fx.Node) -> tuple[list[Spec], Spec]:
    """Mixture-of-experts grouped matmul: row t of x meets the weight of the expert it is
    routed to (``e`` selects, it does not sum), ``(t, k) x (e, k, n) -> (t, n)``. A per-expert
    bias would be added by routing, which a row-parallel rewrite cannot move: not handled."""
    bias = node.args[3] if len(node.args) > 3 else node.kwargs.get("bias")
    if bias is not None:
        raise ValueError("grouped matmul with a bias")
    return [["t", "k"], ["e", "k", "n"]], ["t", "n"]


# op -> (positions of the matmul operands in node.args, spec builder, position of the bias).
# Custom ops are keyed by name: they exist only once their library (transformers) is loaded.
MATMUL_SPECS = {
    aten.mm.default: ((0, 1), lambda n: ([["m", "k"], ["k", "n"]], ["m", "n"]), None),
    aten.addmm.default: ((1, 2), lambda n: ([["m", "k"], ["k", "n"]], ["m", "n"]), 0),
    aten.bmm.default: ((0, 1), lambda n: ([["b", "m", "k"], ["b", "k", "n"]], ["b", "m", "n"]), None),
    aten.baddbmm.default: ((1, 2), lambda n: ([["b", "m", "k"], ["b", "k", "n"]], ["b", "m", "n"]), 0),
    aten.linear.default: ((0, 1), _linear_specs, 2),
    aten.matmul.default: ((0, 1), _matmul_specs, None),
    aten._grouped_mm.default: ((0, 1), _grouped_specs, None),
    "transformers.grouped_mm_fallback.default": ((0, 1), _grouped_specs, None),
}


def matmul_spec(target: object):
    """The spec of a matmul op (by op, or by name for custom ops), or None."""
    return MATMUL_SPECS.get(target) or MATMUL_SPECS.get(str(target))


def _sharded_label(node: fx.Node, operands, specs, out_spec: Spec, inputs: Inputs):
    """The label every sharded operand shards, and their common layout (at dim 0, with the
    fewest replicas among them: :func:`~autotp.rules.finest`). A padded label, or one with
    blocks held whole, must stay in the output: summing over it would add its padding in, or
    count the whole blocks on every rank."""
    labels, shards = set(), []
    for arg, spec in zip(operands, specs):
        p = inputs[arg]
        if isinstance(p, Shard):
            labels.add(spec[p.dim])
            shards.append(p.with_dim(0))
        elif not isinstance(p, Replicate):
            return Cannot(f"matmul operand placement {p} not supported")
    if not shards:
        return None, None
    layout = finest(shards)
    if len(labels) > 1 or isinstance(layout, Cannot):
        return Cannot("matmul operands sharded on different dims")
    label = labels.pop()
    if layout.padded and label not in out_spec:
        return Cannot(f"a sum over a padded dim ({label!r}) would add its padding in")
    if layout.whole and label not in out_spec:
        return Cannot(f"a sum over a dim with blocks held whole ({label!r}) would count them on every rank")
    if layout.period and label not in out_spec:
        return Cannot(f"a sum over a strided dim ({label!r})")
    return label, layout


def _bias_moves(node: fx.Node, bias_at: Optional[int], out: Placement, inputs: Inputs):
    """A bias broadcasts into the output: it must be laid out like the output's sharded dim.
    Under a Partial output it is added once, whole, after the all-reduce."""
    if bias_at is None or len(node.args) <= bias_at or not isinstance(node.args[bias_at], fx.Node):
        return ()
    bias = node.args[bias_at]
    held = inputs[bias]
    dim = out.dim - (ndim(node) - ndim(bias)) if isinstance(out, Shard) else -1
    if dim < 0 or sizes(bias)[dim] == 1:
        return () if isinstance(held, Replicate) else Cannot(f"bias is {held} but the matmul output is {out} there")
    want = out.with_dim(dim)
    if held == want:
        return ()
    if not refinable(held, want, sizes(bias)[dim], inputs.world_size):
        return Cannot(f"bias is {held}, the output needs it {want}")
    return (Redistribute((bias_at,), want),)


def _operand_moves(paths: list[tuple[int, ...]], operands: list[fx.Node], specs: list[Spec], label: str,
                   layout: Shard, inputs: Inputs, what: str) -> Union[list[Redistribute], Cannot]:
    """The local slices that lay every operand holding ``label`` out as ``layout`` on that dim
    (``paths``: where each operand sits in the node's arguments); a broadcast dim of 1 stays."""
    moves = []
    for path, arg, spec in zip(paths, operands, specs):
        if label not in spec:
            continue
        want = layout.with_dim(spec.index(label))
        size = sizes(arg)[want.dim]
        if inputs[arg] == want or (isinstance(size, int) and size == 1):
            continue  # already right, or a broadcast batch dim
        if not refinable(inputs[arg], want, size, inputs.world_size):
            return Cannot(f"{what} operand dim of {size} does not split as {want} over {inputs.world_size} ranks")
        moves.append(Redistribute(path, want))
    return moves


def matmul_rule(node: fx.Node, inputs: Inputs) -> Result:
    positions, build, bias_at = matmul_spec(node.target)
    specs, out_spec = build(node)
    operands = [node.args[i] for i in positions]
    others = [v for v in _routing_inputs(node, positions, bias_at) if not isinstance(inputs[v], Replicate)]
    if others:  # grouped matmuls' routing offsets: which rows meet which expert, on every rank
        return Cannot(f"matmul argument {others[0].name} is {inputs[others[0]]}")
    bias = inputs[node.args[bias_at]] if bias_at is not None and len(node.args) > bias_at else Replicate()
    if not isinstance(bias, (Shard, Replicate)):
        return Cannot(f"matmul bias placement {bias} not supported")
    if isinstance(bias, Shard) and all(isinstance(inputs[a], Replicate) for a in operands):
        return Cannot("sharded bias on a replicated matmul")
    found = _sharded_label(node, operands, specs, out_spec, inputs)
    if isinstance(found, Cannot):
        return found
    label, layout = found
    if label is None:
        return Cannot("matmul reached with no operand sharded")
    if label not in out_spec and sum(label in spec for spec in specs) < 2:
        return Cannot(f"matmul dim {label!r} selects rather than sums (an expert index): not sharded")
    if label not in out_spec:
        layout = Shard(0, layout.blocks)  # partial sums of a chunk held twice would count twice: split it fully
    if build is _grouped_specs:
        refused = _grouped_refusal(node, label, operands, specs, layout, inputs.world_size)
        if refused:
            return refused
    moves = _operand_moves([(pos,) for pos in positions], operands, specs, label, layout, inputs, "matmul")
    if isinstance(moves, Cannot):
        return moves
    out = layout.with_dim(out_spec.index(label)) if label in out_spec else Partial()
    bias_moves = _bias_moves(node, bias_at, out, inputs)
    if isinstance(bias_moves, Cannot):
        return bias_moves
    if isinstance(out, Shard):
        return Out(out, tuple(moves) + bias_moves)
    has_bias = bias_at is not None and len(node.args) > bias_at and isinstance(node.args[bias_at], fx.Node)
    return Out(out, tuple(moves), bias_path=(bias_at,) if has_bias else None)


def _grouped_refusal(node: fx.Node, label: str, operands: list[fx.Node], specs: list[Spec], layout: Shard,
                     world: int) -> Optional[Cannot]:
    """A grouped matmul's rows are routed to experts by the offsets (row t meets the expert whose
    range holds t), so they cannot be split; and aten's kernel needs each operand's rows to
    start on 16-byte boundaries, which a split of the last dim may break."""
    if label == "t":
        return Cannot("the rows of a grouped matmul are routed to experts by offsets: not sharded")
    if layout.padded or layout.whole or layout.period:
        return Cannot(f"a grouped matmul over {layout}")
    if node.target is not aten._grouped_mm.default:
        return None
    for arg, spec in zip(operands, specs):
        if spec[-1] == label:
            local = sizes(arg)[-1] // layout.chunks(world)
            if local * arg.meta["val"].element_size() % 16:
                return Cannot(f"grouped matmul rows of {local} elements would not be 16-byte aligned")
    return None


def _routing_inputs(node: fx.Node, positions: tuple[int, ...], bias_at: Optional[int]) -> list[fx.Node]:
    """The tensor arguments of a matmul node other than its operands and bias."""
    skip = set(positions) | {bias_at}
    found = []
    for i, arg in enumerate(node.target._schema.arguments):
        if i in skip or "Tensor" not in str(arg.type):
            continue
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if isinstance(value, fx.Node):
            found.append(value)
    return found


# Every tensor argument of these ops is an operand, the bias or a routing input checked above.
for _op in MATMUL_SPECS:
    rule(_op, reads=("input", "weight", "offs") if isinstance(_op, str) else schema_tensor_args(_op),
         padded=True, whole_blocks=True, periodic=True)(matmul_rule)


def einsum_specs(node: fx.Node) -> tuple[list[Spec], Spec]:
    """The labels of ``einsum``'s operands and output, ``...`` spelled out as batch labels aligned
    from the right. Implicit outputs (no ``->``) and a label repeated within one operand (a
    diagonal) are not handled."""
    equation = node.args[0].replace(" ", "")
    if "->" not in equation:
        raise ValueError("einsum without an explicit output")
    ins, out = equation.split("->")
    operands = node.args[1]
    terms = ins.split(",")
    if len(terms) != len(operands):
        raise ValueError("einsum equation and operands differ in number")
    broadcast = max((ndim(t) - len(term.replace("...", "")) for t, term in zip(operands, terms) if "..." in term),
                    default=0)

    def spell(term: str, rank: int) -> Spec:
        if "..." not in term:
            return list(term)
        before, after = term.split("...")
        return list(before) + _batch(broadcast)[broadcast - (rank - len(before) - len(after)):] + list(after)

    specs = [spell(term, ndim(t)) for term, t in zip(terms, operands)]
    if any(len(set(spec)) != len(spec) or len(spec) != ndim(t) for spec, t in zip(specs, operands)):
        raise ValueError("einsum with a diagonal or a rank that does not match its term")
    return specs, spell(out, len(out.replace("...", "")) + broadcast)


@rule(aten.einsum.default, reads=("tensors",), padded=True)
def einsum_rule(node: fx.Node, inputs: Inputs) -> Result:
    """Labels work as in a matmul: a sharded label kept in the output shards it there; one summed
    away makes every rank's result a partial sum (all-reduced after the node)."""
    specs, out_spec = einsum_specs(node)
    operands = list(node.args[1])
    found = _sharded_label(node, operands, specs, out_spec, inputs)
    if isinstance(found, Cannot):
        return found
    label, layout = found
    if label is None:
        return Replicate()
    if label not in out_spec:
        layout = Shard(0, layout.blocks)  # partial sums of a chunk held twice would be counted twice
    moves = _operand_moves([(1, i) for i in range(len(operands))], operands, specs, label, layout, inputs, "einsum")
    if isinstance(moves, Cannot):
        return moves
    out = layout.with_dim(out_spec.index(label)) if label in out_spec else Partial()
    return Out(out, tuple(moves))
