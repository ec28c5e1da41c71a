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
from models import LoopedExperts, assert_close_to

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


class _ShapeFromData(_Clamped):
    """Returns its projection, or its first position alone when a value of its input stands out."""

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


class _Routed(nn.Module):
    """Runs each of 4 experts on only the tokens routed to it (a data-dependent loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(D, 4, bias=False)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(4))

    def forward(self, h: torch.Tensor, scale: torch.Tensor | int = 1) -> torch.Tensor:
        flat = h.reshape(-1, D)
        chosen = self.router(flat).argmax(-1)
        out = torch.zeros_like(flat)
        for e in range(4):
            token = torch.nonzero(chosen == e).squeeze(-1)
            if token.shape[0] == 0:
                continue
            out[token] = self.experts[e](flat[token])
        return out.reshape(h.shape) / scale


class _WithSize(_Block):
    """Passes the opaque module a size: the sequence length."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.down(F.gelu(self.up(x)))
        return x + self.inner(F.layer_norm(x, (D,)), x.shape[1])


class _Masked(nn.Module):
    """Takes hidden states and a mask straight from the model's inputs (separate sizes to export)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.inner = nn.Linear(D, D), _Routed()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.inner(self.up(x)) * mask[..., None].to(x.dtype)


class _Expert(nn.Module):
    """Returns its input when it gets no token: the branch is here, the loop in its caller."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h if h.shape[0] == 0 else self.proj(h)


class _CallsExperts(_Routed):
    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(_Expert() for _ in range(4))


def _exact(model: nn.Module, inputs: tuple, capture_on: tuple | None = None, tp: int = 2) -> None:
    with torch.no_grad():
        reference = copy.deepcopy(model)(*inputs)
    with pytest.warns(UserWarning, match="whole on every rank"):
        sim = simulate(model, inputs, tp, example_inputs=capture_on)
    for out in sim.outputs:
        assert_close_to(reference, out)


def test_hooks_on_an_opaque_module_run_once() -> None:
    """export traces the module's own hooks around its node; they must not run again inside."""
    torch.manual_seed(0)
    model = _Block(_Routed()).eval()
    model.inner.register_forward_hook(lambda module, args, out: out * 2)
    model.inner.register_forward_pre_hook(lambda module, args: (args[0] + 1,))
    _exact(model, (torch.randn(2, 6, D),))


def test_a_size_passed_to_an_opaque_module_is_the_call_s_own() -> None:
    """The sequence length passed in is a graph input of the node, not the value at capture."""
    torch.manual_seed(0)
    model = _WithSize(_Routed()).eval()
    _exact(model, (torch.randn(2, 5, D),), capture_on=(torch.randn(2, 8, D),))


def test_sizes_equal_in_the_trace_are_probed_together() -> None:
    """The mask's batch and sequence are other symbols than the hidden states' until a traced op
    compares them; the probes must keep them equal, or the module cannot broadcast them."""
    torch.manual_seed(0)
    _exact(_Masked().eval(), (torch.randn(2, 6, D), torch.rand(2, 6) > 0.3))


def test_where_the_innermost_module_cannot_run_whole_the_next_one_out_does() -> None:
    """The branch is in the expert, which the loop calls with a count of tokens known only from
    the data: the expert cannot be probed, its caller can."""
    torch.manual_seed(0)
    _exact(_Block(_CallsExperts()).eval(), (torch.randn(2, 6, D),))


class _Counts(_Routed):
    """Keeps a count of its calls and scales by it: state between calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(h) * self.calls


def test_an_opaque_module_that_changes_what_it_keeps_raises_on_its_second_call() -> None:
    """Each captured graph runs its own copy of the module, so a count it keeps would not be the
    eager model's: the second call raises instead of computing with it."""
    torch.manual_seed(0)
    model = _Block(_Counts()).eval()
    x = torch.randn(2, 6, D)
    with pytest.warns(UserWarning, match="whole on every rank"):
        captured = capture(model, (x,))
    graph = captured.graph_module
    loaded = {name: tensor for name, tensor in model.state_dict().items()}
    for name in captured.tensor_names:
        owner, _, attr = name.rpartition(".")
        holder = graph.get_submodule(owner) if owner else graph
        holder._parameters[attr] = nn.Parameter(loaded[name], requires_grad=False)
    with torch.no_grad():
        assert_close_to(copy.deepcopy(model)(x), graph(x=x))  # the first call may fill what it keeps
        with pytest.raises(RuntimeError, match="changed what it keeps between calls"):
            graph(x=x)


