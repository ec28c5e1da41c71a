"""Opaque modules (autotp.opaque): a submodule torch.export cannot trace runs whole on every rank.

What must hold: the rest of the model is still planned and every rank matches the unsharded
model (tests/test_zoo.py's RoutedMoEBlock, tests/test_coverage.py's DBRX and LongCat-Flash);
a module that writes into its inputs is refused at capture; a module whose output shape turns
out to depend on the data raises when it runs, never feeds later ops a tensor of another shape;
a root that branches on the data is refused as before."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autotp.capture import CaptureError, capture
from autotp.placement import Shard
from autotp.simulate import simulate
from models import assert_close_to

D = 32


class _Block(nn.Module):
    """A column|row-parallel MLP, then ``inner`` on the normalised hidden states."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.up, self.down, self.inner = nn.Linear(D, 64), nn.Linear(64, D), inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.down(F.gelu(self.up(x)))
        return x + self.inner(F.layer_norm(x, (D,)))


def _stands_out(h: torch.Tensor) -> torch.Tensor:
    """Whether one value of a layer-normalised ``h`` stands far out: above 5 (the most is
    sqrt(D - 1) = 5.57, reached when one value dominates its row)."""
    return (h.abs() > 5).any()


class _Clamped(nn.Module):
    """Scales its projection down when a value of its input stands out: a branch on the data."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.proj(h)
        if _stands_out(h):
            out = out / 1e3
        return out


class _WritesItsInput(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if (h > 0).sum() > 0:
            h.mul_(2)
        return h


class _ShapeFromData(nn.Module):
    """Returns its projection, or its first position alone when a value of its input stands out."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.proj(h)
        if _stands_out(h):
            return out[:, :1]
        return out


class _CachedTable(nn.Module):
    """Builds a table from its buffer on its first call and keeps it as a plain attribute (as
    rotary embeddings once did), and branches on the data."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("freq", torch.linspace(0.5, 2.0, D))
        self.table = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            self.table = torch.cos(self.freq)
        out = h * self.table
        if _stands_out(h):
            out = out / 1e3
        return out


class _UpdatesItsCache(nn.Module):
    """Writes its keys into the dict it is passed (a cache), and branches on the data."""

    def __init__(self) -> None:
        super().__init__()
        self.k = nn.Linear(D, D)

    def forward(self, h: torch.Tensor, cache: dict) -> torch.Tensor:
        cache["keys"] = torch.cat([cache["keys"], self.k(h)], dim=1)
        return h * 2 if _stands_out(h) else h


class _PassesACache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.inner = nn.Linear(D, D), _UpdatesItsCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = {"keys": x}
        h = self.inner(self.up(x), cache)
        return h.sum(1) + cache["keys"].sum(1)


def test_a_module_that_branches_on_the_data_runs_whole_and_the_rest_is_sharded() -> None:
    torch.manual_seed(0)
    model = _Block(_Clamped()).eval()
    x = torch.randn(2, 6, D)
    huge = x.clone()
    huge[0, 0, 0] = 1e7  # takes the branch
    for inputs in (x, huge):
        with torch.no_grad():
            reference = model(inputs)
            h = F.layer_norm(inputs + model.down(F.gelu(model.up(inputs))), (D,))
        assert bool(_stands_out(h)) == (inputs is huge)
        with pytest.warns(UserWarning, match=r"_Clamped \(1 call\(s\)\) run\(s\) whole on every rank"):
            sim = simulate(model, (inputs,), 2, example_inputs=(x,))
        for out in sim.outputs:
            assert_close_to(reference, out)
    params = sim.plan.params
    assert isinstance(params["up.weight"].placement, Shard) and isinstance(params["down.weight"].placement, Shard)
    assert not isinstance(params["inner.proj.weight"].placement, Shard)
    assert "read by inner (_Clamped), which runs whole on every rank" in params["inner.proj.weight"].reason


def test_what_a_probe_leaves_on_its_module_does_not_reach_the_graph() -> None:
    """The probes run on zeros for the module's tensors; a table the forward builds from them
    and keeps would be zeros in every later call if the probes ran on the graph's module."""
    model = _Block(_CachedTable()).eval()
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        reference = copy.deepcopy(model)(x)
    with pytest.warns(UserWarning, match="whole on every rank"):
        sim = simulate(model, (x,), 2)
    for out in sim.outputs:
        assert_close_to(reference, out)


def test_a_module_that_updates_an_object_it_is_passed_is_refused() -> None:
    """The graph would pass the node a rebuilt dict and keep the old keys: refused at capture."""
    with pytest.raises(CaptureError, match="_UpdatesItsCache whole instead failed.*changes an object it is passed"):
        capture(_PassesACache().eval(), (torch.randn(2, 6, D),))


def test_a_module_that_writes_into_its_input_is_refused() -> None:
    model = _Block(_WritesItsInput()).eval()
    with pytest.raises(CaptureError, match="running _WritesItsInput whole instead failed.*writes into its inputs"):
        capture(model, (torch.randn(2, 6, D),))


def test_an_output_shape_that_depends_on_the_data_raises_when_it_runs() -> None:
    torch.manual_seed(0)
    model = _Block(_ShapeFromData()).eval()
    x = torch.randn(2, 6, D)
    with pytest.warns(UserWarning, match="whole on every rank"):
        sim = simulate(model, (x,), 2)  # captured on an input that does not take the branch
    with torch.no_grad():
        reference = model(x)
    for out in sim.outputs:
        assert_close_to(reference, out)
    huge = x.clone()
    huge[0, 0, 0] = 1e7
    with pytest.raises(RuntimeError, match=r"inner \(_ShapeFromData, run whole\) returned \[\[2, 1, 32\]\]"):
        simulate(model, (huge,), 2, example_inputs=(x,))


def test_a_root_that_branches_on_the_data_is_refused() -> None:
    with pytest.raises(CaptureError, match="could not capture _Clamped: GuardOnDataDependentSymNode"):
        capture(_Clamped().eval(), (torch.randn(2, 6, D),))
