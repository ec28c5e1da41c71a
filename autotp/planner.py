"""Planner: from a captured graph and a world size to a :class:`~autotp.plan.Plan`.

The algorithm, in the order to read it:

1. **Candidates** (:func:`find_candidates`): every matmul node (``linear``, ``addmm``, ``mm``,
   ``bmm``, ``matmul``) with an operand that is a parameter, possibly through transposes or
   casts (GPT-2's Conv1D is ``addmm(bias, x, W)`` with ``W`` stored ``[in, out]``).
2. **Column-parallel dim** (:meth:`_Planner.colwise_dim`): the parameter dim whose sharding makes
   the matmul output sharded on its last dim, found by propagating each divisible dim up to the
   matmul: no per-op knowledge of weight layouts.
3. **Regions** (:meth:`_Planner.grow`): seed one candidate colwise and propagate
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
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.fx as fx

from autotp.errors import AutotpError
from autotp.placement import Partial, Placement, Replicate, Shard, divides
from autotp.plan import ArgEdit, Collective, LocalOp, LocalSlice, ParamSpec, Plan, Region, ShardedInput, ShardedOutput
from autotp.propagate import Propagation, arg_at, propagate
from autotp.rules import ndim, sizes
from autotp.rules.matmul import matmul_spec

if TYPE_CHECKING:  # imported where it is used: a run whose graphs all come from the cache never plans
    import networkx as nx

__all__ = ["plan_graph", "plan_with_placements", "find_candidates", "Candidate", "add_rewrites"]

aten = torch.ops.aten

# Ops between a parameter and the matmul that uses it (GPT-2 uses W as stored, Falcon
# ``matmul(x, W.T)``, quantised or mixed-precision models cast it first).
_WEIGHT_CHAIN = {
    aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default,
    aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default,
    aten.alias.default, aten.contiguous.default, aten.clone.default, aten.detach.default,
}


@dataclass(frozen=True)
class Candidate:
    """A parameter worth sharding and the node that consumes it: a matmul (seeded so that its
    output columns are sharded) or an embedding lookup (seeded on the vocabulary)."""

    matmul: fx.Node
    param: fx.Node

    @property
    def module(self) -> str:
        return _module_of(str(self.param.target))


def _param_source(arg: object) -> Optional[fx.Node]:
    while isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target in _WEIGHT_CHAIN:
        arg = arg.args[0]
    return arg if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


def find_candidates(graph: fx.Graph) -> list[Candidate]:
    """Matmuls with a parameter operand of rank >= 2, and embedding tables, in graph order."""
    found, seen = [], set()
    for node in graph.nodes:
        operands = _candidate_operands(node)
        if not operands:
            continue
        for pos in operands:
            param = _param_source(node.args[pos])
            if param is not None and param not in seen and ndim(param) >= 2:
                found.append(Candidate(node, param))
                seen.add(param)
                break
    return found


def _candidate_operands(node: fx.Node) -> tuple[int, ...]:
    """Positions of the operands of ``node`` that may be a parameter worth sharding."""
    if node.op != "call_function":
        return ()
    if node.target is aten.embedding.default:
        return (0,)
    spec = matmul_spec(node.target)
    return spec[0] if spec else ()


def _wants(c: Candidate, got: object) -> bool:
    """Whether a seed gave the consumer the layout we shard for: column-parallel output
    columns for a matmul, a vocabulary-parallel (Partial) lookup for an embedding."""
    if c.matmul.target is aten.embedding.default:
        return isinstance(got, Partial)
    return isinstance(got, Shard) and got.dim == ndim(c.matmul) - 1


def _module_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def _common_module(names: Iterable[str]) -> str:
    names = list(names)  # read twice below
    parts = [_module_of(n).split(".") for n in names]
    common = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    return ".".join(common) or _module_of(names[0])


def _layer_of(region: str) -> Optional[str]:
    """The decoder layer a region sits in: its path up to the first index (``model.layers.3``,
    ``encoder.block.0``); a region outside any indexed container has none."""
    parts = region.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[: digits[0] + 1]) if digits else None


# The layout ops a parameter may pass through on its way to a matmul, and how each maps an
# output dim back to an input dim (None: not a pure relabelling of dims).
def _placement_before(node: fx.Node, after: Placement) -> Optional[Shard]:
    """The placement of ``node``'s input that gives ``after`` on its output."""
    if not isinstance(after, Shard) or node.target not in _WEIGHT_CHAIN:
        return None
    rank = ndim(node)
    if node.target is aten.transpose.int:
        d0, d1 = (a % rank for a in node.args[1:3])
        return after.with_dim({d0: d1, d1: d0}.get(after.dim, after.dim))
    if node.target is aten.permute.default:
        return after.with_dim([d % rank for d in node.args[1]][after.dim])
    if node.target in (aten.t.default, aten.numpy_T.default):
        return after.with_dim(rank - 1 - after.dim)
    return after  # casts, copies, aliases keep the layout


