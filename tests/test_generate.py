"""Generation on the parallelized model: Hugging Face ``generate`` with the KV cache sharded.

On real ranks, each worker generates with the unsharded model first (the reference), then
with the parallelized one, and compares tokens: greedy, 32 new tokens, batch 1 and batch 3
with left padding and an attention mask; and seeded sampling. It also checks that each rank's
cache holds 1/tp of the unsharded cache's bytes, and that after the prefill every step fed
one token (no prefix recompute).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

import autotp
from distributed import run_ranks
from models import hf_model, seq2seq_model

pytestmark = pytest.mark.distributed

NEW = 32
GREEDY = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)


def _prompts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    one = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(11))
    three = torch.randint(3, 128, (3, 7), generator=torch.Generator().manual_seed(12))
    mask = torch.ones_like(three)
    mask[0, :3], mask[1, :1] = 0, 0  # left padding
    return one, three, mask


def _cache_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def generate_worker(rank: int, world: int, names: list[str]) -> dict:
    one, three, mask = _prompts()
    out = {}
    for name in names:
        model = hf_model(name)
        with torch.no_grad():
            ref_one = model.generate(one, **GREEDY)
            ref_cache = DynamicCache(config=model.config)
            ref_three = model.generate(three, attention_mask=mask, cache=ref_cache, **GREEDY)
            torch.manual_seed(5)
            ref_sampled = model.generate(three, attention_mask=mask, max_new_tokens=8, do_sample=True, pad_token_id=0)
            ref_manual = _manual_decode(model, one)
            tp_model = autotp.parallelize(model)  # from here on, calling model runs tp_model
            got_one = tp_model.generate(one, **GREEDY)
            cache = DynamicCache(config=model.config)
            got_three = tp_model.generate(three, attention_mask=mask, cache=cache, **GREEDY)
            torch.manual_seed(5)
            sampled = tp_model.generate(three, attention_mask=mask, max_new_tokens=8, do_sample=True, pad_token_id=0)
            refused = _refusals(tp_model, one)
        out[name] = dict(refused=refused,
            greedy_one=torch.equal(ref_one, got_one), greedy_three=torch.equal(ref_three, got_three),
            sampled_same=torch.equal(ref_sampled, sampled), sampled=sampled.tolist(),
            cache_bytes=_cache_bytes(cache), ref_cache_bytes=_cache_bytes(ref_cache),
            cached_calls=copy.deepcopy(tp_model.cached_calls), tokens=got_three[:, -NEW:].tolist(),
            manual_decode=_gap(ref_manual, _manual_decode(tp_model, one, [r[:, -1:].argmax(-1) for r in ref_manual])),
        )
    return out


def _manual_decode(model, prompt: torch.Tensor, tokens: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """A decode loop written by hand: the prompt with ``use_cache=True``, then one token at a time
    with the ``past_key_values`` the last call returned; the logits of every call. ``tokens``: what
    to feed (default: the greedy ones, for the reference). The parallelized model once returned no
    cache here, and the loop computed on without the context."""
    logits = []
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        for step in range(3):
            logits.append(out.logits)
            token = tokens[step] if tokens else out.logits[:, -1:].argmax(-1)
            out = model(token, past_key_values=out.past_key_values, use_cache=True)
    return logits + [out.logits]


def _refusals(tp_model, prompt: torch.Tensor) -> list[str]:
    """The errors of calls asking a cached call for outputs it does not return (they came back
    None, silently, where the model returns them)."""
    errors = []
    for call in (lambda: tp_model(prompt, use_cache=True, output_hidden_states=True),
                 lambda: tp_model(prompt, use_cache=True, output_attentions=True),
                 lambda: tp_model.generate(prompt, output_hidden_states=True, return_dict_in_generate=True, **GREEDY)):
        try:
            call()
            errors.append("no error")
        except autotp.AutotpError as exc:
            errors.append(str(exc))
    return errors


def _gap(reference: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    return max(((g - r).abs().max() / r.abs().max()).item() for r, g in zip(reference, got))


@pytest.mark.parametrize("world", [2, 4], ids=["tp2", "tp4"])
def test_generate_matches_unsharded_and_shards_the_cache(world):
    names = ["llama", "qwen2", "gpt2", "gpt2_odd_vocab", "gpt_bigcode"]
    per_rank = run_ranks(generate_worker, world, names)
    for name in names:
        ranks = [r[name] for r in per_rank]
        for r in ranks:
            assert r["greedy_one"] and r["greedy_three"], f"{name}: greedy tokens differ from the unsharded model's"
            assert r["sampled_same"], f"{name}: seeded sampling differs from the unsharded model's"
            # by heads; multi-query attention's one kv head is held whole by every rank
            split = 1 if name == "gpt_bigcode" else world
            assert r["cache_bytes"] * split == r["ref_cache_bytes"], f"{name}: the cache is not laid out as planned"
            # 3 generate calls: a prefill each, then one token per step
            assert r["cached_calls"]["prefill"]["calls"] == 3
            assert r["cached_calls"]["decode"] == {"calls": 2 * (NEW - 1) + 7, "tokens": 2 * (NEW - 1) + 7}
        assert all(r["manual_decode"] < 1e-4 for r in ranks), f"{name}: a hand-written decode loop differs"
        assert all("is not supported in a call with a cache" in e for r in ranks for e in r["refused"]), ranks[0]["refused"]
        assert len({str(r["sampled"]) for r in ranks}) == 1, f"{name}: ranks sampled different tokens"
        assert len({str(r["tokens"]) for r in ranks}) == 1


def test_generate_with_experts_that_run_whole():
    """DBRX's experts loop over only the experts a batch routes to, which torch.export cannot
    trace: they run whole on every rank (autotp.opaque) in the prefill and every decode graph,
    while attention and its cache are sharded; generate() gives the unsharded model's tokens."""
    per_rank = run_ranks(generate_worker, 2, ["dbrx"])
    for r in (ranks["dbrx"] for ranks in per_rank):
        assert r["greedy_one"] and r["greedy_three"] and r["sampled_same"]
        assert r["cache_bytes"] * 2 == r["ref_cache_bytes"]


