"""KV-cached calls and ``generate`` on a tensor-parallel model (causal LM or encoder-decoder).

A plain capture runs without a cache (the cache object is not a tensor). For cached calls the
model is captured once more inside :class:`CacheIO`, a wrapper whose inputs and outputs carry
the cache as tensors: per layer its keys and values, and the number of tokens it has seen.
The planner is told that these inputs may be passed sharded and these outputs stay sharded,
so the cache is sharded like the attention heads: each rank keeps only its heads' keys and
values (its share of a kv head when kv heads are fewer than ranks), and no collective touches
it.

One mechanism serves every cache whose layers keep keys and values: a ``DynamicCache`` of
full-attention and sliding-window layers in any mix (the graph rebuilds the caller's layer
classes, so a sliding layer keeps its last ``window - 1`` tokens and decoding cost stays flat
once the window is full), and a container of such caches (an encoder-decoder's self- and
cross-attention caches), flattened part after part.

Graphs are captured on first use per kind of call: *prefill* (no past: the prompt), *decode*
(one new token after a past), *extend* (several new tokens after a past), each with as many
variants as export's guards ask for (see :mod:`autotp.guards`: a sliding window not yet full
and full are two). Between calls the cache lives in the caller's Hugging Face cache object,
filled with this rank's tensors, so ``model.generate(...)`` runs unchanged: the prefix is
never recomputed and each step attends over the cache.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple, Optional

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from autotp.errors import AutotpError

__all__ = ["CacheIO", "CacheSpec", "LayerSpec", "cache_argument", "cache_spec", "is_cache", "phase_of", "read_cache",
           "write_cache", "call_tokens", "example_like"]

CACHE_ARGUMENTS = ("cache", "past_key_values")  # the name differs across transformers versions


def cache_argument(signature: inspect.Signature) -> Optional[str]:
    """The name of the forward argument that takes a Hugging Face cache, if any."""
    return next((name for name in CACHE_ARGUMENTS if name in signature.parameters), None)


def cache_under_its_name(inputs: dict[str, Any], name: str) -> None:
    """Move a cache passed under the other name (``past_key_values`` where the forward's argument
    is ``cache``: transformers takes both) to ``name``, where the cached call looks for it."""
    for other in CACHE_ARGUMENTS:
        if other != name and is_cache(inputs.get(other)) and inputs.get(name) is None:
            inputs[name] = inputs.pop(other)


def fresh_cache(model: Any) -> Optional[Any]:
    """The cache a Hugging Face decoder makes for itself when called with ``use_cache=True`` and
    none, as ``generate`` makes it: a dynamic cache laid out by the config (sliding-window layers
    where it has them). None for an encoder-decoder (whose call with a cache takes the encoder's
    output, not ``input_ids``) and for a model ``generate`` gives no dynamic cache."""
    from transformers import DynamicCache

    supports = getattr(type(model), "_supports_default_dynamic_cache", None)
    if getattr(model.config, "is_encoder_decoder", False) or (callable(supports) and not supports()):
        return None
    return DynamicCache(config=model.config)


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
LAYER_COUNTS: dict[str, tuple[str, ...]] = {"DynamicLayer": (), "DynamicSlidingWindowLayer": ("cumulative_length",),
                                             "StaticLayer": ("cumulative_length",)}


class LayerSpec(NamedTuple):
    """How to rebuild one cache layer inside the graph: its class and the settings its
    constructor takes (read back from the caller's layer by parameter name). A tuple, so that
    the graph cache's key can describe it."""

    cls: type
    settings: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, layer: Any) -> "LayerSpec":
        return cls(type(layer), tuple((name, getattr(layer, name)) for name in _settings_of(type(layer))))

    def build(self) -> Any:
        return self.cls(**dict(self.settings))


