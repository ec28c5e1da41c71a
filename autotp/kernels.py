"""Kernel selection, the stage after loading: which CPU GEMM runs each linear layer of a graph.

PyTorch runs an fp32 ``linear`` on CPU with MKL's sgemm. On some CPUs that is far from the
best GEMM torch ships: on this project's AMD EPYC (2 cores, one thread per rank) oneDNN's
GEMM, with the weight held as a oneDNN tensor, runs the ~200M Llama's layers 2.3-2.4x faster
at prefill sizes and 1.4-1.9x faster at decode (one row). So after loading, each linear whose
weight is only ever used as a linear weight is rewritten to
``torch.ops.mkldnn._linear_pointwise(x, W, b)`` with ``W`` converted once to oneDNN's layout
(the same fp32 values; results differ from MKL's only in summation order, ~1e-7 relative).

``AUTOTP_KERNELS`` chooses: ``auto`` (the default: oneDNN when a probe GEMM measured here is at
least 1.2x faster with it on every rank of the group), ``onednn`` or ``aten``. The choice is
per group, never per rank: replicated layers must compute bit-identically on every rank.

Weights that are views of a memory-mapped checkpoint are copied by the conversion; their file
pages are then dropped (``madvise(MADV_DONTNEED)``), so that the process does not keep both.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import time
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from autotp.errors import AutotpError

__all__ = ["KERNELS", "choose_kernels", "use_onednn", "dense_state", "declared_shape"]

KERNELS = ("auto", "onednn", "aten")
_MIN_SPEEDUP = 1.2  # below it, keep the stock kernel: the layout change is not worth noise
_aten = torch.ops.aten


def _onednn_available(device: torch.device) -> bool:
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _best_ms(fn: Callable[[], object], repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def onednn_speedup() -> float:
    """MKL time / oneDNN time for a 64 x 1024 x 1024 fp32 linear here (about 10 ms in all);
    0 when oneDNN's result is not the same product."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1024, generator=generator)
    weight = torch.randn(1024, 1024, generator=generator)
    packed = weight.to_mkldnn()
    reference, ours = F.linear(x, weight), _onednn_linear(x, packed)
    if not torch.allclose(reference, ours, rtol=1e-4, atol=1e-4 * float(reference.abs().max())):
        return 0.0
    return _best_ms(lambda: F.linear(x, weight)) / _best_ms(lambda: _onednn_linear(x, packed))


def choose_kernels(device: torch.device) -> str:
    """This rank's choice, ``onednn`` or ``aten``, from ``AUTOTP_KERNELS`` (and a probe)."""
    choice = os.environ.get("AUTOTP_KERNELS", "auto")
    if choice not in KERNELS:
        raise AutotpError(f"AUTOTP_KERNELS={choice!r}: expected one of {', '.join(KERNELS)}")
    if choice == "aten" or not _onednn_available(device):
        if choice == "onednn":
            raise AutotpError(f"AUTOTP_KERNELS=onednn needs a CPU device and torch built with oneDNN (got {device})")
        return "aten"
    if choice == "onednn":
        return "onednn"
    return "onednn" if onednn_speedup() >= _MIN_SPEEDUP else "aten"


# ---- the graph rewrite ---------------------------------------------------------------------
# (op, position of the weight, its layout): a linear weight is [out, in], a matmul's right
# operand [in, out] (GPT-2's Conv1D), converted transposed. The rewritten call takes
# (input, weight, bias) from these positions.
_WEIGHT_USES: dict[object, tuple[int, bool, Callable[[tuple], tuple]]] = {
    _aten.linear.default: (1, False, lambda a: (a[0], a[1], a[2] if len(a) > 2 else None)),
    _aten.addmm.default: (2, True, lambda a: (a[1], a[2], a[0])),
    _aten.mm.default: (1, True, lambda a: (a[0], a[1], None)),
}
_TRANSPOSED = "_autotp_onednn_transposed"  # on a converted parameter: it was a matmul's [in, out]


def _weight_use(user: fx.Node, attr: fx.Node) -> Optional[bool]:
    """Whether ``user`` reads ``attr`` as a weight we can convert: None if not, else whether
    the weight is stored [in, out]."""
    rule = _WEIGHT_USES.get(user.target) if user.op == "call_function" else None
    if rule is None or user.kwargs or _attr_positions(user, attr) != [rule[0]]:
        return None
    if user.target == _aten.addmm.default and (len(user.args) > 3 or _dims(user.args[0]) != 1):
        return None  # beta / alpha, or a bias per row
    return rule[1]


def _dims(node: object) -> Optional[int]:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    if value is None and isinstance(node, fx.Node) and node.op == "get_attr":
        value = node.graph.owning_module.__dict__.get(node.target)
    return value.dim() if isinstance(value, torch.Tensor) else None


def _attr_positions(user: fx.Node, attr: fx.Node) -> list[int]:
    return [i for i, a in enumerate(user.args) if a is attr]


