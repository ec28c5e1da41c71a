"""Elementwise ops: the output is the broadcast of the tensor arguments, value by value.

Which ops are elementwise comes from the op itself (:func:`elementwise_family`): an aten op
tagged ``torch.Tag.pointwise`` whose schema is functional, returns one tensor and takes
tensors only as single ``Tensor`` / ``Tensor?`` arguments, and that draws no random numbers.
A short table adds the elementwise ops that carry no tag (casts, copies, composite ops such
as ``rsub.Tensor``). Either way *every* tensor argument the schema names is an operand, so
no argument can be overlooked: an op filed as one-tensor that takes two would read one and
compute wrong. In-place forms (``add_``, ``mul_``, ``copy_``) are found the same way: an op
that writes into ``self`` alone and whose functional form is elementwise. The conformance
test checks both against PyTorch's OpInfo samples.

Broadcasting maths: operands align from the right. If the output is sharded on dim ``d``, each
operand's aligned dim must be absent or of size 1 (it broadcasts: every rank uses the same
values), or sharded the same way. A replicated operand of full size at ``d`` is sliced locally
(Replicate -> Shard needs no communication). A ``Partial`` operand is refused: most
elementwise ops do not distribute over a sum.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx

from autotp.placement import Replicate, Shard
from autotp.rules import (
    ACCEPTS_PADDED,
    ACCEPTS_WHOLE_BLOCKS,
    ACCEPTS_PERIODIC,
    FAMILIES,
    METADATA_ARGS,
    Cannot,
    Inputs,
    Out,
    Redistribute,
    Result,
    Rule,
    finest,
    ndim,
    refinable,
    rule,
    rule_for,
    schema_tensor_args,
    sizes,
)

aten = torch.ops.aten

# Elementwise ops without the pointwise tag. The schema still names their operands.
UNTAGGED = [
    aten.hardswish.default, aten.rsub.Tensor, aten.masked_fill.Tensor, aten.__and__.Tensor,
    aten.__or__.Tensor, aten.floor_divide.default,
    aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default,
    aten.contiguous.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
    aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default, aten.full_like.default,
    aten.copy.default,  # ``src`` broadcast into ``self``'s shape
    aten.expand_as.default,  # ``self`` broadcast into ``other``'s shape
    aten.log_sigmoid.default,
]
# Dropout draws random numbers: elementwise (and the identity) only when not training.
DROPOUT = [aten.dropout.default, aten.feature_dropout.default, aten.native_dropout.default]
_TENSOR_TYPES = ("Tensor", "Optional[Tensor]")


def _operands(node: fx.Node, inputs: Inputs) -> list[tuple[Optional[int], fx.Node]]:
    """``(position in node.args, or None for a keyword, value)`` of every tensor operand."""
    schema = node.target._schema
    ignored = METADATA_ARGS.get(node.target, frozenset())
    found = []
    for i, arg in enumerate(schema.arguments):
        if str(arg.type) not in _TENSOR_TYPES or arg.name in ignored:
            continue
        positional = i < len(node.args) and not arg.kwarg_only
        value = node.args[i] if positional else node.kwargs.get(arg.name)
        if isinstance(value, fx.Node) and isinstance(value.meta.get("val"), torch.Tensor):
            found.append((i if positional else None, value))
    return found


def elementwise_rule(node: fx.Node, inputs: Inputs) -> Result:
    """n-ary elementwise with broadcasting (see the module docstring for the maths)."""
    if torch.Tag.nondeterministic_seeded in node.target.tags and _training(node):
        return Cannot(f"{node.target} draws random numbers (dropout in training mode)")
    val = node.meta["val"]
    out_rank = (val[0] if isinstance(val, (tuple, list)) else val).dim()  # native_dropout: (output, mask)
    operands = _operands(node, inputs)
    aligned = []
    out_sizes = sizes(val[0] if isinstance(val, (tuple, list)) else val)
    for _, arg in operands:
        p = inputs[arg]
        if isinstance(p, Shard):
            aligned.append(p.with_dim(p.dim + out_rank - ndim(arg)))
            if sizes(arg)[p.dim] != out_sizes[aligned[-1].dim]:  # a sharded dim of 1 broadcast wider
                return Cannot(f"operand {arg.name} is {p} on a dim the output broadcasts")
        elif not isinstance(p, Replicate):
            return Cannot(f"operand placement {p} not supported")
    if not aligned:
        return Replicate()
    wanted = finest(aligned)
    if isinstance(wanted, Cannot):
        return wanted
    moves = []
    for i, arg in operands:
        dim = wanted.dim - (out_rank - ndim(arg))
        if dim < 0 or sizes(arg)[dim] == 1 or inputs[arg] == wanted.with_dim(dim):
            continue  # broadcast along the sharded dim (identical on every rank), or already right
        if i is None or not refinable(inputs[arg], wanted.with_dim(dim), sizes(arg)[dim], inputs.world_size):
            return Cannot(f"operand {arg.name} of size {sizes(arg)[dim]} does not split as {wanted}")
        moves.append(Redistribute((i,), wanted.with_dim(dim)))
    if node.target is aten.native_dropout.default:
        return Out((wanted, wanted), tuple(moves))  # (output, mask), both shaped like the input
    return Out(wanted, tuple(moves))


def _training(node: fx.Node) -> bool:
    """Whether a random op draws: dropout only with ``train`` true; an op without it always.
    A probability of 0 still counts: ``native_dropout(x, 0.0, True)`` draws a mask of ones,
    and a rank drawing for its piece would move its generator by less than the model does
    (:func:`autotp.call_checks._may_draw` asks another question, whether the values depend on
    the draw, and lets p = 0 pass)."""
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
    return train is not False


def elementwise_family(op: Any) -> Optional[tuple[Rule, frozenset[str]]]:
    """The elementwise rule for an aten op the tags and schema say is elementwise, else None."""
    if not isinstance(op, torch._ops.OpOverload) or torch.Tag.pointwise not in op.tags:
        return None
    schema = op._schema
    if torch.Tag.nondeterministic_seeded in op.tags or schema.is_mutable:
        return None
    if len(schema.returns) != 1 or str(schema.returns[0].type) != "Tensor":
        return None
    if any(str(a.type) not in _TENSOR_TYPES for a in schema.arguments if "Tensor" in str(a.type)):
        return None
    return elementwise_rule, frozenset(schema_tensor_args(op))


def inplace_rule(functional: Rule) -> Rule:
    """The rule of an op that writes into ``self`` (``add_``, ``copy_``, ``index_copy_``): its
    functional form's, but ``self`` must already be laid out as the result. Slicing it locally
    would write into a view of the whole value, which later readers of ``self`` would see;
    unless this op is its only reader and ``self`` is a fresh tensor (a buffer made to be
    filled, as a static KV cache is; not a view of another value): then nothing else sees the
    write, and the planner makes the buffer at its piece's size. A graph input or parameter is
    answered too, and propagation turns that into a request to lay it out as the write needs
    (it lives on after the call). A rank-aware replacement (a local op) is functional, so it is
    refused."""

    def in_place(node: fx.Node, inputs: Inputs) -> Result:
        answer = functional(node, inputs)
        if isinstance(answer, Cannot):
            return answer
        answer = answer if isinstance(answer, Out) else Out(answer)
        target = node.args[0]
        held = inputs[target]
        sliced = any(move.path == (0,) for move in answer.redistribute)
        private = (isinstance(target, fx.Node) and all(u is node or _reads_metadata(u) for u in target.users)
                   and (target.op in ("placeholder", "get_attr") or _fresh(target)))
        allowed = private if sliced else answer.placement == held
        if answer.local_op or not allowed:
            return Cannot(f"{node.target} writes into a {held} value the result would need {answer.placement}")
        return answer

    in_place.__name__ = in_place.__qualname__ = f"inplace_{functional.__name__}"
    return in_place


def _fresh(node: fx.Node) -> bool:
    """Whether ``node`` makes a new tensor (not a view or an in-place result of another)."""
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and all(r.alias_info is None for r in schema.returns)


def _reads_metadata(user: fx.Node) -> bool:
    """A user that reads a value's shape or dtype only (export's input guards, size reads):
    it does not see what an in-place op writes."""
    if user.op == "call_module":
        return user.target == "_guards_fn"
    return user.target in (aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
                           aten._assert_tensor_metadata.default)


def inplace_family(op: Any) -> Optional[tuple[Rule, frozenset[str]]]:
    """The in-place rule for an aten op that writes into ``self`` alone and whose functional
    form (the name without its trailing ``_``, the same overload) has a rule."""
    if not isinstance(op, torch._ops.OpOverload):
        return None
    schema = op._schema
    writes = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    name = schema.name.split("::")[-1]
    if writes != ["self"] or schema.arguments[0].name != "self" or len(schema.returns) != 1 or not name.endswith("_"):
        return None
    functional = getattr(getattr(aten, name[:-1], None), op._overloadname, None)
    found = rule_for(functional) if functional is not None else None
    if found is None:
        return None
    return inplace_rule(found[0]), frozenset(schema_tensor_args(op))


# Elementwise ops never mix positions: a padded shard's padding stays where it is, a strided
# shard's blocks stay apart, blocks held whole stay whole (operands must match: see finest).
ACCEPTS_PADDED.add(elementwise_rule)
ACCEPTS_PERIODIC.add(elementwise_rule)
ACCEPTS_WHOLE_BLOCKS.add(elementwise_rule)
FAMILIES.append(elementwise_family)
FAMILIES.append(inplace_family)
for _op in UNTAGGED + DROPOUT:
    rule(_op, reads=schema_tensor_args(_op))(elementwise_rule)
# ``type_as`` casts ``self`` to ``other``'s dtype: ``other``'s values and layout do not matter.
rule(aten.type_as.default, reads=("self",), metadata=("other",))(elementwise_rule)
