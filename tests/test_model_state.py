"""What a call checks the model against (autotp.call_checks.ModelState): state the forward reads
through an attribute's insides, changed after parallelize, is found and named. Each of these was
unseen before, and the parallelized model computed with the captured value (0.59-2.43 off on
real ranks, with no error; found by an adversarial review)."""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autotp.call_checks import ModelState

SETTINGS = types.SimpleNamespace(scale=1.0)  # a global object whose attribute the forward reads
HOOK_SCALE = {"v": 1.0}  # read by a hook, not by forward


@dataclasses.dataclass
class Options:
    scale: float = 1.0
    use_gelu: bool = False


def scaled_relu(alpha: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def act(t: torch.Tensor) -> torch.Tensor:
        return F.relu(t) * alpha
    return act


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.options = Options()
        self.leaky = functools.partial(F.leaky_relu, negative_slope=0.1)
        self.act = scaled_relu(1.0)
        self.scales = [torch.tensor(1.0)]
        self.fc1.register_forward_hook(lambda module, args, out: out * HOOK_SCALE["v"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = F.gelu(h) if self.options.use_gelu else self.leaky(h) + self.act(h)
        return self.fc2(h * self.options.scale * self.scales[0] * SETTINGS.scale)


def _set_item(mapping: Any, key: Any, value: Any) -> Callable[[], None]:
    return lambda: mapping.__setitem__(key, value)


CHANGES: list[tuple[str, Callable[[Block], Callable[[], None]], Callable[[Block], Callable[[], None]]]] = [
    ("options.scale", lambda b: lambda: setattr(b.options, "scale", 3.0),
     lambda b: lambda: setattr(b.options, "scale", 1.0)),
    ("leaky (its keywords)", lambda b: _set_item(b.leaky.keywords, "negative_slope", 0.9),
     lambda b: _set_item(b.leaky.keywords, "negative_slope", 0.1)),
    ("act (its closure's alpha)", lambda b: lambda: setattr(b.act.__closure__[0], "cell_contents", 4.0),
     lambda b: lambda: setattr(b.act.__closure__[0], "cell_contents", 1.0)),
    ("scales[0]: written in place", lambda b: lambda: b.scales[0].fill_(3.0), lambda b: lambda: None),
    (f"the global {__name__}.SETTINGS.scale", lambda b: lambda: setattr(SETTINGS, "scale", 3.0),
     lambda b: lambda: setattr(SETTINGS, "scale", 1.0)),
    (f"the global {__name__}.HOOK_SCALE", lambda b: _set_item(HOOK_SCALE, "v", 5.0),
     lambda b: _set_item(HOOK_SCALE, "v", 1.0)),
]


@pytest.mark.parametrize("where, change, undo", CHANGES, ids=[c[0] for c in CHANGES])
def test_state_inside_an_attribute_changed_after_the_record_is_named(where: str, change, undo) -> None:
    block = Block()
    state = ModelState(block)
    assert state.first_change() is None
    with torch.no_grad():
        before = block(torch.ones(2, 16))
    change(block)()
    try:
        with torch.no_grad():
            assert not torch.allclose(block(torch.ones(2, 16)), before)  # the change reaches the forward
        assert state.first_change() == where
    finally:
        undo(block)()
