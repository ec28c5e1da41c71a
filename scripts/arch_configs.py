"""Small seeded configs for every architecture the coverage run checks.

Only sizes are set here (hidden 64, 2 layers, 4 heads, 2 kv heads where the config has them,
head_dim 16, intermediate 128, vocab 128, 4 experts top-2, a sliding window of 8 tokens where
the config has one): no per-model behaviour. This file
is test data; autotp itself names no architecture.
"""

from __future__ import annotations

from typing import Any

COMMON = dict(
    hidden_size=64, n_embd=64, d_model=64, num_hidden_layers=2, n_layer=2, num_layers=2, n_layers=2,
    num_attention_heads=4, n_head=4, num_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
    ffn_dim=128, d_ff=128, n_inner=128, d_kv=16, vocab_size=128, max_position_embeddings=128, n_positions=128,
    num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
    decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_decoder_layers=2,
    rotary_dim=8, partial_rotary_factor=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    decoder_start_token_id=0, tie_word_embeddings=False,
    sliding_window=8,  # where the config has one: generation in the coverage run fills it
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


def causal_lm_types() -> list[str]:
    """Every model type transformers maps to a causal LM (``--all`` in scripts/coverage.py)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def build(arch: str, seed: int = 0, **overrides: Any):
    """The seeded model of ``arch`` (a key of ARCHS, or any model type): causal LM for
    decoders, masked LM / seq2seq otherwise."""
    import torch
    import transformers
    from transformers import AutoConfig
    from transformers.utils import logging

    logging.set_verbosity_error()
    model_type, extra = ARCHS.get(arch, (arch, {}))  # any other model type: COMMON alone
    probe = AutoConfig.for_model(model_type)
    fields = {k: v for k, v in {**COMMON, **extra, **overrides}.items()
              if (hasattr(probe, k) or k in extra or k in overrides) and v is not None}
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    autos = [transformers.AutoModelForCausalLM, transformers.AutoModelForSeq2SeqLM, transformers.AutoModelForMaskedLM]
    if getattr(config, "is_encoder_decoder", False):
        autos.insert(0, autos.pop(1))
    for auto in autos:
        try:
            return auto.from_config(config).eval()
        except ValueError:
            continue
    raise ValueError(f"no auto class builds {model_type}")
