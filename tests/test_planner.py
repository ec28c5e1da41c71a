"""The planner on captured graphs, in one process: which parameters it shards and how, the
collectives and literal edits it asks for, the reasons it gives, and the JSON round trip.
Models are built on ``meta``: planning never reads weights."""

from __future__ import annotations

import pytest
import torch

import autotp
from autotp.placement import Replicate, Shard
from autotp.plan import Plan
from autotp.simulate import simulate
from models import assert_close_to, hf_model, plain_block, simulated_exactly


@pytest.fixture(scope="module")
def llama_plan() -> Plan:
    return autotp.plan(hf_model("llama_gqa", device="meta"), tp_size=2)


def test_llama_regions_are_megatron_pairs(llama_plan: Plan) -> None:
    styles = {n: s.style for n, s in llama_plan.params.items()}
    for layer in range(2):
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        assert [styles[f"{attn}.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj", "o_proj")] == ["colwise"] * 3 + ["rowwise"]
        assert [styles[f"{mlp}.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")] == ["colwise"] * 2 + ["rowwise"]
    assert {r.name for r in llama_plan.regions if r.sharded} == {
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn", "mlp")
    } | {"model.embed_tokens", "lm_head"}
    assert llama_plan.params["model.layers.0.self_attn.q_proj.weight"].placement == Shard(0)
    assert llama_plan.params["model.layers.0.self_attn.o_proj.weight"].placement == Shard(1)
    assert llama_plan.all_reduces_per_layer() == {"model.layers.0": 2, "model.layers.1": 2, "(outside layers)": 1}
    assert not llama_plan.slices


def test_gqa_repeat_literals_are_localised(llama_plan: Plan) -> None:
    # repeat_kv: expand[B, kv=4, n_rep=2, S, D] and reshape[B, heads=8, S, D], twice per layer
    assert sorted((e.old, e.new) for e in llama_plan.edits if e.node.startswith(("expand", "reshape"))) == [(4, 2)] * 4 + [(8, 4)] * 4


def test_vocab_parallel_embedding_and_gathered_lm_head(llama_plan: Plan) -> None:
    embed, head = llama_plan.params["model.embed_tokens.weight"], llama_plan.params["lm_head.weight"]
    assert embed.placement == Shard(0) and embed.style == "vocab"
    assert [o.op for o in llama_plan.local_ops] == ["vocab_parallel_embedding"]
    assert head.placement == Shard(0) and "gathered" in head.reason
    gathers = [c for c in llama_plan.collectives if c.kind == "all_gather"]
    assert [(g.node, g.path, g.dim) for g in gathers] == [("output", [0, 0], 2)]
    assert llama_plan.all_reduces_per_layer()["(outside layers)"] == 1  # after the embedding lookup
    assert llama_plan.bytes_per_rank() <= 1.02 * llama_plan.bytes_unsharded() / 2


def test_outputs_can_stay_sharded() -> None:
    from autotp.capture import capture
    from autotp.planner import plan_graph

    captured = capture(hf_model("llama", device="meta"))
    plan = plan_graph(captured.graph, 2, gather_outputs=False)
    assert not [c for c in plan.collectives if c.kind == "all_gather"]
    assert [(o.path, o.placement) for o in plan.sharded_outputs] == [([0, 0], Shard(2))]
    assert Plan.from_json(plan.to_json()) == plan


def test_tied_embedding_and_head_share_one_shard() -> None:
    plan = autotp.plan(hf_model("gpt2", device="meta"), tp_size=2)
    tied = plan.params["lm_head.weight"]  # the one tensor both lookups and logits read
    assert tied.placement == Shard(0) and tied.style == "vocab" and "tied" in tied.reason
    assert "transformer.wte.weight" not in plan.params  # the alias the graph never reads is not loaded


def test_gpt2_fused_qkv_is_sharded_blockwise() -> None:
    plan = autotp.plan(hf_model("gpt2", device="meta"), tp_size=2)
    assert plan.params["transformer.h.0.attn.c_attn.weight"].placement == Shard(1, 3)  # Conv1D: [in, out]
    assert plan.params["transformer.h.0.attn.c_attn.bias"].placement == Shard(0, 3)
    assert plan.params["transformer.h.0.attn.c_proj.weight"].placement == Shard(0)
    assert plan.params["transformer.h.0.attn.c_proj.bias"].placement == Replicate()
    reduces = [c for c in plan.collectives if c.kind == "all_reduce" and c.region.startswith("transformer.h")]
    assert len(reduces) == 4 and all(c.bias_path == [0] for c in reduces)  # addmm's bias, added once after the reduce
    split_edits = [(e.old, e.new) for e in plan.edits if e.node.startswith("split")]
    assert split_edits == [(64, 32), (64, 32)]


