"""Module globals the model's forward reads by name (autotp.code_globals): a captured graph bakes
them in, so a call after one changed is refused, and their values key the graph cache."""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from autotp.cache_key import _globals_values
from autotp.call_checks import ModelState
from autotp.code_globals import globals_read

SCALE = 1.0
TABLE = {"shift": 0.0}
OFFSETS = torch.zeros(16)
HELPER_EPS = 1e-6
_UNREAD = 5  # read by no forward


def _normalised(h: torch.Tensor) -> torch.Tensor:
    return h / (h.norm(dim=-1, keepdim=True) + HELPER_EPS)  # a global read in a helper of this module


class ReadsGlobals(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._out(_normalised(self.up(x + OFFSETS))) * SCALE

    def _out(self, h: torch.Tensor) -> torch.Tensor:  # a global read in a method the forward calls
        return self.down(h) + TABLE["shift"]


_HERE = sys.modules[__name__]


def test_the_globals_a_forward_reads_are_found_through_helpers_and_methods() -> None:
    found = {what.rsplit(".", 1)[1] for what, _, _ in globals_read(ReadsGlobals()) if what.startswith("global ")}
    assert found == {"SCALE", "TABLE", "OFFSETS", "HELPER_EPS"}, found


def test_a_global_the_forward_reads_changed_after_the_record_is_named() -> None:
    """SCALE set to 2.0 after parallelize: the graph kept 1.0, 0.998 off with no error (on real
    ranks); a dict entry changed in place, 4.99 off. Now each is the first change a call finds."""
    model = ReadsGlobals()
    state = ModelState(model)
    assert state.first_change() is None
    for name, change, undo in [
        ("SCALE", lambda: setattr(_HERE, "SCALE", 2.0), lambda: setattr(_HERE, "SCALE", 1.0)),
        ("TABLE", lambda: TABLE.__setitem__("shift", 3.0), lambda: TABLE.__setitem__("shift", 0.0)),
        ("HELPER_EPS", lambda: setattr(_HERE, "HELPER_EPS", 1e-3), lambda: setattr(_HERE, "HELPER_EPS", 1e-6)),
        ("OFFSETS: written in place", lambda: OFFSETS.add_(1.0), None),
    ]:
        change()
        assert state.first_change() == f"the global {__name__}.{name}"
        if undo is not None:
            undo()
            assert state.first_change() is None
    global _UNREAD
    _UNREAD = 6
    assert ModelState(model).first_change() is None  # a global no forward reads is no state of the model


def test_the_globals_values_key_the_graph_cache() -> None:
    """A value set before parallelize in one run must not reuse the graph another run captured."""
    global SCALE
    before = _globals_values(ReadsGlobals(), {})
    SCALE = 3.0
    try:
        assert _globals_values(ReadsGlobals(), {}) != before
    finally:
        SCALE = 1.0
    assert _globals_values(ReadsGlobals(), {}) == before


class ReadsAClassAttribute(nn.Module):
    FACTOR = 1.0  # set on the class: every instance reads it as self.FACTOR

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.FACTOR


def test_a_class_attribute_the_forward_reads_changed_after_the_record_is_named() -> None:
    state = ModelState(ReadsAClassAttribute())
    ReadsAClassAttribute.FACTOR = 2.0
    try:
        assert state.first_change() == f"the class attribute {__name__}.ReadsAClassAttribute.FACTOR"
    finally:
        ReadsAClassAttribute.FACTOR = 1.0
    assert state.first_change() is None