def _reads_only_metadata(user: fx.Node, value: fx.Node, shard: Shard) -> bool:
    """A user that reads ``value``'s dtype or the size of a dim ``shard`` leaves whole: it does
    not care whether ``value`` is sharded. (Export's input guards are dropped by the rewrite for
    graphs that take sharded inputs.)"""
    if user.target is aten._assert_tensor_metadata.default or (user.op == "call_module" and user.target == "_guards_fn"):
        return True
    return user.target is aten.sym_size.int and user.args[1] % ndim(value) != shard.dim


_MAX_LAYOUT_RETRIES = 4  # phi3's q|k|v slices refine the layout once per slice


def _blocks_for(hint: Optional[tuple[int, ...]], size: int) -> Union[int, tuple[int, ...], None]:
    """A rule's block hint (part sizes at the failing node) rescaled to a seed dim of ``size``."""
    if not hint:
        return None
    total = sum(hint)
    if size % total == 0:
        parts = [h * (size // total) for h in hint]
    elif total % size == 0 and all(h % (total // size) == 0 for h in hint):
        parts = [h // (total // size) for h in hint]
    else:
        return None
    return len(parts) if len(set(parts)) == 1 else tuple(parts)


@dataclass
class _Grown:
    seeds: dict[fx.Node, Placement]
    prop: Propagation
    entries: list[Candidate]


class _Planner:
    def __init__(self, graph: fx.Graph, world_size: int, local_inputs: Iterable[str] = ()) -> None:
        self.graph = graph
        self.world = world_size
        self.local_inputs = set(local_inputs)
        self.candidates = find_candidates(graph)
        self.by_matmul = {c.matmul: c for c in self.candidates}
        self._colwise: dict[fx.Node, Optional[int]] = {}
        self.cut = self._dataflow_cut()
        # whether a region may all-reduce a statistic (a sum over the sharded dim, Out.statistic):
        # off in the first pass over the candidates, on in the second (see plan_graph)
        self.statistics = True

    def _dataflow_cut(self) -> "nx.DiGraph":
        """Dataflow graph with the edges *into* every candidate matmul removed, so that the
        ancestors of a value stop at the nearest matmuls that produce it."""
        import networkx as nx

        flow = nx.DiGraph()
        for node in self.graph.nodes:
            flow.add_node(node)
            if node not in self.by_matmul:
                flow.add_edges_from((src, node) for src in node.all_input_nodes)
        return flow

    def colwise_dim(self, c: Candidate) -> Union[int, str]:
        """The parameter dim that shards the matmul's output columns, or why there is none."""
        if c.param not in self._colwise:
            shape = sizes(c.param)
            answer: Union[int, str] = f"no dim of {c.param.target} {list(shape)} divides by tp={self.world}"
            for d in range(len(shape)):
                if not divides(Shard(d), shape[d], self.world):
                    continue
                prop = propagate(self.graph, {c.param: Shard(d)}, self.world, until=c.matmul)
                answer_at = prop.answers.get(c.matmul)
                if answer_at is not None and _wants(c, answer_at.placement):
                    answer = d
                    break
                if prop.failure is not None:
                    answer = str(prop.failure)
            self._colwise[c.param] = answer
        return self._colwise[c.param]

    def settle(self, seeds: dict[fx.Node, Placement]) -> tuple[dict[fx.Node, Placement], Propagation]:
        """Propagate, promoting parameters that all their users want sliced to sharded seeds
        (a parameter reached through transposes counts: the placement is mapped back)."""
        while True:
            prop = propagate(self.graph, seeds, self.world, statistics=self.statistics)
            wants = prop.failure.wants if prop.failure is not None else None
            if wants is not None and wants[0] not in seeds and self._promotable(wants[0]):
                seeds = {**seeds, wants[0]: wants[1]}  # written in place: laid out as the write needs
                continue
            if not prop.ok:
                return seeds, prop
            wanted: dict[fx.Node, set] = {}
            for node, move in prop.redistributions():
                user, src, to = node, arg_at(node, move.path), move.to
                while src.op == "call_function" and len(src.users) == 1:
                    before = _placement_before(src, to)
                    if before is None:
                        break
                    user, src, to = src, src.args[0], before
                promotable = self._promotable(src) or factory_edit(src, to, self.world) is not None
                if promotable and src not in seeds:
                    wanted.setdefault(src, set()).add((user, to))
            promote = {}
            for p, asks in wanted.items():
                placements = {to for _, to in asks}
                askers = {u for u, _ in asks}
                # returning the value as it is also agrees: a cache input handed back unchanged
                # (cross-attention keys) stays as sharded as it came, or is gathered
                if len(placements) == 1 and all(u in askers or u.op == "output" or _reads_only_metadata(u, p, *placements)
                                                for u in p.users):
                    promote[p] = placements.pop()
            if not promote:
                return seeds, prop
            seeds = {**seeds, **promote}

    def _promotable(self, node: fx.Node) -> bool:
        """A parameter, or an input the caller passes as laid out (a KV cache), may be seeded."""
        return node.op == "get_attr" or (node.op == "placeholder" and node.name in self.local_inputs)

    def upstream_candidates(self, value: fx.Node, taken: set) -> list[Candidate]:
        import networkx as nx

        nodes = nx.ancestors(self.cut, value) | {value}
        return [self.by_matmul[n] for n in self.graph.nodes if n in nodes and n in self.by_matmul
                and self.by_matmul[n].param not in taken]

    def grow(self, c: Candidate, assigned: set) -> Union[_Grown, str]:
        """The region seeded by ``c`` (colwise), grown by the matmuls it needs, or why not."""
        dim = self.colwise_dim(c)
        if isinstance(dim, str):
            return dim
        found = self._seed_layout({}, c.param, dim)
        if isinstance(found, str):
            return found
        grown = _Grown(*found, entries=[c])
        while True:
            better = self._grow_once(grown, assigned)
            if better is None:
                return grown
            grown = better

    def _seed_layout(self, base: dict[fx.Node, Placement], param: fx.Node, dim: int):
        """Settle ``base`` plus ``param`` sharded on ``dim``. When a rule hints at a layout, retry
        with it: fused blocks (a split of q|k|v), or ranks sharing a head (2 kv heads, 4 ranks)."""
        size = sizes(param)[dim]
        shard = Shard(dim)
        for _ in range(_MAX_LAYOUT_RETRIES):
            seeds, prop = self.settle({**base, param: shard})
            if prop.ok:
                return seeds, prop
            failure = prop.failure
            blocks = _blocks_for(failure.blocks, size) if failure.blocks else shard.blocks
            hinted = Shard(dim, blocks or shard.blocks, failure.replicas or shard.replicas)
            if hinted == shard or not divides(hinted, size, self.world):
                return str(failure)
            shard = hinted
        return str(prop.failure)

    def _grow_once(self, grown: _Grown, assigned: set) -> Optional[_Grown]:
        """Add the matmuls upstream of locally sliced values, if that removes slices."""
        sliced = [arg_at(node, move.path) for node, move in grown.prop.redistributions()]
        if not sliced:
            return None
        taken = assigned | set(grown.seeds)
        extra: list[Candidate] = []
        for value in sliced:
            for cand in self.upstream_candidates(value, taken):
                if cand not in extra and isinstance(self.colwise_dim(cand), int):
                    extra.append(cand)
        trials = [extra] + ([[e] for e in extra] if len(extra) > 1 else []) if extra else []
        current = _replicated_slices(grown.prop)
        for group in trials:
            if len(group) == 1:  # one new seed: it may take a hinted layout
                found = self._seed_layout(grown.seeds, group[0].param, int(self.colwise_dim(group[0])))
                if isinstance(found, str):
                    continue
                seeds, prop = found
            else:
                seeds, prop = self.settle({**grown.seeds, **{e.param: Shard(int(self.colwise_dim(e))) for e in group}})
            if prop.ok and _replicated_slices(prop) < current:
                return _Grown(seeds, prop, grown.entries + list(group))
        return None


def _replicated_slices(prop: Propagation) -> int:
    """Local slices of values every rank computed whole: redundant work a bigger region avoids.
    (Refining a piece a few ranks share, such as a kv head, is not counted.)"""
    return sum(1 for node, move in prop.redistributions() if arg_at(node, move.path) not in prop.placements)


# Ops that make a tensor of a literal size, filled without reading any tensor: a piece of the
# result is the same op at the piece's size. (The size is their first argument.)
_FACTORIES = (torch.ops.aten.zeros.default, torch.ops.aten.ones.default, torch.ops.aten.empty.memory_format,
              torch.ops.aten.full.default)


def factory_edit(node: fx.Node, placement: Placement, world: int) -> Optional[ArgEdit]:
    """The edit that makes a factory (``zeros([batch, 4, 15, 16])``: a static KV cache made
    inside the graph) give this rank's piece of ``placement``: its literal size at the sharded
    dim, divided. None when ``node`` is no factory or that size is no literal that divides."""
    if node.target not in _FACTORIES or not isinstance(placement, Shard) or not node.args:
        return None
    shape = node.args[0]
    if not isinstance(shape, (list, tuple)) or not 0 <= placement.dim < len(shape):
        return None
    size, chunks = shape[placement.dim], placement.chunks(world)
    if not isinstance(size, int) or isinstance(size, bool) or not divides(placement, size, world):
        return None
    return ArgEdit(node.name, [0, placement.dim], size, size // chunks)


@dataclass
class _Accepted:
    """The regions accepted so far, and why the other candidates were not."""

    accepted: list[tuple[str, _Grown]] = field(default_factory=list)
    rejected: dict[Candidate, str] = field(default_factory=dict)
    assigned: set = field(default_factory=set)  # seeds of accepted regions
    touched: set = field(default_factory=set)  # nodes they reach


def _consider(planner: _Planner, cand: Candidate, state: _Accepted, within_one_layer: bool) -> None:
    """Grow ``cand``'s region and accept it unless it fails, alone or with the regions it
    touches, or spans layers where ``within_one_layer`` asks it not to."""
    grown = planner.grow(cand, state.assigned)
    if isinstance(grown, str):
        state.rejected[cand] = grown
        return
    layers = {_layer_of(str(s.target)) for s in grown.seeds if s.op == "get_attr"}
    if within_one_layer and len(layers) > 1:
        first = state.rejected.get(cand)
        state.rejected[cand] = (f"with an all-reduced statistic its region would span {len(layers)} layers "
                                f"(a value kept sharded between them)" + (f"; without: {first}" if first else ""))
        return
    mine = set(grown.prop.answers) | set(grown.seeds)
    if mine & state.touched:
        joint = {s: p for _, g in state.accepted for s, p in g.seeds.items()} | grown.seeds
        _, prop = planner.settle(joint)
        if not prop.ok:
            state.rejected[cand] = f"conflicts with an accepted region: {prop.failure}"
            return
    state.rejected.pop(cand, None)
    state.accepted.append((_common_module(str(e.param.target) for e in grown.entries), grown))
    state.assigned |= set(grown.seeds)
    state.touched |= mine


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
    planner = _Planner(graph, world_size, local_inputs)
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
            if cand.param not in state.assigned:
                _consider(planner, cand, state, within_one_layer=statistics)
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
                       lambda i: gather_outputs and i not in keep)
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


def _build_plan(graph, world, accepted, rejected, seeds, final: Propagation, model, inputs, gather) -> Plan:
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
            spec.module_type = types.get(_module_of(spec.name), "")
            plan.params[spec.name] = spec
    add_rewrites(plan, graph, final, region_of, gather)
    for name, grown in accepted:
        exits = sorted({str(planner_param) for planner_param in _exit_params(grown.prop)})
        plan.regions.append(Region(name, True, [str(e.param.target) for e in grown.entries], exits, "", _layer_of(name)))
    for cand, reason in rejected.items():
        plan.regions.append(Region(cand.module, False, [str(cand.param.target)], [], reason, _layer_of(cand.module)))
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
        if gather(path[-1]):
            region = region_of.get(arg_at(output, path))
            plan.collectives.append(Collective("all_gather", output.name, region, None, list(path), placement.dim,
                                               placement.replicas))
        else:
            plan.sharded_outputs.append(ShardedOutput(list(path), placement))
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
        for arg in node.args:
            src = _param_source(arg)
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
    lookups = [u for u in users if final.answers[u].local_op == "vocab_parallel_embedding"]
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
    if not any(matmul_spec(u.target) for u in node.users if u.op == "call_function"):
        kinds = sorted({str(getattr(u.target, "__name__", u.target)) for u in node.users})
        return f"used by {', '.join(kinds) or 'nothing'}: replicated"
    return "replicated"


def collapse_layers(text: str) -> str:
    """``model.layers.3.mlp`` -> ``model.layers.*.mlp``, for grouping identical reasons."""
    return re.sub(r"\.\d+(?=\.|$)", ".*", text)
