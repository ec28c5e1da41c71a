"""Forward propagation of placements through a captured graph.

Consumes an fx graph whose nodes carry ``meta["val"]`` (from :mod:`autotp.capture`) and *seeds*:
placements for some nodes, in practice parameters (``get_attr`` nodes) that the planner wants
sharded. Produces, for every node that sees a sharded input, the answer of its rule
(:mod:`autotp.rules`): its output placement, the local slices and literal edits it needs.

Invariants:

- Nodes are visited in graph (topological) order, and only when one of their inputs is
  sharded: the cost is proportional to the region a seed reaches, not to the graph.
- A ``Partial`` output marks an all-reduce point; the value is ``Replicate`` after it, so the
  region ends there.
- The first ``Cannot`` stops propagation and is reported as the failure.
- A sharded value that reaches the graph output is recorded in ``outputs`` (the planner
  gathers it there, or leaves it sharded when asked to); with ``allow_sharded_outputs=False``
  it is a failure.

This module only reads the graph; it never knows a rank.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Union

import torch.fx as fx

from autotp.placement import Partial, Placement, Replicate, Shard
from autotp.rules import Cannot, Inputs, Out, Redistribute, apply_rule

__all__ = ["Propagation", "Failure", "propagate", "arg_at"]


@dataclass(frozen=True)
class Failure:
    node: fx.Node
    reason: str
    blocks: Optional[tuple[int, ...]] = None  # layout hints from the rule, see rules.Cannot
    replicas: Optional[int] = None
    alternative: bool = False  # the hints are another reading of the op, see rules.Cannot
    # an input or parameter an in-place op would slice, and the layout that would serve it
    wants: Optional[tuple[fx.Node, Placement]] = None

    def __str__(self) -> str:
        stack = self.node.meta.get("nn_module_stack") or {}
        where = list(stack.values())[-1][0] if stack else ""
        return f"{self.reason} (at {self.node.name}{' in ' + where if where else ''})"


@dataclass
class Propagation:
    seeds: dict[fx.Node, Placement]
    placements: dict[fx.Node, Any] = field(default_factory=dict)
    answers: dict[fx.Node, Out] = field(default_factory=dict)
    partials: list[fx.Node] = field(default_factory=list)
    outputs: list[tuple[tuple[int, ...], Shard]] = field(default_factory=list)  # sharded graph outputs
    failure: Optional[Failure] = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    def redistributions(self) -> Iterator[tuple[fx.Node, Redistribute]]:
        for node, answer in self.answers.items():
            for move in answer.redistribute:
                yield node, move


def arg_at(node: fx.Node, path: tuple[Union[int, str], ...]) -> Any:
    """``node.args[path[0]][path[1]]...``; a path that starts with a name starts in ``node.kwargs``."""
    value: Any = node.kwargs if path and isinstance(path[0], str) else node.args
    for i in path:
        value = value[i]
    return value


def schema_arguments(node: fx.Node) -> list[tuple[Any, Any]]:
    """(schema argument, the value passed for it) for each argument a call of an op with a
    schema is given, positional then keyword; none for a node without a schema."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return []
    return list(zip(schema.arguments, node.args)) + [(a, node.kwargs[a.name]) for a in schema.arguments
                                                     if a.name in node.kwargs]


def _sharded_outputs(node: fx.Node, inputs: Inputs, found: list, any_layout: bool) -> Optional[Failure]:
    """Record the graph outputs that are sharded; only plain shards can be gathered (a gather
    concatenates the ranks' pieces: not a fused or strided layout's), unless ``any_layout``."""
    for i, value in enumerate(node.args[0] if isinstance(node.args[0], (list, tuple)) else [node.args[0]]):
        placement = inputs[value]
        if isinstance(placement, Shard) and (any_layout or (placement.blocks == 1 and not placement.period)):
            found.append(((0, i), placement))
        elif not isinstance(placement, Replicate):
            return Failure(node, f"model output {i} is {placement}, which cannot be gathered")
    return None


