"""Planner: from a captured graph and a world size to a :class:`~autotp.plan.Plan`.

The algorithm, in the order to read it (step 1 lives in :mod:`autotp.candidates`, 2 and 3 in
:mod:`autotp.regions`):

1. **Candidates** (:func:`~autotp.candidates.find_candidates`): every matmul node (``linear``, ``addmm``, ``mm``,
   ``bmm``, ``matmul``) with an operand that is a parameter, possibly through transposes or
   casts (GPT-2's Conv1D is ``addmm(bias, x, W)`` with ``W`` stored ``[in, out]``).
2. **Column-parallel dim** (:meth:`~autotp.regions.RegionGrower.colwise`): the parameter dim whose sharding makes
   the matmul output sharded on its last dim, found by propagating each divisible dim up to the
   matmul: no per-op knowledge of weight layouts.
3. **Regions** (:meth:`~autotp.regions.RegionGrower.grow`): seed one candidate colwise and propagate
   (:mod:`autotp.propagate`). Matmuls that contract the sharded dim come out ``Partial``: they
   are the row-parallel exits, and the all-reduce goes after them. Where a rule had to slice a
   replicated value locally (attention slicing k and v because only q was sharded), the
   matmuls upstream of that value, found on a networkx dataflow graph cut at every candidate,
   join the seeds if that removes slices. So q/k/v -> o and gate/up -> down each become one
   region without knowing their names. A parameter that every one of its users wants sharded
   the same way becomes a sharded parameter (row-parallel weights, column-parallel biases).
4. **Acceptance**: a region is kept if propagation hit no ``Cannot`` and no sharded value reaches
   the output; otherwise it stays replicated and the plan records why. Regions that touch each
   other are re-checked together. Candidates are taken in two passes: first without, then with
   all-reduced statistics (a sum over the sharded dim, ``Out.statistic``), the latter only for
   regions within one decoder layer, so that a statistic crosses a norm inside a pair but never
   keeps the residual stream sharded.
5. **Plan**: per parameter its placement, style and reason; the all-reduces; the literal sizes
   to localise; the local slices.

The planner takes ``world_size`` as an int and needs no process group; it never edits the graph.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional

import torch
import torch.fx as fx

from autotp.errors import AutotpError
from autotp.heap import old_objects_frozen
from autotp.local_ops import LOOKUPS
from autotp.placement import Partial, Placement, Replicate, Shard
from autotp.plan import ArgEdit, Collective, LocalOp, LocalSlice, ParamSpec, Plan, Region, ShardedInput, ShardedOutput
from autotp.propagate import Propagation, arg_at, propagate
from autotp.candidates import Candidate, common_module, find_candidates, layer_of, module_of, param_source
from autotp.regions import Grown, RegionGrower, factory_edit
from autotp.rules import ndim, sizes
from autotp.rules.matmul import matmul_spec

__all__ = ["plan_graph", "plan_with_placements", "find_candidates", "Candidate", "add_rewrites"]


@dataclass
class _Accepted:
    """The regions accepted so far, and why the other candidates were not."""

    accepted: list[tuple[str, Grown]] = field(default_factory=list)
    rejected: dict[Candidate, str] = field(default_factory=dict)
    assigned: set = field(default_factory=set)  # seeds of accepted regions
    touched: set = field(default_factory=set)  # nodes they reach
    postponed: list[Candidate] = field(default_factory=list)  # settled only with blocks held whole
    reserved: set = field(default_factory=set)  # the seeds of their regions, not grown alone meanwhile
    lone: dict = field(default_factory=dict)  # parameter -> why it is row-parallel on its own, not in a pair


def _consider(planner: RegionGrower, cand: Candidate, state: _Accepted, within_one_layer: bool,
              postpone_whole: bool = False) -> None:
    """Grow ``cand``'s region and accept it unless it fails, alone or with the regions it
    touches, or spans layers where ``within_one_layer`` asks it not to. With ``postpone_whole``
    a region whose candidate holds blocks whole is put off to the pass with statistics, where
    fewer of them may stay whole (a mamba in_proj: B and C whole, not x, once its norm may
    all-reduce a statistic)."""
    grown = planner.grow(cand, state.assigned)
    if isinstance(grown, str):
        state.rejected[cand] = grown
        return
    if postpone_whole and getattr(grown.seeds.get(cand.param), "whole", ()):
        state.postponed.append(cand)
        state.reserved |= set(grown.seeds)
        return
    layers = {layer_of(str(s.target)) for s in grown.seeds if s.op == "get_attr"}
    if within_one_layer and len(layers) > 1:
        first = state.rejected.get(cand)
        state.rejected[cand] = (f"with an all-reduced statistic its region would span {len(layers)} layers "
                                f"(a value kept sharded between them)" + (f"; without: {first}" if first else ""))
        return
    _accept(planner, state, common_module(str(e.param.target) for e in grown.entries), grown, cand)


def _accept(planner: RegionGrower, state: _Accepted, name: str, grown: Grown, cand: Candidate) -> bool:
    """Accept ``grown`` as region ``name`` unless it fails together with the accepted regions it
    touches (then ``cand`` keeps the reason, and False is returned)."""
    mine = set(grown.prop.answers) | set(grown.seeds)
    if mine & state.touched:
        joint = {s: p for _, g in state.accepted for s, p in g.seeds.items()} | grown.seeds
        _, prop = planner.settle(joint)
        if not prop.ok:
            state.rejected[cand] = f"conflicts with an accepted region: {prop.failure}"
            return False
    state.rejected.pop(cand, None)
    state.accepted.append((name, grown))
    state.assigned |= set(grown.seeds)
    state.touched |= mine
    return True


# A lone row-parallel projection pays an all-reduce of its output on every call for its weight's
# memory: worth it for a weight within this factor of the layers' largest, not for a router's few
# rows (a gate of 8 experts over a hidden of 4096 beside a 14336-wide MLP: 1/1792), and for an
# output at most this many times as wide as the widest all-reduce the accepted regions already
# make (the hidden size: a fused multi-query q|k|v is 1 + 2 / heads of it; not a projection out
# to many heads, whose all-reduce would outweigh the layer's own).
_LONE_ROWWISE_SHARE = 16
_LONE_ROWWISE_WIDENING = 2


def _largest_projection(candidates: list[Candidate]) -> int:
    """The weight a lone projection is measured against: the largest matmul weight inside the
    decoder layers (a large vocabulary's embedding or head would dwarf every projection: 128k x
    4096 against a 1024 x 512 projection), or anywhere in a graph with no layers."""
    weights = [(layer_of(str(c.param.target)) is not None, c.param.meta["val"].numel())
               for c in candidates if not c.is_lookup]
    inside = [n for in_layer, n in weights if in_layer]
    return max(inside or [n for _, n in weights] or [0])


def _lone_rowwise_pass(planner: RegionGrower, state: _Accepted) -> None:
    """The last pass: a projection still replicated (its output read whole by a norm, or fed
    to a region laid out otherwise) may be row-parallel on its own, its replicated input
    sliced locally (no communication) and its output all-reduced. Kept only where nothing else
    is laid out anew: the parameter alone, one all-reduce, checked with the regions it
    touches, and no statistics."""
    planner.statistics = False
    largest = _largest_projection(planner.candidates)
    reduced = [sizes(n)[-1] for _, g in state.accepted for n in g.prop.partials if ndim(n)]
    widest = max((w for w in reduced if isinstance(w, int)), default=None)
    for cand in planner.candidates:
        elements = cand.param.meta["val"].numel()
        if cand.param in state.assigned or elements * _LONE_ROWWISE_SHARE < largest:
            continue
        layout = planner.rowwise(cand)
        if isinstance(layout, str):
            continue
        width_in = sizes(cand.param)[layout.dim]  # the contraction: the output is everything else
        if elements > _LONE_ROWWISE_WIDENING * width_in * (widest or width_in):
            continue
        seeds, prop = planner.settle({cand.param: layout})
        # one all-reduce for the weight (not one per expert of a stacked weight), no output sharded
        if not prop.ok or set(seeds) != {cand.param} or len(prop.partials) != 1 or prop.outputs:
            continue
        why = state.rejected.get(cand, "")  # _accept forgets it
        if _accept(planner, state, module_of(str(cand.param.target)), Grown(seeds, prop, entries=[]), cand):
            state.lone[cand.param] = why


@old_objects_frozen()
def plan_graph(
    graph: fx.Graph, world_size: int, *, model: str = "", inputs: Optional[list[str]] = None,
    gather_outputs: bool = True, local_inputs: Iterable[str] = (), local_outputs: Iterable[int] = (),
) -> Plan:
    """Plan tensor parallelism for a captured graph over ``world_size`` ranks.

    Args:
        graph: an fx graph from :func:`autotp.capture.capture` (nodes carry ``meta["val"]``).
        world_size: the tensor-parallel size.
        model: a label recorded in the plan.
        inputs: the names of the graph's user inputs, recorded in the plan.
        gather_outputs: all-gather sharded model outputs (a column-parallel LM head's
            logits), so every rank returns the full output; ``False`` leaves them sharded.
        local_inputs: names of graph inputs the caller can pass sharded (a KV cache): they
            are sharded like parameters when all their users want it.
        local_outputs: positions of graph outputs that stay sharded (the KV cache it returns).

    Returns:
        A :class:`Plan`; with ``world_size == 1`` every parameter is replicated.
    """
    if world_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {world_size}")
    planner = RegionGrower(graph, world_size, local_inputs)
    state = _Accepted()
    # Two passes. The first takes the regions that need no all-reduced statistic: Megatron's
    # pairs. The second retries what is left, now letting a sum over the sharded dim be Partial
    # (a q/k norm over all heads, a sub-norm between the pair), but only for a region within one
    # layer: grown from a lone projection whose pair failed, a region with statistics kept the
    # residual stream's hidden dim sharded through every later layer (diffllama at tp 2: 13
    # all-reduces instead of 3, row-parallel MLP entries and LM head), exact but far costlier.
    for statistics in (False, True) if world_size > 1 else ():
        planner.statistics = statistics
        for cand in planner.candidates:
            if cand.param not in state.assigned and (statistics or cand.param not in state.reserved):
                _consider(planner, cand, state, within_one_layer=statistics, postpone_whole=not statistics)
            if statistics and cand in state.postponed and cand.param not in state.assigned:
                planner.statistics = False  # no better with statistics: the first pass's layout
                _consider(planner, cand, state, within_one_layer=False)
                planner.statistics = True
    if world_size > 1:
        _lone_rowwise_pass(planner, state)
    planner.statistics = True
    accepted = state.accepted
    # a candidate refused as a seed may have been sharded since, inside another's region
    rejected = {c: why for c, why in state.rejected.items() if c.param not in state.assigned}
    seeds = {s: p for _, g in accepted for s, p in g.seeds.items()}
    seeds, final = planner.settle(seeds)
    if not final.ok:  # regions were checked pairwise when they touched; this is a bug guard
        raise RuntimeError(f"autotp planner: accepted regions fail together: {final.failure}")
    keep = set(local_outputs)
    plan = _build_plan(graph, world_size, accepted, rejected, seeds, final, model, inputs or [],
                       lambda i: gather_outputs and i not in keep, state.lone)
    plan.sharded_inputs = [ShardedInput(n.name, p) for n, p in seeds.items() if n.op == "placeholder"]
    return plan


def plan_with_placements(graph: fx.Graph, world_size: int, fixed: Mapping[str, Placement], *, model: str = "",
                         inputs: Optional[list[str]] = None, gather_outputs: bool = True) -> Plan:
    """A plan for a graph whose parameters are already laid out: those in ``fixed`` as given,
    every other one replicated. It is how a submodule of a planned model runs on the pieces
    this rank holds: propagation from the given placements decides the rest (local slices,
    all-reduces, gathered outputs), and no parameter is laid out anew.

    Raises:
        AutotpError: the graph cannot compute with these placements (an op with no rule meets
            a sharded value, or a sharded output cannot be gathered).
    """
    seeds = {n: fixed[str(n.target)] for n in graph.nodes
             if n.op == "get_attr" and isinstance(fixed.get(str(n.target)), (Shard, Partial))}
    final = propagate(graph, seeds, world_size)
    if not final.ok:
        raise AutotpError(f"{model or 'the module'} cannot compute with this rank's pieces of its parameters: "
                          f"{final.failure}")
    return _build_plan(graph, world_size, [], {}, seeds, final, model, inputs or [], lambda _: gather_outputs)


def _build_plan(graph, world, accepted, rejected, seeds, final: Propagation, model, inputs, gather,
                lone: Optional[Mapping[fx.Node, str]] = None) -> Plan:
    lone = lone or {}
    region_of: dict[fx.Node, str] = {}
    for name, grown in accepted:
        for node in list(grown.prop.answers) + list(grown.seeds):
            region_of.setdefault(node, name)
    plan = Plan(tp_size=world, model=model, inputs=inputs)
    entries = {e.param for _, g in accepted for e in g.entries}
    types = _module_types(graph)
    for node in graph.nodes:
        if node.op == "get_attr" and isinstance(node.meta.get("val"), torch.Tensor):
            spec = _param_spec(node, seeds, entries, final, region_of, rejected)
            if node in lone:  # say why it is not in a pair: the refusal the plan would otherwise lose
                spec.reason = f"row-parallel on its own (all-reduce after); not column-parallel: {lone[node]}"
            spec.module_type = types.get(module_of(spec.name), "")
            plan.params[spec.name] = spec
    add_rewrites(plan, graph, final, region_of, gather)
    for name, grown in accepted:
        exits = sorted({str(planner_param) for planner_param in _exit_params(grown.prop)})
        plan.regions.append(Region(name, True, [str(e.param.target) for e in grown.entries], exits, "", layer_of(name)))
    for cand, reason in rejected.items():
        plan.regions.append(Region(cand.module, False, [str(cand.param.target)], [], reason, layer_of(cand.module)))
    return plan


def add_rewrites(plan: Plan, graph: fx.Graph, final: Propagation, region_of: Mapping[fx.Node, str],
                 gather: Callable[[int], bool]) -> None:
    """Record in ``plan`` what the rewrite must do to carry out ``final``: an all-reduce after
    each Partial node, an all-gather (or a sharded output) per sharded model output, the
    literal edits, the rank-aware ops and the local slices."""
    for node in final.partials:
        bias = final.answers[node].bias_path
        plan.collectives.append(Collective("all_reduce", node.name, region_of.get(node), list(bias) if bias else None))
    output = _output_node(graph)
    for path, placement in final.outputs:
        size = _padded_size(arg_at(output, path), placement)
        if gather(path[-1]):
            region = region_of.get(arg_at(output, path))
            plan.collectives.append(Collective("all_gather", output.name, region, None, list(path), placement.dim,
                                               placement.replicas, size))
        else:
            plan.sharded_outputs.append(ShardedOutput(list(path), placement, size))
    for node, placement in final.seeds.items():  # a buffer made inside the graph, made at its piece's size
        edit = factory_edit(node, placement, plan.tp_size) if node.op == "call_function" else None
        if edit is not None:
            plan.edits.append(edit)
    for node, answer in final.answers.items():
        plan.edits.extend(ArgEdit(node.name, list(e.path), e.old, e.new) for e in answer.edits)
        if answer.local_op:
            plan.local_ops.append(LocalOp(node.name, answer.local_op))
        for move in answer.redistribute:
            src = arg_at(node, move.path)
            held = final.placements.get(src)
            held_replicas = held.replicas if isinstance(held, Shard) else plan.tp_size
            what = f"{src.name} is {held or Replicate()}"
            plan.slices.append(LocalSlice(node.name, list(move.path), move.to, f"{what}, {node.name} needs it {move.to}",
                                          held_replicas))


def _padded_size(value: fx.Node, placement: Shard) -> Optional[int]:
    """The real size of the dim a padded shard of ``value`` pads (None for an even shard)."""
    if not placement.padded:
        return None
    size = sizes(value)[placement.dim]
    if not isinstance(size, int):
        raise AutotpError(f"{value.name}: a padded shard of a dim of dynamic size {size}")
    return size


def _output_node(graph: fx.Graph) -> fx.Node:
    return next(n for n in reversed(graph.nodes) if n.op == "output")


def _module_types(graph: fx.Graph) -> dict[str, str]:
    """Module path -> class name, from the module stacks export records on every node."""
    types: dict[str, str] = {}
    for node in graph.nodes:
        for path, qualname in (node.meta.get("nn_module_stack") or {}).values():
            types.setdefault(path, str(qualname).rsplit(".", 1)[-1])
    return types


def _exit_params(prop: Propagation) -> list[str]:
    out = []
    for node in prop.partials:
        for arg in node.all_input_nodes:  # an einsum's operands are in a list
            src = param_source(arg)
            if src is not None and ndim(src) >= 2:
                out.append(str(src.target))
    return out


def _param_spec(node, seeds, entries, final: Propagation, region_of, rejected) -> ParamSpec:
    val = node.meta["val"]
    spec = ParamSpec(str(node.target), [int(s) for s in val.shape], str(val.dtype).replace("torch.", ""))
    placement = seeds.get(node)
    region = region_of.get(node)
    if placement is None:
        spec.reason = _replicated_reason(node, rejected, final)
        return spec
    spec.placement, spec.region = placement, region
    users = [u for u in node.users if u in final.answers]
    lookups = [u for u in users if final.answers[u].local_op in LOOKUPS]
    if lookups and len(lookups) == len(users):
        spec.style, spec.reason = "vocab", "vocabulary-parallel embedding: masked lookup, all-reduce after"
    elif lookups:
        spec.style, spec.reason = "vocab", (f"vocabulary-parallel, tied: masked embedding lookup (all-reduce after) "
                                            f"and column-parallel head in {region}")
    elif node in entries and final.outputs and any(u in final.placements for u in users):
        gathered = any(region_of.get(arg_at(_output_node(node.graph), p)) == region for p, _ in final.outputs)
        spec.style = "colwise"
        spec.reason = f"column-parallel entry of {region}" + (": its output is a model output, gathered" if gathered else "")
    elif node in entries:
        spec.style, spec.reason = "colwise", f"column-parallel entry of {region}"
    elif any(isinstance(final.answers[u].placement, Partial) for u in users):
        spec.style, spec.reason = "rowwise", f"row-parallel exit of {region} (all-reduce after)"
    elif any(matmul_spec(u.target) for u in users):
        spec.style, spec.reason = "colwise", f"bias of a column-parallel matmul in {region}"
    else:
        spec.style, spec.reason = "sharded", f"sharded with its users in {region}"
    return spec


def _replicated_reason(node: fx.Node, rejected: dict, final: Propagation) -> str:
    for cand, reason in rejected.items():
        if cand.param is node:
            return f"not sharded: {reason}"
    for user in final.partials:
        bias = final.answers[user].bias_path
        if bias and arg_at(user, bias) is node:
            return "bias of a row-parallel matmul: added once, after the all-reduce"
    opaque = [u.meta["autotp_opaque"] for u in node.users if "autotp_opaque" in u.meta]
    if opaque:
        return f"read by {opaque[0]}"
    if not any(matmul_spec(u.target) for u in node.users if u.op == "call_function"):
        kinds = sorted({str(getattr(u.target, "__name__", u.target)) for u in node.users})
        return f"used by {', '.join(kinds) or 'nothing'}: replicated"
    return "replicated"


def collapse_layers(text: str) -> str:
    """``model.layers.3.mlp`` -> ``model.layers.*.mlp``, for grouping identical reasons."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", text)
