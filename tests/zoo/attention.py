"""Attention written by hand the ways models in the wild write it: nanoGPT, Meta's reference Llama
(complex rotary, repeat_kv by expand), GPT-NeoX / Falcon / Bloom fused q|k|v layouts, T5's
relative bias and ALiBi, bmm/baddbmm over heads folded into the batch, q/k norms over all heads."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.sizes import DIM as D, HEADS as H, HEAD_DIM as HS, VOCAB as V


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    return torch.polar(torch.ones(end, dim // 2), torch.outer(torch.arange(end).float(), freqs))


class NanoAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(D, 3 * D)
        self.c_proj = nn.Linear(D, D)
        self.register_buffer("bias", torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(D, dim=2)
        k = k.view(B, T, H, C // H).transpose(1, 2)
        q = q.view(B, T, H, C // H).transpose(1, 2)
        v = v.view(B, T, H, C // H).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class NanoGPT(nn.Module):
    takes_ids = True
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(V, D)
        self.wpe = nn.Embedding(64, D)
        self.blocks = nn.ModuleList([nn.ModuleDict(dict(ln1=nn.LayerNorm(D), attn=NanoAttn(), ln2=nn.LayerNorm(D),
                   fc=nn.Linear(D, 4 * D), proj=nn.Linear(4 * D, D))) for _ in range(2)])
        self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, V, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx):
        B, T = idx.size()
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for b in self.blocks:
            x = x + b["attn"](b["ln1"](x))
            x = x + b["proj"](F.gelu(b["fc"](b["ln2"](x)), approximate="tanh"))
        return self.lm_head(self.ln_f(x))


class MetaLlamaAttn(nn.Module):
    """Meta's reference llama: complex rotary, repeat_kv by expand+reshape."""
    def __init__(self, kv=4):
        super().__init__()
        self.kv = kv
        self.wq = nn.Linear(D, H * HS, bias=False)
        self.wk = nn.Linear(D, kv * HS, bias=False)
        self.wv = nn.Linear(D, kv * HS, bias=False)
        self.wo = nn.Linear(H * HS, D, bias=False)
        self.register_buffer("freqs_cis", precompute_freqs_cis(HS, 64), persistent=False)

    def forward(self, x):
        B, T, _ = x.shape
        xq, xk, xv = self.wq(x).view(B, T, H, HS), self.wk(x).view(B, T, self.kv, HS), self.wv(x).view(B, T, self.kv, HS)
        fc = self.freqs_cis[:T].view(1, T, 1, HS // 2)
        xq = torch.view_as_real(torch.view_as_complex(xq.float().reshape(B, T, H, -1, 2)) * fc).flatten(3).type_as(x)
        xk = torch.view_as_real(torch.view_as_complex(xk.float().reshape(B, T, self.kv, -1, 2)) * fc).flatten(3).type_as(x)
        rep = H // self.kv
        xk = xk[:, :, :, None, :].expand(B, T, self.kv, rep, HS).reshape(B, T, H, HS)
        xv = xv[:, :, :, None, :].expand(B, T, self.kv, rep, HS).reshape(B, T, H, HS)
        q, k, v = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(HS)
        mask = torch.full((T, T), float("-inf")).triu(1)
        scores = F.softmax((scores + mask).float(), dim=-1).type_as(q)
        out = torch.matmul(scores, v).transpose(1, 2).contiguous().view(B, T, -1)
        return self.wo(out)


class SeparateQKVO(nn.Module):
    """q, k, v and o projections of their own; ``heads`` views a projection as [B, H, T, HS]."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D, bias=bias) for _ in range(4))

    @staticmethod
    def heads(t: torch.Tensor) -> torch.Tensor:
        B, T, _ = t.shape
        return t.view(B, T, H, HS).transpose(1, 2)

    def merged(self, y: torch.Tensor) -> torch.Tensor:
        """[B, H, T, HS] back to [B, T, D], through o."""
        B, _, T, _ = y.shape
        return self.o(y.transpose(1, 2).reshape(B, T, D))


class Bmm(SeparateQKVO):
    """Heads folded into the batch: [B * H, T, HS], scores by bmm."""

    def scores(self, q, k):
        return torch.bmm(q, k.transpose(1, 2))

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (self.heads(p(x)).reshape(B * H, T, HS) for p in (self.q, self.k, self.v))
        a = self.scores(q, k).softmax(-1)
        return self.merged(torch.bmm(a, v).view(B, H, T, HS))


class QKNormFull(SeparateQKVO):
    """OLMo2-style: RMS norm over the whole q projection (all heads) before splitting heads."""
    def __init__(self):
        super().__init__(bias=False)
        self.qn = nn.RMSNorm(D)
        self.kn = nn.RMSNorm(D)

    def forward(self, x):
        q, k, v = self.heads(self.qn(self.q(x))), self.heads(self.kn(self.k(x))), self.heads(self.v(x))
        return self.merged(F.scaled_dot_product_attention(q, k, v, is_causal=True))


class ParallelBlock(nn.Module):
    """GPT-J style: attention and MLP read the same norm, one residual."""
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.attn = Bmm()
        self.fc = nn.Linear(D, 256)
        self.proj = nn.Linear(256, D)

    def forward(self, x):
        h = self.ln(x)
        return x + self.attn(h) + self.proj(F.gelu(self.fc(h)))


class FusedQKV(nn.Module):
    """One q|k|v projection of 3 * D columns; subclasses take it apart their own way."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def attend(self, q, k, v, causal=True):
        """q, k, v as [B, T, H, HS]; through SDPA and o."""
        B, T = q.shape[:2]
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return self.o(y.transpose(1, 2).reshape(B, T, D))


class NeoXQKV(FusedQKV):
    """GPT-NeoX: q|k|v interleaved per head, [B, T, H, 3 * HS]."""

    def forward(self, x):
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, H, 3 * HS)
        return self.attend(qkv[..., :HS], qkv[..., HS:2 * HS], qkv[..., 2 * HS:])


