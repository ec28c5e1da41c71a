"""Ops over a projection's output dim, the one a column-parallel layer would shard: scans, sorts,
norms, softmax, reductions, reorderings (flip, roll, index_select, a transposing reshape), padding,
unfold, outer products, complex numbers and FFTs. Each must be refused, or computed exactly."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.sizes import DIM as D


class CumsumAfterCol(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(128, D)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=-1))


class SortAfterCol(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(128, D)

    def forward(self, x):
        return self.b(self.a(x).sort(dim=-1).values)


class NormOverProj(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.ln = nn.LayerNorm(128)
        self.b = nn.Linear(128, D)

    def forward(self, x):
        return self.b(self.ln(self.a(x)))


class SoftmaxOverProj(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(128, D)

    def forward(self, x):
        return self.b(self.a(x).softmax(-1))


class MaxPoolHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(128, D)

    def forward(self, x):
        h = self.a(x)
        return self.b(h - h.amax(-1, keepdim=True)) + h.mean(-1, keepdim=True)


class RollShift(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(128, D)

    def forward(self, x):
        return self.b(torch.roll(self.a(x), shifts=1, dims=-1))


class ScaleByDim(nn.Module):
    """divides by the projection's last dim size (read at run time)"""
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(128, D)

    def forward(self, x):
        h = self.a(x)
        return self.b(h / h.shape[-1])


class SumHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(128, D)

    def forward(self, x):
        h = F.relu(self.a(x))
        return self.b(h) * h.sum(-1, keepdim=True)


class IndexHidden(nn.Module):
    """gather a fixed set of hidden channels"""
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(64, D)
        self.register_buffer("sel", torch.randperm(128)[:64])

    def forward(self, x):
        return self.b(self.a(x).index_select(-1, self.sel))


class FlipHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(128, D)

    def forward(self, x):
        return self.b(self.a(x).flip(-1))


class ReshapeMix(nn.Module):
    """hidden reshaped (B, T, 8, 16) then transposed to mix across the sharded dim"""
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(128, D)

    def forward(self, x):
        B, T, _ = x.shape
        h = self.a(x).view(B, T, 8, 16).transpose(-1, -2).reshape(B, T, 128)
        return self.b(h)


class L2Norm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(128, D)

    def forward(self, x):
        return self.b(F.normalize(self.a(x), dim=-1))


class TopkHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(128, D)

    def forward(self, x):
        h = self.a(x)
        v, i = h.topk(8, dim=-1)
        return self.b(torch.zeros_like(h).scatter(-1, i, v))


class StdHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(128, D)

    def forward(self, x):
        h = self.a(x)
        return self.b((h - h.mean(-1, keepdim=True)) / h.std(-1, keepdim=True))


class VarHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(128, D)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) * h.var(-1, keepdim=True, unbiased=False) + h.norm(dim=-1, keepdim=True)


class ProdHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 16)
        self.b = nn.Linear(16, D)

    def forward(self, x):
        h = torch.sigmoid(self.a(x)) + 0.5
        return self.b(h) * h.prod(-1, keepdim=True) + torch.logsumexp(h, -1, keepdim=True)


class MedianHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(128, D)

    def forward(self, x):
        h = self.a(x)
        return self.b(h) + h.median(-1, keepdim=True).values + h.kthvalue(3, -1, keepdim=True).values


class AnyAllHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(128, D)

    def forward(self, x):
        h = self.a(x)
        flag = (h > 2.0).any(-1, keepdim=True).float() + (h > -5).all(-1, keepdim=True).float() + (h > 0).sum(-1, keepdim=True)
        return self.b(h) * flag


class CumprodHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(128, D)

    def forward(self, x):
        h = torch.sigmoid(self.a(x))
        return self.b(torch.cummax(h, -1).values + torch.logcumsumexp(h, -1))


class DiffHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(127, D)

    def forward(self, x):
        return self.b(torch.diff(self.a(x), dim=-1))


class PadHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(130, D)

    def forward(self, x):
        return self.b(F.pad(self.a(x), (1, 1)))


class UnfoldHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(128, D)

    def forward(self, x):
        h = self.a(x)
        w = h.unfold(-1, 4, 4).mean(-1)  # (B,T,32)
        return self.b(h) + w.sum(-1, keepdim=True)


class OuterHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 16)
        self.b = nn.Linear(256, D)

    def forward(self, x):
        h = self.a(x)
        o = (h.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)
        return self.b(o)


class ComplexHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(128, D)

    def forward(self, x):
        c = torch.view_as_complex(self.a(x).unflatten(-1, (64, 2)))
        c = c * torch.exp(1j * torch.linspace(0, 1, 64))
        return self.b(torch.view_as_real(c).flatten(-2))


class FFTHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 128)
        self.b = nn.Linear(128, D)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.fft.irfft(torch.fft.rfft(h, dim=-1) * 0.5, n=128, dim=-1))


MODULES = [CumsumAfterCol, SortAfterCol, NormOverProj, SoftmaxOverProj, MaxPoolHidden, RollShift, ScaleByDim, SumHidden, IndexHidden, FlipHidden, ReshapeMix, L2Norm, TopkHidden, StdHidden, VarHidden, ProdHidden, MedianHidden, AnyAllHidden, CumprodHidden, DiffHidden, PadHidden, UnfoldHidden, OuterHidden, ComplexHidden, FFTHidden]
