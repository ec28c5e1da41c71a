"""Single-op blocks for the fuzzer's random models: ``down(op(up(x)))`` around the ops a rule must
get right or refuse (reductions, division with rounding modes, ``where``, ``cat``/``stack``,
GPT-2's Conv1D ``addmm``, parameters used directly, layout ops that move sharded columns).
"""

from __future__ import annotations

import random
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from autotp.testing.layers import WIDTHS, Config, linear

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
        self.up, self.down = linear(dim, c["width"], True), linear(c["width"], dim, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, d = self.up(x), self.c["dim"]
        if self.c["op"] in self.ALONG:
            return self.down(self.ALONG[self.c["op"]](h, d))
        r = self.OPS[self.c["op"]](h, d, self.c["keepdim"])
        if not self.c["keepdim"]:
            r = r.unsqueeze(d)
        return self.down(h - r if self.c["combine"] == "sub" else h * torch.sigmoid(r))


def sample_reduce(rng: random.Random, dim: int) -> Config:
    return dict(width=rng.choice(WIDTHS), dim=rng.choice([0, 1, 2, -1, -2]),
                op=rng.choice(sorted(Reduce.OPS) + sorted(Reduce.ALONG)), keepdim=rng.random() < 0.5,
                combine=rng.choice(["sub", "gate"]))


class Divide(nn.Module):
    """``torch.div`` with a rounding mode, by another projection or by a full-width constant."""

    def __init__(self, c: Config, dim: int) -> None:
        super().__init__()
        self.c = c
        self.a, self.b, self.down = linear(dim, c["width"], True), linear(dim, c["width"], True), linear(c["width"], dim, True)
        self.register_buffer("constant", torch.rand(c["width"], dtype=torch.float64) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num = self.a(x) * 4
        den = {"projection": self.b(x).abs() + 1.0, "buffer": self.constant, "full": torch.full_like(num, 3.0),
               "scalar": self.constant[:1]}[self.c["by"]]
        if self.c["swap"]:  # the projection divides: the other operand broadcasts into it
            num, den = den * 100, num.abs() + 1.0
        out = torch.div(num, den, rounding_mode=self.c["mode"])
        return self.down(out) if self.c["then"] == "down" else x * out.mean(-1, keepdim=True)


def sample_divide(rng: random.Random, dim: int) -> Config:
    return dict(width=rng.choice(WIDTHS), by=rng.choice(["projection", "buffer", "full", "scalar"]),
                mode=rng.choice([None, "trunc", "floor"]), swap=rng.random() < 0.5, then=rng.choice(["down", "mean"]))


class Select(nn.Module):
    """``where`` / ``masked_fill`` with conditions computed, or held in buffers."""

    def __init__(self, c: Config, dim: int) -> None:
        super().__init__()
        self.c = c
        self.a, self.b, self.down = linear(dim, c["width"], True), linear(dim, c["width"], True), linear(c["width"], dim, True)
        self.register_buffer("mask", torch.rand(c["width"]) > 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        cond = a > 0 if self.c["cond"] == "computed" else self.mask
        if self.c["op"] == "masked_fill":
            return self.down(a.masked_fill(cond, -0.5))
        other = self.b(x) if self.c["other"] == "projection" else torch.zeros_like(a)
        return self.down(torch.where(cond, a, other))


def sample_select(rng: random.Random, dim: int) -> Config:
    return dict(width=rng.choice(WIDTHS), cond=rng.choice(["computed", "buffer"]), op=rng.choice(["where", "masked_fill"]),
                other=rng.choice(["projection", "zeros"]))


class Join(nn.Module):
    """``cat`` or ``stack`` of two projections, then one back to the model width."""

    def __init__(self, c: Config, dim: int) -> None:
        super().__init__()
        self.c = c
        w = c["width"]
        self.a, self.b = linear(dim, w, c["bias"]), linear(dim, w, c["bias"])
        self.down = linear(2 * w if c["op"] != "stack_sum" else w, dim, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x), self.b(x)
        if self.c["op"] == "cat":
            return self.down(torch.cat([a, F.silu(b)], dim=-1))
        if self.c["op"] == "stack_flat":
            return self.down(torch.stack([a, b], dim=-1).flatten(-2))
        return self.down(torch.stack([a, b * 2], dim=0).sum(0))


def sample_join(rng: random.Random, dim: int) -> Config:
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


def sample_conv1d(rng: random.Random, dim: int) -> Config:
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


def sample_direct(rng: random.Random, dim: int) -> Config:
    return dict(width=rng.choice(WIDTHS), op=rng.choice(["matmul", "torch_matmul"]))


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
    # a dim of 2 is one element a rank over 2 ranks: squeeze must not drop it, and a transposed
    # piece counts as contiguous, so contiguous()/reshape return views where the whole value copies
    "pair_squeeze": (lambda h, w: h.unflatten(-1, (2, w // 2)).squeeze(-2).flatten(-2), lambda w: w,
                     lambda w: w % 2 == 0),
    "written_contiguous": (lambda h, w: _written(h, _pairs(h, w).contiguous(), lambda a: a.transpose(-1, -2).flatten(-2)),
                           lambda w: w, lambda w: w % 2 == 0),
    "written_reshape": (lambda h, w: _written(h, _pairs(h, w).reshape(*h.shape[:2], w),
                                              lambda a: a.unflatten(-1, (w // 2, 2)).transpose(-1, -2).flatten(-2)),
                        lambda w: w, lambda w: w % 2 == 0),
    "written_copy": (lambda h, w: _written(h, h.to(h.dtype, copy=True), lambda a: a), lambda w: w, lambda w: True),
}


def _pairs(h: torch.Tensor, w: int) -> torch.Tensor:
    """``(B, T, W) -> (B, T, W/2, 2)``: the two halves of the columns side by side (a transposed view)."""
    return h.unflatten(-1, (2, w // 2)).transpose(-1, -2)


def _written(h: torch.Tensor, copy: torch.Tensor, undo: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``copy`` (``h``'s elements copied, reordered) doubled in place, put back in ``h``'s order by
    ``undo``, plus ``h``, which the write must not reach."""
    copy.mul_(2.0)
    return undo(copy) + h


class Layout(nn.Module):
    """``down(op(up(x)))`` for one of :data:`LAYOUTS`."""

    def __init__(self, c: Config, dim: int) -> None:
        super().__init__()
        self.c = c
        op, width, _ = LAYOUTS[c["op"]]
        self.op = op
        self.up, self.down = linear(dim, c["width"], c["bias"]), linear(width(c["width"]), dim, True)
        self.register_buffer("perm", torch.randperm(c["width"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = (self.perm,) if self.c["op"] == "index_select" else ()
        return self.down(self.op(self.up(x), self.c["width"], *extra))


def sample_layout(rng: random.Random, dim: int) -> Config:
    op = rng.choice(sorted(LAYOUTS))
    return dict(op=op, width=rng.choice([w for w in WIDTHS if LAYOUTS[op][2](w)]), bias=rng.random() < 0.5)
