"""Tiny seeded models shared by the tests: transformers configs and plain-torch modules."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# hidden 64, 2 layers; heads 4 and kv heads 4 so that tp 1, 2 and 4 all divide them.
HF_CONFIGS = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=128, max_position_embeddings=128),
    # GQA: 8 q heads share 4 kv heads (2 each), still divisible by tp 4
    "llama_gqa": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=128, max_position_embeddings=128),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=128, max_position_embeddings=128),
    # 2 kv heads at tp 4: q and o sharded, k and v replicated and sliced locally per rank
    "qwen2_kv2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=128),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128,
                 bos_token_id=0, eos_token_id=0),
    # multi-query attention: one kv head in a fused q|k|v projection
    "gpt_bigcode": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=128, multi_query=True,
                        bos_token_id=0, eos_token_id=0),
    # a vocabulary that splits evenly over no tp (GPT-2's own is 50257): padded shards
    "gpt2_odd_vocab": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=131, n_positions=128,
                           bos_token_id=0, eos_token_id=0),
    # 6 heads at tp 4: pairs of ranks share 3 heads (gcd(6, 4) = 2)
    "llama_6heads": dict(hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=6, vocab_size=128, max_position_embeddings=128),
    # 5 heads at tp 4: no common divisor -> attention projections row-parallel alone, MLP in a pair
    "llama_5heads": dict(hidden_size=80, intermediate_size=128, num_hidden_layers=2, num_attention_heads=5,
                         num_key_value_heads=5, vocab_size=128, max_position_embeddings=128),
    # sliding-window attention with a window of 6, so that a short generation fills it: every
    # layer (mistral), alternating with full attention (gemma2), one full layer in three (cohere2)
    "mistral": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=128, max_position_embeddings=128, sliding_window=6),
    "gemma2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, head_dim=16, vocab_size=128, max_position_embeddings=128, sliding_window=6),
    "cohere2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=128, max_position_embeddings=128, sliding_window=6,
                    layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    # norms the planner can only cross by all-reducing a statistic: a sub-norm inside each
    # column/row pair (bitnet), and a norm that splits differential attention's region (diffllama)
    "bitnet": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=128, max_position_embeddings=128),
    "diffllama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=128, max_position_embeddings=128),
    # mixture of experts: transformers holds the experts stacked and gate|up fused, and its
    # save_pretrained stores each expert's projections apart (converted back on load)
    "mixtral": dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, num_local_experts=4,
                    num_experts_per_tok=2),
    "qwen2_moe": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=128, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32),
    # experts that loop over only the routed experts (data-dependent): run whole (autotp.opaque);
    # rope_theta and clip_qkv as dbrx-instruct sets them (the class leaves one undeclared, one None)
    "dbrx": dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=128, vocab_size=128,
                 attn_config={"kv_n_heads": 2, "rope_theta": 500000.0, "clip_qkv": 8.0},
                 ffn_config={"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}),
}
MODEL_TYPE = {"llama": "llama", "llama_gqa": "llama", "qwen2": "qwen2", "qwen2_kv2": "qwen2", "gpt2": "gpt2",
              "llama_6heads": "llama", "llama_5heads": "llama", "mistral": "mistral", "gemma2": "gemma2",
              "cohere2": "cohere2", "bitnet": "bitnet", "diffllama": "diffllama",
              "gpt2_odd_vocab": "gpt2", "gpt_bigcode": "gpt_bigcode", "mixtral": "mixtral", "qwen2_moe": "qwen2_moe",
              "dbrx": "dbrx"}


def hf_model(name: str, seed: int = 0, device: str | None = None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    config = AutoConfig.for_model(MODEL_TYPE[name], **HF_CONFIGS[name])
    torch.manual_seed(seed)
    if device == "meta":
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config).eval()
    return AutoModelForCausalLM.from_config(config).eval()


SEQ2SEQ_CONFIGS = {
    "t5": dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=128, decoder_start_token_id=0,
               pad_token_id=0),
    "bart": dict(d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_layers=2, decoder_layers=2,
                 encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=128, max_position_embeddings=64),
}


def seq2seq_model(name: str, seed: int = 0) -> nn.Module:
    """A tiny seeded encoder-decoder (T5, BART) from its config class."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    return AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(name, **SEQ2SEQ_CONFIGS[name])).eval()


