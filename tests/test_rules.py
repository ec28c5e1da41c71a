"""Propagation rules, one table row per case: op, input placements, world size -> answer.

No processes: each case exports a tiny function to get a node with fake-tensor shapes, sets
placements on its inputs, and calls the rule. A failing row names the op and the case id.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from autotp.placement import Partial, Replicate, Shard
from autotp.rules import ArgEdit, Cannot, Inputs, Out, Redistribute, apply_rule

aten = torch.ops.aten


class _Fn(torch.nn.Module):
    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def node_of(fn: Callable, shapes: list[tuple[int, ...]], op, dtype=torch.float32) -> tuple[fx.Node, list[fx.Node]]:
    args = tuple(torch.randn(s, dtype=dtype) for s in shapes)
    gm = torch.export.export(_Fn(fn), args, strict=False).module()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = [n for n in gm.graph.nodes if n.target == op]
    assert found, f"{op} not in graph:\n{gm.graph}"
    return found[0], placeholders


def answer(fn, shapes, op, placements, world=2, dtype=torch.float32):
    node, inputs = node_of(fn, shapes, op, dtype)
    return apply_rule(node, Inputs(dict(zip(inputs, placements)), world))


OFFSETS = torch.tensor([4, 8], dtype=torch.int32)  # rows 0-3 go to expert 0, rows 4-7 to expert 1

CASES = [
    # id, fn, input shapes, op, input placements, world, expected placement (or Cannot)
    ("unary", lambda x: F.silu(x), [(2, 8)], aten.silu.default, [Shard(1)], 2, Shard(1)),
    ("add-broadcast", lambda x, y: x + y, [(2, 4, 8, 16), (2, 1, 8, 16)], aten.add.Tensor, [Shard(1), Replicate()], 2, Shard(1)),
    ("mul-different-dims", lambda x, y: x * y, [(4, 8), (4, 8)], aten.mul.Tensor, [Shard(0), Shard(1)], 2, Cannot),
    ("view-split-heads", lambda x: x.view(2, 8, 4, 16), [(2, 8, 64)], aten.view.default, [Shard(2)], 2, Shard(2)),
    ("view-heads-not-divisible", lambda x: x.view(2, 8, 6, 16), [(2, 8, 96)], aten.view.default, [Shard(2)], 4, Cannot),
    ("view-merge-heads", lambda x: x.reshape(2, 8, 64), [(2, 8, 4, 16)], aten.reshape.default, [Shard(2)], 2, Shard(2)),
    # (batch, heads) merged: each rank holds its heads of every batch row, a strided shard
    ("view-merge-with-outer", lambda x: x.reshape(8, 8, 16), [(2, 4, 8, 16)], aten.reshape.default, [Shard(1)], 2,
     Shard(0, period=4)),
    ("view-unfold-strided", lambda x: x.view(2, 4, 8, 16), [(8, 8, 16)], aten.view.default, [Shard(0, period=4)], 2,
     Shard(1)),
    ("strided-into-cat", lambda x: torch.cat([x, x], 0), [(8, 8)], aten.cat.default, [Shard(0, period=4)], 2, Cannot),
    ("view-fused-blocks", lambda x: x.view(16, 12, 16), [(16, 192)], aten.view.default, [Shard(1, 3)], 2, Shard(1, 3)),
    ("transpose", lambda x: x.transpose(1, 2), [(2, 8, 4, 16)], aten.transpose.int, [Shard(2)], 2, Shard(1)),
    ("permute", lambda x: x.permute(0, 2, 1, 3), [(2, 8, 4, 16)], aten.permute.default, [Shard(2)], 2, Shard(1)),
    ("unsqueeze", lambda x: x.unsqueeze(1), [(2, 4, 8)], aten.unsqueeze.default, [Shard(1)], 2, Shard(2)),
    ("slice-other-dim", lambda x: x[..., :8], [(2, 4, 16)], aten.slice.Tensor, [Shard(1)], 2, Shard(1)),
    ("slice-through-shard", lambda x: x[:, :3], [(2, 8)], aten.slice.Tensor, [Shard(1)], 2, Cannot),
    ("slice-whole-block", lambda x: x[:, 4:8], [(2, 12)], aten.slice.Tensor, [Shard(1, 3)], 2, Shard(1)),
    ("cat-other-dim", lambda x, y: torch.cat([x, y], -1), [(2, 4, 8), (2, 4, 8)], aten.cat.default, [Shard(1), Shard(1)], 2, Shard(1)),
    ("stack", lambda x, y: torch.stack([x, y], -1), [(2, 4, 8), (2, 4, 8)], aten.stack.default, [Shard(1), Shard(1)], 2, Shard(1)),
    ("stack-before-shard", lambda x, y: torch.stack([x, y], 0), [(2, 4, 8), (2, 4, 8)], aten.stack.default, [Shard(1), Replicate()], 2, Shard(2)),
    ("cat-sharded-dim", lambda x, y: torch.cat([x, y], 1), [(2, 4), (2, 8)], aten.cat.default, [Shard(1), Shard(1)], 2, Shard(1, (4, 8))),
    ("linear-colwise", lambda x, w: F.linear(x, w), [(2, 8, 16), (32, 16)], aten.linear.default, [Replicate(), Shard(0)], 2, Shard(2)),
    ("linear-rowwise", lambda x, w: F.linear(x, w), [(2, 8, 16), (32, 16)], aten.linear.default, [Shard(2), Replicate()], 2, Partial()),
    ("addmm-conv1d-colwise", lambda b, x, w: torch.addmm(b, x, w), [(32,), (4, 16), (16, 32)], aten.addmm.default, [Replicate(), Replicate(), Shard(1)], 2, Shard(1)),
    ("matmul-heads-batch", lambda q, k: q @ k, [(2, 4, 8, 16), (2, 4, 16, 8)], aten.matmul.default, [Shard(1), Shard(1)], 2, Shard(1)),
    ("sdpa-heads", lambda q, k, v: F.scaled_dot_product_attention(q, k, v), [(2, 4, 8, 16)] * 3, aten.scaled_dot_product_attention.default, [Shard(1)] * 3, 2, Shard(1)),
    ("sdpa-head-dim", lambda q, k, v: F.scaled_dot_product_attention(q, k, v), [(2, 4, 8, 16)] * 3, aten.scaled_dot_product_attention.default, [Shard(3)] * 3, 2, Cannot),
    ("mean-other-dim", lambda x: x.mean(-1, keepdim=True), [(2, 4, 8)], aten.mean.dim, [Shard(1)], 2, Shard(1)),
    ("mean-sharded-dim", lambda x: x.mean(-1), [(2, 8)], aten.mean.dim, [Shard(1)], 2, Partial()),
    ("sum-sharded-dim", lambda x: x.sum((0, 1)), [(2, 8)], aten.sum.dim_IntList, [Shard(1)], 2, Partial()),
    ("mean-shared-chunks", lambda x: x.mean(-1), [(2, 8)], aten.mean.dim, [Shard(1, replicas=2)], 4, Partial()),
    ("sum-shared-chunks", lambda x: x.sum(-1), [(2, 8)], aten.sum.dim_IntList, [Shard(1, replicas=2)], 4, Cannot),
    ("amax-sharded-dim", lambda x: x.amax(-1), [(2, 8)], aten.amax.default, [Shard(1)], 2, Cannot),
    ("softmax-other-dim", lambda x: x.softmax(-1), [(2, 4, 8)], aten.softmax.int, [Shard(1)], 2, Shard(1)),
    ("layer-norm-sharded", lambda x: F.layer_norm(x, (8,)), [(2, 8)], aten.layer_norm.default, [Shard(1)], 2, Cannot),
    ("tril-masked-dim", lambda x: torch.tril(x), [(4, 4)], aten.tril.default, [Shard(0)], 2, Cannot),
    ("tril-heads", lambda x: torch.tril(x), [(2, 4, 6, 6)], aten.tril.default, [Shard(1)], 2, Shard(1)),
    # x[:, i] with i of shape [2, 3]: dim 1 becomes two dims, the sharded dim 2 moves to 3
    ("index-other-dim", lambda x, i: x[:, i.long()], [(4, 6, 8), (2, 3)], aten.index.Tensor, [Shard(2), Replicate()], 2, Shard(3)),
    ("index-apart-dims", lambda x, i: x[i.long(), :, i.long()], [(4, 6, 8), (3,)], aten.index.Tensor, [Shard(1), Replicate()], 2, Shard(1)),
    ("index-rows", lambda x, i: x[i.long()], [(4, 6, 8), (3,)], aten.index.Tensor, [Shard(0), Replicate()], 2, Partial()),
    ("index-rows-fused", lambda x, i: x[i.long()], [(4, 6, 8), (3,)], aten.index.Tensor, [Shard(0, 2), Replicate()], 2,
     Cannot),
    ("index-sharded-dim", lambda x, i: x[:, i.long()], [(4, 6, 8), (3,)], aten.index.Tensor, [Shard(1), Replicate()], 2,
     Cannot),
    ("no-rule", lambda x: torch.cummax(x, 0)[0], [(4, 4)], aten.cummax.default, [Shard(0)], 2, Cannot),
]


@pytest.mark.parametrize("fn, shapes, op, placements, world, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rule(fn, shapes, op, placements, world, expected):
    got = answer(fn, shapes, op, placements, world)
    if expected is Cannot:
        assert isinstance(got, Cannot), f"expected Cannot, got {got}"
        assert got.reason
    else:
        assert isinstance(got, Out), f"expected {expected}, got {got}"
        assert got.placement == expected


def test_statistic_over_the_sharded_dim_is_marked_for_the_planner():
    # a mean divides each rank's chunk sum by the whole count (rank-aware op); a matmul's Partial is no statistic
    mean = answer(lambda x: x.mean(-1), [(2, 8)], aten.mean.dim, [Shard(1)], 2)
    assert mean.statistic and mean.local_op == "partial_mean"
    total = answer(lambda x: x.sum(-1), [(2, 8)], aten.sum.dim_IntList, [Shard(1)], 2)
    assert total.statistic and total.local_op is None
    rowwise = answer(lambda x, w: F.linear(x, w), [(2, 8, 16), (32, 16)], aten.linear.default, [Shard(2), Replicate()], 2)
    assert not rowwise.statistic


def test_view_localises_the_literal_head_count():
    got = answer(lambda x: x.view(2, 8, 4, 16), [(2, 8, 64)], aten.view.default, [Shard(2)], 2)
    assert got.edits == (ArgEdit((1, 2), 4, 2),)


def test_expand_localises_gqa_repeat():
    got = answer(lambda x: x.expand(2, 2, 3, 8, 16), [(2, 2, 1, 8, 16)], aten.expand.default, [Shard(1)], 2)
    assert got.placement == Shard(1) and got.edits == (ArgEdit((1, 1), 2, 1),)


def test_split_of_fused_projection_needs_blocks_and_hints_them():
    fn, shapes = (lambda x: x.split(64, dim=-1)[1] * 1), [(2, 8, 192)]
    refused = answer(fn, shapes, aten.split.Tensor, [Shard(2)], 2)
    assert isinstance(refused, Cannot) and refused.blocks == (64, 64, 64)
    ok = answer(fn, shapes, aten.split.Tensor, [Shard(2, 3)], 2)
    assert ok.placement == (Shard(2), Shard(2), Shard(2)) and ok.edits == (ArgEdit((1,), 64, 32),)


def test_replicated_operand_is_sliced_locally():
    got = answer(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), [(2, 4, 8, 16)] * 3,
                 aten.scaled_dot_product_attention.default, [Shard(1), Replicate(), Replicate()], 2)
    assert got.redistribute == (Redistribute((1,), Shard(1)), Redistribute((2,), Shard(1)))


def test_rowwise_bias_is_reported_for_one_addition():
    got = answer(lambda x, w, b: F.linear(x, w, b), [(2, 16), (32, 16), (32,)], aten.linear.default,
                 [Shard(1), Replicate(), Replicate()], 2)
    assert got.placement == Partial() and got.bias_path == (2,)
    assert got.redistribute == (Redistribute((1,), Shard(1)),)  # the weight, sliced on its input dim


def test_colwise_bias_is_sliced_with_the_output():
    got = answer(lambda x, w, b: F.linear(x, w, b), [(2, 16), (32, 16), (32,)], aten.linear.default,
                 [Replicate(), Shard(0), Replicate()], 2)
    assert got.placement == Shard(1) and got.redistribute == (Redistribute((2,), Shard(0)),)


@pytest.mark.parametrize("placements, expected", [
    ([Shard(1), Shard(1)], Partial()),        # row-parallel experts: the intermediate dim
    ([Replicate(), Shard(2)], Shard(1)),      # column-parallel experts
    ([Replicate(), Shard(0)], Cannot),        # the expert dim selects rows: never sharded
    ([Shard(0), Replicate()], Cannot),        # the rows are routed to experts by the offsets
], ids=["rowwise", "colwise", "expert-dim", "rows"])
def test_grouped_mm_of_experts(placements, expected):
    got = answer(lambda x, w: torch._grouped_mm(x, w, OFFSETS), [(8, 32), (2, 32, 16)], aten._grouped_mm.default,
                 placements, 2, torch.bfloat16)  # the CPU kernel is bf16-only
    assert isinstance(got, Cannot) if expected is Cannot else got.placement == expected


def test_grouped_mm_keeps_rows_16_byte_aligned():
    # (2, 16, 8) split in 2 on its last dim gives rows of 4 bf16 = 8 bytes: aten's kernel raises
    got = answer(lambda x, w: torch._grouped_mm(x, w, OFFSETS), [(8, 16), (2, 16, 8)], aten._grouped_mm.default,
                 [Replicate(), Shard(2)], 2, torch.bfloat16)
    assert isinstance(got, Cannot) and "16-byte" in got.reason
