"""The handed-over model object, on real ranks (gloo): after ``autotp.parallelize(model)`` the
object the user passed keeps only this rank's pieces, so every call of it, or of a submodule
that holds a piece, must route to tensor-parallel graphs (issue 13: an embedding lookup on
rank 1 returned other tokens' rows; T5/BART ``generate`` failed in the encoder).

Each worker computes the unsharded result first, parallelizes, and compares. A failure names
the rank and the call.
"""

from __future__ import annotations

import pytest
import torch

import autotp
from distributed import run_ranks
from models import assert_close_to, hf_model, seq2seq_model, token_ids

pytestmark = pytest.mark.distributed
GREEDY = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)


def submodule_worker(rank: int, world: int) -> dict:
    model = hf_model("llama")
    ids = token_ids(2, 5, vocab=64)  # ids rank 1 does not hold rows of, at tp 2
    hidden = torch.randn(2, 5, 64)
    with torch.no_grad():
        ref_embedding = model.get_input_embeddings()(ids)
        ref_mlp = model.model.layers[0].mlp(hidden)
        ref_attention = model.model.layers[1].self_attn.q_proj(hidden)
    autotp.parallelize(model)
    with torch.no_grad():
        return dict(embedding=assert_close_to(ref_embedding, model.get_input_embeddings()(ids)),
                    mlp=assert_close_to(ref_mlp, model.model.layers[0].mlp(hidden)),
                    q_proj=assert_close_to(ref_attention, model.model.layers[1].self_attn.q_proj(hidden)))


def test_submodules_of_the_handed_over_model_compute_whole_results() -> None:
    for rank, diffs in enumerate(run_ranks(submodule_worker, 2)):
        assert all(d < 1e-5 for d in diffs.values()), (rank, diffs)


def generate_worker(rank: int, world: int) -> dict:
    out = {}
    for name in ("t5", "bart"):
        model = seq2seq_model(name)
        ids = token_ids(2, 7, seed=4)
        with torch.no_grad():
            expected = model.generate(ids, **GREEDY)
            tp_model = autotp.parallelize(model, {"input_ids": ids, "decoder_input_ids": ids[:, :4]})
            out[name] = torch.equal(tp_model.generate(ids, **GREEDY), expected)
    model = hf_model("llama")
    prompt = token_ids(2, 6, seed=5)
    with torch.no_grad():
        expected = model.generate(prompt, use_cache=False, pad_token_id=0, **GREEDY)
        out["llama_no_cache"] = torch.equal(autotp.parallelize(model).generate(prompt, use_cache=False, pad_token_id=0,
                                                                               **GREEDY), expected)
    return out


def test_encoder_decoder_and_uncached_generate_give_the_unsharded_tokens() -> None:
    for rank, same in enumerate(run_ranks(generate_worker, 2)):
        assert all(same.values()), (rank, same)


def sharded_outputs_worker(rank: int, world: int) -> list[tuple[list[int], float]]:
    model = hf_model("llama")
    ids = token_ids(2, 8)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        references = [model(ids).logits, model(ids, attention_mask=mask).logits]
        tp_model = autotp.parallelize(model, gather_outputs=False)
        outputs = [tp_model(ids).logits, tp_model(ids, attention_mask=mask).logits]  # the second: another graph
    vocab = references[0].shape[-1] // world
    return [(list(out.shape), assert_close_to(ref[..., rank * vocab:(rank + 1) * vocab], out))
            for ref, out in zip(references, outputs)]


def test_gather_outputs_false_holds_for_every_graph() -> None:
    for rank, results in enumerate(run_ranks(sharded_outputs_worker, 2)):
        assert [shape for shape, _ in results] == [[2, 8, 64]] * 2, (rank, results)
