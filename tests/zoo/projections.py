"""MLPs, heads and whole small models written by hand: fused and interleaved gate|up, a mixture of
experts by masks or by a loop over the routed experts, LoRA adapters, layers applied repeatedly (ALBERT), parameters used directly or
in slices, einsum experts, in-place ops, control flow on a size, dict outputs, convolutions."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.sizes import DIM as D, VOCAB as V


class FusedSwiGLU(nn.Module):
    """w12 = Linear(d, 2h) then chunk(2): the trap of fused gate|up."""
    def __init__(self):
        super().__init__()
        self.w12 = nn.Linear(D, 2 * 128)
        self.w3 = nn.Linear(128, D)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class MoE(nn.Module):
    def __init__(self, E=4, k=2):
        super().__init__()
        self.k = k
        self.router = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(D, 128), nn.SiLU(), nn.Linear(128, D)) for _ in range(E)])

    def forward(self, x):
        B, T, _ = x.shape
        x2 = x.reshape(-1, D)
        w, idx = self.router(x2).softmax(-1).topk(self.k, dim=-1)
        out = torch.zeros_like(x2)
        for e, ex in enumerate(self.experts):
            m = (idx == e).to(x.dtype) * w
            out = out + ex(x2) * m.sum(-1, keepdim=True)
        return out.view(B, T, D)


class DispatchMoE(nn.Module):
    """Each expert runs on only the tokens routed to it (``torch.where`` of the routing mask,
    ``index_add_`` back), as the older transformers Mixtral wrote it: data-dependent sizes."""
    def __init__(self, E=4, k=2):
        super().__init__()
        self.k = k
        self.gate = nn.Linear(D, E, bias=False)
        self.w1 = nn.ModuleList(nn.Linear(D, 128, bias=False) for _ in range(E))
        self.w3 = nn.ModuleList(nn.Linear(D, 128, bias=False) for _ in range(E))
        self.w2 = nn.ModuleList(nn.Linear(128, D, bias=False) for _ in range(E))

    def forward(self, x):
        h = x.reshape(-1, D)
        w, chosen = self.gate(h).softmax(-1).topk(self.k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        mask = F.one_hot(chosen, num_classes=len(self.w1)).permute(2, 1, 0)
        out = torch.zeros_like(h)
        for e, (w1, w3, w2) in enumerate(zip(self.w1, self.w3, self.w2)):
            slot, token = torch.where(mask[e])
            picked = h[token]
            out.index_add_(0, token, w2(F.silu(w1(picked)) * w3(picked)) * w[token, slot, None])
        return out.view_as(x)


class _RoutedExperts(nn.Module):
    """Runs only the experts the batch routes to, and skips one that got no token (remote-code
    MoE, older Mixtral): a loop torch.export cannot trace, so autotp runs it whole."""
    def __init__(self, E=4, k=2):
        super().__init__()
        self.k = k
        self.gate = nn.Linear(D, E, bias=False)
        self.w1 = nn.ModuleList(nn.Linear(D, 96, bias=False) for _ in range(E))
        self.w2 = nn.ModuleList(nn.Linear(96, D, bias=False) for _ in range(E))

    def forward(self, h):
        w, chosen = self.gate(h).softmax(-1).topk(self.k, dim=-1)
        mask = F.one_hot(chosen, num_classes=len(self.w1)).permute(2, 1, 0)
        out = torch.zeros_like(h)
        for e in (mask.sum((1, 2)) > 0).nonzero().flatten().tolist():
            slot, token = torch.where(mask[e])
            if token.shape[0] == 0:
                continue
            out.index_add_(0, token, self.w2[e](F.gelu(self.w1[e](h[token]))) * w[token, slot, None])
        return out


class RoutedMoEBlock(nn.Module):
    """An MLP, then experts that loop over the routed experts only: the MLP still shards, the
    experts run whole on every rank."""
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(D, 128)
        self.down = nn.Linear(128, D)
        self.norm = nn.LayerNorm(D)
        self.experts = _RoutedExperts()

    def forward(self, x):
        x = x + self.down(F.gelu(self.up(x)))
        return x + self.experts(self.norm(x).reshape(-1, D)).view_as(x)


class _SortedExperts(nn.Module):
    """DeepSeek-V2's remote code: tokens sorted by expert, each expert's count read with
    ``.cpu().numpy()`` (the data itself), experts with no token skipped, plus a shared expert."""
    def __init__(self, E=4, k=2):
        super().__init__()
        self.k = k
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(D, 64, bias=False), nn.SiLU(), nn.Linear(64, D, bias=False))
                                     for _ in range(E))

    def forward(self, x):
        weights, ids = self.gate(x).softmax(-1).topk(self.k, dim=-1)
        counts = ids.new_zeros((ids.shape[0], len(self.experts))).scatter_(1, ids, 1).sum(0).cpu().numpy()
        order = ids.view(-1).argsort()
        tokens = x[order // self.k]
        outputs, start = [], 0
        for e, count in enumerate(counts):
            if count == 0:
                continue
            outputs.append(self.experts[e](tokens[start:start + count]))
            start += count
        placed = torch.empty_like(tokens)
        placed[order] = torch.cat(outputs)
        return (placed.view(*ids.shape, -1) * weights.unsqueeze(-1)).sum(1)


class SortedMoEBlock(nn.Module):
    """Attention-like projections, then DeepSeek-style sorted experts beside a shared expert:
    the projections and the shared expert shard, the routed experts run whole."""
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(D, D)
        self.o = nn.Linear(D, D)
        self.shared = nn.Sequential(nn.Linear(D, 64), nn.GELU(), nn.Linear(64, D))
        self.routed = _SortedExperts()

    def forward(self, x):
        x = x + self.o(torch.tanh(self.q(x)))
        h = F.layer_norm(x, (D,))
        return x + self.shared(h) + self.routed(h.reshape(-1, D)).view_as(x)


class InterleavedGLU(nn.Module):
    """gate/up interleaved: even columns gate, odd columns up."""
    def __init__(self):
        super().__init__()
        self.w = nn.Linear(D, 256)
        self.o = nn.Linear(128, D)

    def forward(self, x):
        h = self.w(x)
        return self.o(F.silu(h[..., ::2]) * h[..., 1::2])


class Conv1dMix(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, 128)
        self.conv = nn.Conv1d(128, 128, 3, groups=128, padding=2)
        self.out = nn.Linear(128, D)

    def forward(self, x):
        T = x.shape[1]
        h = self.inp(x).transpose(1, 2)
        h = self.conv(h)[..., :T].transpose(1, 2)
        return self.out(F.silu(h))


class LinearTranspose(nn.Module):
    """weight used via F.linear with weight.t().t(), and a matmul with the weight directly"""
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(D, 128) / 10)
        self.w2 = nn.Parameter(torch.randn(128, D) / 10)

    def forward(self, x):
        return F.gelu(x @ self.w1) @ self.w2


class TiedInOut(nn.Module):
    takes_ids = True
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.fc = nn.Linear(D, D)

    def forward(self, ids):
        h = self.fc(self.emb(ids))
        return F.linear(h, self.emb.weight)


class Cat2Proj(nn.Module):
    """two column projections concatenated then one row projection"""
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 64)
        self.b = nn.Linear(D, 64)
        self.c = nn.Linear(128, D)

    def forward(self, x):
        return self.c(torch.cat([F.silu(self.a(x)), self.b(x)], -1))


class Lora(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(D, 256)
        self.a = nn.Linear(D, 8, bias=False)
        self.b = nn.Linear(8, 256, bias=False)
        self.down = nn.Linear(256, D)
        self.a2 = nn.Linear(256, 8, bias=False)
        self.b2 = nn.Linear(8, D, bias=False)

    def forward(self, x):
        h = F.gelu(self.up(x) + self.b(self.a(x)) * 0.5)
        return self.down(h) + self.b2(self.a2(h)) * 0.5


class SeqMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 256), nn.GELU(), nn.Dropout(0.0), nn.Linear(256, D))

    def forward(self, x):
        return x + self.net(x)


class SharedLayers(nn.Module):
    """ALBERT: one layer applied 3 times"""
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, 256)
        self.proj = nn.Linear(256, D)
        self.ln = nn.LayerNorm(D)

    def forward(self, x):
        for _ in range(3):
            x = self.ln(x + self.proj(F.relu(self.fc(x))))
        return x


class WeightSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(256, D) / 10)
        self.o = nn.Linear(128, D)

    def forward(self, x):
        return self.o(F.relu(F.linear(x, self.w[:128])) + F.linear(x, self.w[128:]))


class EinsumExperts(nn.Module):
    def __init__(self, E=4):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(E, D, 64) / 10)
        self.w2 = nn.Parameter(torch.randn(E, 64, D) / 10)
        self.router = nn.Linear(D, E)

    def forward(self, x):
        g = self.router(x).softmax(-1)
        h = F.silu(torch.einsum("btd,edh->bteh", x, self.w1))
        y = torch.einsum("bteh,ehd->bted", h, self.w2)
        return torch.einsum("bted,bte->btd", y, g)


class SoftCapLM(nn.Module):
    takes_ids = True
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.fc = nn.Linear(D, 256)
        self.pr = nn.Linear(256, D)
        self.head = nn.Linear(D, V, bias=False)

    def forward(self, ids):
        h = self.emb(ids) * math.sqrt(D)
        h = h + self.pr(F.gelu(self.fc(h)))
        logits = self.head(F.layer_norm(h, (D,)))
        return torch.tanh(logits / 30.0) * 30.0


class PosFromMask(nn.Module):
    takes_ids = True
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.pos = nn.Embedding(64, D)
        self.fc = nn.Linear(D, 256)
        self.pr = nn.Linear(256, D)

    def forward(self, ids):
        mask = (ids != 0).long()
        pos = torch.cumsum(mask, 1) * mask
        h = self.emb(ids) + self.pos(pos)
        return h + self.pr(F.relu(self.fc(h)))


class UpDown(nn.Module):
    """An MLP's two projections, ``a`` up to 256 columns and ``b`` back; subclasses write the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, 256), nn.Linear(256, D)


