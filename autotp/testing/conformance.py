"""Rule conformance: every propagation rule checked on PyTorch's own per-op sample inputs.

PyTorch keeps sample inputs for ~700 ops in its OpInfo database
(``torch.testing._internal.common_methods_invocations.op_db``); DTensor's op tests run every
op over them. Here, for every sample of every OpInfo whose op reaches an autotp rule:

1. the call is traced to aten ops as torch.export sees them (``make_fx`` with
   ``pre_dispatch=True``: ``linear`` stays ``linear``), its tensors as graph inputs;
2. each input placement is tried (:func:`seed_sets`): each input sharded on each dim that
   splits, in two fused blocks, shared by pairs of ranks, as a ``Partial`` sum, and all
   inputs sharded along one broadcast-aligned dim at once;
3. placements are propagated through the graph. Where a rule refuses, that is sound and is
   counted as a refusal. Where the graph is accepted, it is rewritten for every rank exactly
   as a model's graph is (local slices, localised literals, all-reduces after ``Partial``
   values), the ranks run on their pieces of the inputs (:mod:`autotp.simulate`), and every
   rank's outputs are compared with the unsharded outputs laid out as the plan claims:
   whole where replicated, the rank's chunk where sharded.

A difference or an exception is a failure: a rule accepted a placement it computes wrong.
Ops with no OpInfo get hand-written samples (:func:`hand_samples`). Start at :func:`run`.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from autotp.placement import Partial, Placement, Replicate, Shard, divides, local_chunk
from autotp.plan import Plan, ShardedInput
from autotp.planner import add_rewrites
from autotp.propagate import Propagation, propagate
from autotp.rewrite import rewrite
from autotp.rules import RULES, rule_for
from autotp.simulate import communicators, copy_graph_module, run_ranks_in_threads

__all__ = ["Sample", "Report", "run", "opinfo_samples", "hand_samples", "seed_sets", "check_graph", "trace"]

aten = torch.ops.aten

# ops whose output values are uninitialised memory: only their shapes can be compared
UNINITIALISED = {aten.empty_like.default, aten.new_empty.default, aten.empty.memory_format,
                 aten.empty_strided.default, aten.new_empty_strided.default}
# relative to the output's largest value: a sum split into partial sums rounds differently
_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.complex128: 1e-10, torch.complex64: 2e-5,
              torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@dataclass
class Sample:
    """One call to check: ``fn(*tensors)`` returns a flat list of tensors."""

    label: str
    fn: Callable[..., list[torch.Tensor]]
    tensors: list[torch.Tensor]
    symbolic: bool = False  # trace with symbolic sizes (as export's dynamic dims), else static


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

    def summary(self) -> str:
        return (f"{len(self.ops())} ops reached ({len(self.checked)} with accepted placements checked), "
                f"{self.samples} samples ({self.untraceable} untraceable), {self.placements} placements: "
                f"{sum(self.checked.values())} accepted and matched, {sum(self.refused.values())} refused, "
                f"{len(self.failures)} failed, in {self.seconds:.1f} s")


# ---- samples ---------------------------------------------------------------------------------

def _flat_call(op: Callable, args: tuple, kwargs: dict) -> tuple[Callable[..., list[torch.Tensor]], list[torch.Tensor]]:
    """``op(*args, **kwargs)`` as a function of its tensors alone, returning a flat list."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

    def fn(*tensors: torch.Tensor) -> list[torch.Tensor]:
        values = list(leaves)
        for i, t in zip(positions, tensors):
            values[i] = t
        call_args, call_kwargs = pytree.tree_unflatten(values, spec)
        return [t for t in pytree.tree_leaves(op(*call_args, **call_kwargs)) if isinstance(t, torch.Tensor)]

    return fn, [leaves[i] for i in positions]


def _packet_names() -> set[str]:
    """The aten op names that have a rule, registered or derived from their tags."""
    names = {op._schema.name.split("::")[-1] for op in RULES if hasattr(op, "_schema")}
    for name in dir(aten):
        packet = getattr(aten, name, None)
        if isinstance(packet, torch._ops.OpOverloadPacket) and any(
                rule_for(getattr(packet, o)) for o in packet.overloads()):
            names.add(name)
    return names


def _names_of(opinfo: Any) -> set[str]:
    return ({opinfo.aten_name, opinfo.name.split(".")[-1], opinfo.name.replace(".", "_")}
            | {a.name.split(".")[-1] for a in opinfo.aliases})


# OpInfo samples are sized by module constants S, M, L, XS (5, 10, 20, 3): odd sizes split over
# no world size, so most shape rules would only ever be seen refusing. With these sizes the
# same samples split over 2, 3 and 4 ranks (M, L) or 2 and 3 (S).
EVEN_SIZES = {"S": 6, "M": 12, "L": 24, "XS": 4}


