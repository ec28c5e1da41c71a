"""Export's input guards, kept with each captured graph and checked before a call
(autotp.guards): a graph made for one side of a size branch must not serve the other."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from autotp.capture import capture
from autotp.errors import AutotpError
from autotp.guards import Guards, value_at


class Windowed(nn.Module):
    """Keeps the last 4 positions once there are more than 4, as a sliding-window cache does."""

    def forward(self, x: torch.Tensor, past: list[torch.Tensor]) -> torch.Tensor:
        whole = torch.cat([past[0], x], dim=1)
        return whole[:, -4:] if whole.shape[1] > 4 else whole * 2


def test_guards_tell_which_side_of_a_size_branch_a_graph_serves():
    captured = capture(Windowed(), {"x": torch.ones(2, 3), "past": [torch.ones(2, 3)]})
    guards = Guards.of_captured(captured)
    assert guards.recorded is not None and guards.recorded[0], "export recorded no guard for the branch"

    def call(new: int, past: int) -> dict:
        return {"x": torch.empty(2, new, device="meta"), "past": [torch.empty(2, past, device="meta")]}

    assert guards.hold(call(3, 3)) and guards.hold(call(1, 7))  # longer than 4: the branch traced
    assert not guards.hold(call(1, 2))  # 3 positions: the other branch, another graph


def test_value_at_follows_mapping_and_sequence_paths():
    from torch.utils import _pytree as pytree

    inputs = {"tokens": {"input_ids": 1}, "past": [2, 3]}
    assert value_at(inputs, (pytree.MappingKey("tokens"), pytree.MappingKey("input_ids"))) == 1
    assert value_at(inputs, (pytree.MappingKey("past"), pytree.SequenceKey(1))) == 3


def test_a_graph_whose_guards_were_not_recorded_is_refused():
    captured = capture(Windowed(), {"x": torch.ones(2, 3), "past": [torch.ones(2, 3)]})
    captured.guards = None
    with pytest.raises(AutotpError, match="input guards"):
        Guards.of_captured(captured)


class Specialising(nn.Module):
    """A projection pair whose forward branches on the sequence length: export bakes in the
    branch the example took and guards the length."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x))
        if x.shape[1] == 8:
            h = h * 2
        return self.down(h)


def specialised_worker(rank: int, world: int) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    import autotp

    torch.manual_seed(0)
    block = Specialising().eval()
    mamba = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "mamba", hidden_size=64, num_hidden_layers=2, vocab_size=128, state_size=8, expand=2)).eval()
    xs = [torch.randn(2, n, 16, generator=torch.Generator().manual_seed(n)) for n in (8, 5, 12, 8)]
    ids = [torch.randint(3, 128, (2, n), generator=torch.Generator().manual_seed(n)) for n in (8, 5, 12, 8)]
    with torch.no_grad():
        block_refs, mamba_refs = [block(x) for x in xs], [mamba(i).logits for i in ids]
        tp_block = autotp.parallelize(block, (xs[0],))
        tp_mamba = autotp.parallelize(mamba, {"input_ids": ids[0]})
        block_diffs = [float((tp_block(x) - r).abs().max()) for x, r in zip(xs, block_refs)]
        mamba_diffs = [float((tp_mamba(input_ids=i).logits - r).abs().max()) for i, r in zip(ids, mamba_refs)]
    return dict(block=block_diffs, mamba=mamba_diffs, graphs=(len(tp_block._graphs), len(tp_mamba._graphs)),
                sharded=tp_block.plan.bytes_per_rank() < tp_block.plan.bytes_unsharded())


@pytest.mark.distributed
def test_a_call_another_graph_is_guarded_against_is_captured_again():
    """A model export specialised to one sequence length (mamba's capture guards it) serves
    other lengths with graphs of their own, and the first again."""
    from distributed import run_ranks

    for r in run_ranks(specialised_worker, 2):
        assert max(r["block"]) < 1e-5 and max(r["mamba"]) < 1e-4, r
        assert r["graphs"][0] == 2 and r["graphs"][1] == 3, r["graphs"]  # length 8 reuses its graph
        assert r["sharded"]
