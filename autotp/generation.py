"""KV-cached calls and ``generate`` on a tensor-parallel causal LM.

A plain capture runs without a cache (the cache object is not a tensor). For cached calls the
model is captured once more inside :class:`CacheIO`, a wrapper whose inputs and outputs carry
the cache as per-layer key and value tensors. The planner is told that these inputs may be
passed sharded and these outputs stay sharded, so the cache is sharded like the attention
heads: each rank keeps only its heads' keys and values (its share of a kv head when kv heads
are fewer than ranks), and no collective touches it.

Three graphs serve a generation, each captured on first use: *prefill* (no past: the
prompt), *decode* (one new token after a past), *extend* (several new tokens after a past).
Between calls the cache lives in the caller's Hugging Face ``DynamicCache``, filled with
this rank's tensors, so ``model.generate(...)`` runs unchanged: the prefix is never
recomputed and each step attends over the cache.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple, Optional

import torch
import torch.nn as nn

from autotp.errors import AutotpError

__all__ = ["CacheIO", "LayerSpec", "cache_argument", "cache_layers", "is_cache", "phase_of", "read_cache", "write_cache",
           "cached_inputs", "example_like"]

CACHE_ARGUMENTS = ("cache", "past_key_values")  # the name differs across transformers versions


def cache_argument(signature: inspect.Signature) -> Optional[str]:
    """The name of the forward argument that takes a Hugging Face cache, if any."""
    return next((name for name in CACHE_ARGUMENTS if name in signature.parameters), None)


def is_cache(value: Any) -> bool:
    try:
        from transformers import Cache
    except ImportError:
        return False
    return isinstance(value, Cache)


# Cache layer classes whose whole state a graph can take and give back, by class name, with
# the counts each keeps beside its keys and values. A sliding-window layer keeps only its last
# ``sliding_window - 1`` tokens, so how many tokens it has seen (which places its mask and the
# positions) is not the length of its tensors. Anything else (static, quantized, offloaded,
# linear-attention state) is refused by name.
LAYER_COUNTS: dict[str, tuple[str, ...]] = {"DynamicLayer": (), "DynamicSlidingWindowLayer": ("cumulative_length",)}


class LayerSpec(NamedTuple):
    """How to rebuild one cache layer inside the graph: its class and the settings its
    constructor takes (read back from the caller's layer by parameter name). A tuple, so that
    the graph cache's key can describe it."""

    cls: type
    settings: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, layer: Any) -> "LayerSpec":
        params = inspect.signature(type(layer).__init__).parameters
        named = [p for p in params.values() if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        return cls(type(layer), tuple((p.name, getattr(layer, p.name)) for p in named))

    def build(self) -> Any:
        return self.cls(**dict(self.settings))


def cache_layers(cache: Any) -> tuple[LayerSpec, ...]:
    """The layers of the caller's cache as the graph rebuilds them (empty: a cache that makes
    plain dynamic layers as it goes). Raises for a cache whose state a graph cannot carry."""
    if getattr(cache, "offloading", False):
        raise AutotpError("offloaded caches are not supported by autotp; use the default dynamic cache")
    kinds = sorted({type(layer).__name__ for layer in cache.layers} - set(LAYER_COUNTS))
    if kinds:
        raise AutotpError(f"cache layers of type {kinds} are not supported by autotp (supported: "
                          f"{sorted(LAYER_COUNTS)}); use the model's default cache")
    if any(getattr(layer, "record_past", False) for layer in cache.layers):
        raise AutotpError("sliding-window cache layers that record their past (assisted decoding) are not supported")
    return tuple(LayerSpec.of(layer) for layer in cache.layers)


def _new_cache(layers: tuple[LayerSpec, ...]) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache()  # a cache that makes dynamic layers as it goes
    if layers:
        cache.layers, cache.layer_class_to_replicate = [spec.build() for spec in layers], None
    return cache


class CacheIO(nn.Module):
    """``model`` called with a cache rebuilt from per-layer tensors; returns the logits and
    the updated per-layer keys and values. This is the module captured for cached calls.

    ``past_length`` is the number of tokens the cache has seen, carried as the length of an
    empty ``[n, 0]`` tensor: export keeps a tensor's size symbolic, where it would bake a
    plain int into the graph."""

    def __init__(self, model: nn.Module, cache_arg: str, logits_to_keep: Any, layers: tuple[LayerSpec, ...]) -> None:
        super().__init__()
        self.model = model
        self.cache_arg = cache_arg
        self.logits_to_keep = logits_to_keep
        self.layers = layers

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_keys=None, past_values=None,
                past_length=None):
        cache = _new_cache(self.layers)
        if past_keys is not None:
            _fill(cache, past_keys, past_values, past_length.shape[0])
        kwargs = {self.cache_arg: cache, "use_cache": True}
        if "logits_to_keep" in inspect.signature(self.model.forward).parameters:
            kwargs["logits_to_keep"] = self.logits_to_keep
        # absent masks and positions stay absent: the model computes its own defaults (GPT-2
        # derives positions from the mask, Llama from the cache length)
        given = {k: v for k, v in (("attention_mask", attention_mask), ("position_ids", position_ids)) if v is not None}
        out = self.model(input_ids=input_ids, **given, **kwargs)
        return out.logits, *_contents(cache)