@contextlib.contextmanager
def sample_sizes(sizes: Optional[dict[str, int]]) -> Iterator[None]:
    """Set the OpInfo size constants in every module of torch's test internals that holds them
    (each ``from ... import S`` made its own copy); ``None`` leaves them."""
    changed = []
    if sizes:
        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("torch.testing._internal"):
                for name, value in sizes.items():
                    if isinstance(getattr(module, name, None), int):
                        changed.append((module, name, getattr(module, name)))
                        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in changed:
            setattr(module, name, value)


def opinfo_samples(dtypes: Sequence[torch.dtype] = (torch.float32, torch.float64),
                   per_op: Optional[int] = None, only: Optional[Iterable[str]] = None,
                   sizes: Optional[dict[str, int]] = EVEN_SIZES) -> Iterator[Sample]:
    """Samples of every OpInfo named like an op that has a rule (``per_op``: at most that many
    per OpInfo and dtype; ``only``: OpInfo names to keep; ``sizes``: the size constants, see
    :data:`EVEN_SIZES`, ``None`` for PyTorch's own)."""
    from torch.testing._internal.common_methods_invocations import op_db

    wanted, keep = _packet_names(), set(only) if only else None
    for opinfo in op_db:
        if not (_names_of(opinfo) & wanted) or (keep is not None and opinfo.name not in keep):
            continue
        label = opinfo.name + (f".{opinfo.variant_test_name}" if opinfo.variant_test_name else "")
        for dtype in dtypes:
            if dtype not in opinfo.supported_dtypes("cpu"):
                continue
            try:
                with sample_sizes(sizes):
                    samples = list(opinfo.sample_inputs("cpu", dtype, requires_grad=False))
            except Exception:  # an OpInfo whose samples need something this machine lacks
                continue
            for i, sample in enumerate(samples[:per_op]):
                fn, tensors = _flat_call(opinfo.op, (sample.input, *sample.args), dict(sample.kwargs))
                yield Sample(f"{label}[{str(dtype).split('.')[-1]} #{i}]", fn, tensors)


