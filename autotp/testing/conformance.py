"""Rule conformance: every propagation rule checked on PyTorch's own per-op sample inputs.

PyTorch keeps sample inputs for ~700 ops in its OpInfo database
(``torch.testing._internal.common_methods_invocations.op_db``); DTensor's op tests run every
op over them. Here, for every sample of every OpInfo whose op reaches an autotp rule:

1. the call is traced to aten ops as torch.export sees them (``make_fx`` with
   ``pre_dispatch=True``: ``linear`` stays ``linear``), its tensors as graph inputs;
2. each input placement is tried (:func:`seed_sets`): each input sharded on each dim that
   splits, in two fused blocks (one of them held whole by every rank, or neither), in four
   with the middle two whole, shared by pairs of ranks, padded on each dim that does not split,
   strided (a run of blocks, each split), as a ``Partial`` sum, and all inputs sharded along
   one broadcast-aligned dim at once;
3. placements are propagated through the graph. Where a rule refuses, that is sound and is
   counted as a refusal. Where the graph is accepted, it is rewritten for every rank exactly
   as a model's graph is (local slices, localised literals, all-reduces after ``Partial``
   values), the ranks run on their pieces of the inputs (:mod:`autotp.simulate`), and every
   rank's outputs are compared with the unsharded outputs laid out as the plan claims:
   whole where replicated, the rank's chunk where sharded (its real elements where padded).

A difference or an exception is a failure: a rule accepted a placement it computes wrong.
The samples come from :mod:`autotp.testing.samples`; ops with no OpInfo get hand-written
ones. Start at :func:`run`.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.fx as fx

from autotp.placement import Partial, Placement, Replicate, Shard, divides, local_chunk, valid_length
from autotp.plan import Plan, ShardedInput
from autotp.planner import add_rewrites
from autotp.propagate import Propagation, propagate
from autotp.rewrite import rewrite
from autotp.simulate import communicators, copy_graph_module, run_ranks_in_threads
from autotp.testing.samples import EVEN_SIZES, UNIT_SIZES, Sample, hand_samples, opinfo_samples

__all__ = ["Report", "run", "seed_sets", "check_graph", "trace",
           "Sample", "EVEN_SIZES", "UNIT_SIZES", "opinfo_samples", "hand_samples"]  # the last five from autotp.testing.samples

aten = torch.ops.aten

# ops whose output values are uninitialised memory: only their shapes can be compared
UNINITIALISED = {aten.empty_like.default, aten.new_empty.default, aten.empty.memory_format,
                 aten.empty_strided.default, aten.new_empty_strided.default}
# relative to the output's largest value: a sum split into partial sums rounds differently
_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.complex128: 1e-10, torch.complex64: 2e-5,
              torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@dataclass
class Report:
    """What a run checked. ``checked[op]``: accepted sharded placements of ``op`` whose whole
    graph then matched the unsharded result; ``refused[op]``: placements ``op``'s rule refused."""

    checked: Counter = field(default_factory=Counter)
    refused: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    samples: int = 0
    untraceable: int = 0
    placements: int = 0
    seconds: float = 0.0

    def __iadd__(self, other: "Report") -> "Report":
        self.checked += other.checked
        self.refused += other.refused
        self.failures += other.failures
        for name in ("samples", "untraceable", "placements", "seconds"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def ops(self) -> set[str]:
        return set(self.checked) | set(self.refused)

    def to_dict(self) -> dict[str, Any]:
        """JSON values: what ``scripts/conformance.py --json`` writes (with the summary)."""
        return dict(summary=self.summary(), checked=dict(self.checked), refused=dict(self.refused),
                    failures=self.failures, samples=self.samples, untraceable=self.untraceable,
                    placements=self.placements, seconds=self.seconds)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Report":
        """The report ``to_dict`` wrote: runs split over processes are added with ``+=``."""
        return cls(Counter(data["checked"]), Counter(data["refused"]), list(data["failures"]), data["samples"],
                   data["untraceable"], data["placements"], data["seconds"])

    def summary(self) -> str:
        return (f"{len(self.ops())} ops reached ({len(self.checked)} with accepted placements checked), "
                f"{self.samples} samples ({self.untraceable} untraceable), {self.placements} placements: "
                f"{sum(self.refused.values())} refused, {sum(self.checked.values())} accepted op results "
                f"matched, {len(self.failures)} failed, in {self.seconds:.1f} s")


# ---- one graph -------------------------------------------------------------------------------

class _Call(torch.nn.Module):
    def __init__(self, fn: Callable[..., list[torch.Tensor]]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return self.fn(*tensors)


def trace(sample: Sample) -> Optional[fx.GraphModule]:
    """The sample as an fx graph of aten ops, with ``meta["val"]`` on every node; None if it
    cannot be traced. Static sizes by ``make_fx`` (what torch.export runs inside, 10x faster);
    symbolic ones by torch.export itself, every dim dynamic but the last (batch and sequence
    sizes are dynamic in a captured model, hidden sizes static)."""
    from torch.export import Dim
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        if not sample.symbolic:
            return make_fx(sample.fn, pre_dispatch=True, tracing_mode="fake")(*sample.tensors)
        dynamic = tuple({d: Dim.AUTO for d in range(t.dim() - 1)} for t in sample.tensors)
        return torch.export.export(_Call(sample.fn), tuple(sample.tensors), dynamic_shapes=(dynamic,),
                                   strict=False).module()
    except Exception:
        return None


def seed_sets(placeholders: Sequence[fx.Node], world: int, *, shared_only: bool = False) -> Iterator[dict[fx.Node, Placement]]:
    """The input placements to try: each input alone on each dim (plain, two fused blocks,
    some blocks held whole, shared by rank pairs), each floating input as a Partial sum, and
    every input at once along one dim aligned from the right (as broadcasting aligns them). ``shared_only``: only the
    placements whose chunks pairs of ranks share."""
    values = {p: p.meta.get("val") for p in placeholders}
    tensors = {p: v for p, v in values.items() if isinstance(v, torch.Tensor) and v.numel() > 0}
    for node, value in tensors.items():
        for d in range(value.dim()):
            size = value.shape[d]
            if not isinstance(size, int):
                continue
            layouts = (Shard(d, 1, 2),) if shared_only else (Shard(d), Shard(d, 2), Shard(d, 1, 2), Shard(d, padded=True),
                                                              Shard(d, 2, whole=(0,)), Shard(d, 2, whole=(1,)),
                                                              Shard(d, 4, whole=(1, 2)))
            if not shared_only:  # strided: the dim as a run of blocks, each sharded (the two shortest periods)
                layouts += tuple(Shard(d, period=p) for p in range(world, size, world) if size % p == 0)[:2]
            for shard in layouts:
                if world % shard.replicas == 0 and shard.replicas < world and divides(shard, size, world):
                    yield {node: shard}
        if value.is_floating_point() and not shared_only:
            yield {node: Partial()}
    if shared_only:
        return
    for k in range(1, max((v.dim() for v in tensors.values()), default=0) + 1):
        group = {n: Shard(v.dim() - k) for n, v in tensors.items() if v.dim() >= k and isinstance(v.shape[-k], int)
                 and divides(Shard(0), v.shape[-k], world)}
        if len(group) >= 2:
            yield group


def _local_inputs(tensors: Sequence[torch.Tensor], placeholders: Sequence[fx.Node],
                  seeds: dict[fx.Node, Placement], world: int) -> list[list[torch.Tensor]]:
    """Every rank's inputs: its chunk of a sharded input, its summand of a Partial one."""
    per_rank: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for node, t in zip(placeholders, tensors):
        placement = seeds.get(node, Replicate())
        if isinstance(placement, Partial):
            g = torch.Generator().manual_seed(len(per_rank[0]))
            parts = [torch.randn(t.shape, generator=g, dtype=t.dtype) * t.abs().max().clamp(min=1)
                     for _ in range(world - 1)]
            parts.append(t - sum(parts))
        for rank in range(world):
            if isinstance(placement, Shard):
                per_rank[rank].append(local_chunk(t, placement, rank, world).contiguous())
            elif isinstance(placement, Partial):
                per_rank[rank].append(parts[rank])
            else:
                per_rank[rank].append(t)
    return per_rank


def _mismatch(expected: torch.Tensor, got: Any, values: bool) -> Optional[str]:
    """Why ``got`` is not ``expected``, or None."""
    if not isinstance(got, torch.Tensor):
        return f"got {type(got).__name__}, expected a tensor"
    if got.shape != expected.shape or got.dtype != expected.dtype:
        return f"got {got.dtype}{list(got.shape)}, expected {expected.dtype}{list(expected.shape)}"
    if not values:
        return None
    if not (expected.is_floating_point() or expected.is_complex()):
        return None if torch.equal(got, expected) else "values differ"
    same_nan = torch.equal(got.isnan(), expected.isnan())
    finite = expected.isfinite() & got.isfinite()
    infinite_same = torch.equal(got[~finite & ~expected.isnan()], expected[~finite & ~expected.isnan()])
    scale = expected[finite].abs().max().item() if finite.any() else 0.0
    diff = (got[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    bound = _TOLERANCE.get(expected.dtype, 1e-3) * max(scale, 1.0)
    if not (same_nan and infinite_same and diff <= bound):
        return f"max abs diff {diff:.3e} > {bound:.3e} (nan/inf {'same' if same_nan and infinite_same else 'differ'})"
    return None


def _accepted(prop: Propagation) -> list[fx.Node]:
    """Nodes whose rule accepted a sharded (or Partial) input."""
    return [n for n in prop.answers if any(a in prop.placements for a in n.all_input_nodes)]


def check_graph(gm: fx.GraphModule, tensors: Sequence[torch.Tensor], seeds: dict[fx.Node, Placement],
                world: int, expected: Optional[Sequence[Any]] = None) -> tuple[Propagation, list[fx.Node], Optional[str]]:
    """Propagate ``seeds``; if accepted, run every rank's rewritten graph and compare with
    ``expected`` (default: ``gm`` run on ``tensors``). Returns the propagation, the nodes
    checked, and the failure (None when it matched)."""
    prop = propagate(gm.graph, seeds, world, any_output_layout=True)
    accepted = _accepted(prop)
    if not prop.ok or not accepted:
        return prop, [], None
    plan = Plan(tp_size=world)
    plan.sharded_inputs = [ShardedInput(n.name, p) for n, p in seeds.items()]
    add_rewrites(plan, gm.graph, prop, {}, lambda _: False)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    comms = communicators(world, timeout=30)
    try:
        graphs = [rewrite(copy_graph_module(gm), plan, rank, comm=comms[rank]) for rank in range(world)]
        local = _local_inputs(tensors, placeholders, seeds, world)
        outputs = run_ranks_in_threads(lambda rank: graphs[rank](*local[rank]), world, comms)
    except Exception as exc:  # an accepted placement the rewritten graph cannot run
        return prop, accepted, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    expected = gm(*tensors) if expected is None else expected
    output_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    producers = list(output_node.args[0])
    sharded = {tuple(o.path): o.placement for o in plan.sharded_outputs}
    for rank, got in enumerate(outputs):
        for i, whole in enumerate(expected):
            placement = sharded.get((0, i))
            want = local_chunk(whole, placement, rank, world) if placement is not None else whole
            if placement is not None and placement.padded:  # the rank's real elements: padding is cut
                want = want.narrow(placement.dim, 0, valid_length(placement, whole.shape[placement.dim], rank, world))
            values = not (isinstance(producers[i], fx.Node) and producers[i].target in UNINITIALISED)
            why = _mismatch(want, got[i], values)
            if why:
                return prop, accepted, f"rank {rank} output {i} ({placement or 'whole'}): {why}"
    return prop, accepted, None


def _unsharded(gm: fx.GraphModule, tensors: Sequence[Any]) -> Optional[Sequence[Any]]:
    """``gm``'s outputs on (copies of) ``tensors``, or None where the sample cannot run at its
    sizes (fake tensors traced it, but an index is out of range at small sizes, say)."""
    try:
        return gm(*[t.clone() if isinstance(t, torch.Tensor) else t for t in tensors])
    except Exception:  # noqa: BLE001  the sample's own failure: nothing to compare with
        return None


def _describe(seeds: dict[fx.Node, Placement]) -> str:
    return ", ".join(f"{n.name}: {p}" for n, p in seeds.items())


def run(samples: Iterable[Sample], worlds: Sequence[int] = (2, 3), shared_worlds: Sequence[int] = (4,), *,
        budget_s: Optional[float] = None, progress: Optional[Callable[[str], None]] = None) -> Report:
    """Check every sample at every world size over every seed set; see the module docstring.

    Args:
        samples: what to check (:func:`opinfo_samples`, :func:`hand_samples`).
        worlds: the world sizes to try every placement at.
        shared_worlds: world sizes to try only the placements pairs of ranks share at (they
            exist from 4 ranks on).
        budget_s: stop taking new samples after this many seconds (the report says how many ran).
        progress: called with each sample's label.
    """
    report = Report()
    start = time.perf_counter()
    for sample in samples:
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
        if progress:
            progress(sample.label)
        report.samples += 1
        gm = trace(sample)
        expected = _unsharded(gm, sample.tensors) if gm is not None else None
        if expected is None:
            report.untraceable += 1
            continue
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        tries = [(w, seeds) for w in worlds for seeds in seed_sets(placeholders, w)]
        tries += [(w, seeds) for w in shared_worlds for seeds in seed_sets(placeholders, w, shared_only=True)]
        for world, seeds in tries:
            report.placements += 1
            prop, accepted, failure = check_graph(gm, sample.tensors, seeds, world, expected)
            if failure:
                report.failures.append(f"{sample.label} tp={world} {{{_describe(seeds)}}}: {failure}")
            elif accepted:
                report.checked.update(str(n.target) for n in accepted)
            elif prop.failure is not None:
                report.refused[str(prop.failure.node.target)] += 1
    report.seconds = time.perf_counter() - start
    return report