def num_layers(name: str) -> int:
    cfg = HF_CONFIGS[name]
    return cfg.get("num_hidden_layers", cfg.get("n_layer"))


class PlainAttention(nn.Module):
    """Multi-head self-attention written with plain torch ops: a fused qkv projection chunked
    in three, head counts as Python ints (literals in the graph), matmul + softmax attention,
    and a reshape back to the *global* width ``C`` read from the input."""

    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, heads, T, head_dim)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // self.heads)
        y = att.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class PlainMLP(nn.Module):
    def __init__(self, dim: int = 64, hidden: int = 256) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class PlainBlock(nn.Module):
    """A pre-norm transformer block built from the two modules above."""

    def __init__(self, dim: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = PlainAttention(dim, heads)
        self.mlp = PlainMLP(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LoopedExperts(nn.Module):
    """Experts looped over by the data (so the module runs whole: opaque), with router jitter
    drawn in training mode."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.router = nn.Linear(width, 2, bias=False)
        self.experts = nn.ModuleList(nn.Linear(width, width) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        if self.training:
            x = x * torch.empty_like(x).uniform_(0.9, 1.1)
        top, out = self.router(x).argmax(-1), torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            idx = (top == i).nonzero().squeeze(-1)
            if idx.shape[0] == 0:
                continue
            out = out.index_add(0, idx, expert(x[idx]))
        return out.reshape(shape)


def plain_block(seed: int = 0) -> PlainBlock:
    torch.manual_seed(seed)
    return PlainBlock().eval()


def token_ids(batch: int, seq: int, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def assert_close_to(reference: torch.Tensor, actual: torch.Tensor) -> float:
    """The correctness contract: max abs diff <= 1e-4 x max |reference| (fp32 sums of partial
    products in another order differ by a few ulps; 1e-4 relative leaves room for that and
    nothing else). Returns the max abs diff."""
    diff = (actual - reference).abs().max().item()
    bound = 1e-4 * reference.abs().max().item()
    assert diff <= bound, f"max abs diff {diff:.3e} > bound {bound:.3e}"
    return diff


def simulated_exactly(model: nn.Module, x: torch.Tensor, tps: tuple[int, ...] = (2, 4)) -> list:
    """``model`` on ``x`` simulated at each tp (:func:`autotp.simulate.simulate`), every rank's
    output checked against the unsharded one. Returns the simulations."""
    from autotp.simulate import simulate

    with torch.no_grad():
        reference, sims = model(x), [simulate(model, (x,), tp) for tp in tps]
    for sim in sims:
        for out in sim.outputs:
            assert_close_to(reference, out)
    return sims


def parallelize_and_compare(model: nn.Module, ids: torch.Tensor) -> tuple[nn.Module, list[str], float]:
    """``autotp.parallelize(model)`` recording the warnings it gives; its logits for ``ids``
    checked against the unsharded model's. Returns the tensor-parallel model, the warnings'
    messages and the max abs diff."""
    import warnings

    import autotp

    with torch.no_grad():
        reference = model(ids).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tp_model = autotp.parallelize(model)
    with torch.no_grad():
        diff = assert_close_to(reference, tp_model(ids).logits)
    return tp_model, [str(w.message) for w in caught], diff


def plain_block_with_inputs():
    """A factory for ``autotp plan models:plain_block_with_inputs`` (module, example inputs)."""
    return plain_block(), (torch.randn(2, 6, 64),)


def save_word_tokenizer(directory, vocab_size: int = 128) -> None:
    """A word-level tokenizer built locally (no hub), saved next to a model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]").save_pretrained(directory)
