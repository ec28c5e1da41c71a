"""Cached calls of a :class:`~autotp.module.TensorParallelModule`: a call that carries a Hugging
Face cache runs graphs captured with the cache as tensors (:mod:`autotp.generation`: prefill,
decode, extend), planned so that the cache is sharded like the attention heads, and the cache
object is refilled with this rank's pieces after each call. Each kind of call may have several
graphs (variants), told apart by export's input guards on the call's *global* shapes.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch.fx as fx
from torch.utils import _pytree as pytree

from autotp import cache as graph_cache
from autotp.call_checks import contiguous_arguments
from autotp.capture import capture, structure_key
from autotp.errors import AutotpError
from autotp.generation import (CacheIO, CacheSpec, cache_spec, call_tokens, example_like, phase_of, read_cache,
                               write_cache)
from autotp.guards import Guards, Sized
from autotp.placement import Placement, Replicate, Shard, local_size, parse_placement
from autotp.plan import Plan
from autotp.planner import plan_graph

__all__ = ["CachedCalls"]

# arguments a cached call may carry that the cached graphs compute themselves or do not need
_IGNORED_WITH_CACHE = ("use_cache", "return_dict", "cache_position")
# outputs a cached graph does not return: asked for (by the call or the model's config), refused
_NOT_RETURNED_WITH_CACHE = ("output_attentions", "output_hidden_states")


class CachedCalls:
    """The cached-call half of TensorParallelModule, which provides what these methods read:
    ``_cache_arg``, ``_signature``, ``_twin``, ``_ctx``, ``_gather_outputs``, ``plan``,
    ``tp_size``, ``cached_calls`` (counts per phase), ``_variants`` and ``_cache_layout`` (set by
    the first prefill), ``_slot`` / ``_install`` (the graph cache and loading) and ``_ready``
    (rank 0's random state shared before a graph that draws)."""

    def _cached_call(self, inputs: dict[str, Any]) -> Any:
        cache = inputs.pop(self._cache_arg)
        spec = cache_spec(cache)
        encoder_decoder = getattr(getattr(self._source, "config", None), "is_encoder_decoder", False)
        new_tokens = "decoder_input_ids" if encoder_decoder else "input_ids"
        tokens = call_tokens(inputs, new_tokens)
        keep = inputs.pop("logits_to_keep", 0)
        for name in _IGNORED_WITH_CACHE:
            inputs.pop(name, None)
        self._refuse_unreturned_outputs(inputs)
        given = sorted(name for name, value in inputs.items() if value is not None)  # None: the default
        if given:
            raise AutotpError(f"arguments {given} are not supported in a call with a cache")
        past, new = cache.get_seq_length(), tokens[new_tokens].shape[1]
        call: dict[str, Any] = {"tokens": tokens}
        if past:
            call["past_keys"], call["past_values"], call["past_length"] = read_cache(cache)
        phase = phase_of(past, new)
        gm = self._cache_graph(phase, keep, spec, call, new_tokens)
        logits, keys, values = self._ready(gm)(**contiguous_arguments(gm, call))
        counts = self.cached_calls.setdefault(phase, {"calls": 0, "tokens": 0})
        counts["calls"] += 1
        counts["tokens"] += new
        write_cache(cache, keys, values, past + new)
        return self._output_type()(logits=logits, **{self._cache_arg: cache})

    def _refuse_unreturned_outputs(self, inputs: dict[str, Any]) -> None:
        """A cached call returns the logits and the cache. Hidden states or attention maps asked
        for would come back as None, which reads as "none computed", so they are refused."""
        config = getattr(self._source, "config", None)
        for name in _NOT_RETURNED_WITH_CACHE:
            asked = inputs.pop(name, None)
            if asked is None:
                asked = getattr(config, name, False)
            if asked:
                raise AutotpError(f"{name}=True is not supported in a call with a cache (a cached call returns the "
                                  "logits and the cache only): call without one (use_cache=False) to get them")

    def _output_type(self) -> Any:
        """The model's own output class when it carries the cache field, else the generic one."""
        annotated = self._signature.return_annotation
        if inspect.isclass(annotated) and self._cache_arg in getattr(annotated, "__dataclass_fields__", {}):
            return annotated
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast

    def _cache_graph(self, phase: str, keep: Any, spec: CacheSpec, call: dict[str, Any],
                     new_tokens: str) -> fx.GraphModule:
        """The graph for a cached call: the first variant captured for this kind of call whose
        input guards hold for the call's global shapes, else one captured for it now (a
        sliding window fills: the graph that grew the cache no longer serves)."""
        key = ("cache", phase, keep if isinstance(keep, int) else repr(keep), structure_key(call), spec)
        view = self._global_view(call)
        variants = self._variants.setdefault(key, [])
        for gm, guards in variants:
            if guards.hold(view):
                return gm
        if phase != "prefill" and self._cache_layout is None:
            raise AutotpError("a cached call after a prefix needs the cache this model's prefill produced")
        wrapper, example = CacheIO(self._twin, self._cache_arg, keep, spec), example_like(view, new_tokens)
        slot = self._slot(key, wrapper, example, graph="cached call", phase=phase, keep=repr(keep),
                          gather_outputs=self._gather_outputs)
        hit = slot.get(self._ctx.comm)
        if hit is not None:
            graph, plan = hit.graph_module, hit.plan
            layout = [(shape, parse_placement(p)) for shape, p in hit.extra["layout"]]
            inputs_layout = [parse_placement(p) for p in hit.extra["input_layout"]]
            guards = Guards(graph_cache.decode_guards(hit.extra["guards"]))
        else:
            graph = capture(wrapper, example, device=self._ctx.device)
            guards = Guards.of_captured(graph)
            output = next(n for n in reversed(graph.graph.nodes) if n.op == "output")
            outputs = len(output.args[0])
            cache_inputs = [n.name for n in graph.graph.nodes if n.op == "placeholder" and n.name.startswith("past_")
                            and n.name != "past_length"]
            plan = plan_graph(graph.graph, self.tp_size, model=self.plan.model, inputs=graph.input_names,
                              local_inputs=cache_inputs, local_outputs=range(1, outputs),
                              gather_outputs=self._gather_outputs)
            layout = _cache_layout(plan, output, outputs)
            inputs_layout = _input_layout(plan, cache_inputs) if cache_inputs else None
        if self._cache_layout is None:
            self.__dict__["_cache_layout"] = layout
        expected = [p for _, p in self._cache_layout]
        if [p for _, p in layout] != expected or (inputs_layout and inputs_layout != expected):
            raise AutotpError(f"the {phase} graph shards the cache differently from the first prefill graph")
        if not guards.hold(view):
            raise AutotpError(f"the {phase} graph captured for a call does not serve it (its input guards fail for "
                              f"{_sizes(view)})")
        extra = {"layout": [(shape, str(p)) for shape, p in layout],
                 "input_layout": [str(p) for p in inputs_layout] if inputs_layout else [],
                 "guards": graph_cache.encode_guards(guards.recorded)}
        gm = self._install((*key, len(variants)), graph, plan, lambda name: name.removeprefix("model."), slot=slot,
                           extra=extra)
        variants.append((gm, guards))
        return gm

    def _global_view(self, call: dict[str, Any]) -> dict[str, Any]:
        """``call`` as the unsharded graph would see it: this rank's pieces of the cache become
        their whole shapes (the sharded dim at its global size)."""
        if "past_keys" not in call:
            return call
        pieces = call["past_keys"] + call["past_values"]
        if self._cache_layout is None or len(pieces) != len(self._cache_layout):
            raise AutotpError("this cache does not hold the layers this model's prefill produced")
        whole = []
        for piece, (shape, placement) in zip(pieces, self._cache_layout):
            size = list(piece.shape)
            if isinstance(placement, Shard):
                dim = placement.dim
                if shape[dim] is None:
                    raise AutotpError(f"a cache tensor is sharded along dim {dim}, whose size the graph does not fix")
                held = local_size(placement, shape[dim], self.tp_size)
                if size[dim] != held:  # a cache the unsharded model filled holds every head
                    raise AutotpError(f"a cache tensor has {size[dim]} along dim {dim}, where each rank holds {held} of "
                                      f"{shape[dim]}: pass a cache this parallelized model filled, or an empty one")
                size[dim] = shape[dim]
            whole.append(Sized(size, piece.dtype))
        half = len(whole) // 2
        return {**call, "past_keys": whole[:half], "past_values": whole[half:]}


def _cache_layout(plan: Plan, output: fx.Node, count: int) -> list[tuple[list[Optional[int]], Placement]]:
    """Per cache output of a cached graph: its global shape (``None`` for a dynamic size) and
    how it is laid out."""
    sharded = {tuple(o.path): o.placement for o in plan.sharded_outputs}
    return [([d if isinstance(d, int) else None for d in output.args[0][i].meta["val"].shape],
             sharded.get((0, i), Replicate())) for i in range(1, count)]


def _sizes(inputs: dict[str, Any]) -> str:
    """Every tensor's shape in ``inputs`` (nested: the tokens dict, the cache lists), by path."""
    leaves = pytree.tree_flatten_with_path(inputs, is_leaf=lambda v: isinstance(v, Sized))[0]
    return ", ".join(f"{pytree.keystr(path)} {list(v.shape)}" for path, v in leaves if hasattr(v, "shape"))


def _input_layout(plan: Plan, names: list[str]) -> list[Placement]:
    """Placements of a cached graph's past inputs, in the order of its cache outputs."""
    given = {i.name: i.placement for i in plan.sharded_inputs}
    keys = sorted((n for n in names if n.startswith("past_keys_")), key=lambda n: int(n.rsplit("_", 1)[1]))
    values = sorted((n for n in names if n.startswith("past_values_")), key=lambda n: int(n.rsplit("_", 1)[1]))
    return [given.get(n, Replicate()) for n in keys + values]