def test_kv_heads_fewer_than_ranks_are_shared_by_rank_groups() -> None:
    model = hf_model("llama_gqa", device="meta")  # 8 query heads, 4 kv heads
    plan = autotp.plan(model, tp_size=8)
    q, k = plan.params["model.layers.0.self_attn.q_proj.weight"], plan.params["model.layers.0.self_attn.k_proj.weight"]
    assert q.placement == Shard(0) and q.local_shape(8) == [8, 64]  # one query head (head_dim 8) per rank
    # each kv head serves the 2 ranks whose query heads read it (as vLLM duplicates kv heads)
    assert k.placement == Shard(0, replicas=2) and k.local_shape(8) == [8, 64]  # one kv head of 8 dims
    assert k.local_nbytes(8) * 4 == k.nbytes  # a quarter of the kv weights per rank, not all of them
    # the shared kv head is cut to each rank's query head after repeat_kv: no communication
    assert {(s.placement, s.held_replicas) for s in plan.slices} == {(Shard(1), 2)}
    assert {r.name for r in plan.regions if r.sharded and "self_attn" in r.name} == {
        "model.layers.0.self_attn", "model.layers.1.self_attn"}


def test_heads_sharing_a_divisor_with_tp_are_shared_by_rank_pairs() -> None:
    plan = autotp.plan(hf_model("llama_6heads", device="meta"), tp_size=4)  # 6 heads, gcd(6, 4) = 2
    styles = {n: (s.style, s.placement) for n, s in plan.params.items()}
    assert styles["model.layers.0.self_attn.q_proj.weight"] == ("colwise", Shard(0, replicas=2))  # 3 heads per pair
    # the output projection only contracts the hidden dim: it still splits 4 ways
    assert styles["model.layers.0.self_attn.o_proj.weight"] == ("rowwise", Shard(1))
    assert styles["model.layers.0.mlp.down_proj.weight"] == ("rowwise", Shard(1))


def test_sub_norms_are_crossed_by_all_reducing_their_statistic() -> None:
    # bitnet normalises q|k|v's attention output and gate*up over the sharded dim, between each
    # column/row pair: the pairs stay sharded, each norm all-reducing its [batch, seq, 1] mean
    plan = autotp.plan(hf_model("bitnet", device="meta"), tp_size=2)
    for layer in range(2):
        styles = {p.rsplit(".", 2)[-2]: s.style for p, s in plan.params.items()
                  if p.startswith(f"model.layers.{layer}.") and p.endswith("proj.weight")}
        assert styles == {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise",
                          "gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"}
    assert [o.op for o in plan.local_ops].count("partial_mean") == 4
    assert plan.all_reduces_per_layer()["model.layers.0"] == 4  # 2 statistics, 2 row-parallel exits


class LoneProjections(torch.nn.Module):
    """Pre-norm blocks whose entry projection has 3 outputs, which no tp here splits: only the
    exit ``out`` could be sharded, column-parallel, and that shards the residual stream."""

    def __init__(self, hidden: int = 32, layers: int = 3) -> None:
        super().__init__()
        self.entries = torch.nn.ModuleList(torch.nn.Linear(hidden, 3) for _ in range(layers))
        self.exits = torch.nn.ModuleList(torch.nn.Linear(3, hidden) for _ in range(layers))
        self.head = torch.nn.Linear(hidden, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def norm(h: torch.Tensor) -> torch.Tensor:  # as Hugging Face writes RMSNorm: a mean over the hidden dim
            return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)

        for entry, out in zip(self.entries, self.exits):
            x = x + out(torch.tanh(entry(norm(x))))
        return self.head(norm(x))


def test_a_statistic_never_keeps_the_residual_stream_sharded() -> None:
    # column-parallel, ``out`` would shard the hidden dim, every later norm all-reducing its
    # statistic and every later projection row-parallel. It stays replicated instead.
    torch.manual_seed(0)
    for sim in simulated_exactly(LoneProjections().eval(), torch.randn(2, 5, 32), tps=(2,)):
        assert sim.plan.params["exits.0.weight"].placement == Replicate()
        assert "span" in next(r.reason for r in sim.plan.regions if r.name == "exits.0")
        assert sim.plan.params["head.weight"].placement == Shard(0)


