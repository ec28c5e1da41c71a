"""Parameters read in pieces, planned from the graph and checked exact on the simulator:
experts selected one by one from a stacked weight, a per-head table cut to the sequence, rows
of a table looked up by id, a fused projection whose blocks pass a depthwise conv with some
of them held whole by every rank, and a fused gate|up taken apart by a view or by a stride."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from autotp.placement import Shard
from models import simulated_exactly


class StackedExperts(torch.nn.Module):
    """jetmoe's experts: one ``[experts, 2 * inner, hidden]`` weight, each expert's matrix taken
    with ``w[e]`` (a select), gate|up fused, summed with fixed routing weights."""

    def __init__(self, hidden: int = 16, inner: int = 8, experts: int = 3) -> None:
        super().__init__()
        self.up = torch.nn.Parameter(torch.randn(experts, 2 * inner, hidden) / 4)
        self.down = torch.nn.Parameter(torch.randn(experts, hidden, inner) / 4)
        self.routing = torch.nn.Parameter(torch.rand(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for e in range(self.up.shape[0]):
            gate, up = F.linear(x, self.up[e]).chunk(2, -1)
            out = out + self.routing[e] * F.linear(F.silu(gate) * up, self.down[e])
        return out


def test_experts_selected_from_a_stacked_weight_are_candidates() -> None:
    torch.manual_seed(0)
    for sim in simulated_exactly(StackedExperts().eval(), torch.randn(2, 5, 16)):
        assert sim.plan.params["up"].placement == Shard(1, 2), sim.plan.params["up"].reason
        assert sim.plan.params["down"].placement == Shard(2), sim.plan.params["down"].reason


class DecayedHeads(torch.nn.Module):
    """minimax's lightning attention: a per-head ``[1, heads, max_len, max_len]`` decay table,
    cut to the sequence with a slice and multiplied into the per-head scores."""

    def __init__(self, hidden: int = 16, heads: int = 4, max_len: int = 12) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.o = torch.nn.Linear(hidden, 3 * hidden), torch.nn.Linear(hidden, hidden)
        self.register_buffer("decay", torch.rand(1, heads, max_len, max_len).tril())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        scores = (q @ k.transpose(-1, -2)) * self.decay[:, :, :s, :s]
        return self.o((scores @ v).transpose(1, 2).reshape(b, s, -1))


def test_a_per_head_table_cut_to_the_sequence_shards_with_its_heads() -> None:
    torch.manual_seed(0)
    for sim in simulated_exactly(DecayedHeads().eval(), torch.randn(2, 5, 16)):
        assert sim.plan.params["decay"].placement == Shard(1), sim.plan.params["decay"].reason
        assert not sim.plan.slices  # nothing left to cut from a whole table on every call


class IndexedPositions(torch.nn.Module):
    """whisper's decoder positions: ``weight[position_ids]`` instead of an embedding call."""

    def __init__(self, hidden: int = 16, positions: int = 24, vocab: int = 20) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(vocab, hidden)
        self.positions = torch.nn.Parameter(torch.randn(positions, hidden))
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        where = torch.arange(ids.shape[1]).unsqueeze(0) - ids.shape[1]  # negative: counted from the end
        return self.head(torch.tanh(self.tokens(ids) + self.positions[where]))


def test_rows_looked_up_by_id_are_a_vocabulary_parallel_table() -> None:
    torch.manual_seed(0)
    for sim in simulated_exactly(IndexedPositions().eval(), torch.randint(0, 20, (2, 7))):
        assert sim.plan.params["positions"].placement == Shard(0)
        assert sim.plan.params["positions"].style == "vocab"
        lookups = [o.node for o in sim.plan.local_ops if o.op == "vocab_parallel_index"]
        assert len(lookups) == 1


