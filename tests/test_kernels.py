"""Kernel selection (autotp.kernels): linears retargeted to oneDNN compute what the unsharded
model computes, at tp 1 and 2, in real processes, and hold exactly the same weights."""

from __future__ import annotations

import os

import pytest
import torch

import autotp
from autotp.errors import AutotpError
from autotp.kernels import choose_kernels, onednn_linear, onednn_matmul, use_onednn
from distributed import run_ranks
from models import assert_close_to, hf_model, token_ids

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")

_ONEDNN_CALLS = (onednn_linear, onednn_matmul)


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


@pytest.mark.distributed
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


def _graph(op: object, weight: torch.Tensor, bias: object = None) -> torch.fx.GraphModule:
    """``op`` over an input and a weight (and a bias) read with get_attr, as loading leaves them."""
    graph, root = torch.fx.Graph(), torch.nn.Module()
    x = graph.placeholder("x")
    root.register_buffer("w", weight)
    w = graph.get_attr("w")
    if bias is not None:
        root.register_buffer("b", bias)
    b = graph.get_attr("b") if bias is not None else None
    args = {torch.ops.aten.linear.default: (x, w) + ((b,) if b is not None else ()),
            torch.ops.aten.addmm.default: (b, x, w), torch.ops.aten.mm.default: (x, w)}[op]
    graph.output(graph.call_function(op, args))
    return torch.fx.GraphModule(root, graph)


def _check(gm: torch.fx.GraphModule, x: torch.Tensor, retargeted: int) -> None:
    expected = gm(x)
    assert use_onednn(gm) == retargeted
    assert_close_to(expected, gm(x))


def test_only_contiguous_fp32_weights_are_retargeted() -> None:
    generator = torch.Generator().manual_seed(0)
    wide, x = torch.randn(16, 64, generator=generator), torch.randn(3, 32, generator=generator)
    linear = torch.ops.aten.linear.default
    _check(_graph(linear, wide[:, :32].contiguous()), x, 1)
    _check(_graph(linear, wide[:, :32]), x, 0)  # rows padded: oneDNN would be 2500x slower
    _check(_graph(linear, wide[:, :32].double()), x.double(), 0)
    empty = _graph(linear, torch.empty(0, 32))  # an empty shard: oneDNN raises on it
    assert use_onednn(empty) == 0 and empty(x).shape == (3, 0)


def test_only_biases_oneDNN_reads_as_they_are_are_retargeted() -> None:
    # the oneDNN op reads a bias as a packed vector of the output's width: no strides, no
    # broadcasting (a strided bias read the wrong elements, an expanded one past its end)
    generator = torch.Generator().manual_seed(0)
    weight, x = torch.randn(16, 32, generator=generator), torch.randn(3, 32, generator=generator)
    table = torch.randn(16, 3, generator=generator)
    linear, addmm = torch.ops.aten.linear.default, torch.ops.aten.addmm.default
    _check(_graph(linear, weight, torch.randn(16, generator=generator)), x, 1)
    for bias in (table[:, 1], torch.tensor(1.5).expand(16), torch.tensor(1.5), torch.randn(1), torch.randn(3, 16)):
        _check(_graph(linear, weight, bias), x, 0)
    stored = weight.t().contiguous()  # GPT-2's Conv1D: [in, out]
    _check(_graph(addmm, stored, torch.randn(16, generator=generator)), x, 1)
    _check(_graph(addmm, stored, table[:, 1]), x, 0)
    _check(_graph(torch.ops.aten.mm.default, stored), x, 1)


def test_autocast_and_autograd_run_pytorchs_own_kernel() -> None:
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(16, 32, generator=generator), torch.randn(16, generator=generator)
    gm = _graph(torch.ops.aten.linear.default, weight, bias)
    assert use_onednn(gm) == 1
    x = torch.randn(3, 32, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gm(x).dtype == torch.nn.functional.linear(x, weight, bias).dtype == torch.bfloat16
    x.requires_grad_(True)
    gm(x).sum().backward()
    assert_close_to(weight.sum(0).expand(3, 32), x.grad)


def choice_worker(rank: int, world: int) -> str:
    if rank == 1:
        os.environ["AUTOTP_KERNELS"] = "fast"
    from autotp.group import init_tp

    try:
        init_tp()
    except AutotpError as exc:
        return str(exc)
    return "no error"


@pytest.mark.distributed
def test_a_bad_choice_on_one_rank_fails_every_rank() -> None:
    # not a hang: the rank that raised tells the others in the same gather
    for message in run_ranks(choice_worker, 2, timeout=120):
        assert message.startswith("rank 1: AUTOTP_KERNELS='fast'"), message


def test_kernels_choice_is_checked(monkeypatch) -> None:
    monkeypatch.setenv("AUTOTP_KERNELS", "fast")
    with pytest.raises(AutotpError, match="AUTOTP_KERNELS='fast'"):
        choose_kernels(torch.device("cpu"))
    monkeypatch.setenv("AUTOTP_KERNELS", "onednn")
    with pytest.raises(AutotpError, match="needs a CPU device"):
        choose_kernels(torch.device("meta"))
    monkeypatch.setenv("AUTOTP_KERNELS", "aten")
    assert choose_kernels(torch.device("cpu")) == "aten"
    monkeypatch.setenv("AUTOTP_KERNELS", "auto")
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # PyTorch's switch for oneDNN is obeyed
    assert choose_kernels(torch.device("cpu")) == "aten"