def _order(graph: fx.Graph) -> dict[fx.Node, int]:
    cached = getattr(graph, "_autotp_order", None)
    if cached is None or len(cached) != len(graph.nodes):
        cached = {n: i for i, n in enumerate(graph.nodes)}
        graph._autotp_order = cached  # type: ignore[attr-defined]
    return cached


def _is_replicated(placement: Any) -> bool:
    if isinstance(placement, tuple):
        return all(isinstance(p, Replicate) for p in placement)
    return isinstance(placement, Replicate)


def _sliced_write(node: fx.Node, answer: Out) -> Optional[fx.Node]:
    """The graph input or parameter ``node`` writes into in place, if its answer slices it
    locally: the caller or the next call reads that value, so the write must reach all of it."""
    schema = getattr(node.target, "_schema", None)
    target = node.args[0] if node.args else None
    if schema is None or not schema.arguments or not isinstance(target, fx.Node):
        return None
    first = schema.arguments[0].alias_info
    writes = first is not None and first.is_write
    if writes and target.op in ("placeholder", "get_attr") and any(m.path == (0,) for m in answer.redistribute):
        return target
    return None


def propagate(
    graph: fx.Graph,
    seeds: Mapping[fx.Node, Placement],
    world_size: int,
    *,
    until: Optional[fx.Node] = None,
    allow_sharded_outputs: bool = True,
    statistics: bool = True,
    any_output_layout: bool = False,
) -> Propagation:
    """Propagate ``seeds`` forward; stop after ``until`` if given (used to test one matmul).
    ``statistics=False`` makes a reduction's ``Partial`` (a sum over the sharded dim, see
    ``Out.statistic``) a failure: the planner's first pass. ``any_output_layout`` records a
    sharded output of any layout, not only one a gather can put together: the conformance check
    compares outputs piece by piece."""
    order = _order(graph)
    result = Propagation(seeds=dict(seeds), placements=dict(seeds))
    limit = order[until] if until is not None else len(order)
    heap: list[tuple[int, str]] = []
    by_name: dict[str, fx.Node] = {}

    def push_users(node: fx.Node) -> None:
        for user in node.users:
            if order[user] <= limit and user.name not in by_name:
                by_name[user.name] = user
                heapq.heappush(heap, (order[user], user.name))

    for node in seeds:
        push_users(node)
    inputs = Inputs(result.placements, world_size)
    while heap:
        _, name = heapq.heappop(heap)
        node = by_name[name]
        if node.op == "output" and allow_sharded_outputs:
            failure = _sharded_outputs(node, inputs, result.outputs, any_output_layout)
            if failure is not None:
                result.failure = failure
            return result  # the output node is the last node
        if node.op == "call_module" and node.target == "_guards_fn":
            continue  # export's input checks: dropped by the rewrite when an input is sharded
        if node.op != "call_function":
            what = "reaches the model output" if node.op == "output" else f"enters {node.op} {node.target}"
            result.failure = Failure(node, f"a sharded value {what}")
            return result
        answer = apply_rule(node, inputs)
        if isinstance(answer, Cannot):
            result.failure = Failure(node, answer.reason, answer.blocks, answer.replicas, answer.alternative)
            return result
        if answer.statistic and not statistics:
            result.failure = Failure(node, f"{node.target} sums over the sharded dim: a statistic to all-reduce, "
                                           "taken only after the regions that need none")
            return result
        written = _sliced_write(node, answer)
        if written is not None:
            result.failure = Failure(node, f"{node.target} writes into {written.name}, which lives on after the call "
                                           f"(a {written.op}); a slice of it would not be written",
                                     wants=(written, next(m.to for m in answer.redistribute if m.path == (0,))))
            return result
        result.answers[node] = answer
        if isinstance(answer.placement, Partial):
            result.partials.append(node)  # all-reduced right here: Replicate downstream
        elif not _is_replicated(answer.placement):
            result.placements[node] = answer.placement
            push_users(node)
    return result