def test_heads_in_two_groups_shard_like_plain_heads() -> None:
    # diffllama splits its heads into two groups (q as Shard(1, blocks=2)); attention pairs any
    # whole heads alike, so q and o are sharded though the 2 kv heads (split in two) cannot be
    plan = autotp.plan(hf_model("diffllama", device="meta"), tp_size=2)
    assert plan.params["model.layers.0.self_attn.q_proj.weight"].placement == Shard(0, 2)
    assert plan.params["model.layers.0.self_attn.o_proj.weight"].style == "rowwise"
    assert plan.params["model.layers.1.mlp.gate_proj.weight"].style == "colwise"
    assert max(plan.all_reduces_per_layer().values()) <= 2


def test_one_kv_head_in_a_fused_projection_is_held_whole() -> None:
    # gpt_bigcode's c_attn is q (4 heads) | k | v with one kv head: q's rows are split, every
    # rank holds k's and v's whole, the split gives them replicated
    plan = autotp.plan(hf_model("gpt_bigcode", device="meta"), tp_size=4)
    fused = Shard(0, (64, 16, 16), whole=(1, 2))
    assert plan.params["transformer.h.0.attn.c_attn.weight"].placement == fused
    assert plan.params["transformer.h.0.attn.c_attn.bias"].placement == fused
    assert plan.params["transformer.h.0.attn.c_attn.weight"].local_shape(4) == [16 + 32, 64]
    assert plan.params["transformer.h.0.attn.c_proj.weight"].style == "rowwise"
    assert plan.all_reduces_per_layer()["transformer.h.0"] == 2
    split = [(e.old, e.new) for e in plan.edits if e.node.startswith("split")]
    assert split == [(64, 16), (64, 16)]  # q's size per rank; k and v keep theirs


