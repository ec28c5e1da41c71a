"""Kernel selection, the stage after loading: which CPU GEMM runs each linear layer of a graph.

PyTorch runs an fp32 ``linear`` on CPU with MKL's sgemm. On some CPUs that is far from the
best GEMM torch ships: on this project's AMD EPYC (one thread per rank) oneDNN's GEMM,
reached through ``torch.ops.mkldnn._linear_pointwise`` on the same dense fp32 weight, runs
the ~200M Llama's layers 2.2x faster at prefill sizes (512 x 1024 x 4096: 17.7 ms vs 38.5 ms)
and 1.4x faster on the LM head at one row. The product is the same fp32 computation summed
in another order (~1e-7 relative). Nothing is converted or copied: the weights stay where
loading put them, so memory, ``state_dict`` and the graph cache are unchanged; only the
graph's calls are retargeted.

``AUTOTP_KERNELS`` chooses: ``auto`` (the default: oneDNN when a probe GEMM, 5 ms at start-up,
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

__all__ = ["KERNELS", "choose_kernels", "use_onednn", "kernel_pass", "onednn_speedup"]

KERNELS = ("auto", "onednn", "aten")
_MIN_SPEEDUP = 1.2  # below it, keep the stock kernel: a win within noise is not worth a change
_aten = torch.ops.aten


def _onednn_available(device: torch.device) -> bool:
    return (device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_matmul(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight (+ bias)`` for a 2-D ``x`` and a weight stored [in, out] (GPT-2's Conv1D).
    One row stays on MKL: oneDNN reads that layout slower there (0.15 vs 0.10 ms for
    768 x 3072), and 2x faster from two rows on."""
    if x.shape[0] == 1:
        return torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)
    return torch.ops.mkldnn._linear_pointwise(x, weight.t(), bias, "none", [], "")


def _best_ms(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def onednn_speedup() -> float:
    """MKL time / oneDNN time for a 32 x 1024 x 1024 fp32 linear here (best of 3 each, about
    5 ms in all); 0 when oneDNN's result is not the same product."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1024, generator=generator)
    weight = torch.randn(1024, 1024, generator=generator)
    reference, ours = F.linear(x, weight), onednn_linear(x, weight)
    if not torch.allclose(reference, ours, rtol=1e-4, atol=1e-4 * float(reference.abs().max())):
        return 0.0
    return _best_ms(lambda: F.linear(x, weight)) / _best_ms(lambda: onednn_linear(x, weight))


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
def _linear_call(args: tuple) -> tuple[Callable, tuple]:
    bias = args[2] if len(args) > 2 else None
    return torch.ops.mkldnn._linear_pointwise.default, (args[0], args[1], bias, "none", [], "")


# op -> (position of its weight, its replacement call and arguments). A linear's weight is
# [out, in]; a matmul's right operand is [in, out].
_RETARGET: dict[object, tuple[int, Callable[[tuple], tuple[Callable, tuple]]]] = {
    _aten.linear.default: (1, _linear_call),
    _aten.addmm.default: (2, lambda a: (onednn_matmul, (a[1], a[2], a[0]))),
    _aten.mm.default: (1, lambda a: (onednn_matmul, (a[0], a[1]))),
}


def _value(gm: fx.GraphModule, node: object) -> Optional[torch.Tensor]:
    """The tensor a ``get_attr`` node reads, or a node's traced value."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":  # a flat attribute after loading, else a dotted path
        value = gm.__dict__.get(node.target)
        if value is None:
            value = gm
            for part in str(node.target).split("."):
                value = getattr(value, part, None)
    else:
        value = node.meta.get("val")
    return value if isinstance(value, torch.Tensor) else None


def _retargetable(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A call whose weight is a loaded fp32 CPU matrix and whose other operands fit oneDNN."""
    rule = _RETARGET.get(node.target) if node.op == "call_function" else None
    if rule is None or node.kwargs or len(node.args) <= rule[0]:
        return False
    weight_node = node.args[rule[0]]
    weight = _value(gm, weight_node) if getattr(weight_node, "op", None) == "get_attr" else None
    if (weight is None or isinstance(weight, torch._subclasses.FakeTensor) or weight.dtype != torch.float32
            or weight.dim() != 2 or weight.device.type != "cpu" or not weight.is_contiguous()):
        return False  # (oneDNN reads a weight with padded rows 2500x slower: 21 s for 17 ms of work)
    if node.target == _aten.addmm.default:
        bias = _value(gm, node.args[0])
        return len(node.args) == 3 and bias is not None and bias.dim() == 1  # no beta/alpha; one bias row
    return True


def use_onednn(gm: fx.GraphModule, recompile: bool = True) -> int:
    """Retarget ``gm``'s linears (and matmuls by a weight) to oneDNN; returns how many.
    ``recompile=False`` leaves generating the code to the caller (12 ms for a 600-node graph)."""
    count = 0
    for node in gm.graph.nodes:
        if _retargetable(gm, node):
            node.target, node.args = _RETARGET[node.target][1](node.args)
            count += 1
    if count and recompile:
        gm.recompile()
    return count


def kernel_pass(kernels: str) -> Optional[Callable[[fx.GraphModule], int]]:
    """The pass that puts a loaded graph on ``kernels`` (for :func:`autotp.loading.load_into`)."""
    return (lambda gm: use_onednn(gm, recompile=False)) if kernels == "onednn" else None