def test_torchrun_generate_prints_the_unsharded_models_text(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoTokenizer

    from models import save_word_tokenizer

    model = hf_model("llama")
    model.save_pretrained(tmp_path / "model")
    save_word_tokenizer(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    prompt = "w5 w17 w99 w3"
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = tokenizer.decode(reference[0, ids.shape[1]:], skip_special_tokens=True)
    out = autotp.convert(tmp_path / "model", 2, tmp_path / "tp2", progress=False)
    torchrun = Path(sys.executable).with_name("torchrun")
    done = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "autotp", "generate", str(out),
                           "--prompt", prompt, "--max-new-tokens", "8"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == expected
    assert "8 new tokens in" in done.stderr and "tokens/s at tp=2" in done.stderr
    assert " linears" in done.stderr  # and what ran them: the collective path and the kernels


def sliding_worker(rank: int, world: int, names: list[str]) -> dict:
    """Sliding-window and hybrid caches: a prompt shorter than the window (the window fills
    while decoding) and one longer (full from the start), batch 2 with left padding. The
    unsharded references come first: parallelize hands the model object over to the ranks."""
    out = {}
    for name in names:
        model = hf_model(name)
        window = model.config.sliding_window
        prompts = {}
        for length in (window - 2, window + 3):
            ids = torch.randint(3, 128, (2, length), generator=torch.Generator().manual_seed(length))
            mask = torch.ones_like(ids)
            mask[0, :2] = 0
            prompts[length] = (ids, mask)
        references = {}
        with torch.no_grad():
            for length, (ids, mask) in prompts.items():
                cache = DynamicCache(config=model.config)
                tokens = model.generate(ids, attention_mask=mask, cache=cache, **GREEDY)
                no_cache = model.generate(ids, attention_mask=mask, use_cache=False, **{**GREEDY, "max_new_tokens": 6,
                                                                                      "min_new_tokens": 6})
                references[length] = (tokens, no_cache, cache)
            tp_model = autotp.parallelize(model)
            results = {}
            for length, (ids, mask) in prompts.items():
                reference, no_cache, ref_cache = references[length]
                cache = DynamicCache(config=model.config)
                got = tp_model.generate(ids, attention_mask=mask, cache=cache, **GREEDY)
                got_no_cache = tp_model.generate(ids, attention_mask=mask, use_cache=False,
                                                 **{**GREEDY, "max_new_tokens": 6, "min_new_tokens": 6})
                results[length] = dict(
                    same=torch.equal(reference, got), same_no_cache=torch.equal(no_cache, got_no_cache),
                    lengths=[layer.keys.shape[-2] for layer in cache.layers],
                    ref_lengths=[layer.keys.shape[-2] for layer in ref_cache.layers],
                    sliding=[layer.is_sliding for layer in cache.layers],
                    bytes=_cache_bytes(cache), ref_bytes=_cache_bytes(ref_cache),
                )
        out[name] = dict(results=results, window=window, decode=tp_model.cached_calls["decode"])
    return out


@pytest.mark.parametrize("world", [2, 4], ids=["tp2", "tp4"])
def test_sliding_window_and_hybrid_caches_generate_the_unsharded_tokens(world):
    names = ["mistral", "gemma2", "cohere2"]
    per_rank = run_ranks(sliding_worker, world, names)
    for name in names:
        for r in per_rank:
            window = r[name]["window"]
            for prompt_length, res in r[name]["results"].items():
                assert res["same"], f"{name}, prompt {prompt_length}: greedy tokens differ from the unsharded model's"
                assert res["same_no_cache"], f"{name}, prompt {prompt_length}: use_cache=False tokens differ"
                # the cache keeps HF's own lengths: a sliding layer its last window - 1 tokens only
                assert res["lengths"] == res["ref_lengths"], name
                total = prompt_length + NEW - 1
                assert res["lengths"] == [window - 1 if s else total for s in res["sliding"]], name
                assert any(res["sliding"]), f"{name}: no sliding layer in the cache"
                assert res["bytes"] * world == res["ref_bytes"], f"{name}: the cache is not sharded by heads"
            # every decode step fed one token: the prefix was never run again
            assert r[name]["decode"]["calls"] == r[name]["decode"]["tokens"] == 2 * (NEW - 1)


def _all_layers_bytes(cache) -> int:
    parts = [cache.self_attention_cache, cache.cross_attention_cache]
    return sum(t.numel() * t.element_size() for part in parts for layer in part.layers for t in (layer.keys, layer.values))


def encoder_decoder_worker(rank: int, world: int, names: list[str]) -> dict:
    """T5 and BART: the decoder's self-attention cache grows, its cross-attention cache is
    computed once from the encoder's states; both are sharded by heads."""
    from transformers import EncoderDecoderCache

    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(13))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    options = dict(GREEDY, decoder_start_token_id=0)
    out = {}
    for name in names:
        model = seq2seq_model(name)
        with torch.no_grad():
            ref_cache = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
            reference = model.generate(ids, attention_mask=mask, cache=ref_cache, **options)
            uncached = model.generate(ids, attention_mask=mask, use_cache=False, **options)
            tp_model = autotp.parallelize(model, {"input_ids": ids, "decoder_input_ids": ids[:, :3]})
            cache = EncoderDecoderCache(DynamicCache(config=model.config), DynamicCache(config=model.config))
            got = tp_model.generate(ids, attention_mask=mask, cache=cache, **options)
            got_uncached = tp_model.generate(ids, attention_mask=mask, use_cache=False, **options)
        out[name] = dict(same=torch.equal(reference, got), same_uncached=torch.equal(uncached, got_uncached),
                         bytes=_all_layers_bytes(cache), ref_bytes=_all_layers_bytes(ref_cache),
                         cached_calls=tp_model.cached_calls)
    return out


@pytest.mark.parametrize("world", [2, 4], ids=["tp2", "tp4"])
def test_encoder_decoder_generate_with_a_sharded_cache(world):
    names = ["t5", "bart"]
    for r in run_ranks(encoder_decoder_worker, world, names):
        for name in names:
            res = r[name]
            assert res["same"], f"{name}: cached greedy tokens differ from the unsharded model's"
            assert res["same_uncached"], f"{name}: use_cache=False tokens differ from the unsharded model's"
            assert res["bytes"] * world == res["ref_bytes"], f"{name}: the self/cross cache is not sharded by heads"
            # the decoder starts from one token, then feeds one per step: nothing is recomputed
            assert res["cached_calls"]["prefill"] == {"calls": 1, "tokens": 1}
            assert res["cached_calls"]["decode"] == {"calls": NEW - 1, "tokens": NEW - 1}


def static_worker(rank: int, world: int, names: list[str]) -> dict:
    """``cache_implementation="static"``: the cache is preallocated to its full length and
    written in place; inside the graph the buffer is made at this rank's heads. The model is
    parallelized before any static generation (generate() then keeps its longest cache length
    on the model object, which read as a change after parallelize and refused every later call),
    and a second, longer generation follows."""
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(14))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    options = dict(GREEDY, cache_implementation="static")
    out = {}
    for name in names:
        twin, model = hf_model(name), hf_model(name)  # the same seeded weights: the reference and the one handed over
        with torch.no_grad():
            tp_model = autotp.parallelize(model)
            reference = twin.generate(ids, attention_mask=mask, return_dict_in_generate=True, **options)
            got = tp_model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **options)
            decode = dict(tp_model.cached_calls["decode"])
            longer = dict(options, max_new_tokens=NEW + 4, min_new_tokens=NEW + 4)
            longer_same = torch.equal(twin.generate(ids, attention_mask=mask, **longer),
                                      tp_model.generate(ids, attention_mask=mask, **longer))
        out[name] = dict(same=torch.equal(reference.sequences, got.sequences), longer_same=longer_same,
                         kinds={type(layer).__name__ for layer in got.cache.layers},
                         bytes=_cache_bytes(got.cache), ref_bytes=_cache_bytes(reference.cache),
                         decode=decode)
    return out


