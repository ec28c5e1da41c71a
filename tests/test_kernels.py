"""Kernel selection (autotp.kernels): linears rewritten to oneDNN compute what the unsharded
model computes, at every tp, in real processes; weights read any other way stay dense; a
state_dict gives the weights back exactly; file pages of converted weights are dropped."""

from __future__ import annotations

import os

import pytest
import torch

import autotp
from autotp.errors import AutotpError
from autotp.kernels import _drop_file_pages, choose_kernels, declared_shape, file_mappings
from distributed import run_ranks
from models import assert_close_to, hf_model, token_ids

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def kernels_worker(rank: int, world: int, kernels: str, names: list[str]) -> dict:
    os.environ["AUTOTP_KERNELS"] = kernels
    out = {}
    for name in names:
        model = hf_model(name)
        reference_weights = {k: v.clone() for k, v in model.state_dict().items()}
        prompt = token_ids(2, 6)
        with torch.no_grad():
            reference = model(prompt).logits
            reference_tokens = model.generate(prompt, max_new_tokens=5, do_sample=False)
        tp_model = autotp.parallelize(model)
        with torch.no_grad():
            logits = tp_model(prompt).logits
        tokens = tp_model.generate(prompt, max_new_tokens=5, do_sample=False)
        params = dict(tp_model.graph_module.named_parameters(remove_duplicate=False))
        state = tp_model.state_dict()
        out[name] = dict(
            kernels=tp_model.kernels,
            diff=assert_close_to(reference, logits),
            tokens_match=torch.equal(tokens, reference_tokens),
            onednn=sorted(n for n, p in params.items() if p.is_mkldnn),
            dense=sorted(n for n, p in params.items() if not p.is_mkldnn),
            local_bytes=tp_model.local_bytes(),
            # the state_dict is dense, in the declared shapes, and holds the loaded values exactly
            state_dense=all(not v.is_mkldnn for v in state.values()),
            state_shapes=all(list(state[f"graph_module.{n}"].shape) == declared_shape(p) for n, p in params.items()),
            state_exact=world > 1 or all(torch.equal(state[f"graph_module.{n}"], reference_weights[n]) for n in params),
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
            assert ours["state_dense"] and ours["state_shapes"] and ours["state_exact"], name
            assert ours["local_bytes"] == stock["local_bytes"], name  # the same bytes, another layout
            assert stock["onednn"] == []
    llama, gpt2 = onednn[0]["llama"], onednn[0]["gpt2"]
    # every Llama linear (q, k, v, o, gate, up, down per layer, and the untied LM head)
    assert len(llama["onednn"]) == 7 * 2 + 1 and "lm_head.weight" in llama["onednn"]
    assert "model.embed_tokens.weight" in llama["dense"]
    # GPT-2's Conv1D weights are matmul operands, converted transposed; its LM head is tied
    # to the embedding (read by the lookup too), so it stays dense
    assert len(gpt2["onednn"]) == 4 * 2 and "lm_head.weight" in gpt2["dense"]


def test_kernels_choice_is_checked(monkeypatch) -> None:
    monkeypatch.setenv("AUTOTP_KERNELS", "fast")
    with pytest.raises(AutotpError, match="AUTOTP_KERNELS='fast'"):
        choose_kernels(torch.device("cpu"))
    monkeypatch.setenv("AUTOTP_KERNELS", "onednn")
    with pytest.raises(AutotpError, match="needs a CPU device"):
        choose_kernels(torch.device("meta"))


def _resident_kib(address: int) -> int:
    """Rss of the mapping holding ``address``, from /proc/self/smaps."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                inside = start <= address < end
            elif inside and fields[0] == "Rss:":
                return int(fields[1])
    raise AssertionError("no mapping holds the address")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc")
def test_converted_weights_leave_no_file_pages(tmp_path) -> None:
    values = torch.arange(3 * 1024 * 1024, dtype=torch.float32)  # 12 MiB
    path = tmp_path / "weights.bin"
    values.numpy().tofile(path)
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=values.nbytes)
    mapped = torch.empty(0).set_(storage, 0, values.shape)
    assert torch.equal(mapped, values)  # every page read: resident
    before = _resident_kib(mapped.data_ptr())
    _drop_file_pages(mapped, file_mappings())
    after = _resident_kib(mapped.data_ptr())
    assert before >= 12 * 1024 and after < 64, (before, after)
    assert torch.equal(mapped, values)  # read again from the file: the same values
    anonymous = torch.ones(3 * 1024 * 1024)
    _drop_file_pages(anonymous, file_mappings())  # not a file mapping: left as it is
    assert bool((anonymous == 1).all())
