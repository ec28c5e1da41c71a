"""Small seeded configs for every architecture the coverage run checks.

Only sizes are set here: no per-model behaviour. This file is test data; autotp itself names no
architecture. A family is built from the first of these that builds *and* runs (``build_checked``):

1. ``small``: COMMON's sizes (hidden 64, 2 layers, 4 heads, 2 kv heads where the config has
   them, head_dim 16, intermediate 128, vocab 128, 4 experts top-2, a sliding window of 8 tokens
   where the config has one) on the config and on each of its sub-configs (a multimodal model's
   text and vision towers);
2. ``scaled``: the config class's own defaults with every width (hidden, intermediate, head
   dims, low-rank dims) divided by one power of two, so that hidden is about 64, and 2, 4 or 8
   layers. Dividing every width by the same factor keeps the relations a config checks or a
   model relies on (heads x head_dim = expand x hidden, the parts of a split head), which fixed
   sizes break; and more layers give a hybrid its layers of every kind (an attention layer
   every 4th or 8th);
3. ``scaled, no cache``: for a hybrid whose default layers are all recurrent, where Hugging
   Face's own forward cannot size its cache.

Where none of them builds and runs: each as a decoder (``is_decoder=True``, for a config with
that flag: a causal LM that refuses to be built as an encoder); then all of them again from the
config class the family's causal-LM class takes, where it differs from the one the model type
names (a text decoder's config inside a composite one, as for musicgen).

In every way, expert counts a config's defaults leave unset (None) get COMMON's (4 experts, top 2,
1 shared); and a family outside the matrix whose config class's defaults build no model that runs
on token ids at any size (a field its model reads that the class leaves undeclared or unset) gets
the few fields it needs (``FIELDS``).

The coverage table names the config of every family not built the first way.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator, Optional

COMMON = dict(
    hidden_size=64, n_embd=64, d_model=64, num_hidden_layers=2, n_layer=2, num_layers=2, n_layers=2,
    num_attention_heads=4, n_head=4, num_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
    ffn_dim=128, d_ff=128, n_inner=128, d_kv=16, vocab_size=128, max_position_embeddings=128, n_positions=128,
    num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_decoder_layers=2,
    rotary_dim=8, partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    decoder_start_token_id=0, tie_word_embeddings=False,
    sliding_window=8, local_attention_window_len=8,  # where the config has one: generation in the coverage run fills it
    # the same sizes under the names one model gives them (reformer's head and feed-forward widths, the global
    # transformer's width as BLT's byte-level stacks see it, its hash embeddings' vocabulary)
    attention_head_size=16, feed_forward_size=128, hidden_size_global=64, encoder_hash_byte_group_vocab=128,
)

# per architecture: the model type and the few fields its config needs besides COMMON
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "mixtral": ("mixtral", {}),
    "qwen2": ("qwen2", {}),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen3": ("qwen3", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {}),
    "gemma3_text": ("gemma3_text", {}),
    "phi": ("phi", {}),
    "phi3": ("phi3", {}),
    "gpt2": ("gpt2", {}),
    "gpt_neox": ("gpt_neox", {}),
    "gptj": ("gptj", {}),
    "gpt_bigcode": ("gpt_bigcode", {"multi_query": True}),
    "opt": ("opt", {"word_embed_proj_dim": 64}),
    "bloom": ("bloom", {}),
    "falcon": ("falcon", {"new_decoder_architecture": False, "multi_query": True, "head_dim": None}),
    "codegen": ("codegen", {}),
    "starcoder2": ("starcoder2", {}),
    "olmo": ("olmo", {}),
    "olmo2": ("olmo2", {}),
    "bitnet": ("bitnet", {}),
    "diffllama": ("diffllama", {}),
    "stablelm": ("stablelm", {}),
    "cohere": ("cohere", {}),
    "cohere2": ("cohere2", {"layer_types": ["sliding_attention", "full_attention"]}),
    "granite": ("granite", {}),
    "bert": ("bert", {}),
    "roberta": ("roberta", {}),
    # recurrent and state-space families: export specialises their captures to one length
    "mamba": ("mamba", {}),
    "falcon_mamba": ("falcon_mamba", {}),
    "rwkv": ("rwkv", {}),
    "cpmant": ("cpmant", {}),
    "t5": ("t5", {}),
    "bart": ("bart", {}),
}

# per model type outside the matrix (``--all``): the fields its config needs besides sizes, where the config
# class's own defaults build no model that runs on token ids at any size: a field the model reads that the
# class does not declare or leaves unset (as its released checkpoints' configs set it), a relation between
# fields that fixed sizes break, or counts scaled defaults keep too large. A field holding a sub-config's
# fields is merged into that sub-config's sizes.
FIELDS: dict[str, dict[str, Any]] = {
    # Hugging Face's forward sizes its cache from a layer count BltConfig does not have (its encoder, global and
    # decoder stacks would share one cache's layers): uncached
    "blt": {"use_cache": False},
    # rope parameters per layer type (the model reads no others)
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    # the attention reads rope_theta (undeclared by DbrxAttentionConfig) and clamps q, k, v to clip_qkv (its
    # default None fails torch.clamp), both as dbrx-instruct sets them; COMMON's kv heads and expert sizes by
    # their names in its sub-configs
    "dbrx": {"attn_config": {"rope_theta": 500000.0, "clip_qkv": 8.0, "kv_n_heads": 2},
             "ffn_config": {"ffn_hidden_size": 128, "moe_top_k": 2}},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},  # its default is None
    # multi-head latent attention at COMMON's sizes: rope dims = head_dim (which sizes its rotary embedding), one
    # kv head per head (None: the class's default; COMMON's 2 would repeat them), low ranks 32; 2 zero-computation
    # experts to the 4 routed ones (its defaults: 256 to 512); 2 layers of two sublayers each
    "longcat_flash": {"num_key_value_heads": None, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16,
                      "q_lora_rank": 32, "kv_lora_rank": 32, "zero_expert_num": 2, "num_hidden_layers": 4},
    # token ids are (batch x codebooks, length): the coverage run's batch of 2 is one sequence of 2 codebooks
    "musicgen": {"num_codebooks": 2},
    "musicgen_melody": {"num_codebooks": 2},
    # axial position embeddings (a shape of max_position_embeddings, widths summing to hidden); a local and an
    # LSH attention layer
    "reformer": {"axial_pos_shape": [8, 16], "axial_pos_embds_dim": [16, 48], "attn_layers": ["local", "lsh"]},
    "xmod": {"default_language": "en_XX"},  # its adapter's language (set_default_language sets this field)
}


def causal_lm_types() -> list[str]:
    """Every model type transformers maps to a causal LM (``--all`` in scripts/coverage.py)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers",
                 "num_decoder_layers")
