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
from typing import Any, Optional

import torch
import torch.nn as nn

from autotp.errors import AutotpError

__all__ = ["CacheIO", "cache_argument", "is_cache", "phase_of", "read_cache", "write_cache", "cached_inputs"]

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


class CacheIO(nn.Module):
    """``model`` called with a cache rebuilt from per-layer tensors; returns the logits and
    the updated per-layer keys and values. This is the module captured for cached calls."""

    def __init__(self, model: nn.Module, cache_arg: str, logits_to_keep: Any) -> None:
        super().__init__()
        self.model = model
        self.cache_arg = cache_arg
        self.logits_to_keep = logits_to_keep

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_keys=None, past_values=None):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        if past_keys is not None:
            _fill(cache, past_keys, past_values)  # filled directly: no concatenation with an empty tensor
        kwargs = {self.cache_arg: cache, "use_cache": True}
        if "logits_to_keep" in inspect.signature(self.model.forward).parameters:
            kwargs["logits_to_keep"] = self.logits_to_keep
        # absent masks and positions stay absent: the model computes its own defaults (GPT-2
        # derives positions from the mask, Llama from the cache length)
        given = {k: v for k, v in (("attention_mask", attention_mask), ("position_ids", position_ids)) if v is not None}
        out = self.model(input_ids=input_ids, **given, **kwargs)
        return out.logits, *_contents(cache)


def _check_layers(cache: Any) -> None:
    kinds = {type(layer).__name__ for layer in cache.layers}
    if kinds - {"DynamicLayer"}:
        raise AutotpError(f"cache layers of type {sorted(kinds - {'DynamicLayer'})} are not supported by autotp "
                          "(sliding-window or static caches); use the default dynamic cache")


def read_cache(cache: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """This rank's per-layer keys and values held by a Hugging Face cache."""
    _check_layers(cache)
    return _contents(cache)


def write_cache(cache: Any, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """Store this rank's updated keys and values in the caller's cache object (no copy)."""
    _check_layers(cache)
    _fill(cache, keys, values)


def _contents(cache: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


def _fill(cache: Any, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    for layer, k, v in zip(cache.layers, keys, values):
        if not layer.is_initialized:
            layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v


def phase_of(past: int, new_tokens: int) -> str:
    if past == 0:
        return "prefill"
    return "decode" if new_tokens == 1 else "extend"


def cached_inputs(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                  position_ids: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The graph's token inputs: those the caller gave."""
    given = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    return {k: v for k, v in given.items() if v is not None}


def example_like(inputs: dict[str, Any], global_shapes: Optional[list[list[int]]]) -> dict[str, Any]:
    """Example inputs to capture a cached graph: the call's, with batch and past lengths of at
    least 2 (export would specialise 1) and the cache at its global (unsharded) shapes."""
    ids = inputs["input_ids"]
    batch, new = max(2, ids.shape[0]), ids.shape[1] if ids.shape[1] == 1 else max(2, ids.shape[1])
    past = 0
    example: dict[str, Any] = {}
    if "past_keys" in inputs:
        past = max(2, inputs["past_keys"][0].shape[-2])
        shapes = global_shapes or [list(t.shape) for t in inputs["past_keys"] + inputs["past_values"]]
        tensors = [torch.zeros([batch, s[1], past, s[3]], dtype=t.dtype, device=t.device)
                   for s, t in zip(shapes, inputs["past_keys"] + inputs["past_values"])]
        half = len(tensors) // 2
        example["past_keys"], example["past_values"] = tensors[:half], tensors[half:]
    tokens = {"input_ids": torch.zeros(batch, new, dtype=ids.dtype, device=ids.device)}
    if "attention_mask" in inputs:
        tokens["attention_mask"] = torch.ones(batch, past + new, dtype=inputs["attention_mask"].dtype, device=ids.device)
    if "position_ids" in inputs:
        tokens["position_ids"] = torch.zeros(batch, new, dtype=inputs["position_ids"].dtype, device=ids.device)
    return {**tokens, **example}
