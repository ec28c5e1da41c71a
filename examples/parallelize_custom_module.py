"""Parallelize your own module: no transformers, no plan written by hand.

    torchrun --nproc-per-node 2 examples/parallelize_custom_module.py

The model below is plain PyTorch: a fused qkv projection split with ``chunk``, head counts as
Python ints, attention as matmul + softmax, a reshape back to the width read from the input.
autotp finds the Megatron layout from the graph (qkv column-parallel in three blocks, proj
row-parallel; fc1 column-parallel, fc2 row-parallel) and rewrites the head count and width.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import autotp


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // self.heads)  # (B, heads, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        y = att.masked_fill(~causal, float("-inf")).softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, dim: int = 128, heads: int = 8) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class Model(nn.Module):
    def __init__(self, depth: int = 2, dim: int = 128) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def main() -> None:
    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(2, 10, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x)

    tp_model = autotp.parallelize(model, example_inputs=(x,))
    with torch.no_grad():
        out = tp_model(x)
        other = torch.randn(3, 7, 128)
        # another batch and sequence length use the same graph
        assert torch.allclose(tp_model(other), model_reference(other), atol=1e-5)

    if tp_model.rank == 0:
        print(tp_model.plan.to_table(only_sharded=True))
    diff = (out - reference).abs().max().item()
    print(f"[rank {tp_model.rank}/{tp_model.tp_size}] max|diff| {diff:.2e}  "
          f"weights {tp_model.local_bytes() / 2**10:.0f} KiB", flush=True)


def model_reference(x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)  # the same weights as in main()
    with torch.no_grad():
        return Model().eval()(x)


if __name__ == "__main__":
    main()
