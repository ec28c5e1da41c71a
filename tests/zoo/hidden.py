"""Ops over a projection's output dim, the one a column-parallel layer would shard: scans, sorts,
norms, softmax, reductions, reorderings (flip, roll, index_select, a transposing reshape), padding,
unfold, outer products, complex numbers and FFTs. Each must be refused, or computed exactly.

Every module here is ``x -> a -> op -> b`` (:class:`Projected`): ``a`` projects to ``width``
columns, ``op`` reads them (and may call ``b`` on them and combine the result with a statistic
of them), ``b`` projects ``op``'s columns back. The table :data:`OPS` is the zoo."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.sizes import DIM

Op = Callable[[torch.Tensor, nn.Module], torch.Tensor]  # (a's output, b) -> the module's output


class Projected(nn.Module):
    op: Op
    width, out_width = 128, 128

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(DIM, self.width), nn.Linear(self.out_width, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return type(self).op(self.a(x), self.b)


def _topk_scattered(h: torch.Tensor) -> torch.Tensor:
    values, index = h.topk(8, dim=-1)
    return torch.zeros_like(h).scatter(-1, index, values)


def _any_all_count(h: torch.Tensor) -> torch.Tensor:
    return ((h > 2.0).any(-1, keepdim=True).float() + (h > -5).all(-1, keepdim=True).float()
            + (h > 0).sum(-1, keepdim=True))


def _rotated(h: torch.Tensor) -> torch.Tensor:
    c = torch.view_as_complex(h.unflatten(-1, (h.shape[-1] // 2, 2)))
    return torch.view_as_real(c * torch.exp(1j * torch.linspace(0, 1, h.shape[-1] // 2))).flatten(-2)


_INDEX = torch.randperm(128, generator=torch.Generator().manual_seed(0))[:64]

# name -> (op, width of a's output, width b reads)
OPS: dict[str, tuple[Op, int, int]] = {
    "Cumsum": (lambda h, b: b(torch.cumsum(h, dim=-1)), 128, 128),
    "Sort": (lambda h, b: b(h.sort(dim=-1).values), 128, 128),
    "LayerNormOver": (lambda h, b: b(F.layer_norm(h, h.shape[-1:])), 128, 128),
    "Softmax": (lambda h, b: b(h.softmax(-1)), 128, 128),
    "MaxAndMean": (lambda h, b: b(h - h.amax(-1, keepdim=True)) + h.mean(-1, keepdim=True), 128, 128),
    "Roll": (lambda h, b: b(torch.roll(h, shifts=1, dims=-1)), 128, 128),
    "ScaleBySize": (lambda h, b: b(h / h.shape[-1]), 128, 128),
    "TimesSum": (lambda h, b: b(F.relu(h)) * F.relu(h).sum(-1, keepdim=True), 128, 128),
    "IndexSelect": (lambda h, b: b(h.index_select(-1, _INDEX)), 128, 64),
    "Flip": (lambda h, b: b(h.flip(-1)), 128, 128),
    "TransposingReshape": (lambda h, b: b(h.unflatten(-1, (8, 16)).transpose(-1, -2).flatten(-2)), 128, 128),
    "L2Normalize": (lambda h, b: b(F.normalize(h, dim=-1)), 128, 128),
    "TopkScatter": (lambda h, b: b(_topk_scattered(h)), 128, 128),
    "Standardize": (lambda h, b: b((h - h.mean(-1, keepdim=True)) / h.std(-1, keepdim=True)), 128, 128),
    "VarAndNorm": (lambda h, b: b(h) * h.var(-1, keepdim=True, unbiased=False) + h.norm(dim=-1, keepdim=True),
                   128, 128),
    "ProdAndLogsumexp": (lambda h, b: b(torch.sigmoid(h) + 0.5) * (torch.sigmoid(h) + 0.5).prod(-1, keepdim=True)
                         + torch.logsumexp(h, -1, keepdim=True), 16, 16),
    "MedianAndKth": (lambda h, b: b(h) + h.median(-1, keepdim=True).values + h.kthvalue(3, -1, keepdim=True).values,
                     128, 128),
    "AnyAllCount": (lambda h, b: b(h) * _any_all_count(h), 128, 128),
    "CummaxLogcumsumexp": (lambda h, b: b(torch.cummax(torch.sigmoid(h), -1).values
                                          + torch.logcumsumexp(torch.sigmoid(h), -1)), 128, 128),
    "Diff": (lambda h, b: b(torch.diff(h, dim=-1)), 128, 127),
    "Pad": (lambda h, b: b(F.pad(h, (1, 1))), 128, 130),
    "UnfoldMean": (lambda h, b: b(h) + h.unfold(-1, 4, 4).mean(-1).sum(-1, keepdim=True), 128, 128),
    "Outer": (lambda h, b: b((h.unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)), 16, 256),
    "ComplexRotation": (lambda h, b: b(_rotated(h)), 128, 128),
    "FFT": (lambda h, b: b(torch.fft.irfft(torch.fft.rfft(h, dim=-1) * 0.5, n=h.shape[-1], dim=-1)), 128, 128),
}

MODULES = [type(name, (Projected,), {"op": staticmethod(op), "width": width, "out_width": out_width})
           for name, (op, width, out_width) in OPS.items()]
