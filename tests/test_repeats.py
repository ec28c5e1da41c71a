"""Repeated layers traced once (autotp.repeats): the copied graph is the graph a trace of every
layer gives, and a layer that would trace differently is traced."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn as nn

from autotp.capture import capture
from autotp.layer_trace import graph_signature
from models import simulated_exactly

WIDTH = 16


class Block(nn.Module):
    """A residual MLP; ``special`` doubles its update (set on one layer only)."""

    def __init__(self, index: int, special: bool = False, bump: bool = False) -> None:
        super().__init__()
        self.index, self.special = index, special
        self.up, self.down = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)
        if bump:
            self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.down(torch.relu(self.up(x)))
        if self.special:
            update = update * 2
        if hasattr(self, "calls"):
            self.calls.add_(1)
        return x + update


class Stack(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


_CALLS = [0]


class ReadsAGlobal(Block):
    """A layer whose graph depends on state outside it that the previous layer changed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _CALLS[0] += 1
        update = self.down(torch.relu(self.up(x)))
        return x + (update * 3 if _CALLS[0] == 1 else update)


def _both(model: nn.Module, x, before=lambda: None):
    """``model`` captured with every layer traced and with repeats copied (``before`` each): the
    two graphs must be the same. Returns the second capture."""
    before()
    traced = capture(model, x if isinstance(x, dict) else (x,), share_layers=False)
    before()
    shared = capture(model, x if isinstance(x, dict) else (x,), share_layers=True)
    assert graph_signature(shared.graph) == graph_signature(traced.graph)
    return shared


def _copies_and_captures_as_traced(arch: str) -> None:
    """The family, built with 5 layers as the coverage sweep builds it, copies layers, and its
    graph and plan at tp 2 are those of tracing every layer (scripts/repeats_check.py)."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "scripts"))
    from repeats_check import check

    row = check(arch, layers=5, tp=2)
    assert row.get("copied", 0) > 0 and row["same_graph"] and row["same_plan"], row


def _stack(n: int, block=Block, per_layer: dict[int, dict] | None = None) -> Stack:
    torch.manual_seed(0)
    return Stack([block(i, **(per_layer or {}).get(i, {})) for i in range(n)]).eval()


def test_repeated_layers_are_copied_and_compute_what_the_model_does() -> None:
    model, x = _stack(6), torch.randn(2, 8, WIDTH)
    shared = _both(model, x)
    # layer 0 is given the input with a symbolic width (the first linear pins it to 16), so it
    # matches no later layer; 1 is traced, 2 traced to confirm it, 3-5 copied
    assert shared.copied_layers == 3
    simulated_exactly(model, x)


def test_a_layer_whose_read_attribute_differs_is_traced() -> None:
    model, x = _stack(6, per_layer={3: {"special": True}}), torch.randn(2, 8, WIDTH)
    shared = _both(model, x)
    # 0 as above, 1 traced, 2 confirms 1; 3 differs from 1 in `special`, which the forward reads,
    # so it is traced; 4-5 copied from 1 (`index` differs too, but no forward reads it)
    assert shared.copied_layers == 2
    simulated_exactly(model, x)


def test_global_state_changed_by_a_layer_fails_the_confirmation() -> None:
    model, x = _stack(5, block=ReadsAGlobal), torch.randn(2, 8, WIDTH)
    _CALLS[0] = 0
    reference = model(x)
    shared = _both(model, x, before=lambda: _CALLS.__setitem__(0, 0))  # 1 is confirmed by 2, 3-4 copied
    assert shared.copied_layers == 2
    _CALLS[0] = 0
    from autotp.simulate import simulate

    for out in simulate(model, (x,), 2).outputs:
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)


def test_a_layer_that_mutates_its_buffer_is_traced() -> None:
    model, x = _stack(5, per_layer={i: {"bump": True} for i in range(5)}), torch.randn(2, 8, WIDTH)
    assert _both(model, x).copied_layers == 0


@pytest.mark.parametrize("arch", [
    "falcon",  # a small constant tensor in each layer: each copy gets its own
    "dory",  # the layers run twice: module frames keyed @1 on the second call
    "llama4",  # a no-op .to() tracks its input under a new node that a later layer reads
    "phi4_multimodal",  # a shared module: export calls modules through attribute proxies
])
def test_families_whose_copies_once_differed_capture_as_traced(arch: str) -> None:
    """Each of these gave a graph other than tracing every layer gives, until the fix its
    comment names (scripts/repeats_check.py over every family found them)."""
    _copies_and_captures_as_traced(arch)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_hf_decoder_layers_are_copied(model_type: str) -> None:
    """Llama's layers differ only in layer_idx, never read without a cache; Gemma-2's alternate
    sliding and full attention, so each kind has its own representative."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 128, (2, 8))
    assert _both(model, {"input_ids": ids}).copied_layers == (4 if model_type == "llama" else 2)
    assert capture(model, {"input_ids": ids}).copied_layers == (4 if model_type == "llama" else 2)  # by default too