# widths: the sizes that scale together with hidden (not counts, vocabularies, lengths or windows)
_WIDTH = re.compile(r"^(hidden_size|n_embd|d_model|d_ff|d_kv|d_inner|n_inner|hidden_size_per_head|"
                    r"[a-z_]*intermediate_size|[a-z_]*ffn_dim|[a-z_]*head_dim|[a-z_]*lora_rank)$")
_SECTION = re.compile(r"^(n|num)_[a-z_]+_layers$")
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=0, tie_word_embeddings=False)
# expert counts, by the names configs give them, for those a config's defaults leave unset (a mixture of
# experts built on a subclass's numbers)
_EXPERT_COUNTS = dict(num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2,
                      n_shared_experts=1)


_MISSING = object()


def _get(config: Any, key: str, default: Any = None) -> Any:
    """``config.key``, or ``default`` where it has none (a per-layer field read globally raises
    transformers' AmbiguousGlobalPerLayerAttributeError: that is a none too)."""
    try:
        return getattr(config, key)
    except Exception:  # noqa: BLE001
        return default


def _has(config: Any, key: str) -> bool:
    return _get(config, key, _MISSING) is not _MISSING


def _sub_configs(config: Any) -> dict[str, Any]:
    """The config's sub-configs (a multimodal model's text and vision towers) that it holds."""
    from transformers import PretrainedConfig

    found = {name: getattr(config, name, None) for name in getattr(config, "sub_configs", {}) or {}}
    return {name: sub for name, sub in found.items() if isinstance(sub, PretrainedConfig)}


def _layer_count(values: dict[str, Any]) -> Optional[int]:
    return next((values[k] for k in _LAYER_COUNTS if isinstance(values.get(k), int)), None)


def _per_layer_cut(values: dict[str, Any], layers: int) -> dict[str, Any]:
    """``values`` (a config's fields) with what it lists per layer cut to the first ``layers``:
    lists as long as its layer count, and maps keyed by layer index."""
    count = _layer_count(values)
    cut = {}
    for key, value in values.items():
        if isinstance(value, (list, tuple)) and count and len(value) == count and count != layers:
            cut[key] = list(value[:layers])
        elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
            cut[key] = {k: v for k, v in value.items() if int(k) < layers}
        else:
            cut[key] = value
    return cut