def read_cache(cache: Any) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """This rank's per-layer keys and values held by a Hugging Face cache, and the number of
    tokens it has seen (as :class:`CacheIO` takes it)."""
    keys, values = _contents(cache)
    return keys, values, torch.empty(cache.get_seq_length(), 0)


def write_cache(cache: Any, keys: list[torch.Tensor], values: list[torch.Tensor], seen: int) -> None:
    """Store this rank's updated keys and values in the caller's cache object (no copy), with
    ``seen`` tokens counted, as the layers inside the graph counted them."""
    while len(cache.layers) < len(keys):  # a cache that makes its layers as it goes
        cache.layers.append(cache.layer_class_to_replicate())
    _fill(cache, keys, values, seen)


def _contents(cache: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


def _fill(cache: Any, keys: list[torch.Tensor], values: list[torch.Tensor], seen: Any) -> None:
    for layer, k, v in zip(cache.layers, keys, values):
        if not layer.is_initialized:
            layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        for count in LAYER_COUNTS[type(layer).__name__]:
            setattr(layer, count, seen)


def phase_of(past: int, new_tokens: int) -> str:
    if past == 0:
        return "prefill"
    return "decode" if new_tokens == 1 else "extend"


def cached_inputs(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                  position_ids: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The graph's token inputs: those the caller gave."""
    given = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    return {k: v for k, v in given.items() if v is not None}


def example_like(call: dict[str, Any]) -> dict[str, Any]:
    """Example inputs to capture a cached graph for ``call`` (taken at its global, unsharded
    shapes): the same sizes, except that a batch, a past or a prompt of 1 becomes 2 (export
    would make a graph for 1 alone; a single new token stays 1: decoding is its own graph).
    Cache tensors as long as the past grow with it; those a window keeps shorter stay."""
    ids = call["input_ids"]
    batch, new = max(2, ids.shape[0]), ids.shape[1] if ids.shape[1] == 1 else max(2, ids.shape[1])
    seen = call["past_length"].shape[0] if "past_length" in call else 0
    past = max(2, seen) if seen else 0
    grown = (past - seen) + (new - ids.shape[1])  # how much longer the mask gets
    example: dict[str, Any] = {"input_ids": torch.zeros(batch, new, dtype=ids.dtype, device=ids.device)}
    if "attention_mask" in call:
        mask = call["attention_mask"]
        example["attention_mask"] = torch.ones(batch, mask.shape[1] + grown, dtype=mask.dtype, device=mask.device)
    if "position_ids" in call:
        example["position_ids"] = torch.zeros(batch, new, dtype=call["position_ids"].dtype, device=ids.device)
    for name in ("past_keys", "past_values"):
        if name in call:
            example[name] = [torch.zeros([batch, t.shape[1], past if t.shape[2] == seen else t.shape[2], *t.shape[3:]],
                                         dtype=t.dtype, device=ids.device) for t in call[name]]
    if seen:
        example["past_length"] = torch.empty(past, 0)
    return example
