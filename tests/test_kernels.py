"""Kernel selection (autotp.kernels): linears retargeted to oneDNN compute what the unsharded
model computes, at tp 1 and 2, in real processes, and hold exactly the same weights."""

from __future__ import annotations

import os

import pytest
import torch

import autotp
from autotp.errors import AutotpError
from autotp.kernels import choose_kernels, onednn_matmul, use_onednn
from distributed import run_ranks
from models import assert_close_to, hf_model, token_ids

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

_ONEDNN_CALLS = (torch.ops.mkldnn._linear_pointwise.default, onednn_matmul)


def kernels_worker(rank: int, world: int, kernels: str, names: list[str]) -> dict:
    os.environ["AUTOTP_KERNELS"] = kernels
    out = {}
    for name in names:
        model = hf_model(name)
        prompt = token_ids(2, 6)
        with torch.no_grad():
            reference = model(prompt).logits
            reference_tokens = model.generate(prompt, max_new_tokens=5, do_sample=False)
        tp_model = autotp.parallelize(model)
        with torch.no_grad():
            logits = tp_model(prompt).logits
        tokens = tp_model.generate(prompt, max_new_tokens=5, do_sample=False)
        graphs = list(tp_model._graphs.values())  # the call's, and generate()'s prefill and decode
        out[name] = dict(
            kernels=tp_model.kernels,
            diff=assert_close_to(reference, logits),
            tokens_match=torch.equal(tokens, reference_tokens),
            graphs=len(graphs),
            onednn_calls=[sum(n.target in _ONEDNN_CALLS for n in gm.graph.nodes) for gm in graphs],
            state={k: v.clone() for k, v in tp_model.state_dict().items()},
        )
    return out


@pytest.mark.parametrize("world", [1, 2], ids=["tp1", "tp2"])
def test_onednn_linears_match_unsharded(world: int) -> None:
    names = ["llama", "gpt2"]
    onednn = run_ranks(kernels_worker, world, "onednn", names)
    aten = run_ranks(kernels_worker, world, "aten", names)
    for rank in range(world):
        for name in names:
            ours, stock = onednn[rank][name], aten[rank][name]
            assert ours["kernels"] == "onednn" and stock["kernels"] == "aten"
            assert ours["tokens_match"] and stock["tokens_match"], name
            assert ours["graphs"] == 3 and stock["onednn_calls"] == [0, 0, 0]
            # nothing is converted: the same tensors, bit for bit
            assert ours["state"].keys() == stock["state"].keys()
            assert all(torch.equal(ours["state"][k], stock["state"][k]) for k in ours["state"]), name
    # Llama: q, k, v, o, gate, up, down per layer (2 layers) and the LM head, in every graph.
    assert onednn[0]["llama"]["onednn_calls"] == [15, 15, 15]
    # GPT-2: c_attn, c_proj, c_fc, c_proj per layer (Conv1D: a matmul by a [in, out] weight),
    # and the LM head, tied to the embedding (which still reads it as a table)
    assert onednn[0]["gpt2"]["onednn_calls"] == [9, 9, 9]


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_matmul_is_the_matmul(rows: int, bias: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(rows, 48, generator=generator), torch.randn(48, 80, generator=generator)
    b = torch.randn(80, generator=generator) if bias else None
    expected = x @ weight + (b if bias else 0)
    assert_close_to(expected, onednn_matmul(x, weight, b))


def _linear_graph(weight: torch.Tensor) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    x, w = graph.placeholder("x"), graph.get_attr("w")
    graph.output(graph.call_function(torch.ops.aten.linear.default, (x, w)))
    root = torch.nn.Module()
    root.register_buffer("w", weight)
    return torch.fx.GraphModule(root, graph)


def test_only_contiguous_fp32_weights_are_retargeted() -> None:
    generator = torch.Generator().manual_seed(0)
    wide, x = torch.randn(16, 64, generator=generator), torch.randn(3, 32, generator=generator)
    for weight, expected in [(wide[:, :32].contiguous(), 1), (wide[:, :32], 0), (wide[:, :32].double(), 0)]:
        gm = _linear_graph(weight)
        assert use_onednn(gm) == expected
        assert_close_to(torch.nn.functional.linear(x.to(weight.dtype), weight), gm(x.to(weight.dtype)))


def test_kernels_choice_is_checked(monkeypatch) -> None:
    monkeypatch.setenv("AUTOTP_KERNELS", "fast")
    with pytest.raises(AutotpError, match="AUTOTP_KERNELS='fast'"):
        choose_kernels(torch.device("cpu"))
    monkeypatch.setenv("AUTOTP_KERNELS", "onednn")
    with pytest.raises(AutotpError, match="needs a CPU device"):
        choose_kernels(torch.device("meta"))
    monkeypatch.setenv("AUTOTP_KERNELS", "aten")
    assert choose_kernels(torch.device("cpu")) == "aten"