class ScaledBy(Block):
    """A layer scaled by a per-layer value it reads through ``__dict__``, which the watch on its
    class cannot see."""

    def __init__(self, index: int, scale: float) -> None:
        super().__init__(index)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x))) * self.__dict__["scale"]


def test_hand_written_layers_are_traced_unless_sharing_is_asked_for() -> None:
    """Scales 1, 2, 2, 3: layer 1 is the representative, 2 confirms it, and a copy of it for 3
    would compute with 2. Only transformers' and torch's code shares by default (checked family
    by family); code like this is traced layer by layer, and exact."""
    torch.manual_seed(0)
    model, x = Stack([ScaledBy(i, scale) for i, scale in enumerate([1.0, 2.0, 2.0, 3.0])]).eval(), torch.randn(2, 8, WIDTH)
    assert capture(model, (x,)).copied_layers == 0
    simulated_exactly(model, x)
    assert capture(_stack(6), (x,)).copied_layers == 0  # even where a copy would be right
    assert capture(_stack(6), (x,), share_layers=True).copied_layers == 3


def test_share_layers_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOTP_SHARE_LAYERS", "sometimes")
    with pytest.raises(ValueError, match="AUTOTP_SHARE_LAYERS"):
        capture(_stack(3), (torch.randn(2, 8, WIDTH),))


def test_a_layer_with_hooks_inside_is_traced() -> None:
    """A copy would not call the layer's submodules, so their hooks would not run."""
    model, x = _stack(5), torch.randn(2, 8, WIDTH)
    seen: list[str] = []
    for i, layer in enumerate(model.layers):
        layer.up.register_forward_hook(lambda module, args, out, i=i: seen.append(f"up {i}"))
    assert _both(model, x).copied_layers == 0
    assert seen[-5:] == [f"up {i}" for i in range(5)]  # every layer's hook ran in the last capture


class SharedHead(Stack):
    """One module under two names: export then calls modules through attribute proxies."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__(blocks)
        self.norm = nn.LayerNorm(WIDTH)
        self.same_norm = self.norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.same_norm(self.norm(super().forward(x)))


def test_layers_are_copied_when_export_proxies_module_attributes() -> None:
    torch.manual_seed(0)
    model, x = SharedHead([Block(i) for i in range(6)]).eval(), torch.randn(2, 8, WIDTH)
    assert _both(model, x).copied_layers == 3  # module paths as traced (graph_signature compares them)
    simulated_exactly(model, x)


class Inner(nn.Module):
    def __init__(self, doubled: bool) -> None:
        super().__init__()
        self.doubled = doubled
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        return x + (2 * y if self.doubled else y)


class Outer(nn.Module):
    """Layers of layers: the attribute that tells outer layer 4 apart is read inside its inner
    layers, some of which are copies."""

    def __init__(self, doubled: bool) -> None:
        super().__init__()
        self.inner = nn.ModuleList(Inner(doubled) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.inner:
            x = layer(x)
        return x


def test_a_read_inside_a_copied_inner_layer_counts_for_the_outer_layer() -> None:
    torch.manual_seed(0)
    model, x = Stack([Outer(doubled=i == 4) for i in range(6)]).eval(), torch.randn(2, 8, WIDTH)
    _both(model, x)  # outer layer 4 is traced, not copied: its inner layers read `doubled`
    simulated_exactly(model, x)


def test_cpmant_captures_with_its_layers_copied() -> None:
    """CpmAnt's layers make a small constant tensor from a comparison: reading its values for
    autotp's bookkeeping once ran under the trace, made data-dependent symbols, and the
    capture failed."""
    _copies_and_captures_as_traced("cpmant")


def test_a_failure_while_copying_falls_back_to_tracing_every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    import autotp.repeats as repeats

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the copying")

    monkeypatch.setattr(repeats._Sharing, "_copy", broken)
    model, x = _stack(6), torch.randn(2, 8, WIDTH)
    with pytest.warns(UserWarning, match="every layer was traced instead"):
        captured = capture(model, (x,), share_layers=True)
    assert captured.copied_layers == 0
    assert graph_signature(captured.graph) == graph_signature(capture(model, (x,), share_layers=False).graph)