class _RunningMean(nn.Module):
    """Assigns a new tensor to its buffer in forward (an EMA), with no branch on the data."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.register_buffer("mean", torch.zeros(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.proj(x)
        self.mean = 0.9 * self.mean + 0.1 * out.mean((0, 1))
        return out + self.mean


def test_a_buffer_assigned_in_forward_is_refused() -> None:
    """export traces ``self.mean = ...`` as nothing: the graph would read the loaded buffer on
    every call (off from the second call on, with no error). Refused at capture."""
    with pytest.raises(CaptureError, match=r"assigns a new tensor to the buffer\(s\) _RunningMean.mean"):
        capture(_Block(_RunningMean()).eval(), (torch.randn(2, 6, D),))


class _CastsItsBuffer(nn.Module):
    """Gives its buffer itself back (CTRL's ``self.pos_encoding = self.pos_encoding.to(...)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.register_buffer("table", torch.linspace(0, 1, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.table = self.table.to(device=x.device, dtype=x.dtype)
        return self.proj(x) + self.table


def test_a_buffer_given_itself_back_is_no_assignment() -> None:
    torch.manual_seed(0)
    model = _Block(_CastsItsBuffer()).eval()
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        reference = model(x)
    for out in simulate(model, (x,), 2).outputs:
        assert_close_to(reference, out)


class _TakesKwargs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.b(self.a(x))


def test_a_tensor_that_only_kwargs_take_is_named_when_export_fails() -> None:
    """xLSTM's forward takes ``attention_mask`` only through ``**kwargs``: export fails on it
    with an assertion about tree names; the error says which argument and what to do."""
    with pytest.raises(CaptureError, match=r"mask reaches _TakesKwargs.forward only through \*\*kwargs.*leave it out"):
        capture(_TakesKwargs(), {"x": torch.randn(2, 3, D), "mask": torch.ones(2, 3)})


class _SeededNoise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(2 * D, 2 * D, generator=torch.Generator().manual_seed(0))
        return self.b(self.a(x) @ noise)


def test_a_generator_the_forward_makes_is_refused() -> None:
    """Export keeps the generator as one constant whose state runs on across calls: the second
    call drew other numbers than the model, which seeds a new one each call (12.1 off at tp 1)."""
    with pytest.raises(CaptureError, match="draws random numbers from a torch.Generator"):
        capture(_SeededNoise(), (torch.randn(2, 3, D),))


class _LayerDrop(nn.Module):
    """A layer skipped at random: drawn with Python's ``random`` or NumPy's global generator and
    read (``how``), or drawn in any mode and read only in training mode, as transformers' layer
    drop does (MusicGen's)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.a, self.b, self.how = nn.Linear(D, 2 * D), nn.Linear(2 * D, D), how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import random

        import numpy as np

        if self.how == "layer drop":
            drawn = random.uniform(0, 1)
            return x if self.training and drawn < 0.5 else x + self.b(self.a(x))
        if self.how == "into a tensor":  # read by a C function, not through an operator
            return x + self.b(self.a(x)) * torch.tensor(random.random())
        drawn = {"Python": random.random, "NumPy": np.random.random, "an int": lambda: random.randint(0, 1)}[self.how]()
        return x if drawn < 0.5 else x + self.b(self.a(x))


@pytest.mark.parametrize("how, source", [("Python", "Python"), ("NumPy", "NumPy"), ("an int", "Python"),
                                         ("into a tensor", None)])
def test_a_forward_reading_a_draw_from_python_or_numpy_random_is_refused(how, source) -> None:
    """The trace runs the forward once: the branch its draw took became the graph's for every
    call (4 of 6 calls 1.1 off, and ranks seeded apart traced different branches)."""
    with pytest.raises(CaptureError, match=f"draws from {source}'s random module" if source else "torch.export"):
        capture(_LayerDrop(how), (torch.randn(2, 3, D),))


def test_a_draw_nothing_reads_is_captured() -> None:
    """transformers' layer drop draws in eval mode too and reads the number only in training
    (MusicGen): such a model is captured, and exact."""
    model, x = _LayerDrop("layer drop").eval(), torch.randn(2, 3, D)
    with torch.no_grad():
        assert_close_to(model(x), simulate(model, (x,), 2).outputs[0])


class _WithExperts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.moe = nn.Linear(D, D), LoopedExperts(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.moe(self.up(x))


def test_a_capture_leaves_torchs_random_state_as_it_was() -> None:
    """An opaque module's probe runs its forward on zeros, drawing from torch's generator: the
    model's next call then drew other numbers than the unsharded model's (3.09 off)."""
    model, x = _WithExperts().train(), torch.randn(6, D)
    before = torch.get_rng_state()
    with pytest.warns(UserWarning, match="run.* whole"):
        captured = capture(model, (x,))
    assert any(n.op == "call_module" for n in captured.graph_module.graph.nodes)  # the probe ran
    assert torch.equal(torch.get_rng_state(), before)
