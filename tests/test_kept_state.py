"""A forward that keeps state in its modules between calls (autotp.kept_state): refused at
capture where the graph would compute with the captured value from the second call on (each
refused module here computed wrong from its second call before, at tp 1 too); allowed, and
exact on every call, where the state carries nothing into the next call."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn as nn

from autotp.capture import CaptureError, capture, graph_inputs, normalise_example_inputs
from autotp.planner import plan_graph
from autotp.simulate import communicators, rank_graphs, run_ranks_in_threads
from models import assert_close_to

D = 16


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)


class CallCounter(_MLP):
    """``self.calls += 1``, then scales by it: a captured graph scales by 1 on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.down(self.up(x)) * self.calls


class ClassDefaultCounter(_MLP):
    calls = 0  # the first write makes an instance attribute from the class's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = self.calls + 1
        return self.down(self.up(x)) * self.calls


class _RunningMean(nn.Module):
    """A running mean kept in a plain attribute (not a buffer), None before the first call."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.state = nn.Linear(D, D), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        self.state = h.mean() if self.state is None else 0.5 * self.state + 0.5 * h.mean()
        return h + self.state


class PlainRunningMean(_MLP):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _RunningMean()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(self.inner(x)))


class FirstCallFlag(_MLP):
    """Takes another branch on its first call only."""

    def __init__(self) -> None:
        super().__init__()
        self.warm = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if not self.warm:
            self.warm = True
            h = h * 0
        return self.down(h)


class ListCache(_MLP):
    """Appends to a list it keeps and reads all of it: a hand-written cache."""

    def __init__(self) -> None:
        super().__init__()
        self.cache: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        self.cache.append(h.mean(-1, keepdim=True))
        return self.down(h * torch.cat(self.cache, -1).sum(-1, keepdim=True))


class CountInADict(_MLP):
    def __init__(self) -> None:
        super().__init__()
        self.stats = {"calls": 0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.stats["calls"] += 1
        return self.down(self.up(x)) * self.stats["calls"]


@pytest.mark.parametrize("module, kept", [(CallCounter, "CallCounter.calls (0 -> 1)"),
                                          (ClassDefaultCounter, "ClassDefaultCounter.calls (0 -> 1)"),
                                          (PlainRunningMean, "_RunningMean.state (None -> a tensor)"),
                                          (FirstCallFlag, "FirstCallFlag.warm (False -> True)"),
                                          (ListCache, "ListCache.cache (0 -> 1 items) in place"),
                                          (CountInADict, "CountInADict.stats (1 -> 1 items) in place")],
                         ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_state_a_forward_reads_and_changes_is_refused(module, kept: str) -> None:
    """Each computed 1.05 off (the counter) or otherwise wrong from the second call on, with no
    error, before the refusal; the eager module's second call differs from its first."""
    model = module().eval()
    x, y = torch.randn(2, 6, D), torch.randn(2, 6, D)
    with torch.no_grad():  # the state does change what the model computes: y after x is not y first
        called, fresh = copy.deepcopy(model), copy.deepcopy(model)
        called(x)
        assert not torch.allclose(called(y), fresh(y))
    with pytest.raises(CaptureError, match=r"forward (reads and )?changes " + re.escape(kept)):
        capture(model, (x,))
    assert model.__dict__.get("calls", 0) == 0 and getattr(model, "warm", False) is False  # capture ran a copy
    assert not getattr(model, "cache", []) and getattr(model, "stats", {"calls": 0}) == {"calls": 0}


class KeepsAttentionMap(_MLP):
    """Writes what it computed for inspection, never reads it back."""

    def __init__(self) -> None:
        super().__init__()
        self.last = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        self.last = h.detach()
        return self.down(h)


class TogglesWithinTheCall(_MLP):
    def __init__(self) -> None:
        super().__init__()
        self.mode = "plain"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.mode = "scaled"
        h = self.up(x) * (2.0 if self.mode == "scaled" else 1.0)
        self.mode = "plain"
        return self.down(h)


