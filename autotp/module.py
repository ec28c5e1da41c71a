"""TensorParallelModule: this rank's part of a tensor-parallel model, called like the original.

It holds rewritten graphs per input structure, all sharing this rank's tensors:

- the graph :func:`autotp.parallelize` captured (a plain call such as ``model(input_ids)``);
- graphs for other argument sets, captured and planned on first use (every rank does);
- for generation, the cached graphs of :mod:`autotp.generation` (prefill, decode, extend),
  used when a call carries a Hugging Face cache (:mod:`autotp.cached_calls`); ``generate()``
  runs Hugging Face's own generation loop over them, on the original model object, whose
  ``forward`` now routes here.

Each kind of call may have several graphs (variants): export guards the sizes a graph was
made for (a length it specialised, a sliding window full or not), and a call none of them
serves is captured again (:mod:`autotp.guards`).
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Iterator, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from autotp import cache as graph_cache
from autotp import hf
from autotp.call_checks import ModelState, OneCaller, check_no_gradients, contiguous_arguments, draws_random_numbers
from autotp.capture import bind_inputs, capture, forward_signature, graph_inputs, meta_twin, structure_key
from autotp.errors import AutotpError
from autotp.cached_calls import CachedCalls
from autotp.generation import cache_argument, cache_under_its_name, fresh_cache, is_cache
from autotp.group import TPContext, check_same_plan, share_rng
from autotp.health import PeerFailure, clear_failed, mark_failed, note_call_raised
from autotp.kernels import kernel_pass
from autotp.loading import LoadError, load_into, named_tensors
from autotp.placement import Placement, Replicate
from autotp.plan import Plan
from autotp.planner import plan_graph, plan_with_placements
from autotp.rewrite import rewrite

__all__ = ["TensorParallelModule"]

def placements(plan: Plan, prefix: str = "") -> dict[str, Placement]:
    """Parameter name (without ``prefix``) -> placement."""
    return {name.removeprefix(prefix): spec.placement for name, spec in plan.params.items()}


class _LocalSource:
    """Tensors already local to this rank (``rename``: a graph's name -> the model's)."""

    def __init__(self, tensors: dict[str, torch.Tensor], rename: Callable[[str], str]) -> None:
        self.tensors, self.rename = tensors, rename

    def has(self, name: str) -> bool:
        return self.rename(name) in self.tensors

    def read(self, name: str, placement: Placement, rank: int, world_size: int) -> torch.Tensor:
        if self.rename(name) not in self.tensors:
            raise LoadError(f"this rank holds no data for {self.rename(name)!r}")
        return self.tensors[self.rename(name)]


class TensorParallelModule(CachedCalls, nn.Module):
    """This rank's part of a tensor-parallel model. Call it like the original model.

    Attributes:
        graph_module: the rewritten graph for the inputs given to :func:`parallelize`.
        plan: the plan it carries out (the same on every rank).
        rank, tp_size: this rank and the size of its tensor-parallel group.
        timings: seconds per stage of :func:`parallelize` (init: the process group and the
            collective path; capture, plan, rewrite, load).
        cached_calls: per phase of cached calls (prefill, decode, extend): how many calls, and
            how many new tokens they fed (a decode step feeds one per sequence: the prefix is
            never run again).
        cache_status: what the graph cache (:mod:`autotp.cache`) did for ``graph_module``:
            ``hit``, ``stored``, ``miss``, ``off``, ``uncacheable: <why>``; ``graph_cache``
            holds the same per later graph.
    """

    def __init__(self, gm: fx.GraphModule, plan: Plan, ctx: TPContext, source: nn.Module, key: tuple,
                 *, cache: bool = True, gather_outputs: bool = True) -> None:
        super().__init__()
        self.graph_module = gm
        self.plan = plan
        self.rank, self.tp_size = ctx.rank, ctx.tp_size
        self.timings: dict[str, float] = {}
        self.cached_calls: dict[str, dict[str, int]] = {}
        self.cache_status = "off"
        self.graph_cache: dict[tuple, str] = {}
        # Not submodules: the source model is the skeleton for capturing other calls, and the
        # object whose generate() runs over this module.
        signature = forward_signature(source)
        # _twin: the model's structure at global shapes, on meta, for later captures (the
        # source's own tensors become this rank's pieces)
        self.__dict__.update(_ctx=ctx, _source=source, _twin=meta_twin(source), _graphs={key: gm},
                             _signature=signature, _cache_arg=cache_argument(signature), _cache_layout=None, _variants={},
                             _use_cache=cache, _gather_outputs=gather_outputs, _state=ModelState(source),
                             _caller=OneCaller())
        if hf.is_hf_model(source):
            self.__dict__["config"] = source.config

    # ---- calls ------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._checked_call(args, kwargs):
            return self._forward(*args, **kwargs)

    @contextlib.contextmanager
    def _checked_call(self, args: tuple, kwargs: dict) -> Iterator[None]:
        """Around a call: its failure recorded for the peers, one calling thread, the model as
        handed over, no gradients asked for and none built (inference only: autotp.call_checks)."""
        with _reported_failure(), self._caller.admitted():
            self._state.check()
            check_no_gradients(args, kwargs)
            with torch.no_grad():
                yield

    def _forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = bind_inputs(self._source, args, kwargs, self._signature)
        if self._cache_arg:
            cache_under_its_name(inputs, self._cache_arg)
            if inputs.get("use_cache") is True and inputs.get(self._cache_arg) is None and hf.is_hf_model(self._source):
                # asked for a cache and given none: the model would make one and return it filled (a
                # hand-written decode loop passes it back); a plain call returns none
                inputs[self._cache_arg] = fresh_cache(self._source)
            if is_cache(inputs.get(self._cache_arg)):
                return self._cached_call(inputs)
            if hf.is_hf_model(self._source):
                hf.check_packing_as_model(self._source, inputs)
        return self._plain_call("", inputs)

    def call_submodule(self, path: str, *args: Any, **kwargs: Any) -> Any:
        """Call the submodule at ``path`` of the handed-over model on this rank's pieces of its
        tensors: its own graph is captured and planned on first use, with the parameters laid
        out as this rank holds them (an encoder-decoder's ``generate()`` calls the encoder)."""
        with self._checked_call(args, kwargs):
            return self._plain_call(path, bind_inputs(self._source.get_submodule(path), args, kwargs))

    def remember_model_state(self) -> None:
        """Record the handed-over model's state (attributes, config, hooks, which tensors it
        holds, mode) that every later call must find unchanged (:mod:`autotp.call_checks`)."""
        self.__dict__["_state"] = ModelState(self._source, sharded=[p.name for p in self.plan.sharded_params()])

    def train(self, mode: bool = True) -> "TensorParallelModule":
        """Set the handed-over model's mode. A captured graph keeps the mode it was traced in,
        so a call after a change is refused (:mod:`autotp.call_checks`): set it before
        :func:`autotp.parallelize`."""
        self.training = mode
        self._source.train(mode)
        return self

    def _plain_call(self, path: str, inputs: dict[str, Any]) -> Any:
        """A call without a cache of the model (``path`` empty) or of one of its submodules."""
        inputs.pop("use_cache", None)  # plain calls return no cache (see generate() for cached decoding)
        as_tuple = inputs.pop("return_dict", None) is False  # the output type is applied here, not captured
        key = ("submodule", path, structure_key(inputs)) if path else structure_key(inputs)
        signature = None if path else self._signature  # the model's is kept: this runs on every call
        arguments = graph_inputs(self._source.get_submodule(path), inputs, signature)
        out = self._run_variant(key, arguments, lambda variant, bump: self._graph_for(path, variant, inputs, bump))
        return out.to_tuple() if as_tuple and hasattr(out, "to_tuple") else out

    def _run_variant(self, key: tuple, arguments: dict[str, Any],
                     capture_for: Callable[[tuple, bool], fx.GraphModule]) -> Any:
        """Run the first graph captured for this kind of call whose input guards hold, else a
        graph captured for this call. A plain graph checks its own guards first thing, before
        any collective, so every rank (same inputs) tries the next variant together. A model
        that specialises a size (a sequence length export made a constant) gets one graph per
        value instead of an assertion. A capture is made with sizes of 1 taken as 2 (so that
        they stay dynamic); if that graph does not serve the call, with the call's own sizes."""
        for variant in itertools.count():
            variant_key = key if variant == 0 else (key, "variant", variant)
            if variant_key in self._graphs:
                served, out = _guarded_call(self._ready(self._graphs[variant_key]), arguments)
                if served:
                    return out
                continue
            for bump in (True, False):
                served, out = _guarded_call(self._ready(capture_for(variant_key, bump)), arguments)
                if served:
                    return out
            raise AutotpError(f"the graph captured for this call does not serve it: {out}")
        raise AssertionError("itertools.count() ended")  # for type checkers: the loop returns

    def _ready(self, gm: fx.GraphModule) -> fx.GraphModule:
        """``gm``, after giving every rank rank 0's random state if it draws random numbers
        (:mod:`autotp.call_checks`): every rank runs the same graphs in the same order."""
        if draws_random_numbers(gm):
            share_rng(self._ctx)
        return gm

    def _graph_for(self, path: str, key: tuple, inputs: dict[str, Any], bump_unit_dims: bool = True) -> fx.GraphModule:
        """A call with other arguments than the capture's, or of a submodule: capture and plan
        again (all ranks do). A submodule keeps the placements this rank holds its tensors in."""
        twin = self._twin.get_submodule(path) if path else self._twin
        held = self._held_placements(path) if path else None
        settings = dict(graph=f"submodule {path}" if path else "other call", gather_outputs=self._gather_outputs)
        if held is not None:
            settings["placements"] = sorted((name, str(p)) for name, p in held.items())
        if not bump_unit_dims:
            settings["sizes"] = "as called"  # another graph than the one captured with 1s taken as 2
        slot = self._slot(key, twin, inputs, **settings)
        rename = (lambda name: f"{path}.{name}") if path else (lambda name: name)
        hit = slot.get(self._ctx.comm)
        if hit is not None:
            return self._install(key, hit.graph_module, hit.plan, rename, slot=slot)
        captured = capture(twin, inputs, device=self._ctx.device, bump_unit_dims=bump_unit_dims)
        label = f"{self.plan.model}.{path}" if path else self.plan.model
        if held is not None:
            plan = plan_with_placements(captured.graph, self.tp_size, held, model=label, inputs=captured.input_names,
                                        gather_outputs=True)
        else:
            plan = plan_graph(captured.graph, self.tp_size, model=label, inputs=captured.input_names,
                              gather_outputs=self._gather_outputs)
        return self._install(key, captured, plan, rename, slot=slot)

    def _held_placements(self, path: str) -> dict[str, Placement]:
        """How this rank holds each tensor of the submodule at ``path``, by its name there (a
        tied tensor is known to the plan under another name: it is found by identity)."""
        by_id = {id(t): self.plan.params[name].placement for name, t in named_tensors(self._source).items()
                 if name in self.plan.params}
        return {name: by_id.get(id(t), Replicate()) for name, t in named_tensors(self._source.get_submodule(path)).items()}

    def _slot(self, key: tuple, model: nn.Module, inputs: dict[str, Any], **settings: Any) -> graph_cache.CacheSlot:
        return graph_cache.slot(self._use_cache, model, inputs, tp_size=self.tp_size, rank=self.rank,
                                device=str(self._ctx.device), **settings)

    def _install(self, key: tuple, captured: Any, plan: Plan, rename: Callable[[str], str] = lambda name: name,
                 slot: Optional[graph_cache.CacheSlot] = None, extra: Optional[dict[str, Any]] = None) -> fx.GraphModule:
        """Check ``plan`` against the first graph's (``rename``: a name in ``plan`` -> the model's),
        rewrite ``captured`` (a Captured), or take it as rewritten (a graph module from the
        cache), and load it with the tensors this rank already holds."""
        mine, theirs = {rename(n): p for n, p in placements(plan).items()}, placements(self.plan)
        differ = sorted(n for n in mine.keys() & theirs.keys() if mine[n] != theirs[n])  # constants differ by graph
        if differ:
            raise AutotpError(
                f"a call with arguments {plan.inputs} plans the parameters differently from the "
                f"capture with {self.plan.inputs} ({', '.join(f'{n}: {mine[n]} vs {theirs[n]}' for n in differ[:3])}); "
                "parallelize with example_inputs like this call"
            )
        check_same_plan(plan, self._ctx)
        if isinstance(captured, fx.GraphModule):
            gm = captured
        else:
            gm = rewrite(captured.graph_module, plan, self.rank, comm=self._ctx.comm)
            if slot is not None:
                slot.put(gm, plan, captured.guards, extra)
        if slot is not None:
            self.graph_cache[key] = slot.status
        load_into(gm, plan, self.rank, _LocalSource(self._held_tensors(), rename), then=kernel_pass(self._ctx.kernels))
        self._graphs[key] = gm
        return gm

    def _held_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's tensors by every name: the first graph's, and the handed-over model's
        (which are the same objects, under tied names too)."""
        held = {n: t for n, t in named_tensors(self._source).items() if t.device.type != "meta"}
        return held | named_tensors(self.graph_module)

    # ---- generation -------------------------------------------------------------------------
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Hugging Face's ``generate`` (greedy, sampling, ...) with the cache sharded by heads.

        Call it on every rank with the same arguments; every rank returns the same tokens.
        Sampling draws the same tokens on every rank: rank 0's random state is shared first.
        """
        if not callable(getattr(type(self._source), "generate", None)):
            raise AttributeError(f"{type(self._source).__name__} has no generate()")
        if not self._gather_outputs:
            raise AutotpError("generate() reads whole logits: parallelize with gather_outputs=True to generate")
        if self._cache_arg is None:
            # a model that carries its own recurrent state (RWKV's ``state``) instead of a Hugging
            # Face cache: plain graphs return no state, so each step runs over the whole sequence
            # (exact, quadratic), as Hugging Face's own generate(use_cache=False) does
            kwargs.setdefault("use_cache", False)
        with _reported_failure(), self._caller.admitted():  # every step of one generation before another call
            share_rng(self._ctx)
            return self._source.generate(*args, **kwargs)

    @property
    def generation_config(self) -> Any:
        """The handed-over model's generation config (what ``generate()`` defaults to): the
        checkpoint's ``generation_config.json`` for :func:`autotp.load`."""
        return getattr(self._source, "generation_config", None)

    @generation_config.setter
    def generation_config(self, value: Any) -> None:
        self._source.generation_config = value

    # ---- introspection ----------------------------------------------------------------------
    def local_bytes(self) -> int:
        """Bytes of the parameters and buffers this rank holds, each tensor counted once. (Not
        storage sizes: a tensor loaded from a checkpoint may be a view of the mapped file.)"""
        seen, total = set(), 0
        for t in list(self.graph_module.parameters()) + list(self.graph_module.buffers()):
            key = (t.data_ptr(), t.numel(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total

    @property
    def collective_path(self) -> str:
        """How the collectives run: ``deepspeed shared memory``, ``gloo``, ``nccl``, ..."""
        return self._ctx.comm.name

    @property
    def kernels(self) -> str:
        """The GEMM the linear layers run on: ``onednn`` or ``aten`` (see :mod:`autotp.kernels`)."""
        return self._ctx.kernels

    def extra_repr(self) -> str:
        return (f"model={self.plan.model}, rank={self.rank}, tp_size={self.tp_size}, "
                f"collectives={self.collective_path}, kernels={self.kernels}")


@contextlib.contextmanager
def _reported_failure() -> Iterator[None]:
    """An error on this rank is recorded before it propagates, so that the peers it leaves
    waiting in a collective can name this rank (see autotp.group.describe_failure). A new call
    takes back the record of an error this rank raised before and its caller handled."""
    clear_failed()
    try:
        yield
    except BaseException as exc:
        note_call_raised()
        if not isinstance(exc, PeerFailure):  # a peer's failure is recorded by that peer
            mark_failed(f"{type(exc).__name__}: {exc}")
        raise


def _guarded_call(gm: fx.GraphModule, arguments: dict[str, Any]) -> tuple[bool, Any]:
    """``(True, output)`` of ``gm``, or ``(False, the failed guard)`` when export's input checks
    (the graph's first node, before any collective) reject ``arguments``."""
    try:
        return True, gm(**contiguous_arguments(gm, arguments))
    except AssertionError as exc:
        if not str(exc).startswith("Guard failed"):
            raise
        return False, exc