@functools.lru_cache(maxsize=None)
def _settings_of(layer_class: type) -> tuple[str, ...]:
    """The named parameters of a layer class's constructor (read once per class: every cached
    call describes every layer of its cache)."""
    params = inspect.signature(layer_class.__init__).parameters.values()
    return tuple(p.name for p in params if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


class CacheSpec(NamedTuple):
    """The structure of the caller's cache: its parts (the cache itself, or the caches a
    container such as ``EncoderDecoderCache`` holds, in its attribute order), each as its layers
    (empty: a cache that makes plain dynamic layers as it goes), and the container's class."""

    container: Optional[type]
    parts: tuple[tuple[LayerSpec, ...], ...]

    def build(self) -> Any:
        parts = [_new_part(layers) for layers in self.parts]
        return self.container(*parts) if self.container is not None else parts[0]


def _parts(cache: Any) -> list[Any]:
    """The caches holding layers: a container's (in its attribute order), else ``cache``."""
    inner = [value for value in vars(cache).values() if is_cache(value)]
    return inner or [cache]


def cache_spec(cache: Any) -> CacheSpec:
    """The caller's cache as the graph rebuilds it. Raises for a cache whose state a graph
    cannot carry."""
    parts = _parts(cache)
    for i, part in enumerate(parts):
        if getattr(part, "offloading", False):
            raise AutotpError("offloaded caches are not supported by autotp; use the default dynamic cache")
        kinds = sorted({type(layer).__name__ for layer in part.layers} - set(LAYER_COUNTS))
        if kinds:
            raise AutotpError(f"cache layers of type {kinds} are not supported by autotp (supported: "
                              f"{sorted(LAYER_COUNTS)}); generate with use_cache=False, or with a dynamic cache")
        if any(getattr(layer, "record_past", False) for layer in part.layers):
            raise AutotpError("sliding-window cache layers that record their past (assisted decoding) are not "
                              "supported")
        if i and any(LAYER_COUNTS[type(layer).__name__] for layer in part.layers):
            # the count carried through the graph is the first part's (the tokens generated)
            raise AutotpError("a cross-attention cache with sliding-window layers is not supported")
    container = type(cache) if len(parts) > 1 or parts[0] is not cache else None
    return CacheSpec(container, tuple(tuple(LayerSpec.of(layer) for layer in part.layers) for part in parts))


def _new_part(layers: tuple[LayerSpec, ...]) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache()  # a cache that makes dynamic layers as it goes
    if layers:
        cache.layers, cache.layer_class_to_replicate = [spec.build() for spec in layers], None
    return cache


class CacheIO(nn.Module):
    """``model`` called with a cache rebuilt from tensors; returns the logits and the updated
    keys and values of every layer (part after part).

    ``tokens``: the call's tensors besides the cache (``input_ids`` or ``decoder_input_ids``,
    masks, positions, and an encoder-decoder's ``encoder_hidden_states``). ``past_length`` is
    the number of tokens the cache has seen, carried as the length of an empty ``[n, 0]``
    tensor: export keeps a tensor's size symbolic, where it would bake a plain int into the
    graph."""

    def __init__(self, model: nn.Module, cache_arg: str, logits_to_keep: Any, spec: CacheSpec) -> None:
        super().__init__()
        self.model = model
        self.cache_arg = cache_arg
        self.logits_to_keep = logits_to_keep
        self.spec = spec

    def forward(self, tokens, past_keys=None, past_values=None, past_length=None):
        cache = self.spec.build()
        if past_keys is not None:
            _fill(cache, past_keys, past_values, past_length.shape[0])
        kwargs = {self.cache_arg: cache, "use_cache": True}
        if "logits_to_keep" in inspect.signature(self.model.forward).parameters:
            kwargs["logits_to_keep"] = self.logits_to_keep
        # absent masks and positions stay absent: the model computes its own defaults (GPT-2
        # derives positions from the mask, Llama from the cache length)
        given = dict(tokens)
        if "encoder_hidden_states" in given:
            given["encoder_outputs"] = (given.pop("encoder_hidden_states"),)
        out = self.model(**given, **kwargs)
        return out.logits, *_contents(cache)


def read_cache(cache: Any) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """This rank's keys and values held by a Hugging Face cache (every layer, part after
    part), and the number of tokens it has seen (as :class:`CacheIO` takes it)."""
    keys, values = _contents(cache)
    return keys, values, torch.empty(cache.get_seq_length(), 0)


def write_cache(cache: Any, keys: list[torch.Tensor], values: list[torch.Tensor], seen: int) -> None:
    """Store this rank's updated keys and values in the caller's cache object (no copy), with
    ``seen`` tokens counted, as the layers inside the graph counted them."""
    parts = _parts(cache)
    for part, count in zip(parts, _layer_counts(cache, len(keys))):
        while len(part.layers) < count:  # a cache that makes its layers as it goes
            part.layers.append(part.layer_class_to_replicate())
    _fill(cache, keys, values, seen)


def _layer_counts(cache: Any, total: int) -> list[int]:
    """Layers per part for ``total`` layers: parts that make their layers as they go share what
    the others do not hold (an encoder-decoder's two parts have one layer per decoder layer)."""
    counts = [len(part.layers) for part in _parts(cache)]
    empty = [i for i, c in enumerate(counts) if c == 0]
    if empty:
        share, rest = divmod(total - sum(counts), len(empty))
        if rest:
            raise AutotpError(f"cannot lay {total} cache layers out over this cache's parts")
        for i in empty:
            counts[i] = share
    return counts


def _contents(cache: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    layers = [layer for part in _parts(cache) for layer in part.layers]
    return [layer.keys for layer in layers], [layer.values for layer in layers]


def _set_count(layer: Any, name: str, seen: Any) -> None:
    """A layer's count of the tokens it has seen, as the layer keeps it (an int, or a 0-d
    tensor that a static layer advances in place)."""
    current = getattr(layer, name)
    if isinstance(current, torch.Tensor):
        seen = torch.full((), seen, dtype=current.dtype, device=current.device)
    setattr(layer, name, seen)


def _fill(cache: Any, keys: list[torch.Tensor], values: list[torch.Tensor], seen: Any) -> None:
    parts = _parts(cache)
    layers = [layer for part in parts for layer in part.layers]
    for layer, k, v in zip(layers, keys, values):
        if not layer.is_initialized:
            layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        for count in LAYER_COUNTS[type(layer).__name__]:
            _set_count(layer, count, seen)
    if hasattr(cache, "is_updated"):  # a container's note of which cross-attention layers are filled
        cross = parts[-1]
        cache.is_updated = {i: cross.layers[i].is_initialized and cross.layers[i].keys.shape[-2] > 0
                            for i in range(len(cross.layers))}


def phase_of(past: int, new_tokens: int) -> str:
    if past == 0:
        return "prefill"
    return "decode" if new_tokens == 1 else "extend"


# the tensors besides the cache that a cached call may carry, by the name the model takes them
TOKEN_INPUTS = ("input_ids", "decoder_input_ids", "attention_mask", "decoder_attention_mask", "position_ids")


def call_tokens(inputs: dict[str, Any], new_tokens: str) -> dict[str, torch.Tensor]:
    """The graph's ``tokens`` input, taken out of a call's ``inputs``: the new tokens (named
    ``new_tokens``), masks and positions the caller gave, and an encoder-decoder's encoder
    states (``encoder_outputs``, computed once by ``generate``) as ``encoder_hidden_states``."""
    taken = {name: inputs.pop(name, None) for name in TOKEN_INPUTS}
    tokens = {name: value for name, value in taken.items() if value is not None}
    if new_tokens not in tokens:
        raise AutotpError(f"a call with a cache needs {new_tokens} (inputs_embeds is not supported)")
    encoder = inputs.pop("encoder_outputs", None)
    if encoder is not None:
        tokens["encoder_hidden_states"] = encoder[0]
    return tokens


def example_like(call: dict[str, Any], new_tokens: str) -> dict[str, Any]:
    """Example inputs to capture a cached graph for ``call`` (taken at its global, unsharded
    shapes): the same sizes, except that a batch or a past of 1 becomes 2, and a prompt of 1
    becomes 2 (export would make a graph for 1 alone; a single new token stays 1: decoding is
    its own graph). Other sizes follow by value: a dim as long as the new tokens, or as the
    past and the new tokens together (a 2-d mask; a 4-d one's query and key dims), changes
    with them; cache tensors as long as the past grow with it (those a window keeps shorter,
    a static cache's and cross-attention keys stay)."""
    ids = call["tokens"][new_tokens]
    new = ids.shape[1] if ids.shape[1] == 1 else max(2, ids.shape[1])
    seen = call["past_length"].shape[0] if "past_length" in call else 0
    past = max(2, seen) if seen else 0
    sizes = {ids.shape[1]: new, seen + ids.shape[1]: past + new}

    def like(t: torch.Tensor) -> torch.Tensor:
        return torch.ones([max(2, t.shape[0]), *(sizes.get(d, d) for d in t.shape[1:])], dtype=t.dtype, device=ids.device)

    # a mask may come as a dict of prepared masks per layer type
    example: dict[str, Any] = {"tokens": pytree.tree_map_only(torch.Tensor, like, call["tokens"])}
    for name in ("past_keys", "past_values"):
        if name in call:
            example[name] = [torch.zeros([max(2, t.shape[0]), t.shape[1], past if t.shape[2] == seen else t.shape[2],
                                          *t.shape[3:]], dtype=t.dtype, device=ids.device) for t in call[name]]
    if seen:
        example["past_length"] = torch.empty(past, 0)
    return example