class FalconMQA(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, (H + 2) * HS, bias=False)
        self.o = nn.Linear(D, D, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        f = self.qkv(x).view(B, T, H + 2, HS)
        q, k, v = f[:, :, :-2], f[:, :, [-2]], f[:, :, [-1]]
        k = k.expand(B, T, H, HS)
        v = v.expand(B, T, H, HS)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, D))


class BloomQKV(FusedQKV):
    """Bloom: [B, T, H, 3, HS], q, k and v selected from the 3."""

    def forward(self, x):
        B, T, _ = x.shape
        f = self.qkv(x).view(B, T, H, 3, HS)
        return self.attend(f[..., 0, :], f[..., 1, :], f[..., 2, :], causal=False)


class T5Bias(SeparateQKVO):
    """T5's relative position bias: an embedding of buckets with one column per head."""
    def __init__(self):
        super().__init__(bias=False)
        self.rel = nn.Embedding(32, H)

    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        bucket = (torch.arange(T)[None, :] - torch.arange(T)[:, None]).clamp(-15, 16) + 15
        scores = q @ k.transpose(-1, -2) + self.rel(bucket).permute(2, 0, 1).unsqueeze(0)
        return self.merged(scores.softmax(-1) @ v)


class Alibi(SeparateQKVO):
    """ALiBi: a per-head slope times the distance, added to the scores."""
    def __init__(self):
        super().__init__()
        self.register_buffer("slopes", torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)]))

    def forward(self, x):
        T = x.shape[1]
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        dist = (torch.arange(T)[None, :] - torch.arange(T)[:, None]).float()
        scores = q @ k.transpose(-1, -2) / math.sqrt(HS) + self.slopes.view(1, H, 1, 1) * dist
        return self.merged(scores.softmax(-1) @ v)


class Baddbmm(Bmm):
    """Bloom's scores: baddbmm onto a zero base, scaled by alpha."""

    def scores(self, q, k):
        base = torch.zeros(q.shape[0], q.shape[1], k.shape[1])
        return torch.baddbmm(base, q, k.transpose(1, 2), beta=1.0, alpha=1 / math.sqrt(HS))


class GatedAttnOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(D, D)
        self.g = nn.Linear(D, D)
        self.o = nn.Linear(D, D)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, H, HS).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(B, T, D)
        return self.o(y * torch.sigmoid(self.g(x)))


class MaskKwarg(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.o = nn.Linear(D, D)

    def forward(self, x, attn_mask=None):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(D, -1)
        sh = lambda t: t.view(B, T, H, HS).transpose(1, 2)
        y = F.scaled_dot_product_attention(sh(q), sh(k), sh(v), attn_mask=attn_mask)
        return self.o(y.transpose(1, 2).reshape(B, T, D))


class HeadsFromShape(nn.Module):
    """head count read from the weight's shape at run time"""
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(D, D)
        self.o = nn.Linear(D, D)

    def forward(self, x):
        B, T, _ = x.shape
        n = self.q.weight.shape[0] // HS
        q = self.q(x).view(B, T, n, HS).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, q, q)
        return self.o(y.transpose(1, 2).reshape(B, T, n * HS))


class ChunkQK(nn.Module):
    """q and k fused and viewed apart as [..., 2, heads, head_dim]; v separate."""
    def __init__(self):
        super().__init__()
        self.qk = nn.Linear(D, 2 * D, bias=False)
        self.v = nn.Linear(D, D, bias=False)
        self.o = nn.Linear(D, D, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        q, k = self.qk(x).view(B, T, 2, H, HS).unbind(2)
        v = self.v(x).view(B, T, H, HS)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class MatmulHiddenSelf(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(D, 128)
        self.c = nn.Linear(D, D)

    def forward(self, x):
        g = self.a(x) @ self.b(x).transpose(-1, -2)  # (B,T,T) sums over hidden
        return self.c(g.softmax(-1) @ x)


MODULES = [NanoAttn, NanoGPT, MetaLlamaAttn, Bmm, QKNormFull, ParallelBlock, NeoXQKV, FalconMQA, BloomQKV,
           T5Bias, Alibi, Baddbmm, GatedAttnOut, MaskKwarg, HeadsFromShape, ChunkQK, MatmulHiddenSelf]
