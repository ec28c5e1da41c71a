"""The blocks the fuzzer builds random modules from: the shapes real models use, in plain torch.

Every block maps hidden states ``(batch, seq, dim)`` to hidden states of the same shape, so any
sequence of blocks is a model. Each kind is a row of :data:`KINDS`: how to draw a random
configuration (``sample(rng, dim)``), how to build the module (``build(config, dim)``), and
which simpler configurations to try when shrinking a failure (``simpler(config)``). A
configuration is a dict of JSON values, so a failing model is a few lines of JSON.

The blocks cover, on purpose, what the rules must get right or refuse: fused projections
split by ``split``/``chunk``/``unbind``/``narrow``/slicing or viewed apart (``[..., 3, heads,
head_dim]``, ``[..., 2, width]``); views with literal head counts or
``-1``; hand-written, SDPA and heads-folded-into-the-batch (Bloom's ``bmm`` over ``[batch * heads, ...]``)
attention (causal, masks, grouped kv heads by ``enable_gqa``,
``repeat_interleave`` or ``expand``); rotary pairs by ``unflatten``; per-head and whole q/k
norms; gated MLPs and activations; reductions over every dim; division with rounding modes;
``where``/``masked_fill``; ``cat``/``stack``; GPT-2's Conv1D ``addmm`` (with ``beta``/``alpha``);
parameters used directly; mixture-of-experts routing with ``topk``/``scatter`` and stacked
experts in ``bmm``. Sizes are drawn so that head counts sometimes do not divide tp.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from autotp.testing.layers import (MLP, MoE, Attention, Config, Norm, sample_attention, sample_mlp, sample_moe,
                                   simpler_attention, simpler_mlp)
from autotp.testing.ops import (Conv1D, Direct, Divide, Join, Layout, Reduce, Select, sample_conv1d, sample_direct,
                                sample_divide, sample_join, sample_layout, sample_reduce, sample_select)

__all__ = ["KINDS", "Kind", "Model", "build_model"]


def no_simpler(c: Config) -> list[Config]:
    return []


def simpler_width(c: Config) -> list[Config]:
    return [{**c, "width": 8}] if c.get("width") != 8 else []


@dataclass(frozen=True)
class Kind:
    sample: Callable[[random.Random, int], Config]
    build: Callable[[Config, int], nn.Module]
    simpler: Callable[[Config], list[Config]]


KINDS: dict[str, Kind] = {
    "mlp": Kind(sample_mlp, MLP, simpler_mlp),
    "attention": Kind(sample_attention, Attention, simpler_attention),
    "norm": Kind(lambda r, d: dict(kind=r.choice(["layer_norm", "rms_norm", "by_hand"]), bias=r.random() < 0.5), Norm,
                 no_simpler),
    "reduce": Kind(sample_reduce, Reduce, simpler_width),
    "divide": Kind(sample_divide, Divide, simpler_width),
    "select": Kind(sample_select, Select, simpler_width),
    "join": Kind(sample_join, Join, simpler_width),
    "conv1d": Kind(sample_conv1d, Conv1D, simpler_width),
    "direct": Kind(sample_direct, Direct, simpler_width),
    "moe": Kind(sample_moe, MoE, simpler_width),
    "layout": Kind(sample_layout, Layout, no_simpler),
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
