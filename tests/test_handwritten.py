"""Hand-written module styles that the Hugging Face families do not show, each simulated at
several tp and every rank's output checked against the unsharded module's.

- Fused projections that a view takes apart instead of a split: ``q|k|v`` viewed as ``[..., 3,
  heads, head_dim]`` (timm's and many hand-written attentions, ``nn.MultiheadAttention``) and
  ``gate|up`` viewed as ``[..., 2, inner]``. The view alone cannot tell whether its leading 3
  (or 2) counts heads or fused blocks; the planner tries the blocks where the heads do not split.
- Projections of the module's own tensors: learned queries (Perceiver), a memory held in a
  buffer. Both operands of the matmul are the module's; the projection is the one to shard.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from autotp.placement import Shard
from models import simulated_exactly

DIM, HEADS = 48, 12  # 12 heads split over 2, 3 and 4 ranks
HEAD_DIM = DIM // HEADS


class ViewedQKV(nn.Module):
    """``qkv(x).view(B, T, 3, heads, head_dim).unbind(2)``."""

    def __init__(self, heads: int = HEADS) -> None:
        super().__init__()
        self.qkv, self.o = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, DIM // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.o(y.transpose(1, 2).flatten(2))


class PermutedQKV(nn.Module):
    """timm's ``qkv(x).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)``, unpacked,
    with attention written out."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM, bias=False), nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * HEAD_DIM ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, DIM))


class ViewedGLU(nn.Module):
    """``w(x).unflatten(-1, (2, inner)).unbind(-2)``: gate and up fused, viewed apart."""

    def __init__(self, inner: int = 96) -> None:
        super().__init__()
        self.w, self.o = nn.Linear(DIM, 2 * inner), nn.Linear(inner, DIM)
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w(x).unflatten(-1, (2, self.inner)).unbind(-2)
        return self.o(F.silu(gate) * up)


class TorchMHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(DIM, HEADS, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


def _megatron_pair(sim, column: str, row: str, blocks: int) -> None:
    params = sim.plan.params
    assert params[f"{column}.weight"].placement == Shard(0, blocks), params[f"{column}.weight"].reason
    assert params[f"{row}.weight"].style == "rowwise", params[f"{row}.weight"].reason
    assert [c.kind for c in sim.plan.collectives] == ["all_reduce"]


@pytest.mark.parametrize("module", [ViewedQKV, PermutedQKV], ids=["view-unbind", "reshape-permute"])
def test_a_fused_qkv_viewed_as_three_blocks_of_heads_is_column_parallel_blockwise(module) -> None:
    torch.manual_seed(0)
    for sim in simulated_exactly(module().eval(), torch.randn(2, 6, DIM), tps=(2, 3, 4)):
        column, row = ("qkv", "o") if module is ViewedQKV else ("qkv", "proj")
        _megatron_pair(sim, column, row, blocks=3)
        if module is ViewedQKV:  # the view's literal head count is each rank's
            heads = [e for e in sim.plan.edits if e.node.startswith("view") and e.old == HEADS]
            assert [e.new for e in heads] == [HEADS // sim.plan.tp_size]


def test_fused_heads_that_do_not_split_over_the_ranks_are_shared_by_rank_pairs() -> None:
    """6 heads in each of q, k, v on 4 ranks: each pair of ranks holds 3 heads of each block."""
    torch.manual_seed(0)
    sim, = simulated_exactly(ViewedQKV(heads=6).eval(), torch.randn(2, 6, DIM), tps=(4,))
    assert sim.plan.params["qkv.weight"].placement == Shard(0, 3, replicas=2), sim.plan.params["qkv.weight"].reason
    assert sim.plan.params["o.weight"].style == "rowwise"


def test_gate_and_up_viewed_apart_are_two_blocks() -> None:
    torch.manual_seed(0)
    for sim in simulated_exactly(ViewedGLU().eval(), torch.randn(2, 6, DIM), tps=(2, 3, 4)):
        if sim.plan.tp_size == 4:
            # [..., 2, 96] on 4 ranks reads first as 2 kv heads of 96, which pairs of ranks share
            # (the view cannot tell them apart); the unbind then asks for 2 blocks: each pair
            # holds its half of gate and of up
            assert sim.plan.params["w.weight"].placement == Shard(0, 2, replicas=2)
        else:
            _megatron_pair(sim, "w", "o", blocks=2)


def test_torch_multihead_attention_shards_its_packed_projection() -> None:
    torch.manual_seed(0)
    for sim in simulated_exactly(TorchMHA().eval(), torch.randn(2, 6, DIM), tps=(2, 4)):
        assert sim.plan.params["mha.in_proj_weight"].placement == Shard(0, 3)
        assert sim.plan.params["mha.out_proj.weight"].style == "rowwise"


def test_a_leading_factor_that_counts_heads_still_shards_as_heads() -> None:
    """``[..., 4 heads, 12]`` at tp 2: the heads split, so no block reading is tried."""

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.o = nn.Linear(DIM, DIM), nn.Linear(DIM, DIM)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            B, T, _ = x.shape
            q = self.q(x).view(B, T, 4, 12).transpose(1, 2)
            return self.o(F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(B, T, DIM))

    torch.manual_seed(0)
    for sim in simulated_exactly(Heads().eval(), torch.randn(2, 6, DIM), tps=(2, 4)):
        _megatron_pair(sim, "q", "o", blocks=1)


class LearnedQueries(nn.Module):
    """Perceiver-style: a parameter of latent queries projected by ``to_q``."""

    def __init__(self, latents: int = 5) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(latents, DIM))
        self.to_q, self.to_kv = nn.Linear(DIM, DIM, bias=False), nn.Linear(DIM, 2 * DIM, bias=False)
        self.o = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (B, T, _), L = x.shape, self.latents.shape[0]
        q = self.to_q(self.latents).view(1, L, HEADS, HEAD_DIM).transpose(1, 2).expand(B, HEADS, L, HEAD_DIM)
        k, v = (t.view(B, T, HEADS, HEAD_DIM).transpose(1, 2) for t in self.to_kv(x).chunk(2, -1))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, DIM))


class MemoryInABuffer(nn.Module):
    """Cross-attention to a memory the module holds as a buffer, projected by ``kv``."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.kv, self.o = nn.Linear(DIM, DIM), nn.Linear(DIM, 2 * DIM), nn.Linear(DIM, DIM)
        self.register_buffer("memory", torch.randn(2, 7, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        heads = lambda t: t.view(B, t.shape[1], HEADS, HEAD_DIM).transpose(1, 2)  # noqa: E731
        k, v = self.kv(self.memory).chunk(2, -1)
        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(k), heads(v))
        return self.o(y.transpose(1, 2).reshape(B, T, DIM))


@pytest.mark.parametrize("module,projections", [(LearnedQueries, ("to_q", "to_kv")), (MemoryInABuffer, ("q", "kv"))],
                         ids=["learned-queries", "memory-buffer"])
def test_a_projection_of_the_modules_own_tensor_is_column_parallel(module, projections) -> None:
    torch.manual_seed(0)
    for sim in simulated_exactly(module().eval(), torch.randn(2, 6, DIM), tps=(2, 3, 4)):
        params = sim.plan.params
        assert [params[f"{p}.weight"].placement for p in projections] == [Shard(0), Shard(0, 2)], \
            [params[f"{p}.weight"].reason for p in projections]
        assert params["o.weight"].style == "rowwise"
        assert not {"latents", "memory"} & {p.name for p in sim.plan.sharded_params()}
