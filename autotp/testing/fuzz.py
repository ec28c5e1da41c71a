"""Differential fuzzing: random modules compared with their unsharded selves on simulated ranks.

A *spec* (a dict of JSON values) describes a model: its width, vocabulary, input kind (token
ids or hidden states), a list of blocks from :mod:`autotp.testing.blocks` with their random
configurations, and its head (plain, with a bias, tied to the embedding, or none).
:func:`random_spec` draws one from a seed; :func:`check` builds it in float64, captures it once,
and for each tp plans, rewrites and runs every rank (:mod:`autotp.simulate`) on two input
shapes, comparing every rank's output with the unsharded model's. Each (spec, tp) is one of:

- ``exact``: every rank's output within 1e-9 x max |reference| (float64 makes reordered sums
  differ by ~1e-16, so a real layout error cannot hide under the bound);
- ``wrong``: it ran, and the numbers differ;
- ``internal``: an exception other than :class:`~autotp.errors.AutotpError`;
- ``refused``: an ``AutotpError`` with its message (a model autotp cannot capture, say).

:func:`shrink` reduces a failing spec to a small one that fails the same way, by removing
blocks and simplifying their configurations, so that it can be kept as a regression test.
:func:`fuzz` runs many seeds; ``scripts/fuzz.py`` is its command line.
"""

from __future__ import annotations

import json
import random
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from autotp.capture import capture
from autotp.errors import AutotpError, first_line
from autotp.planner import plan_graph
from autotp.simulate import communicators, rank_graphs, run_ranks_in_threads
from autotp.testing.blocks import KINDS, build_model

__all__ = ["random_spec", "check", "shrink", "fuzz", "Outcome", "FuzzReport", "CLASSES"]

CLASSES = ("exact", "wrong", "internal", "refused")
_TOLERANCE = 1e-9
# how often each block kind is drawn: the common transformer blocks most
_WEIGHTS = {"mlp": 4, "attention": 5, "norm": 2, "reduce": 2, "divide": 1, "select": 1, "join": 1,
            "conv1d": 1, "direct": 1, "moe": 1, "layout": 3}


@dataclass
class Outcome:
    tp: int
    kind: str  # one of CLASSES
    detail: str = ""
    sharded: int = 0  # parameters the plan sharded
    diff: float = 0.0
    copied: int = 0  # layers whose nodes capture copied from an identical layer's


def random_spec(seed: int) -> dict[str, Any]:
    """A random model, the same for the same seed."""
    rng = random.Random(seed)
    dim = rng.choice([12, 16, 20, 24, 30, 32, 36, 48])
    kinds = rng.choices(sorted(_WEIGHTS), weights=[_WEIGHTS[k] for k in sorted(_WEIGHTS)], k=rng.randint(1, 4))
    blocks = [dict(kind=k, config=KINDS[k].sample(rng, dim), residual=rng.random() < 0.6, norm=rng.random() < 0.5)
              for k in kinds]
    source = rng.choice(["ids", "ids", "hidden"])
    spec = dict(seed=seed, dim=dim, vocab=rng.choice([12, 15, 16, 24, 30, 32, 50]), input=source,
                padding_idx=rng.choice([None, 0]), blocks=blocks,
                head=rng.choice(["plain", "bias"] + (["none"] if source == "hidden" else [])),
                tied=rng.random() < 0.4, batch=rng.choice([2, 3]), seq=rng.choice([4, 5, 6, 8]))
    # a third of the models stack their blocks 3 times over (fresh weights each): repeated
    # layers, whose graphs capture copies (autotp.repeats). Drawn last: the rest is as before.
    spec["blocks"] = blocks * rng.choice([1, 1, 3])
    return spec


def _other_input(spec: dict[str, Any], inputs: torch.Tensor) -> torch.Tensor:
    """An input of another batch and sequence length: the capture is dynamic in both."""
    g = torch.Generator().manual_seed(spec["seed"] + 2)
    shape = (spec["batch"] + 1, spec["seq"] + 3) + tuple(inputs.shape[2:])
    if spec["input"] == "ids":
        return torch.randint(0, spec["vocab"], shape, generator=g)
    return torch.randn(shape, generator=g, dtype=inputs.dtype)


def _first_line(exc: BaseException) -> str:
    """The exception in one line, with where it was raised."""
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" ({where.filename.rsplit('/', 2)[-1]}:{where.lineno})" if where else ""
    return f"{first_line(exc)}{at}"


def _compare(references: list[torch.Tensor], per_call: list[list[Any]]) -> tuple[float, Optional[str]]:
    """The largest difference over every call and rank, and what is wrong, if anything."""
    worst = 0.0
    for call, (reference, outputs) in enumerate(zip(references, per_call)):
        for rank, out in enumerate(outputs):
            if not isinstance(out, torch.Tensor) or out.shape != reference.shape:
                return worst, f"call {call} rank {rank}: shape {getattr(out, 'shape', None)}, expected {reference.shape}"
            diff = (out - reference).abs().max().item()
            worst = max(worst, diff)
            if not diff <= _TOLERANCE * max(1.0, reference.abs().max().item()):
                return worst, f"call {call} rank {rank}: max abs diff {diff:.3e}"
    return worst, None


