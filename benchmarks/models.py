"""Model configurations the benchmarks use (built from config classes: no downloads)."""

from __future__ import annotations

import torch

CONFIGS = {
    # ~200M parameters: the size issue #6 compares peers on
    "llama-200m": ("llama", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                                 num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
                                 max_position_embeddings=2048)),
    # the same sizes with a 256-token sliding window on every layer: decode cost stays flat
    # once the window is full (benchmarks/generation.py --positions 128,1024,2048)
    "mistral-200m": ("mistral", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                                     num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
                                     max_position_embeddings=4096, sliding_window=256)),
    "gpt2-124m": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)),
    "llama-tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                 max_position_embeddings=128)),
}


def build(name: str, *, device: str | None = None, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    kind, kwargs = CONFIGS[name]
    config = AutoConfig.for_model(kind, **kwargs)
    torch.manual_seed(seed)
    if device == "meta":
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config).eval()
    return AutoModelForCausalLM.from_config(config).eval()