def _convertible(t: torch.Tensor) -> bool:
    return (t.dtype == torch.float32 and t.dim() == 2 and t.device.type == "cpu" and t.layout == torch.strided
            and not isinstance(t, torch._subclasses.FakeTensor) and t.numel() > 0)


def use_onednn(gm: fx.GraphModule) -> int:
    """Rewrite ``gm``'s linears to oneDNN and convert their weights; returns how many weights
    it converted. A weight also read any other way stays as it is; a weight another graph of
    the same model already converted (its tensors are shared) is read densely where this
    graph needs it so (``to_dense``), which is exact."""
    tensors = {node: gm.__dict__.get(node.target) for node in gm.graph.nodes if node.op == "get_attr"}
    readers: dict[int, list[tuple[fx.Node, fx.Node]]] = {}
    for attr, value in tensors.items():
        if isinstance(value, torch.Tensor):
            for user in attr.users:
                readers.setdefault(id(value), []).append((attr, user))
    names, mappings = _registered_names(gm), file_mappings()
    converted = 0
    for uses in readers.values():
        value = tensors[uses[0][0]]
        layouts = {_weight_use(user, attr) for attr, user in uses}
        if value.is_mkldnn:
            for attr, user in uses:
                if _weight_use(user, attr) == getattr(value, _TRANSPOSED, False):
                    _rewrite_call(user)
                else:
                    _read_densely(gm, user, attr, value)
            continue
        if len(layouts) != 1 or None in layouts or not _convertible(value):
            continue
        transposed = layouts.pop()
        packed = _to_onednn(value, transposed, mappings)
        for name in names.get(id(value), []):
            _replace_registered(gm, name, packed)
        for attr, user in uses:
            gm.__dict__[attr.target] = packed
            _rewrite_call(user)
        converted += 1
    gm.graph.lint()
    gm.recompile()
    return converted


def _registered_names(gm: fx.GraphModule) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        names.setdefault(id(t), []).append(name)
    return names


def _to_onednn(value: torch.Tensor, transposed: bool, mappings: list[tuple[int, int]]) -> nn.Parameter:
    dense = value.detach().t() if transposed else value.detach()
    packed = nn.Parameter(dense.contiguous().to_mkldnn(), requires_grad=False)
    setattr(packed, _TRANSPOSED, transposed)
    _drop_file_pages(value, mappings)
    return packed


def _replace_registered(gm: fx.GraphModule, name: str, packed: nn.Parameter) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    if attr in owner._parameters:
        owner._parameters[attr] = packed
    else:
        owner._buffers[attr] = packed


def _rewrite_call(user: fx.Node) -> None:
    user.args = (*_WEIGHT_USES[user.target][2](user.args), "none", [], "")
    user.target = torch.ops.mkldnn._linear_pointwise.default


def _read_densely(gm: fx.GraphModule, user: fx.Node, attr: fx.Node, value: torch.Tensor) -> None:
    with gm.graph.inserting_before(user):
        dense = gm.graph.call_function(_aten.to_dense.default, (attr,))
        if getattr(value, _TRANSPOSED, False):
            dense = gm.graph.call_function(_aten.t.default, (dense,))
    user.replace_input_with(attr, dense)


def declared_shape(t: torch.Tensor) -> list[int]:
    """The shape the model declares for ``t`` (a matmul weight converted here is stored transposed)."""
    return list(t.shape)[::-1] if getattr(t, _TRANSPOSED, False) else list(t.shape)


def dense_state(module: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """``module``'s ``state`` (a state_dict hook's) with oneDNN weights back in their dense,
    declared layout. (The entries are detached copies: the layout mark is on the parameter.)"""
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_mkldnn:
            owner_name, _, attr = name.removeprefix(prefix).rpartition(".")
            owner = module.get_submodule(owner_name)
            held = owner._parameters.get(attr, owner._buffers.get(attr))
            dense = value.to_dense()
            state[name] = dense.t().contiguous() if getattr(held, _TRANSPOSED, False) else dense
    return state


# ---- memory ---------------------------------------------------------------------------------
_MADV_DONTNEED = 4  # Linux's value


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def file_mappings() -> list[tuple[int, int]]:
    """Address ranges this process maps from regular files (from ``/proc/self/maps``; none
    where there is no such file)."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[5].startswith("/") and not fields[5].startswith("/dev/"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        pass
    return ranges


def _drop_file_pages(t: torch.Tensor, mappings: list[tuple[int, int]]) -> None:
    """Drop the resident pages of a tensor that is a view of a file mapping, once it has been
    copied. Only whole pages inside the tensor go; reading them again re-reads the file (the
    weights are never written), so no other view of those bytes can see a change."""
    first, last = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    if not any(start <= first and last <= end for start, end in mappings):
        return
    page = mmap.PAGESIZE
    start, end = -(-first // page) * page, last // page * page
    if end > start:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)