def check(spec: dict[str, Any], tps: Sequence[int] = (2, 3, 4)) -> list[Outcome]:
    """Build ``spec``, capture it once, and compare every tp's ranks with the unsharded model."""
    model, first = build_model(spec)
    calls = [first, _other_input(spec, first)]
    with torch.no_grad():
        references = [model(x) for x in calls]
    try:
        # share_layers: copying is asked for, as only transformers' and torch's code shares by default;
        # these blocks keep no per-layer state outside their attributes, so copies must be exact
        captured = capture(model, (first,), share_layers=True)
    except AutotpError as exc:
        return [Outcome(tp, "refused", str(exc).splitlines()[0]) for tp in tps]
    except Exception as exc:  # noqa: BLE001 - classified
        return [Outcome(tp, "internal", _first_line(exc)) for tp in tps]
    outcomes = [_check_tp(spec, model, captured, calls, references, tp) for tp in tps]
    for outcome in outcomes:
        outcome.copied = captured.copied_layers
    return outcomes


def _check_tp(spec: dict[str, Any], model: torch.nn.Module, captured: Any, calls: list[torch.Tensor],
              references: list[torch.Tensor], tp: int) -> Outcome:
    try:
        plan = plan_graph(captured.graph, tp, model="fuzz", inputs=captured.input_names)
        comms = communicators(tp, timeout=60)
        graphs = rank_graphs(captured, plan, model, comms)
        per_call = [run_ranks_in_threads(lambda rank, x=x: graphs[rank](x), tp, comms) for x in calls]
    except AutotpError as exc:
        return Outcome(tp, "refused", str(exc).splitlines()[0])
    except Exception as exc:  # noqa: BLE001 - classified
        return Outcome(tp, "internal", _first_line(exc))
    sharded = len(plan.sharded_params())
    diff, wrong = _compare(references, per_call)
    return Outcome(tp, "wrong" if wrong else "exact", wrong or "", sharded, diff)


# ---- shrinking -------------------------------------------------------------------------------

def _smaller(spec: dict[str, Any]) -> Iterable[dict[str, Any]]:
    """Specs one step simpler than ``spec``: a block fewer, a block simpler, a plainer model."""
    blocks = spec["blocks"]
    for i in range(len(blocks)):
        if len(blocks) > 1:
            yield {**spec, "blocks": blocks[:i] + blocks[i + 1:]}
    for i, block in enumerate(blocks):
        for change in ({"residual": False}, {"norm": False}):
            if {**block, **change} != block:
                yield {**spec, "blocks": blocks[:i] + [{**block, **change}] + blocks[i + 1:]}
        for config in KINDS[block["kind"]].simpler(block["config"]):
            yield {**spec, "blocks": blocks[:i] + [{**block, "config": config}] + blocks[i + 1:]}
    for change in ({"tied": False}, {"padding_idx": None}, {"head": "plain"}, {"batch": 2}, {"seq": 4}):
        if {**spec, **change} != spec:
            yield {**spec, **change}


def shrink(spec: dict[str, Any], tp: int, kind: str, *, max_checks: int = 200) -> dict[str, Any]:
    """A smallest spec (by greedy steps) that still gives ``kind`` at ``tp``."""
    checks = 0
    improved = True
    while improved and checks < max_checks:
        improved = False
        for candidate in _smaller(spec):
            checks += 1
            try:
                outcome = check(candidate, (tp,))[0]
            except Exception:  # a simplification the block library cannot build: not smaller
                continue
            if outcome.kind == kind:
                spec, improved = candidate, True
                break
            if checks >= max_checks:
                break
    return spec


# ---- many seeds ------------------------------------------------------------------------------

@dataclass
class FuzzReport:
    counts: dict[int, Counter] = field(default_factory=dict)  # tp -> class -> count
    sharded: dict[int, int] = field(default_factory=dict)  # tp -> exact cases that sharded something
    failures: list[dict[str, Any]] = field(default_factory=list)  # {tp, kind, detail, spec, shrunk}
    refusals: Counter = field(default_factory=Counter)
    cases: int = 0
    copied: int = 0  # models with layers copied at capture
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"{self.cases} modules in {self.seconds:.1f} s ({self.copied} with repeated layers copied)"]
        for tp in sorted(self.counts):
            c = self.counts[tp]
            lines.append(f"  tp {tp}: " + ", ".join(f"{c[k]} {k}" for k in CLASSES)
                         + f" ({self.sharded.get(tp, 0)} exact with parameters sharded)")
        return "\n".join(lines)


def fuzz(seeds: Iterable[int], tps: Sequence[int] = (2, 3, 4), *, shrink_failures: bool = True,
         tp_of: Optional[Callable[[int], int]] = None, budget_s: Optional[float] = None,
         progress: Optional[Callable[[int, list[Outcome]], None]] = None) -> FuzzReport:
    """Check the random model of every seed at every tp (or at ``tp_of(seed)`` alone); failures
    are shrunk when asked."""
    report = FuzzReport(counts={tp: Counter() for tp in tps}, sharded={tp: 0 for tp in tps})
    start = time.perf_counter()
    for seed in seeds:
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break
        spec = random_spec(seed)
        outcomes = check(spec, (tp_of(seed),) if tp_of else tps)
        report.cases += 1
        report.copied += any(out.copied for out in outcomes)
        for out in outcomes:
            report.counts[out.tp][out.kind] += 1
            if out.kind == "exact" and out.sharded:
                report.sharded[out.tp] += 1
            if out.kind == "refused":
                report.refusals[out.detail.split(":")[0][:80]] += 1
            if out.kind in ("wrong", "internal"):
                small = shrink(spec, out.tp, out.kind) if shrink_failures else spec
                report.failures.append(dict(tp=out.tp, kind=out.kind, detail=out.detail, seed=seed,
                                            shrunk=json.loads(json.dumps(small))))
        if progress:
            progress(seed, outcomes)
    report.seconds = time.perf_counter() - start
    return report