@pytest.mark.parametrize("world", [2, 4], ids=["tp2", "tp4"])
def test_static_cache_generates_the_unsharded_tokens(world):
    names = ["llama", "qwen2_kv2"]  # qwen2_kv2 at tp 4: two ranks share each kv head
    for r in run_ranks(static_worker, world, names):
        for name in names:
            res = r[name]
            assert res["same"], f"{name}: greedy tokens with a static cache differ from the unsharded model's"
            assert res["longer_same"], f"{name}: a second, longer static generation differs"
            assert res["kinds"] == {"StaticLayer"}, res["kinds"]
            shared = 2 if name == "qwen2_kv2" and world == 4 else 1
            assert res["bytes"] * world == res["ref_bytes"] * shared, f"{name}: the static cache is not sharded by heads"
            assert res["decode"] == {"calls": NEW - 1, "tokens": NEW - 1}


def unsharded_cache_worker(rank: int, world: int) -> dict:
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(15))
    model = hf_model("llama")
    with torch.no_grad():
        whole = model(ids, use_cache=True).past_key_values  # filled by the unsharded model: every head
        tp_model = autotp.parallelize(model)
        own = tp_model(ids, use_cache=True).past_key_values  # a prefill: the cache's layout is known
        try:
            tp_model(ids[:, -1:], past_key_values=whole, use_cache=True)
            error = "no error"
        except autotp.AutotpError as exc:
            error = str(exc)
        tp_model(ids[:, -1:], past_key_values=own, use_cache=True)  # its own cache still serves
    return dict(error=error)


def test_a_cache_the_unsharded_model_filled_is_refused_by_name():
    """A cache holding every head, passed to the parallelized model, ran into a bare RuntimeError
    inside the graph (a size mismatch where the new keys meet the cache)."""
    for r in run_ranks(unsharded_cache_worker, 2):
        assert "where each rank holds 2 of 4: pass a cache this parallelized model filled" in r["error"], r["error"]
