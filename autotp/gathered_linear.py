"""A column-parallel linear whose output is gathered (the LM head's logits), each rank's piece
computed straight into the memory the gather reads it from.

Unfused, each rank's GEMM writes its piece of the logits into a buffer of its own (31 MiB for
4 x 128 tokens of a 32000 vocabulary at tp 2), which the gather then copies again: fresh memory
every call, whose pages the kernel maps one fault at a time, and one more pass over the piece.
Where gathers go through shared memory (:mod:`autotp.shm_gather`, with DeepSpeed's kernel), the
GEMM writes the piece into this rank's segment instead (``torch.mm(..., out=...)``), from which
every rank copies it into its output.

Over gloo it is not done: gloo sends from a rank's own memory, and the fresh buffer cost what
the alternatives did (computing into the gathered output's columns made the piece strided,
which went out slab by slab through staging buffers: 1055 against 1062 ms, within the spread).

The product is the same GEMM on the same operands (``mm`` / ``addmm``, which ``F.linear`` runs on
CPU): bit for bit the unfused piece. The pass runs with the stock kernels only (oneDNN's op
writes no ``out``); where a call cannot be fused (another collective path, autograd, autocast,
mixed dtypes) it runs as the linear and the gather it replaced.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from autotp.collectives import ALL_GATHER, GATHERED_LINEAR, Communicator
from autotp.shm_gather import SharedGather

__all__ = ["GATHERED_LINEAR", "GatheredLinear", "fuse_gathered_linears"]


class GatheredLinear(nn.Module):
    """``all_gather(F.linear(x, weight, bias), dim)`` along the output's last dim, computed in place."""

    def __init__(self, comm: Communicator) -> None:
        super().__init__()
        self.comm = comm

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dim: int,
                replicas: int = 1, size: Optional[int] = None) -> torch.Tensor:
        shared = self.comm.shared_gather
        whole = (_computed_in_shared_memory(shared, x, weight, bias)
                 if shared is not None and _fusable(x, weight, bias, dim, replicas) else None)
        if whole is None:  # not fusable, or shared memory cannot hold it
            whole = self.comm.all_gather(F.linear(x, weight, bias), dim, replicas)
        return whole if size is None else whole.narrow(dim, 0, size)

    def extra_repr(self) -> str:
        return f"world_size={self.comm.world_size}, path={self.comm.name}"


def _fusable(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dim: int, replicas: int) -> bool:
    """A call the in-place GEMM computes as ``F.linear`` would: one dtype, on CPU, no autograd
    or autocast (an ``out=`` GEMM takes neither), a plain matrix, gathered along its last dim."""
    tensors = [x, weight] + ([bias] if bias is not None else [])
    return (replicas == 1 and x.dim() >= 1 and dim % x.dim() == x.dim() - 1 and weight.dim() == 2
            and (bias is None or bias.dim() == 1)
            and all(t.dtype == x.dtype and t.device.type == "cpu" for t in tensors)
            and x.is_floating_point() and not torch.is_autocast_enabled("cpu")
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)))


def _computed_in_shared_memory(shared: SharedGather, x: torch.Tensor, weight: torch.Tensor,
                               bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    width, shape = weight.shape[0], list(x.shape[:-1])
    if math.prod(shape) * width == 0:  # an empty output: nothing to gather
        return x.new_empty(shape + [width * shared.world_size])
    piece = shared.slot(shape + [width], x.dtype)
    if piece is None:
        return None
    rows, flat = piece.view(-1, width), x.reshape(-1, x.shape[-1])
    if bias is None:
        torch.mm(flat, weight.t(), out=rows)
    else:
        torch.addmm(bias, flat, weight.t(), out=rows)
    return shared.gather(piece, x.dim() - 1)


def fuse_gathered_linears(gm: fx.GraphModule) -> int:
    """Where gathers go through shared memory (the fast all-reduce's path), replace each gather
    of a linear's output, where the gather is the linear's only use, by one
    :class:`GatheredLinear` call (which checks the rest at each call); returns how many. Leaves
    generating the code to the caller (as the kernel passes do)."""
    gather = getattr(gm, ALL_GATHER, None)
    if gather is None or gather.comm.shared_gather is None:  # gathered by sends and receives: nothing to gain
        return 0
    count = 0
    for node in list(gm.graph.nodes):
        if not (node.op == "call_module" and node.target == ALL_GATHER):
            continue
        linear = node.args[0]
        if not (isinstance(linear, fx.Node) and linear.op == "call_function"
                and linear.target == torch.ops.aten.linear.default and len(linear.users) == 1
                and not linear.kwargs and 2 <= len(linear.args) <= 3):
            continue
        if not hasattr(gm, GATHERED_LINEAR):
            gm.add_submodule(GATHERED_LINEAR, GatheredLinear(gather.comm))
        x, weight = linear.args[:2]
        bias = linear.args[2] if len(linear.args) > 2 else None
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_module(GATHERED_LINEAR, (x, weight, bias) + tuple(node.args[1:]))
        fused.meta = dict(node.meta)
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        gm.graph.erase_node(linear)
        count += 1
    return count
