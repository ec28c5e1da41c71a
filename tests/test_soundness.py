"""The reproductions of issue 13, each a module that once gave wrong numbers or crashed, now exact.

Every test runs all ranks in one process (autotp.simulate) and compares every rank's output with
the unsharded module's (max abs diff <= 1e-4 x max |reference|, the project's contract; fp32
sums reordered by the all-reduce differ by a few ulps). A failure names the module and the rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autotp.capture import capture, graph_inputs, normalise_example_inputs
from autotp.errors import AutotpError
from autotp.planner import plan_graph
from autotp.simulate import communicators, rank_graphs, run_ranks_in_threads, simulate
from models import PlainMLP, assert_close_to


def _sharded_and_exact(module: nn.Module, x: torch.Tensor, tp: int) -> int:
    """Simulate ``module`` at ``tp``; every rank's output must match. Returns sharded params."""
    module.eval()
    with torch.no_grad():
        reference = module(x)
    sim = simulate(module, x, tp)
    for rank, out in enumerate(sim.outputs):
        try:
            assert_close_to(reference, out)
        except AssertionError as exc:
            raise AssertionError(f"{type(module).__name__} rank {rank}/{tp}: {exc}") from None
    return len(sim.plan.sharded_params())


class GroupedQueryAttention(nn.Module):
    """4 query heads, 2 kv heads, SDPA with ``enable_gqa``."""

    def __init__(self, dim: int = 64, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, heads * self.head_dim)
        self.k, self.v = nn.Linear(dim, kv_heads * self.head_dim), nn.Linear(dim, kv_heads * self.head_dim)
        self.o = nn.Linear(heads * self.head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


@pytest.mark.parametrize("tp", [2, 4])
def test_sdpa_enable_gqa_kv_heads_shared_by_rank_pairs(tp: int) -> None:
    torch.manual_seed(0)
    sharded = _sharded_and_exact(GroupedQueryAttention(), torch.randn(2, 8, 64), tp)
    assert sharded >= 4  # q and o at least; at tp 4 each pair of ranks shares a kv head


class DivideByProjection(nn.Module):
    """``div(100, fc1(x), rounding_mode="trunc")``: the projection is the divisor."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ratio = torch.div(torch.ones(1) * 100, self.fc1(x), rounding_mode="trunc")
        return self.fc2(x * ratio.mean(-1, keepdim=True))


def test_div_tensor_mode_reads_both_operands() -> None:
    torch.manual_seed(0)
    _sharded_and_exact(DivideByProjection(), torch.randn(2, 8, 16), 2)


class RootSwiGLU(nn.Module):
    """Linears held by the root module itself (no submodule path to name the region by)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def test_linears_at_the_root_of_the_model() -> None:
    torch.manual_seed(0)
    assert _sharded_and_exact(RootSwiGLU(), torch.randn(2, 8, 16), 2) == 5  # w1, w3 (+biases), w2


class RotaryPairs(nn.Module):
    """Rotary pairs written ``unflatten(-1, (head_dim // 2, 2))`` on head-sharded q."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.o = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, 4, 16).transpose(1, 2)
        pairs = q.unflatten(-1, (8, 2))
        q = torch.stack([-pairs[..., 1], pairs[..., 0]], -1).flatten(-2)
        return self.o(q.transpose(1, 2).reshape(B, T, 64))


def test_unflatten_of_a_dim_after_the_sharded_one() -> None:
    torch.manual_seed(0)
    assert _sharded_and_exact(RotaryPairs(), torch.randn(2, 8, 64), 2) >= 3


class ScaledAddmm(nn.Module):
    """GPT-2-style Conv1D pair whose row-parallel ``addmm`` scales bias and product."""

    def __init__(self, beta: float, alpha: float) -> None:
        super().__init__()
        self.beta, self.alpha = beta, alpha
        self.w1, self.b1 = nn.Parameter(torch.randn(16, 32)), nn.Parameter(torch.randn(32))
        self.w2, self.b2 = nn.Parameter(torch.randn(32, 16)), nn.Parameter(torch.randn(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.addmm(self.b1, x, self.w1).relu()
        return torch.addmm(self.b2, h, self.w2, beta=self.beta, alpha=self.alpha)


@pytest.mark.parametrize("beta, alpha", [(0.5, 2.0), (0.0, 1.0), (1.0, 3.0)])
def test_row_parallel_addmm_keeps_beta_and_alpha(beta: float, alpha: float) -> None:
    torch.manual_seed(0)
    assert _sharded_and_exact(ScaledAddmm(beta, alpha), torch.randn(6, 16), 2) >= 3


class AttentionDropout(nn.Module):
    """SDPA with dropout: random, so its heads must not be sharded (the module is in train mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.o = nn.Linear(32, 96), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, 4, 8).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        return self.o(y.transpose(1, 2).reshape(B, T, 32))


def test_attention_dropout_is_not_sharded() -> None:
    sim = simulate(AttentionDropout(), torch.randn(2, 4, 32), 2)
    assert not any(s.name.startswith("qkv") for s in sim.plan.sharded_params())  # o alone may be column-parallel
    assert "dropout" in " ".join(r.reason for r in sim.plan.regions if not r.sharded)


class WritesIntoItsInput(nn.Module):
    """Writes a projection into a buffer the caller passes, and into one it keeps: both are
    read after the call, so each must be written whole."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)
        self.register_buffer("last", torch.zeros(2, 3, 64))

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        out.copy_(h)
        self.last.copy_(h)
        return self.down(torch.relu(h))


def test_an_in_place_write_into_an_input_or_a_buffer_is_never_sliced() -> None:
    """A rank's slice of a replicated value is a copy: writing into it would leave the caller's
    tensor (or the module's buffer, read by the next call) partly unwritten."""
    torch.manual_seed(0)
    module = WritesIntoItsInput().eval()
    x = torch.randn(2, 3, 16)
    reference_out = torch.zeros(2, 3, 64)
    with torch.no_grad():
        reference = module(x, reference_out)
        expected_last = module.last.clone()
        module.last.zero_()
    for tp in (2, 4):
        out = torch.zeros(2, 3, 64)
        sim = simulate(module, (x, out), tp)
        for rank, got in enumerate(sim.outputs):
            assert_close_to(reference, got)
        # every rank wrote the whole input (the ranks share it here) and its whole buffer
        assert_close_to(reference_out, out)
        for rank, graph in enumerate(sim.graphs):
            assert_close_to(expected_last, graph.get_buffer("last"))


class WritesIntoAView(nn.Module):
    """Writes a column-parallel projection into a view of a tensor it reads afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        scratch = torch.zeros(2, 2, 3, 64)
        scratch.select(1, 0).copy_(h)  # the write must land in scratch, which sum reads
        return self.down(torch.relu(h)) + self.down(scratch.sum(1))


def test_an_in_place_write_into_a_view_is_never_sliced() -> None:
    torch.manual_seed(0)
    for tp in (2, 4):
        assert _sharded_and_exact(WritesIntoAView(), torch.randn(2, 3, 16), tp) >= 2  # up and down stay sharded


class HalfQueryNorm(nn.Module):
    """An RMS norm of q over all heads (OLMo-2's), in float16, with q large: the mean of q**2
    (~3000) fits float16, a rank's sum of its chunk of q**2 (~70000 at tp 2) does not."""

    def __init__(self, dim: int = 48, heads: int = 12) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.o = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        with torch.no_grad():
            self.q.weight.mul_(80.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x)
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.o(q)


class HalfSum(nn.Module):
    """A float16 sum over a projection whose halves are large and of opposite signs: the whole
    (~10000) fits float16, each half's sum does not."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.up, self.o = nn.Linear(dim, 2 * dim, bias=False), nn.Linear(2 * dim, dim, bias=False)
        with torch.no_grad():
            self.up.weight.zero_()
            self.up.weight[:dim, 0], self.up.weight[dim:, 0] = 9000.0, -8000.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        return self.o(h) + h.sum(-1, keepdim=True)


@pytest.mark.parametrize("tp", [2, 4])
def test_half_precision_statistics_over_the_sharded_dim_stay_in_range(tp: int) -> None:
    """A mean's piece is summed in float32 and divided before it is rounded (it cannot exceed
    the mean); a float16 sum is refused. Both overflowed to inf on every rank before."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 48).half()
    for module, x in ((HalfQueryNorm().half(), x), (HalfSum().half(), torch.ones(2, 3, 8).half())):
        module.eval()
        with torch.no_grad():
            reference = module(x).float()
        assert torch.isfinite(reference).all()
        sim = simulate(module, x, tp)
        assert sim.plan.sharded_params(), type(module).__name__
        for rank, out in enumerate(sim.outputs):
            torch.testing.assert_close(out.float(), reference, rtol=2e-3, atol=2e-3 * reference.abs().max().item(),
                                       msg=lambda m: f"{type(module).__name__} rank {rank}/{tp}: {m}")


def test_a_row_parallel_bias_under_autocast_keeps_the_matmuls_dtype() -> None:
    """Under ``torch.autocast`` the row-parallel matmul runs in bfloat16; its bias, added after
    the all-reduce, was added in its own float32 and promoted the output (found in a review:
    float32 where the unsharded module returns bfloat16). Autocast is per thread, so each
    simulated rank enters it in its own."""
    torch.manual_seed(0)
    module, x = PlainMLP(32, 128).eval(), torch.randn(4, 32)  # fc2: row-parallel, with a bias
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = module(x)
    call = normalise_example_inputs(module, x)
    captured, taken = capture(module, call), graph_inputs(module, call)
    plan = plan_graph(captured.graph, 2)
    assert {s.name for s in plan.sharded_params()} >= {"fc1.weight", "fc2.weight"}
    comms = communicators(2)
    graphs = rank_graphs(captured, plan, module, comms)

    def under_autocast(rank: int) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return graphs[rank](**taken)

    for rank, out in enumerate(run_ranks_in_threads(under_autocast, 2, comms)):
        assert out.dtype == reference.dtype == torch.bfloat16, f"rank {rank}: {out.dtype}"
        torch.testing.assert_close(out, reference, rtol=2e-2, atol=2e-2)  # bfloat16 sums in another order


class SlidingWindowMean(nn.Module):
    """A window mean by ``as_strided``, strides worked out for a contiguous tensor after
    ``contiguous()``: captured with contiguous inputs, the graph read a transposed input in its
    own layout (0.54 off at tp 2, 3 and 4, on the first call; found by an adversarial review)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 48), nn.Linear(48, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        b, t, c = x.shape
        return self.fc2(F.gelu(self.fc1(x.as_strided((b, t - 2, 3, c), (t * c, c, c, 1)).mean(2))))


class ZeroesAFeatureOfACopy(nn.Module):
    """Writes into ``x.contiguous()``: the model's own copy when ``x`` is transposed, ``x``
    itself when it is contiguous (and the graph, captured with contiguous inputs, writes ``x``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 48), nn.Linear(48, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.contiguous()
        y[..., 0] = 0.0
        return self.fc2(F.relu(self.fc1(y))) + x


def _transposed() -> torch.Tensor:
    return torch.randn(8, 2, 16, generator=torch.Generator().manual_seed(1)).transpose(0, 1)


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_a_transposed_input_runs_as_the_model_reads_it(tp: int) -> None:
    torch.manual_seed(0)
    assert not _transposed().is_contiguous()
    assert _sharded_and_exact(SlidingWindowMean(), _transposed(), tp) > 0


def test_a_transposed_input_to_a_graph_that_writes_its_inputs_is_refused() -> None:
    """On a contiguous copy the write could not reach the caller's tensor where the model's
    does (a contiguous input), and would where it must not (1.88 off, the caller's tensor
    changed); so such a call is refused, and a contiguous one stays exact."""
    torch.manual_seed(0)
    module = ZeroesAFeatureOfACopy().eval()
    with pytest.raises(AutotpError, match=r"input x is not contiguous \(shape \[2, 8, 16\], strides \[16, 32, 1\]\) "
                                          r"and this graph writes into its inputs"):
        simulate(module, (_transposed(),), 2)
    x = _transposed().contiguous()
    with torch.no_grad():
        reference, given = module(x.clone()), x.clone()
        sim = simulate(module, (given,), 2)
    assert sim.plan.sharded_params()
    for out in sim.outputs:
        assert_close_to(reference, out)
