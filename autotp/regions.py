"""Regions: the planner's steps 2 and 3, on one captured graph and a world size.

1. **Candidates** (:func:`autotp.candidates.find_candidates`): every matmul with a parameter
   operand (through transposes or casts), and every table looked up by id.
2. **Column-parallel dim** (:meth:`RegionGrower.colwise`): the parameter dim whose sharding
   shards the matmul's output columns, found by propagation, not by weight-layout knowledge.
3. **Growth** (:meth:`RegionGrower.grow`): seed one candidate column-parallel, propagate, retry
   with a layout a rule hints at (fused blocks, ranks sharing a head), and add the matmuls
   upstream of values a rule had to slice locally, when that removes slices.

Which regions are kept, and the plan made of them, is :mod:`autotp.planner`'s. Nothing here
edits the graph or knows a rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Union

import torch
import torch.fx as fx

from autotp.candidates import PIECE_CHAIN, WEIGHT_CHAIN, Candidate, find_candidates
from autotp.placement import Partial, Placement, Shard, block_sizes, divides
from autotp.plan import ArgEdit
from autotp.propagate import Propagation, arg_at, propagate
from autotp.rules import Inputs, Out, apply_rule, ndim, sizes

if TYPE_CHECKING:  # imported where it is used: a run whose graphs all come from the cache never plans
    import networkx as nx

__all__ = ["RegionGrower", "Grown", "factory_edit"]

aten = torch.ops.aten


def _wants(c: Candidate, got: object) -> bool:
    """Whether a seed gave the consumer the layout we shard for: column-parallel output
    columns for a matmul, a vocabulary-parallel (Partial) lookup for a table."""
    if c.is_lookup:
        return isinstance(got, Partial)
    if c.matmul.target is aten.einsum.default:  # its output labels are all the param's or the input's: none is "last"
        return isinstance(got, Shard)
    return isinstance(got, Shard) and got.dim == ndim(c.matmul) - 1


# Ops that lay one tensor out anew, or take a piece of it: a parameter read through them
# (attention sinks viewed as [1, heads, 1, 1] and expanded, a per-head decay table cut to the
# sequence) is sharded where the op's own rule carries its shard to the layout its user wants.
_LAYOUT_CHAIN = {
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.flatten.using_ints,
    aten.unflatten.int,
} | PIECE_CHAIN  # a piece of a parameter (a decay table cut to the sequence) keeps the other dims' shards


# Where a parameter passes through an op on its way to its user: the placement of the op's
# input that gives the placement its user wants (None: no op here gives it).
def _placement_before(node: fx.Node, after: Placement, world: int) -> Optional[Shard]:
    """The placement of ``node``'s input that gives ``after`` on its output."""
    if not isinstance(after, Shard):
        return None
    rank = ndim(node)
    if node.target is aten.transpose.int:
        d0, d1 = (a % rank for a in node.args[1:3])
        return after.with_dim({d0: d1, d1: d0}.get(after.dim, after.dim))
    if node.target is aten.permute.default:
        return after.with_dim([d % rank for d in node.args[1]][after.dim])
    if node.target in (aten.t.default, aten.numpy_T.default):
        return after.with_dim(rank - 1 - after.dim)
    if node.target in WEIGHT_CHAIN:
        return after  # casts, copies, aliases keep the layout
    if node.target in _LAYOUT_CHAIN and not after.padded:
        # derived, not inverted by hand: the input shard the op's own rule maps to ``after``
        # (the propagation that follows the promotion checks the whole region again)
        source = node.args[0]
        for dim in range(ndim(source)):
            size = sizes(source)[dim]
            plain = Shard(dim, after.blocks if isinstance(after.blocks, int) else 1, after.replicas)
            for tried in dict.fromkeys((plain, Shard(dim, after.blocks, after.replicas, whole=after.whole))):
                if isinstance(size, int) and not divides(tried, size, world):
                    continue  # the rules take a shard that splits: a [2, 24] viewed as [48] is no 4-way shard of its 2 rows
                answer = apply_rule(node, Inputs({source: tried}, world))
                if isinstance(answer, Out) and answer.placement == after and not answer.redistribute:
                    return tried
    return None


def _reads_only_metadata(user: fx.Node, value: fx.Node, shard: Shard) -> bool:
    """A user that reads ``value``'s dtype or the size of a dim ``shard`` leaves whole: it does
    not care whether ``value`` is sharded. (Export's input guards are dropped by the rewrite for
    graphs that take sharded inputs.)"""
    if user.target is aten._assert_tensor_metadata.default or (user.op == "call_module" and user.target == "_guards_fn"):
        return True
    return user.target is aten.sym_size.int and user.args[1] % ndim(value) != shard.dim


_MAX_LAYOUT_RETRIES = 4  # phi3's q|k|v slices refine the layout once per slice
_MAX_FUSED_BLOCKS = 5  # blocks of a fused layout whose subsets held whole are tried (2^5 - 2 settles at most)


