"""Kernel selection, the stage after loading: which CPU GEMM runs each linear layer of a graph.

PyTorch runs an fp32 ``linear`` on CPU with MKL's sgemm. On some CPUs that is far from the
best GEMM torch ships: on this project's AMD EPYC (one thread per rank) oneDNN's GEMM,
reached through ``torch.ops.mkldnn._linear_pointwise`` on the same dense fp32 weight, runs
the ~200M Llama's layers 2.2x faster at prefill sizes (512 x 1024 x 4096: 17.7 ms vs 38.5 ms)
and 1.4x faster on the LM head at one row. The product is the same fp32 computation summed
in another order (~1e-7 relative). Nothing is converted or copied: the weights stay where
loading put them, so memory, ``state_dict`` and the graph cache are unchanged; only the
graph's calls are retargeted.

``AUTOTP_KERNELS`` chooses: ``auto`` (the default: oneDNN when a probe GEMM, 4 ms at start-up,
measures it at least 1.2x faster on every rank of the group), ``onednn`` or ``aten``. The
choice is per group, never per rank: replicated layers must compute bit-identically on every
rank.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from autotp.errors import AutotpError
from autotp.gathered_linear import fuse_gathered_linears
from autotp.loading import _get_attr

__all__ = ["KERNELS", "choose_kernels", "probe_kernels", "use_onednn", "kernel_pass", "onednn_speedup"]

KERNELS = ("auto", "onednn", "aten")
_MIN_SPEEDUP = 1.2  # below it, keep the stock kernel: a win within noise is not worth a change
_aten = torch.ops.aten


def _onednn_available(device: torch.device) -> bool:
    return (device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _stock_only(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """A call the oneDNN op would get wrong: it knows neither autocast nor autograd, and reads
    fp32 only."""
    return (x.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))))


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on oneDNN (on PyTorch's own kernel under autocast or
    autograd, or for another dtype)."""
    if _stock_only(x, weight, bias):
        return F.linear(x, weight, bias)
    return _onednn(x, weight, bias)


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_matmul(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight (+ bias)`` for a 2-D ``x`` and a weight stored [in, out] (GPT-2's Conv1D).
    One row stays on MKL: oneDNN reads that layout slower there (0.15 vs 0.10 ms for
    768 x 3072), and 2x faster from two rows on."""
    if x.shape[0] == 1 or _stock_only(x, weight, bias):
        return torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)
    return _onednn(x, weight.t(), bias)


def _best_ms(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def onednn_speedup() -> float:
    """MKL time / oneDNN time for a 32 x 1024 -> 512 fp32 linear here (best of 3 each, about
    4 ms in all); 0 when oneDNN's result is not the same product. (1024 outputs took 8 ms, a
    start-up cost on every rank, and measured 1.66-1.87x where 512 measure 1.62-1.79x.)"""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1024, generator=generator)
    weight = torch.randn(512, 1024, generator=generator)
    reference, ours = F.linear(x, weight), _onednn(x, weight)
    if not torch.allclose(reference, ours, rtol=1e-4, atol=1e-4 * float(reference.abs().max())):
        return 0.0
    return _best_ms(lambda: F.linear(x, weight)) / _best_ms(lambda: _onednn(x, weight))


def choose_kernels(device: torch.device) -> str:
    """This rank's choice, ``onednn`` or ``aten``, from ``AUTOTP_KERNELS`` (and a probe).

    Raises:
        AutotpError: ``AUTOTP_KERNELS`` is not a known value, or asks for oneDNN where it
            cannot run.
    """
    choice = os.environ.get("AUTOTP_KERNELS", "auto")
    if choice not in KERNELS:
        raise AutotpError(f"AUTOTP_KERNELS={choice!r}: expected one of {', '.join(KERNELS)}")
    if choice == "aten" or not _onednn_available(device):
        if choice == "onednn":
            raise AutotpError(f"AUTOTP_KERNELS=onednn needs a CPU device and torch built with oneDNN, "
                              f"enabled (got {device})")
        return "aten"
    return "onednn" if choice == "onednn" else probe_kernels(device)[0]


def probe_kernels(device: torch.device, probes: int = 1) -> tuple[str, float]:
    """What ``auto`` chooses here, and the probe's speed-up (the median of ``probes`` probes)
    it rests on: ``onednn`` from ``_MIN_SPEEDUP`` up, else ``aten`` (also where oneDNN is not
    available or cannot run the probe, with a speed-up of 0)."""
    if not _onednn_available(device):
        return "aten", 0.0
    try:
        speedup = sorted(onednn_speedup() for _ in range(probes))[probes // 2]
    except RuntimeError:  # oneDNN could not run the probe here: keep PyTorch's kernel
        return "aten", 0.0
    return ("onednn" if speedup >= _MIN_SPEEDUP else "aten"), speedup


# ---- the graph rewrite ---------------------------------------------------------------------
# op -> (position of its weight, position of its bias or None, whether the weight is stored
# [in, out] (a matmul's right operand) rather than [out, in] (a linear's), the replacement
# call and its (input, weight, bias) arguments)
_RETARGET: dict[object, tuple[int, Optional[int], bool, Callable, Callable[[tuple], tuple]]] = {
    _aten.linear.default: (1, 2, False, onednn_linear, lambda a: (a[0], a[1], a[2] if len(a) > 2 else None)),
    _aten.addmm.default: (2, 0, True, onednn_matmul, lambda a: (a[1], a[2], a[0])),
    _aten.mm.default: (1, None, True, onednn_matmul, lambda a: (a[0], a[1])),
}


def _attr_tensor(gm: fx.GraphModule, node: object) -> Optional[torch.Tensor]:
    """The tensor a ``get_attr`` node reads; None for any other argument (an activation, a
    constant)."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    value = _get_attr(gm, str(node.target))
    return value if isinstance(value, torch.Tensor) else None


def _loaded_matrix(t: Optional[torch.Tensor]) -> bool:
    # (oneDNN reads a weight with padded rows 2500x slower: 21 s for 17 ms of work)
    return (t is not None and not isinstance(t, torch._subclasses.FakeTensor) and t.dtype == torch.float32
            and t.dim() == 2 and t.device.type == "cpu" and t.is_contiguous() and t.numel() > 0)


def _retargetable(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A call whose weight is a loaded, contiguous fp32 CPU matrix and whose bias, if any, is
    a loaded vector of the output's width: the oneDNN op reads a bias as exactly that, with no
    strides and no broadcasting."""
    rule = _RETARGET.get(node.target) if node.op == "call_function" else None
    if rule is None or node.kwargs or len(node.args) <= rule[0]:
        return False
    weight_at, bias_at, transposed = rule[:3]
    if node.target == _aten.addmm.default and len(node.args) > 3:
        return False  # beta / alpha
    weight = _attr_tensor(gm, node.args[weight_at])
    if not _loaded_matrix(weight):
        return False
    bias_node = node.args[bias_at] if bias_at is not None and len(node.args) > bias_at else None
    if bias_node is None:
        return True
    bias = _attr_tensor(gm, bias_node)
    width = weight.shape[1] if transposed else weight.shape[0]
    return (bias is not None and bias.dtype == torch.float32 and bias.device.type == "cpu"
            and list(bias.shape) == [width] and bias.is_contiguous())


def use_onednn(gm: fx.GraphModule, recompile: bool = True) -> int:
    """Retarget ``gm``'s linears (and matmuls by a weight) to oneDNN; returns how many.
    ``recompile=False`` leaves generating the code to the caller (12 ms for a 600-node graph)."""
    count = 0
    for node in gm.graph.nodes:
        if _retargetable(gm, node):
            call, operands = _RETARGET[node.target][3:]
            node.target, node.args = call, operands(node.args)
            count += 1
    if count and recompile:
        gm.recompile()
    return count


def kernel_pass(kernels: str) -> Callable[[fx.GraphModule], int]:
    """The pass that puts a loaded graph on ``kernels`` (for :func:`autotp.loading.load_into`):
    the linears retargeted to oneDNN, or, on the stock kernels, a gathered linear's GEMM
    writing straight into the gathered output (:mod:`autotp.gathered_linear`)."""
    if kernels == "onednn":
        return lambda gm: use_onednn(gm, recompile=False)
    return fuse_gathered_linears
