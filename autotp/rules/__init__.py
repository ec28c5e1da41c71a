"""Propagation rules: one small pure function per aten op family, registered in one table.

A rule answers one question for one node: *given the placements of my inputs, what is the
placement of my output, and what must change for that to be true?* It returns

- a :class:`~autotp.placement.Placement` (or a tuple of them for ops with several outputs), or
- an :class:`Out`, which adds what the rewrite must do at this node: slice a replicated input
  locally (:class:`Redistribute`, no communication), or replace a literal size in the node's
  arguments by its per-rank value (:class:`ArgEdit`), or
- :class:`Cannot` with a reason: this op cannot keep its input sharded. The planner then shards
  less (the region is replicated), so an unknown op never produces wrong numbers.

Rules read shapes from ``node.meta["val"]`` (fake tensors, possibly with symbolic batch and
sequence sizes), know the world size (for divisibility) but never the rank, never edit the
graph and never communicate. Start reading at :func:`rule` and :data:`RULES`; the families live
in ``pointwise.py``, ``view.py``, ``pieces.py``, ``reinterpret.py``, ``matmul.py``, ``conv.py``,
``attention.py``, ``reduction.py`` and ``misc.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.fx as fx

from autotp.placement import Placement, Replicate, Shard

if TYPE_CHECKING:  # sympy takes 0.23 s to import, and a run from the graph cache never plans
    import sympy

__all__ = [
    "finest",
    "refinable",
    "RULES",
    "rule",
    "rule_for",
    "READS",
    "METADATA_ARGS",
    "FAMILIES",
    "tensor_arguments",
    "schema_tensor_args",
    "Cannot",
    "Out",
    "Redistribute",
    "ArgEdit",
    "Inputs",
    "Result",
    "sizes",
    "ndim",
    "norm_dim",
    "apply_rule",
]


@dataclass(frozen=True)
class Cannot:
    """The op cannot keep its input sharded; ``reason`` is shown in the plan.

    ``blocks`` is a hint: the global part sizes along the input's sharded dim with which the op
    *would* work (a ``split`` of a fused ``q|k|v`` output). The planner retries the seed laid
    out that way. ``alternative``: the hint is another reading of the op (a view's leading 3
    as fused blocks rather than heads), not a refinement of this one; if it fails too, this
    reason is the one the plan gives.
    """

    reason: str
    blocks: Optional[tuple[int, ...]] = None
    replicas: Optional[int] = None  # a hint: the op would work with the dim shared by this many ranks
    alternative: bool = False


@dataclass(frozen=True)
class Redistribute:
    """The input at ``node.args[path...]`` becomes ``to`` by a local slice, no communication:
    from ``Replicate()``, or from a coarser shard of the same dim (more replicas)."""

    path: tuple[int, ...]
    to: Shard


@dataclass(frozen=True)
class ArgEdit:
    """Replace the literal at ``node.args[path...]`` (a global size) by its per-rank value (a
    path that starts with a name starts in ``node.kwargs``). A symbolic size there (another
    node: ``batch * heads`` at a strided shard's dim) is named by that node's name, and ``new``
    is what the rewrite divides it by when the graph runs."""

    path: tuple[Union[int, str], ...]
    old: Union[int, str]
    new: int


@dataclass(frozen=True)
class Out:
    placement: Union[Placement, tuple[Placement, ...]]
    redistribute: tuple[Redistribute, ...] = ()
    edits: tuple[ArgEdit, ...] = ()
    # For a matmul whose output is Partial: where its bias sits, so the rewrite adds it once,
    # after the all-reduce, instead of once per rank.
    bias_path: tuple[int, ...] | None = None
    # The op needs a rank-aware implementation (a name in autotp.local_ops.LOCAL_OPS), e.g. a
    # lookup in a vocabulary-sharded table that masks the ids other ranks own.
    local_op: str | None = None
    # The Partial is a reduction's (a sum or mean over the sharded dim: a statistic), not a
    # matmul's contraction. Exact either way; the planner takes regions that need one only after
    # those that need none (autotp.planner), as they can keep a residual stream sharded.
    statistic: bool = False


Result = Union[Placement, tuple[Placement, ...], Out, Cannot]


@dataclass
class Inputs:
    """Placements of a node's inputs; anything not recorded (constants, untouched nodes) is Replicate."""

    placements: Mapping[fx.Node, Any]
    world_size: int
    _default: Placement = field(default_factory=Replicate)

    def __getitem__(self, arg: Any) -> Placement:
        if isinstance(arg, fx.Node):
            return self.placements.get(arg, self._default)
        return self._default


Rule = Callable[[fx.Node, Inputs], Result]
RULES: dict[Any, Rule] = {}
# The tensor arguments (schema names) each rule reads. Every other tensor argument of the op
# must be one it reads for its metadata only (METADATA_ARGS), or the rule refuses the node:
# a rule that never looks at an argument cannot know how that argument's layout must change.
READS: dict[Any, frozenset[str]] = {}
# Tensor arguments an op reads only for their dtype, device or shape: their layout is free.
METADATA_ARGS: dict[Any, frozenset[str]] = {}
# Families found from the op itself (its schema and tags) rather than from a list: each is a
# function from an op to its rule and the arguments it reads, or None (see pointwise.py).
FAMILIES: list[Callable[[Any], Optional[tuple[Rule, frozenset[str]]]]] = []
# The rules that keep a padded shard's padding apart from its real elements, and those that
# handle a fused dim with blocks held whole (see autotp.placement): every other rule is refused
# such an input before it runs, so a rule written for plain shards never sees one.
ACCEPTS_PADDED: set[Rule] = set()
ACCEPTS_WHOLE_BLOCKS: set[Rule] = set()
ACCEPTS_PERIODIC: set[Rule] = set()
# Shard field marking such a layout, the rules that take it, and why the others may not.
_RESTRICTED_LAYOUTS = (
    ("padded", ACCEPTS_PADDED, "it would read the padding of a dim that does not split evenly"),
    ("whole", ACCEPTS_WHOLE_BLOCKS, "a fused dim with blocks held whole: only a matmul or the split into its "
                                    "blocks takes one"),
    ("period", ACCEPTS_PERIODIC, "a strided shard (a sharded dim merged with the dims before it): only ops that "
                                 "keep its blocks apart take one"),
)


def rule(*ops: Any, reads: Iterable[str], metadata: Iterable[str] = (), padded: bool = False,
         whole_blocks: bool = False, periodic: bool = False) -> Callable[[Rule], Rule]:
    """Register ``fn`` as the propagation rule of every op in ``ops``. ``reads``: the names of
    the tensor arguments the rule looks at; ``metadata``: those the op reads only the dtype,
    device or shape of. ``tests/test_conformance.py`` checks that, between them, they name
    every tensor argument of every registered op's schema. ``padded``: the rule handles padded
    shards (:data:`ACCEPTS_PADDED`); ``whole_blocks``: shards with blocks held whole
    (:data:`ACCEPTS_WHOLE_BLOCKS`); ``periodic``: strided shards (:data:`ACCEPTS_PERIODIC`)."""

    def register(fn: Rule) -> Rule:
        for wanted, accepting in ((padded, ACCEPTS_PADDED), (whole_blocks, ACCEPTS_WHOLE_BLOCKS),
                                  (periodic, ACCEPTS_PERIODIC)):
            if wanted:
                accepting.add(fn)
        for op in ops:
            RULES[op] = fn
            READS[op] = frozenset(reads)
            if metadata:
                METADATA_ARGS[op] = frozenset(metadata)
        return fn

    return register


_DERIVED: dict[Any, Optional[tuple[Rule, frozenset[str]]]] = {}


def rule_for(target: Any) -> Optional[tuple[Rule, frozenset[str]]]:
    """The rule of an op and the tensor arguments it reads: registered by op (or by name, for
    custom ops that exist only once their library is loaded), else derived from the op."""
    for key in (target, str(target)):
        if key in RULES:
            return RULES[key], READS[key]
    if target not in _DERIVED:
        _DERIVED[target] = next((found for family in FAMILIES if (found := family(target)) is not None), None)
    return _DERIVED[target]


def tensor_arguments(node: fx.Node) -> list[tuple[str, Any]]:
    """``(schema name, value)`` of every argument of ``node`` that its op's schema types as a
    tensor (``Tensor``, ``Tensor?``, ``Tensor[]``), given positionally or by keyword."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return []
    found = []
    for i, arg in enumerate(schema.arguments):
        if "Tensor" not in str(arg.type):
            continue
        if i < len(node.args) and not arg.kwarg_only:
            found.append((arg.name, node.args[i]))
        elif arg.name in node.kwargs:
            found.append((arg.name, node.kwargs[arg.name]))
    return found


def schema_tensor_args(op: Any) -> list[str]:
    """The names of the arguments ``op``'s schema types as tensors (or lists of them)."""
    return [a.name for a in op._schema.arguments if "Tensor" in str(a.type)]


def _unread_argument(node: fx.Node, reads: frozenset[str]) -> Optional[str]:
    """The first tensor argument given to ``node`` that its rule neither reads nor may ignore."""
    ignored = METADATA_ARGS.get(node.target, frozenset())
    for name, value in tensor_arguments(node):
        if name not in reads and name not in ignored and value is not None and value != []:
            return name
    return None


def apply_rule(node: fx.Node, inputs: Inputs) -> Out | Cannot:
    """Run the node's rule and normalise the answer to ``Out`` or ``Cannot``."""
    found = rule_for(node.target)
    if found is None:
        return Cannot(f"no propagation rule for {_op_name(node)}")
    fn, reads = found
    unread = _unread_argument(node, reads)
    if unread is not None:
        return Cannot(f"the rule for {_op_name(node)} does not read its argument {unread!r}")
    for field_name, accepting, why in _RESTRICTED_LAYOUTS:
        held = next((a for a in node.all_input_nodes if getattr(inputs[a], field_name, None)), None)
        if held is not None and fn not in accepting:
            return Cannot(f"{_op_name(node)} of {held.name} ({inputs[held]}): {why}")
    try:
        result = fn(node, inputs)
    except (IndexError, KeyError, TypeError, ValueError) as exc:  # malformed args: shard less
        return Cannot(f"rule for {_op_name(node)} failed: {exc}")
    except _data_dependent_guard():  # a size only the data decides (tokens routed to an expert)
        return Cannot(f"{_op_name(node)}: a size that depends on the data")
    if isinstance(result, (Out, Cannot)):
        return result
    return Out(result)


def _data_dependent_guard() -> type[Exception]:
    """torch's exception for a guard on a data-dependent size. Looked up only when a rule has
    raised: its module imports sympy, which a run from the graph cache never needs."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    return GuardOnDataDependentSymNode


def finest(shards: list[Shard]) -> Union[Shard, Cannot]:
    """The common layout of shards of one dim that may differ only in ``replicas``: the one
    with the fewest (the others are refined to it locally)."""
    base = {(s.dim, s.blocks, s.padded, s.whole, s.period) for s in shards}
    if len(base) != 1:
        return Cannot(f"operands sharded differently ({', '.join(sorted(map(str, set(shards))))})")
    return min(shards, key=lambda s: s.replicas)


def refinable(held: Any, to: Shard, size: Any, world_size: int) -> bool:
    """Whether a local slice turns ``held`` (Replicate or a shard) into ``to``: the dim must
    split into ``to``'s pieces (a shard of 2 kv heads held by pairs of 4 ranks cannot be split
    further), and a held shard must be ``to``'s dim and blocks with a multiple of its replicas.
    A strided shard is cut from a whole value only; its dim may have a dynamic size (whole
    blocks of its period: ``batch * heads``)."""
    from autotp.placement import divides

    if to.period:
        return isinstance(held, Replicate) and divides(to, size, world_size)
    if not isinstance(size, int) or not divides(to, size, world_size):
        return False
    if isinstance(held, Replicate):
        return True
    return (isinstance(held, Shard) and not held.padded and not to.padded and not held.whole and not to.whole
            and not held.period and (held.dim, held.blocks) == (to.dim, to.blocks)
            and held.replicas % to.replicas == 0)


def _op_name(node: fx.Node) -> str:
    target = node.target
    return str(getattr(target, "__name__", target)) if not isinstance(target, str) else target


# ---- shape helpers shared by the rule files -------------------------------------------------

def _size(s: Any) -> Union[int, sympy.Expr]:
    if isinstance(s, int):
        return s
    if isinstance(s, torch.SymInt):
        expr = s.node.expr
        return int(expr) if expr.is_number else expr
    return s


def sizes(x: Any) -> tuple:
    """Global sizes of a node's tensor value: ints, or sympy expressions for dynamic dims."""
    val = x.meta["val"] if isinstance(x, fx.Node) else x
    return tuple(_size(s) for s in val.shape)


def ndim(x: fx.Node) -> int:
    return len(x.meta["val"].shape)


def norm_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim



# Importing the family modules fills RULES.
from autotp.rules import attention, conv, matmul, misc, pieces, pointwise, reduction, reinterpret, view  # noqa: E402,F401