def hand_samples() -> list[Sample]:
    """Samples for ops that have a rule but no OpInfo, or that only a symbolic trace emits."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    x, y = randn(4, 6, 8), randn(4, 6, 8)
    mask = randn(4, 6, 8) > 0
    calls: list[tuple[str, Callable, tuple, bool]] = [
        ("and", lambda a, b: a & b, (mask, randn(6, 8) > 0), False),
        ("or", lambda a, b: a | b, (mask, randn(4, 1, 8) > 0), False),
        ("_softmax", lambda a: aten._softmax(a, -1, False), (x,), False),
        ("_log_softmax", lambda a: aten._log_softmax(a, 1, False), (x,), False),
        ("_to_copy", lambda a: aten._to_copy(a, dtype=torch.float64), (x,), False),
        ("_unsafe_view", lambda a: aten._unsafe_view(a, [4, 6, 2, 4]), (x,), False),
        ("alias", lambda a: aten.alias(a), (x,), False),
        ("detach", lambda a: a.detach() * 2, (x,), False),
        ("lift_fresh_copy", lambda a: aten.lift_fresh_copy(a), (x,), False),
        ("dropout-eval", lambda a: torch.dropout(a, 0.5, False), (x,), False),
        ("feature_dropout-eval", lambda a: torch.feature_dropout(a, 0.5, False), (x,), False),
        ("native_dropout-eval", lambda a: list(torch.native_dropout(a, 0.5, False)), (x,), False),
        ("numpy_T", lambda a: aten.numpy_T(a), (x,), False),
        ("type_as", lambda a, b: a.type_as(b), (x, y.double()), False),
        ("sizes", lambda a: a.view(a.shape[0], a.shape[1], -1) * a.shape[-1], (x,), True),
        ("sizes-2", lambda a: a.reshape(a.shape[0] * a.shape[1], a.shape[2]).sum(0), (x,), True),
        ("new_ones", lambda a: a.new_ones(a.shape) + a, (x,), False),
        ("new_zeros", lambda a: a.new_zeros(4, 6, 8) * a, (x,), False),
        ("new_full", lambda a: a.new_full((6, 8), 2.0) * a, (x,), False),
        ("grouped_mm", lambda a, w, offs: torch._grouped_mm(a, w, offs=offs),  # bf16 only, on CPU
         (randn(8, 16, dtype=torch.bfloat16), randn(2, 16, 16, dtype=torch.bfloat16),
          torch.tensor([4, 8], dtype=torch.int32)), False),
        ("index_select", lambda a, i: a.index_select(1, i), (x, torch.tensor([0, 2, 5])), False),
        ("sdpa-gqa", lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
         (randn(2, 4, 6, 8), randn(2, 2, 6, 8), randn(2, 2, 6, 8)), False),
        ("sdpa-mask", lambda q, k, v, m: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m),
         (randn(2, 4, 6, 8), randn(2, 4, 6, 8), randn(2, 4, 6, 8), randn(2, 4, 6, 6)), False),
        ("repeat_interleave", lambda a: a.repeat_interleave(2, dim=1), (x,), False),
        ("embedding", lambda w, i: torch.nn.functional.embedding(i, w), (randn(12, 8), torch.tensor([[0, 5, 11]])), False),
        ("contiguous", lambda a: a.transpose(0, 1).contiguous(), (x,), False),
        ("to-dtype-layout", lambda a: aten.to.dtype_layout(a, dtype=torch.float64) + 1, (x,), False),
        ("norm-dim", lambda a: aten.norm.ScalarOpt_dim(a, 2, [1]), (x,), False),
        ("to-export", lambda a: a.to(torch.float64) * 2, (x,), True),
        ("numel", lambda a: a * a.numel(), (x,), True),
        ("stride", lambda a: a * a.stride(0), (x,), True),
    ]
    grouped = _transformers_grouped_mm()
    if grouped is not None:
        calls.append(("grouped_mm_fallback", grouped, (randn(8, 16), randn(2, 16, 12),
                                                       torch.tensor([4, 8], dtype=torch.int32)), False))
    samples = []
    for label, fn, tensors, symbolic in calls:
        flat, leaves = _flat_call(lambda *a, fn=fn: fn(*a), tensors, {})
        samples.append(Sample(f"hand:{label}", flat, leaves, symbolic))
    return samples


def _transformers_grouped_mm() -> Optional[Callable]:
    """transformers' grouped matmul op (its MoE experts' fallback), when transformers is installed."""
    try:
        import transformers.integrations.moe  # noqa: F401  (registers the op)
    except ImportError:
        return None
    op = getattr(getattr(torch.ops, "transformers", None), "grouped_mm_fallback", None)
    return None if op is None else (lambda a, w, offs: op(a, w, offs))


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
    shared by rank pairs), each floating input as a Partial sum, and every input at once along
    one dim aligned from the right (as broadcasting aligns them). ``shared_only``: only the
    placements whose chunks pairs of ranks share."""
    values = {p: p.meta.get("val") for p in placeholders}
    tensors = {p: v for p, v in values.items() if isinstance(v, torch.Tensor) and v.numel() > 0}
    for node, value in tensors.items():
        for d in range(value.dim()):
            size = value.shape[d]
            if not isinstance(size, int):
                continue
            for shard in (Shard(d, 1, 2),) if shared_only else (Shard(d), Shard(d, 2), Shard(d, 1, 2)):
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
                world: int) -> tuple[Propagation, list[fx.Node], Optional[str]]:
    """Propagate ``seeds``; if accepted, run every rank's rewritten graph and compare.
    Returns the propagation, the nodes checked, and the failure (None when it matched)."""
    prop = propagate(gm.graph, seeds, world)
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
    expected = gm(*tensors)
    output_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    producers = list(output_node.args[0])
    sharded = {tuple(o.path): o.placement for o in plan.sharded_outputs}
    for rank, got in enumerate(outputs):
        for i, whole in enumerate(expected):
            placement = sharded.get((0, i))
            want = local_chunk(whole, placement, rank, world) if placement is not None else whole
            values = not (isinstance(producers[i], fx.Node) and producers[i].target in UNINITIALISED)
            why = _mismatch(want, got[i], values)
            if why:
                return prop, accepted, f"rank {rank} output {i} ({placement or 'whole'}): {why}"
    return prop, accepted, None


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
        if gm is None:
            report.untraceable += 1
            continue
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        tries = [(w, seeds) for w in worlds for seeds in seed_sets(placeholders, w)]
        tries += [(w, seeds) for w in shared_worlds for seeds in seed_sets(placeholders, w, shared_only=True)]
        for world, seeds in tries:
            report.placements += 1
            prop, accepted, failure = check_graph(gm, sample.tensors, seeds, world)
            if failure:
                report.failures.append(f"{sample.label} tp={world} {{{_describe(seeds)}}}: {failure}")
            elif accepted:
                report.checked.update(str(n.target) for n in accepted)
            elif prop.failure is not None:
                report.refused[str(prop.failure.node.target)] += 1
    report.seconds = time.perf_counter() - start
    return report