class SharedStateMixer(torch.nn.Module):
    """A mamba2 mixer with one group: in_proj makes z|x|B|C|dt, a depthwise causal conv runs
    over x|B|C, B and C (one group) are shared by every head, a gated norm over all of x; then
    the residual, a norm and a head. x and z can be split by heads; B and C (a state of 5) cannot, and every rank holds them whole."""

    def __init__(self, hidden: int = 16, heads: int = 4, head_dim: int = 4, state: int = 5) -> None:
        super().__init__()
        self.heads, self.head_dim, self.state = heads, head_dim, state
        inner = heads * head_dim
        self.in_proj = torch.nn.Linear(hidden, 2 * inner + 2 * state + heads, bias=False)
        self.conv = torch.nn.Conv1d(inner + 2 * state, inner + 2 * state, 4, groups=inner + 2 * state, padding=3)
        self.decay = torch.nn.Parameter(torch.rand(heads))
        self.norm = torch.nn.Parameter(torch.rand(inner) + 0.5)
        self.out_proj = torch.nn.Linear(inner, hidden, bias=False)
        self.head = torch.nn.Linear(hidden, 24, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        inner = self.heads * self.head_dim
        z, xbc, dt = self.in_proj(x).split([inner, inner + 2 * self.state, self.heads], -1)
        xbc = F.silu(self.conv(xbc.transpose(1, 2))[..., :s]).transpose(1, 2)
        xs, B, C = xbc.split([inner, self.state, self.state], -1)
        xs = xs.view(b, s, self.heads, self.head_dim)
        weight = torch.sigmoid(dt + self.decay)  # [b, s, heads]
        mixed = torch.einsum("bsn,btn->bst", C, B).tril()  # shared by every head
        y = torch.einsum("bst,bthd->bshd", mixed, xs * weight.unsqueeze(-1)).reshape(b, s, inner)
        y = _rms(y * F.silu(z)) * self.norm
        return self.head(_rms(x + self.out_proj(y)))


def _rms(h: torch.Tensor) -> torch.Tensor:  # as Hugging Face writes RMSNorm: a mean over the last dim
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_blocks_every_rank_holds_whole_pass_through_the_conv() -> None:
    # at tp 2 only: 46 rows split over 4 ranks only padded, and a padded layout takes no blocks
    torch.manual_seed(0)
    for sim in simulated_exactly(SharedStateMixer().eval(), torch.randn(2, 7, 16), tps=(2,)):
        fused = sim.plan.params["in_proj.weight"].placement
        assert isinstance(fused, Shard) and fused.dim == 0, sim.plan.params["in_proj.weight"].reason
        assert fused.blocks == (16, 16, 5, 5, 4) and fused.whole == (2, 3)  # z, x, dt split; B, C whole
        assert sim.plan.params["conv.weight"].placement == Shard(0, (16, 5, 5), whole=(1, 2))
        assert sim.plan.params["out_proj.weight"].style == "rowwise"


class GateUpTakenApart(torch.nn.Module):
    """Two ways to take a fused gate|up apart that are not a split: moshi views it as
    ``[..., 2, inner]`` and selects, gpt-oss interleaves the two and takes every other column."""

    def __init__(self, hidden: int = 16, inner: int = 8) -> None:
        super().__init__()
        self.viewed, self.viewed_out = torch.nn.Linear(hidden, 2 * inner), torch.nn.Linear(inner, hidden)
        self.interleaved, self.interleaved_out = torch.nn.Linear(hidden, 2 * inner), torch.nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pair = self.viewed(_rms(x)).view(*x.shape[:-1], 2, -1)
        x = x + self.viewed_out(F.silu(pair[..., 0, :]) * pair[..., 1, :])
        both = self.interleaved(_rms(x))
        return x + self.interleaved_out(F.silu(both[..., ::2]) * both[..., 1::2])


def test_a_fused_gate_up_taken_apart_by_view_or_by_stride_is_sharded() -> None:
    torch.manual_seed(0)
    for sim in simulated_exactly(GateUpTakenApart().eval(), torch.randn(2, 5, 16)):
        viewed = sim.plan.params["viewed.weight"].placement
        # at tp 4 pairs of ranks share each piece: the view's first failure (2 "heads" over 4
        # ranks) hints sharing before the select hints blocks, and the hints only add up
        assert isinstance(viewed, Shard) and (viewed.dim, viewed.blocks) == (0, 2), sim.plan.params["viewed.weight"].reason
        assert sim.plan.params["interleaved.weight"].placement == Shard(0), sim.plan.params["interleaved.weight"].reason
        for name in ("viewed_out.weight", "interleaved_out.weight"):
            assert sim.plan.params[name].style == "rowwise"
