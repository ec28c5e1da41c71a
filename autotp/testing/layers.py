"""Transformer layers for the fuzzer's random models: MLPs, attention, norms, mixture of experts.

Written in plain torch the ways real models write them (see :mod:`autotp.testing.blocks` for
what each must exercise). Each class takes its configuration (a dict of JSON values) and the
model width; each ``sample_*`` draws a configuration, each ``simpler_*`` lists simpler ones.
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

Config = dict[str, Any]
ACTIVATIONS = {
    "silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "leaky_relu": F.leaky_relu, "square": torch.square,
}
WIDTHS = [6, 8, 12, 16, 18, 20, 24, 30, 32]


def linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=bias)


def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


# ---- MLP ---------------------------------------------------------------------------------------

class MLP(nn.Module):
    """``down(act(up(x)))``, or gated ``down(act(gate(x)) * up(x))`` with gate|up fused or not."""

    def __init__(self, c: Config, dim: int) -> None:
        super().__init__()
        self.c, width = c, c["width"]
        if c["gated"] and c["fused"]:
            self.gate_up = linear(dim, 2 * width, c["bias"])
        else:
            self.up = linear(dim, width, c["bias"])
            if c["gated"]:
                self.gate = linear(dim, width, c["bias"])
        self.down = linear(width, dim, c["down_bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.c["act"]]
        if self.c["gated"] and self.c["fused"]:
            both = self.gate_up(x)
            if self.c["split"] == "chunk":
                gate, up = both.chunk(2, dim=-1)
            elif self.c["split"] == "split":
                gate, up = both.split(self.c["width"], dim=-1)
            elif self.c["split"] == "unflatten":
                gate, up = both.unflatten(-1, (2, self.c["width"])).unbind(-2)
            else:
                gate, up = both[..., : self.c["width"]], both[..., self.c["width"]:]
            return self.down(act(gate) * up)
        if self.c["gated"]:
            return self.down(act(self.gate(x)) * self.up(x))
        return self.down(act(self.up(x)))


def sample_mlp(rng: random.Random, dim: int) -> Config:
    return dict(width=rng.choice(WIDTHS), gated=rng.random() < 0.5, fused=rng.random() < 0.5,
                split=rng.choice(["chunk", "split", "slice", "unflatten"]), act=rng.choice(sorted(ACTIVATIONS)),
                bias=rng.random() < 0.5, down_bias=rng.random() < 0.5)


def simpler_mlp(c: Config) -> list[Config]:
    return [{**c, **change} for change in ({"gated": False}, {"fused": False}, {"bias": False},
                                            {"down_bias": False}, {"act": "relu"}) if {**c, **change} != c]


# ---- attention ---------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head attention written the ways real models write it (see the module docstring)."""

    def __init__(self, c: Config, dim: int) -> None:
        super().__init__()
        self.c = c
        h, kv, hd = c["heads"], c["kv_heads"], c["head_dim"]
        if c["fused"]:
            self.qkv = linear(dim, (h + 2 * kv) * hd, c["bias"])
        else:
            self.q, self.k, self.v = (linear(dim, n * hd, c["bias"]) for n in (h, kv, kv))
        self.o = linear(h * hd, dim, c["o_bias"])
        if c["qk_norm"] == "head":
            self.q_norm, self.k_norm = nn.Parameter(torch.rand(hd) + 0.5), nn.Parameter(torch.rand(hd) + 0.5)
        elif c["qk_norm"] == "whole":
            self.q_norm, self.k_norm = nn.Parameter(torch.rand(h * hd) + 0.5), nn.Parameter(torch.rand(kv * hd) + 0.5)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c, (h, kv, hd) = self.c, (self.c["heads"], self.c["kv_heads"], self.c["head_dim"])
        if not c["fused"]:
            return self.q(x), self.k(x), self.v(x)
        qkv = self.qkv(x)
        if c["split"] == "chunk" and h == kv:
            return qkv.chunk(3, dim=-1)
        if c["split"] == "narrow":
            return qkv.narrow(-1, 0, h * hd), qkv.narrow(-1, h * hd, kv * hd), qkv.narrow(-1, (h + kv) * hd, kv * hd)
        if c["split"] == "slice":
            return qkv[..., : h * hd], qkv[..., h * hd: (h + kv) * hd], qkv[..., (h + kv) * hd:]
        if c["split"] == "unbind" and h == kv:  # (B, T, 3, heads * hd): q, k, v interleaved per position
            q, k, v = qkv.view(*qkv.shape[:-1], 3, h * hd).unbind(-2)
            return q, k, v
        if c["split"] == "view_heads" and h == kv:  # (B, T, 3, heads, hd), taken apart by unbind
            q, k, v = qkv.view(*qkv.shape[:-1], 3, h, hd).unbind(-3)
            return q.flatten(-2), k.flatten(-2), v.flatten(-2)
        if c["split"] == "permute" and h == kv:  # timm: (B, T, 3, heads, hd) permuted to (3, B, T, heads, hd)
            q, k, v = qkv.reshape(*qkv.shape[:-1], 3, h, hd).permute(2, 0, 1, 3, 4)
            return q.flatten(-2), k.flatten(-2), v.flatten(-2)
        q, k, v = qkv.split([h * hd, kv * hd, kv * hd], dim=-1)
        return q, k, v

    def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """(B, T, n * hd) -> (B, n, T, hd), with the head count as a literal or as -1."""
        B, T, _ = t.shape
        count = -1 if self.c["view"] == "minus_one" else n
        return t.view(B, T, count, self.c["head_dim"]).transpose(1, 2)

    def _rotate(self, t: torch.Tensor) -> torch.Tensor:
        hd = self.c["head_dim"]
        if self.c["rope"] == "half":
            a, b = t[..., : hd // 2], t[..., hd // 2:]
            return t * 0.8 + torch.cat([-b, a], dim=-1) * 0.6
        pairs = t.unflatten(-1, (hd // 2, 2))  # rotary pairs (x0, x1), (x2, x3), ...
        return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2) * 0.6 + t * 0.8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, (h, kv, hd) = self.c, (self.c["heads"], self.c["kv_heads"], self.c["head_dim"])
        B, T, _ = x.shape
        q, k, v = self._project(x)
        if c["qk_norm"] == "whole":
            q, k = rms(q, self.q_norm), rms(k, self.k_norm)
        q, k, v = self._heads(q, h), self._heads(k, kv), self._heads(v, kv)
        if c["qk_norm"] == "head":
            q, k = rms(q, self.q_norm), rms(k, self.k_norm)
        if c["rope"] != "none" and hd % 2 == 0:
            q, k = self._rotate(q), self._rotate(k)
        if kv != h and not (c["gqa"] == "enable_gqa" and c["kind"] == "sdpa"):
            k, v = self._repeat(k), self._repeat(v)
        y = self._attend(q, k, v, T)
        out = y.transpose(1, 2)
        width = {"literal": h * hd, "minus_one": -1}.get(c["merge"], h * hd)
        if c["merge"] == "shape" and h * hd == x.shape[-1]:
            width = x.shape[-1]  # the global width read from the input, as GPT-2's merge_heads does
        return self.o(out.reshape(B, T, width))

    def _repeat(self, t: torch.Tensor) -> torch.Tensor:
        group = self.c["heads"] // self.c["kv_heads"]
        if self.c["gqa"] == "repeat_interleave":
            return t.repeat_interleave(group, dim=1)
        B, n, T, hd = t.shape  # HF's repeat_kv: expand a new dim, then merge it into the heads
        return t[:, :, None].expand(B, n, group, T, hd).reshape(B, n * group, T, hd)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, T: int) -> torch.Tensor:
        c = self.c
        gqa = c["gqa"] == "enable_gqa" and c["kv_heads"] != c["heads"]
        if c["kind"] == "sdpa":
            mask = None
            if c["mask"] == "additive":
                mask = torch.triu(torch.full((T, T), -1e4, dtype=q.dtype), 1)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=c["mask"] == "causal",
                                                  enable_gqa=gqa)
        if c["kind"] == "folded":  # heads folded into the batch, as Bloom does: [B * heads, T, hd] and bmm
            B, n, _, hd = q.shape
            q, k, v = (t.reshape(B * n, T, hd) for t in (q, k, v))
            scores = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(hd)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(c["head_dim"])
        if c["mask"] != "none":
            causal = torch.ones(T, T, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(causal, -1e4)
        if c["kind"] == "folded":
            return torch.bmm(scores.softmax(dim=-1), v).view(B, n, T, hd)
        return scores.softmax(dim=-1) @ v


def sample_attention(rng: random.Random, dim: int) -> Config:
    head_dim = rng.choice([2, 4, 6, 8])
    heads = rng.choice([1, 2, 3, 4, 4, 5, 6, 8, 8])
    divisors = [d for d in range(1, heads + 1) if heads % d == 0]
    kv = rng.choice(divisors + ([heads // 2] * 2 if heads % 2 == 0 else []))  # grouped kv heads often
    return dict(heads=heads, kv_heads=kv, head_dim=head_dim, fused=rng.random() < 0.5,
                split=rng.choice(["split", "chunk", "narrow", "slice", "unbind", "view_heads", "permute"]),
                bias=rng.random() < 0.5,
                o_bias=rng.random() < 0.5, view=rng.choice(["literal", "minus_one"]),
                merge=rng.choice(["literal", "minus_one", "shape"]), kind=rng.choice(["sdpa", "manual", "folded"]),
                mask=rng.choice(["none", "causal", "additive"]), gqa=rng.choice(["enable_gqa", "repeat_interleave", "expand"]),
                qk_norm=rng.choice(["none", "none", "head", "whole"]), rope=rng.choice(["none", "half", "pairs"]))


def simpler_attention(c: Config) -> list[Config]:
    changes = ({"fused": False}, {"bias": False}, {"o_bias": False}, {"view": "literal"}, {"merge": "literal"},
               {"kind": "manual"}, {"mask": "none"}, {"qk_norm": "none"}, {"rope": "none"}, {"gqa": "repeat_interleave"},
               {"kv_heads": c["heads"]}, {"heads": c["kv_heads"]})
    return [{**c, **change} for change in changes if {**c, **change} != c]


# ---- norms, reductions and elementwise ---------------------------------------------------------

class Norm(nn.Module):
    """LayerNorm or RMSNorm, as a module, as ``F.rms_norm`` or written out."""

    def __init__(self, c: Config, dim: int) -> None:
        super().__init__()
        self.c = c
        self.ln = nn.LayerNorm(dim, bias=c["bias"]) if c["kind"] == "layer_norm" else None
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ln is not None:
            return self.ln(x)
        if self.c["kind"] == "rms_norm":
            return F.rms_norm(x, (x.shape[-1],), self.weight, 1e-6)
        return rms(x, self.weight)


class MoE(nn.Module):
    """Top-k routing over stacked experts: run densely with ``bmm`` and combined by the routing
    weights scattered into a (tokens, experts) matrix, or token-expert pairs sorted by expert."""

    def __init__(self, c: Config, dim: int) -> None:
        super().__init__()
        self.c, e, w = c, c["experts"], c["width"]
        self.router = linear(dim, e, False)
        self.w_up, self.w_down = nn.Parameter(torch.randn(e, dim, w) * 0.3), nn.Parameter(torch.randn(e, w, dim) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        probs = self.router(flat).softmax(-1)
        top, index = probs.topk(self.c["top_k"], dim=-1)
        if self.c["dispatch"] == "sorted":
            return self._sorted(flat, top, index).view(B, T, D)
        weights = torch.zeros_like(probs).scatter(1, index, top / top.sum(-1, keepdim=True))
        h = torch.bmm(flat.unsqueeze(0).expand(self.c["experts"], -1, -1), self.w_up)
        out = torch.bmm(F.silu(h), self.w_down)  # (experts, tokens, dim)
        return (out * weights.t().unsqueeze(-1)).sum(0).view(B, T, D)

    def _sorted(self, flat: torch.Tensor, top: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Each (token, expert) pair as a row, rows sorted by expert: gather the tokens and the
        experts' weights with ``index_select``, add the results back with ``index_add``."""
        expert = index.reshape(-1)
        order = expert.argsort(stable=True)
        token = torch.arange(flat.shape[0]).repeat_interleave(self.c["top_k"]).index_select(0, order)
        chosen = expert.index_select(0, order)
        h = torch.bmm(flat.index_select(0, token).unsqueeze(1), self.w_up.index_select(0, chosen))
        out = torch.bmm(F.silu(h), self.w_down.index_select(0, chosen)).squeeze(1)  # (pairs, dim)
        scale = top.reshape(-1).index_select(0, order).unsqueeze(-1)
        return torch.zeros_like(flat).index_add(0, token, out * scale)


def sample_moe(rng: random.Random, dim: int) -> Config:
    experts = rng.choice([2, 3, 4])
    return dict(experts=experts, top_k=rng.choice(range(1, experts + 1)), width=rng.choice(WIDTHS),
                dispatch=rng.choice(["dense", "sorted"]))