class ScaleViewed(UpDown):
    """Per-column scales stored in other shapes, viewed or expanded to the 256 columns: at tp 4
    the [2, 128] one is no shard of its 2 rows, nor the [1, 256] one of its 1 row, nor the [1]
    one at all. Each stays whole (they were sharded, and every rank loaded a piece of nothing)."""

    def __init__(self):
        super().__init__()
        self.s2, self.s1, self.s0 = (nn.Parameter(torch.randn(*shape)) for shape in ((2, 128), (1, 256), (1,)))

    def forward(self, x):
        return self.b(self.a(x) * self.s2.view(256) * self.s1.view(256) * self.s0.expand(256))


class InplaceMLP(UpDown):
    def forward(self, x):
        h = self.a(x)
        h.relu_()
        h *= 2.0
        h.add_(1.0)
        y = self.b(h)
        y += x
        return y


class ShapeBranch(UpDown):
    """Python control flow on an input size."""
    def __init__(self):
        super().__init__()
        self.c = nn.Linear(D, D)

    def forward(self, x):
        h = self.b(F.gelu(self.a(x)))
        if x.shape[1] > 4:
            h = h + self.c(x)
        return h


class DictOut(UpDown):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(D, V)

    def forward(self, x):
        h = self.b(F.relu(self.a(x)))
        return {"hidden": h, "logits": self.head(h), "aux": h.mean()}