class RebuildsItsTable(_MLP):
    """Writes a table, then reads it, on every call: the graph rebuilds it each call too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.table = torch.arange(x.shape[1], dtype=x.dtype)[:, None]
        return self.down(self.up(x + self.table))


class CollectsIntoAFreshList(_MLP):
    """Makes a new list each call and appends to it: the previous call's list is never read."""

    def __init__(self) -> None:
        super().__init__()
        self.maps: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.maps = []
        h = self.up(x)
        self.maps.append(h.detach())
        return self.down(h)


@pytest.mark.parametrize("module", [KeepsAttentionMap, TogglesWithinTheCall, RebuildsItsTable, CollectsIntoAFreshList],
                         ids=lambda m: m.__name__)
def test_state_that_carries_nothing_into_the_next_call_is_allowed(module) -> None:
    """Sharded at tp 2 and exact on every rank on each of three calls."""
    torch.manual_seed(0)
    model = module().eval()
    eager = copy.deepcopy(model)
    x = torch.randn(2, 6, D)
    call = normalise_example_inputs(model, (x,))
    captured = capture(model, call)
    plan = plan_graph(captured.graph, 2, model=module.__name__, inputs=captured.input_names)
    assert plan.sharded_params()
    comms = communicators(2)
    graphs = rank_graphs(captured, plan, model, comms)
    taken = graph_inputs(model, call)
    with torch.no_grad():
        for _ in range(3):
            reference = eager(x)
            for out in run_ranks_in_threads(lambda rank: graphs[rank](**taken), 2, comms):
                assert_close_to(reference, out)


class ReadsThroughData(_MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.up(x) * self.up.bias.data.abs().max())


class WritesThroughData(_MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        self.up.bias.data[:3] = h.mean()  # eager: the next call adds this bias
        return self.down(h)


@pytest.mark.parametrize("module", [ReadsThroughData, WritesThroughData], ids=lambda m: m.__name__)
def test_a_parameter_reached_through_data_is_refused_at_capture(module) -> None:
    """``.data`` hands the forward a tensor export does not trace to the parameter: the graph
    held a constant with no data behind it, and loading failed naming ``lifted_tensor_0``."""
    with pytest.raises(CaptureError, match=r"uses a tensor made from its parameters or buffers outside what "
                                           r"torch.export traces \(lifted_tensor_0 in the graph; `.data`"):
        capture(module().eval(), (torch.randn(2, 6, D),))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_hidden_states_and_attentions_of_a_model_never_asked_for_them(name: str) -> None:
    """transformers installs its output-recording hooks on the first call that asks for hidden
    states or attentions and marks the model: read and changed by the forward, which capture
    refused (on a model never called with them). Capture installs them on its copy, as every
    later call has them: each hidden state and attention map is the unsharded model's at tp 2,
    in two captures from the same model (the first leaves nothing on it)."""
    from autotp.simulate import simulate
    from models import hf_model, token_ids

    model = hf_model(name)
    model.set_attn_implementation("eager")  # sdpa returns no attention maps
    eager = copy.deepcopy(model)
    call = dict(input_ids=token_ids(2, 8), output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        reference = eager(**call)
        for _ in range(2):
            sim = simulate(model, call, 2)
            assert sim.plan.sharded_params()
            for out in sim.outputs:
                assert len(out.hidden_states) == len(reference.hidden_states) == 3
                assert len(out.attentions) == len(reference.attentions) == 2
                for ours, theirs in zip(out.hidden_states + out.attentions, reference.hidden_states + reference.attentions):
                    assert_close_to(theirs, ours)
                assert_close_to(reference.logits, out.logits)


def test_capturing_a_plain_module_does_not_import_transformers() -> None:
    """The hooks above are transformers' own: capture looks for them on its models only. Looking
    on every module imported transformers into a process that had not (2.2 s of a plain
    module's first capture)."""
    import subprocess
    import sys

    script = ("import sys, torch, torch.nn as nn\n"
              "from autotp.capture import capture, normalise_example_inputs\n"
              "m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)).eval()\n"
              "capture(m, normalise_example_inputs(m, (torch.randn(2, 4),)))\n"
              "print(sorted(name for name in sys.modules if name.split('.')[0] == 'transformers'))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