def test_a_vocabulary_that_does_not_split_is_padded() -> None:
    # 131 rows over 2 or 4 ranks: 66 or 33 each, zeros after row 131; the logits gathered, then cut
    for tp in (2, 4):
        plan = autotp.plan(hf_model("gpt2_odd_vocab", device="meta"), tp_size=tp)
        head = plan.params["lm_head.weight"]
        assert head.placement == Shard(0, padded=True) and head.style == "vocab"
        assert head.local_shape(tp) == [-(-131 // tp), 64]
        gathers = [c for c in plan.collectives if c.kind == "all_gather"]
        assert [(g.dim, g.size) for g in gathers] == [(2, 131)]
        assert Plan.from_json(plan.to_json()) == plan


def test_padding_is_never_read_by_a_rule_that_does_not_know_it() -> None:
    class SoftmaxHead(torch.nn.Module):  # a softmax over the padded vocabulary would count the padding
        def __init__(self, features: int) -> None:
            super().__init__()
            self.head = torch.nn.Linear(features, 13)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x).softmax(-1)

    # 7 input features do not split over 2 ranks either: nothing is left to shard
    plan = autotp.plan(SoftmaxHead(7), tp_size=2, example_inputs=(torch.randn(2, 7),))
    assert plan.params["head.weight"].placement == Replicate()
    assert "padding" in plan.params["head.weight"].reason
    # 8 do: the head is row-parallel on its own (its output all-reduced before the softmax)
    plan = autotp.plan(SoftmaxHead(8), tp_size=2, example_inputs=(torch.randn(2, 8),))
    assert plan.params["head.weight"].placement == Shard(1) and plan.params["head.weight"].style == "rowwise"


def test_a_per_head_parameter_read_through_a_view_shards_with_its_heads() -> None:
    # attention sinks (gpt-oss style): one logit per head, viewed as [1, heads, 1, 1], expanded
    # and appended to the sharded scores; the view's own rule says which dim of the parameter
    # holds the heads, so it is sharded with them instead of sliced on every call
    class SinkAttention(torch.nn.Module):
        def __init__(self, hidden: int = 32, heads: int = 4) -> None:
            super().__init__()
            self.heads = heads
            self.q, self.k, self.v, self.o = (torch.nn.Linear(hidden, hidden) for _ in range(4))
            self.sinks = torch.nn.Parameter(torch.randn(heads))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, s, _ = x.shape
            q, k, v = (p(x).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
            scores = q @ k.transpose(-1, -2) / 8**0.5
            sinks = self.sinks.reshape(1, -1, 1, 1).expand(b, -1, s, 1)
            probs = torch.cat([scores, sinks], -1).softmax(-1)[..., :-1]
            return self.o((probs @ v).transpose(1, 2).reshape(b, s, -1))

    torch.manual_seed(0)
    for sim in simulated_exactly(SinkAttention().eval(), torch.randn(2, 5, 32)):
        assert sim.plan.params["sinks"].placement == Shard(0), sim.plan.params["sinks"].reason
        assert not sim.plan.slices  # nothing left to slice on every call


class FoldedHeadsAttention(torch.nn.Module):
    """Bloom's attention, and a gated-delta-net output norm: heads folded into the batch
    (``[batch * heads, seq, head_dim]``) with a per-(batch, head) bias computed from the input,
    then every (batch, position, head) row normalised on its own (``[batch * seq * heads, d]``)."""

    def __init__(self, hidden: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.d = heads, hidden // heads
        self.qkv, self.o = torch.nn.Linear(hidden, 3 * hidden), torch.nn.Linear(hidden, hidden)
        self.gate = torch.nn.Linear(hidden, hidden)
        self.norm = torch.nn.Parameter(torch.rand(self.d) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        fused = self.qkv(x).view(b, s, self.heads, 3, self.d)
        q, k, v = (fused[..., i, :].transpose(1, 2).reshape(b * self.heads, s, self.d) for i in range(3))
        bias = x.mean(-1).repeat_interleave(self.heads, 0).unsqueeze(1)  # [batch * heads, 1, seq]
        probs = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=self.d**-0.5).softmax(-1)
        rows = torch.bmm(probs, v).view(b, self.heads, s, self.d).transpose(1, 2).reshape(-1, self.d)
        gate = self.gate(x).reshape(-1, self.d)  # [batch, seq, heads * d] straight to rows of d
        rows = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm * torch.sigmoid(gate)
        return self.o(rows.reshape(b, s, -1))


def test_heads_folded_into_the_batch_are_strided_shards() -> None:
    # [batch, heads, ...] viewed as [batch * heads, ...] holds each rank's heads of every batch
    # row: Shard(0, period=heads); the replicated bias is cut the same way on each rank, and the
    # view back to [batch, heads, ...] gives a plain shard
    torch.manual_seed(0)
    model, x = FoldedHeadsAttention().eval(), torch.randn(3, 5, 32)
    for sim in simulated_exactly(model, x):
        for name in ("qkv.weight", "gate.weight"):
            assert sim.plan.params[name].style == "colwise", sim.plan.params[name].reason
        assert sim.plan.params["o.weight"].style == "rowwise"
        assert [str(s.placement) for s in sim.plan.slices] == ["Shard(0, period=4)"]
    other = torch.randn(2, 7, 32)  # another batch and length: the folded size is computed per call
    with torch.no_grad():
        assert_close_to(model(other), simulate(model, (other,), 2, example_inputs=(x,)).outputs[1])


def test_tp1_shards_nothing() -> None:
    plan = autotp.plan(hf_model("llama", device="meta"), tp_size=1)
    assert not plan.sharded_params() and not plan.collectives and not plan.edits


def test_plan_round_trips_through_json(llama_plan: Plan) -> None:
    text = llama_plan.to_json()
    again = Plan.from_json(text)
    assert again == llama_plan
    assert again.to_json() == text


def test_plan_rejects_unknown_format_version(llama_plan: Plan) -> None:
    data = llama_plan.to_dict()
    data["format_version"] = 999
    with pytest.raises(ValueError, match="format version"):
        Plan.from_dict(data)


def test_table_explains_each_parameter(llama_plan: Plan) -> None:
    table = llama_plan.to_table()
    assert "model.layers.1.mlp.down_proj.weight" in table
    assert "[64, 128] -> [64, 64]" in table
    assert "per decoder layer: 2 (2 layers)" in table


def test_custom_module_fused_chunk_is_found_from_the_graph() -> None:
    plan = autotp.plan(plain_block(), tp_size=2, example_inputs=(torch.randn(2, 6, 64),))
    assert plan.params["attn.qkv.weight"].placement == Shard(0, 3)
    assert plan.params["attn.qkv.bias"].placement == Shard(0, 3)
    assert plan.params["attn.proj.weight"].style == "rowwise"
    assert [c.kind for c in plan.collectives] == ["all_reduce"] * 2


def test_example_inputs_are_required_for_plain_modules() -> None:
    with pytest.raises(ValueError, match="example_inputs"):
        autotp.plan(plain_block(), tp_size=2)


class _RoutedMLP(torch.nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.router = torch.nn.Linear(hidden, 2)
        self.up, self.down = torch.nn.Linear(hidden, inner), torch.nn.Linear(inner, hidden)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        mix = self.router(h).softmax(-1)
        return h * mix[..., :1] + self.down(torch.relu(self.up(h))) * mix[..., 1:]


class ProjectedIntoANorm(torch.nn.Module):
    """electra's embeddings_project: a projection whose output a layer norm reads whole, so no
    column-parallel region can take it, beside a vocabulary far larger than any layer's weight;
    a projection out to 4x its width, also into a norm; and in the layer, a router whose few
    rows are not worth a collective."""

    def __init__(self, vocab: int = 1000, hidden: int = 16, inner: int = 64) -> None:
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(vocab, hidden), torch.nn.Linear(hidden, vocab)
        self.project, self.widen = torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, 4 * hidden)
        self.norm, self.wide_norm = torch.nn.LayerNorm(hidden), torch.nn.LayerNorm(4 * hidden)
        self.layers = torch.nn.ModuleList([_RoutedMLP(hidden, inner)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.project(self.embed(ids)))
        h = h + self.wide_norm(self.widen(h)).sum(-1, keepdim=True)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def test_a_projection_no_region_can_take_is_row_parallel_on_its_own() -> None:
    torch.manual_seed(0)
    for sim in simulated_exactly(ProjectedIntoANorm().eval(), torch.randint(0, 1000, (2, 5))):
        params = sim.plan.params
        # 256 elements: measured against the layer's 1024-element MLP weights, not the 16000 of the vocabulary
        assert params["project.weight"].placement == Shard(1), params["project.weight"].reason
        assert params["project.weight"].style == "rowwise"
        assert params["project.bias"].placement == Replicate()  # added once, after the all-reduce
        assert params["widen.weight"].placement == Replicate()  # its all-reduce would be 4x as wide as its input
        assert params["layers.0.router.weight"].placement == Replicate()  # 32 elements
        assert [params[f"layers.0.{p}.weight"].style for p in ("up", "down")] == ["colwise", "rowwise"]


class GatedHeads(torch.nn.Module):
    """beam's attention: a gate projection viewed as the attention output's heads
    (``gate(x).view_as(attn)``) and multiplied in before the output projection; 2 kv heads for
    4 query heads, which 4 ranks share in pairs."""

    def __init__(self, hidden: int = 16, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, head_dim = heads, kv_heads, hidden // heads
        self.q, self.gate, self.o = (torch.nn.Linear(hidden, hidden) for _ in range(3))
        self.k, self.v = (torch.nn.Linear(hidden, kv_heads * head_dim) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, -1).transpose(1, 2)
        k, v = (p(x).view(b, s, self.kv_heads, -1).transpose(1, 2).repeat_interleave(self.heads // self.kv_heads, 1)
                for p in (self.k, self.v))
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        gated = attn * torch.sigmoid(self.gate(x).view_as(attn))
        return self.o(gated.reshape(b, s, -1))


def test_a_whole_projection_viewed_as_sharded_heads_joins_their_region() -> None:
    torch.manual_seed(0)
    for sim in simulated_exactly(GatedHeads().eval(), torch.randn(2, 5, 16)):
        params = sim.plan.params
        assert params["gate.weight"].placement == Shard(0), params["gate.weight"].reason
        assert params["q.weight"].placement == Shard(0), params["q.weight"].reason


class EinsumHeads(torch.nn.Module):
    """xlnet's attention: ``[hidden, heads, head_dim]`` parameters applied with einsum, the
    output projection contracting heads and head_dim at once."""

    def __init__(self, hidden: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (torch.nn.Parameter(torch.randn(hidden, heads, hidden // heads) / 4)
                                          for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (torch.einsum("bsh,hnd->bsnd", x, w) for w in (self.q, self.k, self.v))
        probs = torch.einsum("bind,bjnd->bnij", q, k).softmax(-1)
        return x + torch.einsum("bsnd,hnd->bsh", torch.einsum("bnij,bjnd->bind", probs, v), self.o)


def test_projections_written_as_einsum_are_a_megatron_pair() -> None:
    torch.manual_seed(0)
    for sim in simulated_exactly(EinsumHeads().eval(), torch.randn(2, 5, 16)):
        params = sim.plan.params
        assert [params[p].placement for p in "qkvo"] == [Shard(1)] * 4, [params[p].reason for p in "qkvo"]
        assert [params[p].style for p in "qkvo"] == ["colwise"] * 3 + ["rowwise"]
        assert [c.kind for c in sim.plan.collectives] == ["all_reduce"]