class Dropout(UpDown):
    def __init__(self):
        super().__init__()
        self.d = nn.Dropout(0.1)

    def forward(self, x):
        return self.b(self.d(F.relu(self.a(x))))


class NoGradBlock(UpDown):
    def forward(self, x):
        with torch.no_grad():
            scale = self.a(x).abs().amax(-1, keepdim=True)
        return self.b(F.relu(self.a(x)) / (scale + 1))


class Sequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, D))

    def forward(self, x):
        return self.net(x)


class ConvNet(nn.Module):
    """1x1 convolutions as projections (channels-first)"""
    shards = False  # convolutions are not candidates (README)
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(D, 256, 1)
        self.c2 = nn.Conv1d(256, D, 1)

    def forward(self, x):
        return self.c2(F.gelu(self.c1(x.transpose(1, 2)))).transpose(1, 2)


class Conv2dNet(nn.Module):
    shards = False  # convolutions are not candidates (README)
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(D, 128, 3, padding=1)
        self.c2 = nn.Conv2d(128, D, 1)

    def forward(self, x):
        B, T, C = x.shape
        img = x.transpose(1, 2).reshape(B, C, 2, T // 2)
        return self.c2(F.relu(self.c1(img))).reshape(B, C, T).transpose(1, 2)


class GroupNormAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.gn = nn.GroupNorm(8, 128)
        self.b = nn.Linear(128, D)

    def forward(self, x):
        h = self.a(x).transpose(1, 2)
        return self.b(self.gn(h).transpose(1, 2))


class BatchNormAfter(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.bn = nn.BatchNorm1d(128)
        self.b = nn.Linear(128, D)
        self.bn.running_mean.uniform_()
        self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return self.b(self.bn(self.a(x).transpose(1, 2)).transpose(1, 2))


class ArgmaxHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.e = nn.Embedding(128, D)

    def forward(self, x):
        return self.e(self.a(x).argmax(-1))


class LogSoftmaxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, V)

    def forward(self, x):
        return F.log_softmax(self.a(x), -1)


class CrossEntropyOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, V)

    def forward(self, x):
        logits = self.a(x)
        tgt = torch.arange(x.shape[1]).expand(x.shape[0], -1) % V
        return F.cross_entropy(logits.reshape(-1, V), tgt.reshape(-1))


MODULES = [FusedSwiGLU, MoE, DispatchMoE, RoutedMoEBlock, SortedMoEBlock, InterleavedGLU, Conv1dMix, LinearTranspose, TiedInOut, Cat2Proj, Lora, SeqMLP,
           SharedLayers, WeightSlice, EinsumExperts, SoftCapLM, PosFromMask, ScaleViewed, InplaceMLP, ShapeBranch, DictOut,
           Dropout, NoGradBlock, Sequential, ConvNet, Conv2dNet, GroupNormAfter, BatchNormAfter, ArgmaxHidden,
           LogSoftmaxHead, CrossEntropyOut]
