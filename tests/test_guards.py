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
