"""autotp.aliasing: an op that returns a view or a copy as strides allow returns on each rank
what it returned in the capture, wherever the graph writes in place (the zoo's
``one_per_rank`` modules are the end-to-end checks: they were wrong at tp 4 without it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from autotp.aliasing import AliasingError, as_captured, captured_aliasing
from autotp.capture import capture, normalise_example_inputs


def _graph(module: nn.Module, x: torch.Tensor) -> torch.fx.Graph:
    return capture(module, normalise_example_inputs(module, (x,))).graph


class _Heads(nn.Module):
    def __init__(self, write: bool) -> None:
        super().__init__()
        self.up, self.write = nn.Linear(48, 48), write

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        a = h.unflatten(-1, (4, 12)).transpose(1, 2).contiguous()  # a copy
        b = h.reshape(-1)  # a view
        if self.write:
            a.add_(1.0)
            b.mul_(2.0)
        return a.sum() + h.sum()


def test_a_graph_that_writes_nothing_is_left_alone() -> None:
    assert captured_aliasing(_graph(_Heads(write=False), torch.randn(2, 5, 48))) == {}


def test_what_each_op_returned_in_the_capture_is_read_from_its_fake_tensors() -> None:
    found = captured_aliasing(_graph(_Heads(write=True), torch.randn(2, 5, 48)))
    assert sorted(found.items()) == [("contiguous", False), ("reshape", True), ("unflatten", True)]


def test_a_view_where_the_capture_copied_becomes_a_copy() -> None:
    x = torch.randn(4, 6)
    out = as_captured(x.reshape(24), x, False, "reshape")
    assert torch.equal(out, x.reshape(24)) and out.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    view = x.reshape(24)
    assert as_captured(view, x, True, "reshape") is view


def test_a_copy_where_the_capture_had_a_view_raises() -> None:
    x = torch.randn(4, 6)
    with pytest.raises(AliasingError, match="reshape returned a view of its input in the captured graph"):
        as_captured(x.t().reshape(24), x, True, "reshape")
