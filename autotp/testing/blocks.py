"""The blocks the fuzzer builds random modules from: the shapes real models use, in plain torch.

Every block maps hidden states ``(batch, seq, dim)`` to hidden states of the same shape, so any
sequence of blocks is a model. Each kind is a row of :data:`KINDS`: how to draw a random
configuration (``sample(rng, dim)``), how to build the module (``build(config, dim)``), and
which simpler configurations to try when shrinking a failure (``simpler(config)``). A
configuration is a dict of JSON values, so a failing model is a few lines of JSON.

The blocks cover, on purpose, what the rules must get right or refuse: fused projections
split by ``split``/``chunk``/``unbind``/``narrow``/slicing; views with literal head counts or
``-1``; hand-written and SDPA attention (causal, masks, grouped kv heads by ``enable_gqa``,
``repeat_interleave`` or ``expand``); rotary pairs by ``unflatten``; per-head and whole q/k
norms; gated MLPs and activations; reductions over every dim; division with rounding modes;
``where``/``masked_fill``; ``cat``/``stack``; GPT-2's Conv1D ``addmm`` (with ``beta``/``alpha``);
parameters used directly; mixture-of-experts routing with ``topk``/``scatter`` and stacked
experts in ``bmm``. Sizes are drawn so that head counts sometimes do not divide tp.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["KINDS", "Kind", "Model", "build_model"]

Config = dict[str, Any]
ACTIVATIONS = {
    "silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "leaky_relu": F.leaky_relu, "square": torch.square,
}
WIDTHS = [6, 8, 12, 16, 18, 20, 24, 30, 32]


def _linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=bias)


def _rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


# ---- MLP ---------------------------------------------------------------------------------------

class MLP(nn.Module):
    """``down(act(up(x)))``, or gated ``down(act(gate(x)) * up(x))`` with gate|up fused or not."""

    def __init__(self, c: Config, dim: int) -> None:
        super().__init__()
        self.c, width = c, c["width"]
        if c["gated"] and c["fused"]:
            self.gate_up = _linear(dim, 2 * width, c["bias"])
        else:
            self.up = _linear(dim, width, c["bias"])
            if c["gated"]:
                self.gate = _linear(dim, width, c["bias"])
        self.down = _linear(width, dim, c["down_bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.c["act"]]
        if self.c["gated"] and self.c["fused"]:
            both = self.gate_up(x)
            if self.c["split"] == "chunk":
                gate, up = both.chunk(2, dim=-1)
            elif self.c["split"] == "split":
                gate, up = both.split(self.c["width"], dim=-1)
            else:
                gate, up = both[..., : self.c["width"]], both[..., self.c["width"]:]
            return self.down(act(gate) * up)
        if self.c["gated"]:
            return self.down(act(self.gate(x)) * self.up(x))
        return self.down(act(self.up(x)))


def _sample_mlp(rng: random.Random, dim: int) -> Config:
    return dict(width=rng.choice(WIDTHS), gated=rng.random() < 0.5, fused=rng.random() < 0.5,
                split=rng.choice(["chunk", "split", "slice"]), act=rng.choice(sorted(ACTIVATIONS)),
                bias=rng.random() < 0.5, down_bias=rng.random() < 0.5)


def _simpler_mlp(c: Config) -> list[Config]:
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
            self.qkv = _linear(dim, (h + 2 * kv) * hd, c["bias"])
        else:
            self.q, self.k, self.v = (_linear(dim, n * hd, c["bias"]) for n in (h, kv, kv))
        self.o = _linear(h * hd, dim, c["o_bias"])
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
            q, k = _rms(q, self.q_norm), _rms(k, self.k_norm)
        q, k, v = self._heads(q, h), self._heads(k, kv), self._heads(v, kv)
        if c["qk_norm"] == "head":
            q, k = _rms(q, self.q_norm), _rms(k, self.k_norm)
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
        scores = q @ k.transpose(-2, -1) / math.sqrt(c["head_dim"])
        if c["mask"] != "none":
            causal = torch.ones(T, T, dtype=torch.bool).triu(1)
            scores = scores.masked_fill(causal, -1e4)
        return scores.softmax(dim=-1) @ v


def _sample_attention(rng: random.Random, dim: int) -> Config:
    head_dim = rng.choice([2, 4, 6, 8])
    heads = rng.choice([1, 2, 3, 4, 4, 5, 6, 8, 8])
    divisors = [d for d in range(1, heads + 1) if heads % d == 0]
    kv = rng.choice(divisors + ([heads // 2] * 2 if heads % 2 == 0 else []))  # grouped kv heads often
    return dict(heads=heads, kv_heads=kv, head_dim=head_dim, fused=rng.random() < 0.5,
                split=rng.choice(["split", "chunk", "narrow", "slice", "unbind"]), bias=rng.random() < 0.5,
                o_bias=rng.random() < 0.5, view=rng.choice(["literal", "minus_one"]),
                merge=rng.choice(["literal", "minus_one", "shape"]), kind=rng.choice(["sdpa", "manual"]),
                mask=rng.choice(["none", "causal", "additive"]), gqa=rng.choice(["enable_gqa", "repeat_interleave", "expand"]),
                qk_norm=rng.choice(["none", "none", "head", "whole"]), rope=rng.choice(["none", "half", "pairs"]))


def _simpler_attention(c: Config) -> list[Config]:
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
        return _rms(x, self.weight)


class Reduce(nn.Module):
    """``down(h op reduce(h, dim))`` with ``h = up(x)``: a reduction over any dim, kept or not."""

    OPS = {
        "sum": lambda t, d, k: t.sum(d, keepdim=k), "mean": lambda t, d, k: t.mean(d, keepdim=k),
        "amax": lambda t, d, k: t.amax(d, keepdim=k), "var": lambda t, d, k: t.var(d, keepdim=k),
        "logsumexp": lambda t, d, k: t.logsumexp(d, keepdim=k), "norm": lambda t, d, k: t.norm(dim=d, keepdim=k),
        "max": lambda t, d, k: t.max(d, keepdim=k)[0],
    }
    ALONG = {"softmax": lambda t, d: t.softmax(d), "log_softmax": lambda t, d: t.log_softmax(d),
             "cumsum": lambda t, d: t.cumsum(d) / t.shape[d]}

    def __init__(self, c: Config, dim: int) -> None:
        super().__init__()
        self.c = c
        self.up, self.down = _linear(dim, c["width"], True), _linear(c["width"], dim, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, d = self.up(x), self.c["dim"]
        if self.c["op"] in self.ALONG:
            return self.down(self.ALONG[self.c["op"]](h, d))
        r = self.OPS[self.c["op"]](h, d, self.c["keepdim"])
        if not self.c["keepdim"]:
            r = r.unsqueeze(d)
        return self.down(h - r if self.c["combine"] == "sub" else h * torch.sigmoid(r))


def _sample_reduce(rng: random.Random, dim: int) -> Config:
    return dict(width=rng.choice(WIDTHS), dim=rng.choice([0, 1, 2, -1, -2]),
                op=rng.choice(sorted(Reduce.OPS) + sorted(Reduce.ALONG)), keepdim=rng.random() < 0.5,
                combine=rng.choice(["sub", "gate"]))


class Divide(nn.Module):
    """``torch.div`` with a rounding mode, by another projection or by a full-width constant."""

    def __init__(self, c: Config, dim: int) -> None:
        super().__init__()
        self.c = c
        self.a, self.b, self.down = _linear(dim, c["width"], True), _linear(dim, c["width"], True), _linear(c["width"], dim, True)
        self.register_buffer("constant", torch.rand(c["width"], dtype=torch.float64) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num = self.a(x) * 4
        den = {"projection": self.b(x).abs() + 1.0, "buffer": self.constant, "full": torch.full_like(num, 3.0),
               "scalar": self.constant[:1]}[self.c["by"]]
        if self.c["swap"]:  # the projection divides: the other operand broadcasts into it
            num, den = den * 100, num.abs() + 1.0
        out = torch.div(num, den, rounding_mode=self.c["mode"])
        return self.down(out) if self.c["then"] == "down" else x * out.mean(-1, keepdim=True)


def _sample_divide(rng: random.Random, dim: int) -> Config:
    return dict(width=rng.choice(WIDTHS), by=rng.choice(["projection", "buffer", "full", "scalar"]),
                mode=rng.choice([None, "trunc", "floor"]), swap=rng.random() < 0.5, then=rng.choice(["down", "mean"]))


class Select(nn.Module):
    """``where`` / ``masked_fill`` with conditions computed, or held in buffers."""

    def __init__(self, c: Config, dim: int) -> None:
        super().__init__()
        self.c = c
        self.a, self.b, self.down = _linear(dim, c["width"], True), _linear(dim, c["width"], True), _linear(c["width"], dim, True)
        self.register_buffer("mask", torch.rand(c["width"]) > 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        cond = a > 0 if self.c["cond"] == "computed" else self.mask
        if self.c["op"] == "masked_fill":
            return self.down(a.masked_fill(cond, -0.5))
        other = self.b(x) if self.c["other"] == "projection" else torch.zeros_like(a)
        return self.down(torch.where(cond, a, other))


def _sample_select(rng: random.Random, dim: int) -> Config:
    return dict(width=rng.choice(WIDTHS), cond=rng.choice(["computed", "buffer"]), op=rng.choice(["where", "masked_fill"]),
                other=rng.choice(["projection", "zeros"]))


class Join(nn.Module):
    """``cat`` or ``stack`` of two projections, then one back to the model width."""

    def __init__(self, c: Config, dim: int) -> None:
        super().__init__()
        self.c = c
        w = c["width"]
        self.a, self.b = _linear(dim, w, c["bias"]), _linear(dim, w, c["bias"])
        self.down = _linear(2 * w if c["op"] != "stack_sum" else w, dim, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x), self.b(x)
        if self.c["op"] == "cat":
            return self.down(torch.cat([a, F.silu(b)], dim=-1))
        if self.c["op"] == "stack_flat":
            return self.down(torch.stack([a, b], dim=-1).flatten(-2))
        return self.down(torch.stack([a, b * 2], dim=0).sum(0))


def _sample_join(rng: random.Random, dim: int) -> Config:
    return dict(width=rng.choice(WIDTHS), op=rng.choice(["cat", "stack_flat", "stack_sum"]), bias=rng.random() < 0.5)


class Conv1D(nn.Module):
    """GPT-2's Conv1D: ``addmm(bias, x_2d, W)`` with ``W`` stored ``[in, out]``."""

    def __init__(self, c: Config, dim: int) -> None:
        super().__init__()
        self.c, w = c, c["width"]
        self.w1, self.b1 = nn.Parameter(torch.randn(dim, w) * 0.3), nn.Parameter(torch.randn(w) * 0.1)
        self.w2, self.b2 = nn.Parameter(torch.randn(w, dim) * 0.3), nn.Parameter(torch.randn(dim) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        h = torch.addmm(self.b1, x.view(-1, x.size(-1)), self.w1)
        h = F.gelu(h).view(*shape, self.c["width"])
        kw = dict(beta=self.c["beta"], alpha=self.c["alpha"])
        return torch.addmm(self.b2, h.view(-1, h.size(-1)), self.w2, **kw).view(*shape, x.size(-1))


def _sample_conv1d(rng: random.Random, dim: int) -> Config:
    return dict(width=rng.choice(WIDTHS), beta=rng.choice([1.0, 1.0, 0.5, 0.0]), alpha=rng.choice([1.0, 1.0, 2.0]))


class Direct(nn.Module):
    """Parameters used directly: ``x @ W`` matmuls and elementwise scales."""

    def __init__(self, c: Config, dim: int) -> None:
        super().__init__()
        self.c, w = c, c["width"]
        self.w1, self.w2 = nn.Parameter(torch.randn(dim, w) * 0.3), nn.Parameter(torch.randn(w, dim) * 0.3)
        self.scale = nn.Parameter(torch.rand(w) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w1 if self.c["op"] == "matmul" else torch.matmul(x, self.w1)
        return (torch.relu(h) * self.scale) @ self.w2


def _sample_direct(rng: random.Random, dim: int) -> Config:
    return dict(width=rng.choice(WIDTHS), op=rng.choice(["matmul", "torch_matmul"]))


class MoE(nn.Module):
    """Top-k routing over stacked experts: run densely with ``bmm`` and combined by the routing
    weights scattered into a (tokens, experts) matrix, or token-expert pairs sorted by expert."""

    def __init__(self, c: Config, dim: int) -> None:
        super().__init__()
        self.c, e, w = c, c["experts"], c["width"]
        self.router = _linear(dim, e, False)
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


def _sample_moe(rng: random.Random, dim: int) -> Config:
    experts = rng.choice([2, 3, 4])
    return dict(experts=experts, top_k=rng.choice(range(1, experts + 1)), width=rng.choice(WIDTHS),
                dispatch=rng.choice(["dense", "sorted"]))


# Layout ops on a projection ``h`` of shape (B, T, W): name -> (op, output width, valid widths).
# ``index_select`` also takes a fixed permutation of the W columns.
# Several move or mix the columns a column-parallel projection shards: a rule must refuse them
# or rewrite them right.
LAYOUTS: dict[str, tuple[Callable[..., torch.Tensor], Callable[[int], int], Callable[[int], bool]]] = {
    "heads_transpose": (lambda h, w: h.view(*h.shape[:2], 2, w // 2).transpose(-1, -2).reshape(*h.shape[:2], w),
                        lambda w: w, lambda w: w % 2 == 0),
    "unflatten_sum": (lambda h, w: h.unflatten(-1, (2, w // 2)).sum(-2), lambda w: w // 2, lambda w: w % 2 == 0),
    "unflatten_inner_sum": (lambda h, w: h.unflatten(-1, (w // 2, 2)).sum(-1), lambda w: w // 2, lambda w: w % 2 == 0),
    "strided_slice": (lambda h, w: h[..., ::2], lambda w: (w + 1) // 2, lambda w: True),
    "offset_slice": (lambda h, w: h[..., 1:], lambda w: w - 1, lambda w: w > 1),
    "half_slice": (lambda h, w: h[..., w // 2:], lambda w: w - w // 2, lambda w: True),
    "narrow": (lambda h, w: h.narrow(-1, 1, w - 2), lambda w: w - 2, lambda w: w > 2),
    "index_select": (lambda h, w, perm: h.index_select(-1, perm), lambda w: w, lambda w: True),
    "flip": (lambda h, w: h.flip(-1), lambda w: w, lambda w: True),
    "roll": (lambda h, w: h.roll(1, -1), lambda w: w, lambda w: True),
    "select": (lambda h, w: h.select(-1, 0).unsqueeze(-1) * h, lambda w: w, lambda w: True),
    "cat_self": (lambda h, w: torch.cat([h, h[..., :1]], -1), lambda w: w + 1, lambda w: True),
    "permute": (lambda h, w: h.permute(2, 0, 1).relu().permute(1, 2, 0), lambda w: w, lambda w: True),
    "expand_merge": (lambda h, w: h.unsqueeze(-2).expand(*h.shape[:2], 2, w).reshape(*h.shape[:2], 2 * w),
                     lambda w: 2 * w, lambda w: True),
    "merge_seq": (lambda h, w: h.reshape(h.shape[0], -1).tanh().view(*h.shape), lambda w: w, lambda w: True),
    "pairs_swap": (lambda h, w: h.reshape(*h.shape[:2], w // 2, 2).permute(0, 1, 3, 2).flatten(2),
                   lambda w: w, lambda w: w % 2 == 0),
    "repeat_interleave": (lambda h, w: h.repeat_interleave(2, dim=-1), lambda w: 2 * w, lambda w: True),
    "cumsum": (lambda h, w: h.cumsum(-1), lambda w: w, lambda w: True),
    "sort": (lambda h, w: h.sort(-1).values, lambda w: w, lambda w: True),
    "topk": (lambda h, w: h.topk(2, -1).values, lambda w: 2, lambda w: w >= 2),
    "squeeze_unsqueeze": (lambda h, w: h.unsqueeze(0).unsqueeze(-1).squeeze(-1).squeeze(0), lambda w: w, lambda w: True),
    "transpose_seq": (lambda h, w: h.transpose(1, 2).softmax(-1).transpose(1, 2), lambda w: w, lambda w: True),
}


class Layout(nn.Module):
    """``down(op(up(x)))`` for one of :data:`LAYOUTS`."""

    def __init__(self, c: Config, dim: int) -> None:
        super().__init__()
        self.c = c
        op, width, _ = LAYOUTS[c["op"]]
        self.op = op
        self.up, self.down = _linear(dim, c["width"], c["bias"]), _linear(width(c["width"]), dim, True)
        self.register_buffer("perm", torch.randperm(c["width"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = (self.perm,) if self.c["op"] == "index_select" else ()
        return self.down(self.op(self.up(x), self.c["width"], *extra))


def _sample_layout(rng: random.Random, dim: int) -> Config:
    op = rng.choice(sorted(LAYOUTS))
    return dict(op=op, width=rng.choice([w for w in WIDTHS if LAYOUTS[op][2](w)]), bias=rng.random() < 0.5)


def _no_simpler(c: Config) -> list[Config]:
    return []


def _simpler_width(c: Config) -> list[Config]:
    return [{**c, "width": 8}] if c.get("width") != 8 else []


@dataclass(frozen=True)
class Kind:
    sample: Callable[[random.Random, int], Config]
    build: Callable[[Config, int], nn.Module]
    simpler: Callable[[Config], list[Config]]


KINDS: dict[str, Kind] = {
    "mlp": Kind(_sample_mlp, MLP, _simpler_mlp),
    "attention": Kind(_sample_attention, Attention, _simpler_attention),
    "norm": Kind(lambda r, d: dict(kind=r.choice(["layer_norm", "rms_norm", "by_hand"]), bias=r.random() < 0.5), Norm,
                 _no_simpler),
    "reduce": Kind(_sample_reduce, Reduce, _simpler_width),
    "divide": Kind(_sample_divide, Divide, _simpler_width),
    "select": Kind(_sample_select, Select, _simpler_width),
    "join": Kind(_sample_join, Join, _simpler_width),
    "conv1d": Kind(_sample_conv1d, Conv1D, _simpler_width),
    "direct": Kind(_sample_direct, Direct, _simpler_width),
    "moe": Kind(_sample_moe, MoE, _simpler_width),
    "layout": Kind(_sample_layout, Layout, _no_simpler),
}


class Residual(nn.Module):
    def __init__(self, inner: nn.Module, norm: bool, dim: int) -> None:
        super().__init__()
        self.inner, self.norm = inner, nn.LayerNorm(dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(self.norm(x) if self.norm is not None else x)


class Model(nn.Module):
    """Token ids (or hidden states) -> blocks -> logits (or hidden states)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        dim, vocab = spec["dim"], spec["vocab"]
        self.embed = nn.Embedding(vocab, dim, padding_idx=spec["padding_idx"]) if spec["input"] == "ids" else None
        self.blocks = nn.ModuleList()
        for block in spec["blocks"]:
            inner = KINDS[block["kind"]].build(block["config"], dim)
            self.blocks.append(Residual(inner, block["norm"], dim) if block["residual"] else inner)
        self.head = None
        if spec["head"] != "none":
            self.head = nn.Linear(dim, vocab, bias=spec["head"] == "bias")
            if spec["tied"] and self.embed is not None:
                self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.embed is not None else x
        for block in self.blocks:
            h = block(h)
        return self.head(h) if self.head is not None else h


def build_model(spec: dict[str, Any]) -> tuple[nn.Module, torch.Tensor]:
    """The model a spec describes, in float64 with seeded weights, and its seeded input."""
    torch.manual_seed(spec["seed"])
    model = Model(spec).double().eval()
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    batch, seq = spec["batch"], spec["seq"]
    if spec["input"] == "ids":
        inputs = torch.randint(0, spec["vocab"], (batch, seq), generator=g)
    else:
        inputs = torch.randn(batch, seq, spec["dim"], generator=g, dtype=torch.float64)
    return model, inputs