def _unset_experts(config: Any) -> dict[str, Any]:
    """Expert counts for those ``config`` leaves unset."""
    return {k: v for k, v in _EXPERT_COUNTS.items() if k in config.to_dict() and _get(config, k) is None}


def _merged(fields: dict[str, Any], more: dict[str, Any]) -> dict[str, Any]:
    """``fields`` updated with ``more``: a sub-config's fields (a dict on both sides) are merged."""
    merged = dict(fields)
    for k, v in more.items():
        merged[k] = _merged(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def _small(config: Any, fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` that ``config`` has, expert counts it leaves unset, and its sub-configs made small the
    same way."""
    chosen = {**_unset_experts(config), **{k: v for k, v in fields.items() if _has(config, k) and v is not None}}
    for name, sub in _sub_configs(config).items():
        chosen[name] = {**_per_layer_cut(sub.to_dict(), fields["num_hidden_layers"]), **_small(sub, fields)}
    return chosen


def _scaled(config: Any, layers: int) -> dict[str, Any]:
    """The fields that make ``config``'s defaults small: every width divided by one power of two
    (so that hidden is about 64, and no head or low-rank dim is under 8), ``layers`` layers, what
    it lists per layer cut to them, vocab 128; the same for its sub-configs."""
    values = {k: _get(config, k) for k in config.to_dict()}  # the config's own values (to_dict may rewrite some)
    widths = {k: v for k, v in values.items() if _WIDTH.match(k) and isinstance(v, int) and not isinstance(v, bool)}
    hidden = next((values[k] for k in ("hidden_size", "d_model", "n_embd") if isinstance(values.get(k), int)), 64)
    narrowest = min([v for k, v in widths.items() if k.endswith(("head_dim", "lora_rank", "d_kv")) and v > 0],
                    default=hidden)
    factor = 1 << max(0, (min(hidden // 64, narrowest // 8)).bit_length() - 1)
    # a width the factor does not divide (an expert width of 1407) gets a multiple of 8 near its share
    chosen = {k: v // factor if v % factor == 0 else max(8, round(v / factor / 8) * 8) for k, v in widths.items()}
    count = _layer_count(values)
    if count is not None:
        chosen.update({k: v for k, v in _per_layer_cut(values, layers).items() if v != values[k]})
        chosen.update({k: layers for k in _LAYER_COUNTS if isinstance(values.get(k), int)})
        # the sections of the stack (input, recurrent, output layers) keep their shares of it
        chosen.update({k: max(1, v * layers // count) for k, v in values.items()
                       if _SECTION.match(k) and k not in _LAYER_COUNTS and isinstance(v, int) and v > 0})
    chosen.update({k: v for k, v in {"vocab_size": 128, **_TOKENS}.items() if k in values})
    chosen.update(_unset_experts(config))
    for name, sub in _sub_configs(config).items():
        chosen[name] = {**_per_layer_cut(sub.to_dict(), layers), **_scaled(sub, layers)}
    return chosen


def _causal_lm_class(model_type: str) -> Optional[type]:
    """The class transformers maps ``model_type`` to as a causal LM, if any."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, ""), None)


def _config_makers(model_type: str) -> dict[str, Callable[..., Any]]:
    """What makes ``model_type``'s config from fields, by a label for the table: the config class
    the type names, then, where it differs, the one its causal-LM class takes (a text decoder's
    config inside a composite one, as for musicgen)."""
    from transformers import AutoConfig, PretrainedConfig

    makers = {"": lambda **fields: AutoConfig.for_model(model_type, **fields)}
    own = getattr(_causal_lm_class(model_type), "config_class", None)
    if (isinstance(own, type) and issubclass(own, PretrainedConfig)
            and not isinstance(AutoConfig.for_model(model_type), own)):
        makers[f", {own.__name__}"] = own
    return makers


def config_candidates(arch: str, **overrides: Any) -> Iterator[tuple[str, Callable[[], Any]]]:
    """The configs ``build_checked`` tries for ``arch``, in order: how each is made, and a
    function that makes it (which raises where the config class refuses the sizes)."""
    model_type, extra = ARCHS.get(arch, (arch, FIELDS.get(arch, {})))  # any other model type: sizes, and FIELDS
    for label, make in _config_makers(model_type).items():
        yield from _candidates(make, label, arch in ARCHS, {**extra, **overrides})
        if arch in ARCHS:  # a family of the matrix is built the one way its results were recorded for
            return


def _candidates(make: Callable[..., Any], label: str, small_only: bool,
                given: dict[str, Any]) -> Iterator[tuple[str, Callable[[], Any]]]:
    def small(**more: Any) -> Callable[[], Any]:
        def config() -> Any:
            fields = _small(make(), {**COMMON, **given})
            return make(**_merged(fields, {k: v for k, v in {**more, **given}.items() if v is not None}))
        return config

    def scaled(layers: int, **more: Any) -> Callable[[], Any]:
        return lambda: make(**_merged(_scaled(make(), layers), {**more, **given}))

    yield f"small{label}", small()
    if small_only:
        return
    for layers in (2, 4, 8):
        yield f"scaled defaults{label}, {layers} layers", scaled(layers)
    # a hybrid whose default layers are all recurrent: Hugging Face's own forward fails to size
    # its cache (no attention layer to ask), so it runs uncached
    yield f"scaled defaults{label}, 2 layers, no cache", scaled(2, use_cache=False)
    if _has(make(), "is_decoder"):  # a causal LM that refuses to be built as an encoder
        yield f"small{label}, as a decoder", small(is_decoder=True)
        yield f"scaled defaults{label}, 2 layers, as a decoder", scaled(2, is_decoder=True)


def _instantiate(config: Any, seed: int, model_type: str):
    """The seeded model of ``config``: causal LM for decoders, masked LM / seq2seq otherwise."""
    import torch
    import transformers

    torch.manual_seed(seed)
    causal_lm = _causal_lm_class(model_type)
    if causal_lm is not None and config.model_type != model_type:  # a text decoder's config: no auto class maps it
        return causal_lm._from_config(config).eval()
    autos = [transformers.AutoModelForCausalLM, transformers.AutoModelForSeq2SeqLM, transformers.AutoModelForMaskedLM]
    if getattr(config, "is_encoder_decoder", False):
        autos.insert(0, autos.pop(1))
    for auto in autos:
        try:
            return auto.from_config(config).eval()
        except ValueError:
            continue
    raise ValueError(f"no auto class builds {config.model_type}")


def build_checked(arch: str, check: Callable[[Any], None] = lambda model: None, seed: int = 0,
                  **overrides: Any) -> tuple[Any, str]:
    """The seeded model of ``arch`` from the first of its configs (``config_candidates``) that
    builds and passes ``check`` (which runs it), and how that config was made. Raises the
    first config's error when none does: it is the one the table should show."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    first: Optional[BaseException] = None
    for how, make in config_candidates(arch, **overrides):
        try:
            model = _instantiate(make(), seed, ARCHS.get(arch, (arch,))[0])
            check(model)
            return model, how
        except Exception as exc:  # noqa: BLE001  the next config may build; the first error is reported
            first = first or exc
    assert first is not None
    raise first


def build_and_run(arch: str) -> tuple[Any, dict[str, Any], Any, str]:
    """The seeded model of ``arch`` from the first of its configs that builds and runs on token
    ids (batch 2, 9 tokens; an encoder-decoder's decoder reads the first 7): the model, those
    inputs, its output (logits), and how its config was made."""
    import torch

    ran: dict[str, Any] = {}

    def run(model: Any) -> None:
        config = model.config
        ids = torch.randint(3, config.get_text_config().vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
        ran["inputs"] = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False):
            ran["inputs"]["decoder_input_ids"] = ids[:, :7].clone()
        with torch.no_grad():
            out = logits_of(model(**ran["inputs"]))
            uncached = logits_of(model(**ran["inputs"], use_cache=False)) if _takes(model, "use_cache") else out
        # autotp computes a call without a cache (its capture turns the cache off); a config under
        # which the model itself answers otherwise with one (a layer run twice over one cache
        # slot) has no single reference to compare with
        if (out - uncached).abs().max() > 1e-4 * out.abs().max():  # the tolerance "exact" allows
            raise ValueError("its output depends on use_cache at these sizes")
        ran["output"] = out

    model, how = build_checked(arch, run)
    return model, ran["inputs"], ran["output"], how


def logits_of(out: Any) -> Any:
    """A model output's logits (its first element where it has no ``logits`` field)."""
    return out.logits if hasattr(out, "logits") else out[0]


def _takes(model: Any, name: str) -> bool:
    import inspect

    return name in inspect.signature(model.forward).parameters


def build(arch: str, seed: int = 0, **overrides: Any):
    """The seeded model of ``arch`` (a key of ARCHS, or any model type) from the first of its
    configs that builds: causal LM for decoders, masked LM / seq2seq otherwise."""
    return build_checked(arch, seed=seed, **overrides)[0]