def _blocks_for(hint: Optional[tuple[int, ...]], size: int, current: Shard) -> Union[int, tuple[int, ...], None]:
    """A rule's block hint (part sizes at the failing node) rescaled to a seed dim of ``size``,
    or, where the hint splits one block of the seed's current layout (a mamba in_proj's x|B|C
    block, split after its conv), that layout with the block cut into the hint's parts."""
    if not hint:
        return None
    total = sum(hint)
    if size % total == 0:
        parts = [h * (size // total) for h in hint]
    elif total % size == 0 and all(h % (total // size) == 0 for h in hint):
        parts = [h // (total // size) for h in hint]
    else:
        held = block_sizes(current, size)
        if held.count(total) != 1 or len(held) == 1:
            return None
        at = held.index(total)
        parts = held[:at] + list(hint) + held[at + 1:]
    return len(parts) if len(set(parts)) == 1 else tuple(parts)


@dataclass
class Grown:
    seeds: dict[fx.Node, Placement]
    prop: Propagation
    entries: list[Candidate]


class RegionGrower:
    def __init__(self, graph: fx.Graph, world_size: int, local_inputs: Iterable[str] = ()) -> None:
        self.graph = graph
        self.world = world_size
        self.local_inputs = set(local_inputs)
        self.candidates = find_candidates(graph)
        self.by_matmul = {c.matmul: c for c in self.candidates}
        self._colwise: dict[fx.Node, Union[Shard, str]] = {}
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

    def colwise(self, c: Candidate) -> Union[Shard, str]:
        """The layout of the parameter that shards the matmul's output columns, or why there is
        none. A dim that does not split evenly (a vocabulary of 50257) is tried padded."""
        if c.param not in self._colwise:
            self._colwise[c.param] = self._layout_until(c, lambda got: _wants(c, got), padded=True)
        return self._colwise[c.param]

    def rowwise(self, c: Candidate) -> Union[Shard, str]:
        """The layout of the parameter that splits the matmul's contraction, so that its output
        is ``Partial`` (its input sliced locally where it is replicated), or why there is none."""
        return self._layout_until(c, lambda got: isinstance(got, Partial), padded=False)

    def _layout_until(self, c: Candidate, good: Callable[[Placement], bool], padded: bool) -> Union[Shard, str]:
        """The first even layout of ``c.param`` (then padded ones, with ``padded``) under which
        the matmul's output is ``good``, found by propagating each up to the matmul."""
        shape = sizes(c.param)
        answer: Union[Shard, str] = f"no dim of {c.param.target} {list(shape)} divides by tp={self.world}"
        tries = [Shard(d) for d in range(len(shape))] + [Shard(d, padded=True) for d in range(len(shape)) if padded]
        for shard in tries:
            if not divides(shard, shape[shard.dim], self.world):
                continue
            prop = propagate(self.graph, {c.param: shard}, self.world, until=c.matmul)
            answer_at = prop.answers.get(c.matmul)
            if answer_at is not None and good(answer_at.placement):
                return shard
            if prop.failure is not None:
                answer = str(prop.failure)
        return answer

    def settle(self, seeds: dict[fx.Node, Placement]) -> tuple[dict[fx.Node, Placement], Propagation]:
        """Propagate, promoting parameters that all their users want sliced to sharded seeds
        (a parameter reached through transposes counts: the placement is mapped back)."""
        while True:
            prop = propagate(self.graph, seeds, self.world, statistics=self.statistics)
            wants = prop.failure.wants if prop.failure is not None else None
            if wants is not None and wants[0] not in seeds and self._promotable(wants[0], wants[1]):
                seeds = {**seeds, wants[0]: wants[1]}  # written in place: laid out as the write needs
                continue
            if not prop.ok:
                return seeds, prop
            wanted: dict[fx.Node, set] = {}
            for node, move in prop.redistributions():
                user, src, to = node, arg_at(node, move.path), move.to
                while src.op == "call_function" and len(src.users) == 1:
                    before = _placement_before(src, to, self.world)
                    if before is None:
                        break
                    user, src, to = src, src.args[0], before
                promotable = self._promotable(src, to) or factory_edit(src, to, self.world) is not None
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

    def _promotable(self, node: fx.Node, placement: Placement) -> bool:
        """A parameter, or an input the caller passes as laid out (a KV cache, never padded),
        may be seeded; neither ever strided (loaders and caches hold plain pieces)."""
        if getattr(placement, "period", 0):
            return False
        return node.op == "get_attr" or (node.op == "placeholder" and node.name in self.local_inputs
                                         and not getattr(placement, "padded", False))

    def upstream_candidates(self, value: fx.Node, taken: set) -> list[Candidate]:
        import networkx as nx

        nodes = nx.ancestors(self.cut, value) | {value}
        return [self.by_matmul[n] for n in self.graph.nodes if n in nodes and n in self.by_matmul
                and self.by_matmul[n].param not in taken]

    def grow(self, c: Candidate, assigned: set) -> Union[Grown, str]:
        """The region seeded by ``c`` (colwise), grown by the matmuls it needs, or why not."""
        layout = self.colwise(c)
        if isinstance(layout, str):
            return layout
        found = self._seed_layout({}, c.param, layout)
        if isinstance(found, str):
            return found
        grown = Grown(*found, entries=[c])
        while True:
            better = self._grow_once(grown, assigned)
            if better is None:
                return grown
            grown = better

    def _seed_layout(self, base: dict[fx.Node, Placement], param: fx.Node, shard: Shard):
        """Settle ``base`` plus ``param`` laid out as ``shard``. When a rule hints at a layout,
        retry with it: fused blocks (a split of q|k|v), or ranks sharing a head (2 kv heads, 4
        ranks). A padded layout takes no hint."""
        dim = shard.dim
        size = sizes(param)[dim]
        tried = []
        standing = None  # the failure that asked for another reading: its reason stands if that fails
        for _ in range(_MAX_LAYOUT_RETRIES):
            seeds, prop = self.settle({**base, param: shard})
            if prop.ok:
                return seeds, prop
            failure = prop.failure
            if shard.padded:
                return str(failure)
            if failure.alternative and standing is None:
                standing = failure
            tried.append(shard)
            blocks = _blocks_for(failure.blocks, size, shard) if failure.blocks else shard.blocks
            hinted = Shard(dim, blocks or shard.blocks, failure.replicas or shard.replicas)
            if hinted == shard:
                break
            if not divides(hinted, size, self.world):  # its blocks that do not split may still be held whole
                tried.append(hinted)
                break
            shard = hinted
        # some blocks held whole: in the finest layout tried first, then in those it refined (a
        # mamba in_proj whose B|C cannot split keeps z|x|dt sharded, B and C whole)
        for layout in reversed(tried):
            found = self._with_whole_blocks(base, param, layout)
            if found is not None:
                return found
        return str(standing or prop.failure)

    def _with_whole_blocks(self, base: dict[fx.Node, Placement], param: fx.Node, shard: Shard):
        """A fused layout that failed, retried with some of its blocks held whole by every rank
        (the fewest elements first): a q|k|v whose single kv head cannot be split keeps q
        sharded, k and v whole. None when no such layout settles."""
        count = shard.num_blocks if shard.replicas == 1 and not shard.whole else 0
        if not 2 <= count <= _MAX_FUSED_BLOCKS:
            return None
        parts = block_sizes(shard, sizes(param)[shard.dim])
        subsets = [whole for taken in range(1, count) for whole in combinations(range(count), taken)]
        for whole in sorted(subsets, key=lambda w: (sum(parts[b] for b in w), len(w))):  # fewest elements whole first
            layout = Shard(shard.dim, shard.blocks, whole=whole)
            if divides(layout, sizes(param)[shard.dim], self.world):
                seeds, prop = self.settle({**base, param: layout})
                if prop.ok:
                    return seeds, prop
        return None

    def _grow_once(self, grown: Grown, assigned: set) -> Optional[Grown]:
        """Add the matmuls upstream of locally sliced values, if that removes slices."""
        sliced = [arg_at(node, move.path) for node, move in grown.prop.redistributions()]
        if not sliced:
            return None
        taken = assigned | set(grown.seeds)
        extra: list[Candidate] = []
        for value in sliced:
            for cand in self.upstream_candidates(value, taken):
                if cand not in extra and isinstance(self.colwise(cand), Shard):
                    extra.append(cand)
        trials = [extra] + ([[e] for e in extra] if len(extra) > 1 else []) if extra else []
        current = _replicated_slices(grown.prop)
        for group in trials:
            if len(group) == 1:  # one new seed: it may take a hinted layout
                found = self._seed_layout(grown.seeds, group[0].param, self.colwise(group[0]))
                if isinstance(found, str):
                    continue
                seeds, prop = found
            else:
                seeds, prop = self.settle({**grown.seeds, **{e.param: self.colwise(e) for e in group}})
            if prop.ok and _replicated_slices(prop) < current:
                return Grown(seeds, prop, grown.entries + list(group))
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
    if (node.target not in _FACTORIES or not isinstance(placement, Shard) or placement.padded or placement.period
            or not node.args):
        return None
    shape = node.args[0]
    if not isinstance(shape, (list, tuple)) or not 0 <= placement.dim < len(shape):
        return None
    size, chunks = shape[placement.dim], placement.chunks(world)
    if not isinstance(size, int) or isinstance(size, bool) or not divides(placement, size, world):
        return None
    return ArgEdit(node.name, [0, placement.dim], size, size // chunks)
