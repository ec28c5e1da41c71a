"""A column-parallel linear whose output is gathered (the LM head's logits), computed straight
into its place in the gathered output.

Unfused, each rank's GEMM writes its piece of the logits into a buffer of its own (31 MiB for
4 x 128 tokens of a 32000 vocabulary at tp 2), which the gather then copies into the gathered
output: fresh memory every call, whose pages the kernel maps one fault at a time, and one more
pass over the piece. BLAS writes a matrix with any row stride, so where the gather is a sum of
zero-filled outputs (DeepSpeed's shared-memory kernel, which only sums), the piece is computed
where it lands instead (``torch.mm(..., out=...)`` on its columns of the output), the other columns are
zeroed and the output summed in place. Llama-191M, prefill 4 x 128, tp 2, MKL, shared memory,
10 alternating calls per rank: 1029 ms (962-1141) against 1048 (995-1171) unfused.

Over gloo it is not done: a piece computed in place is strided there, and gloo sends only
contiguous memory, so it went out slab by slab through staging buffers, each rank in step with
the other's receives; that cost what the fresh buffer had (1055 against 1062 ms, within the
spread).

The product is the same GEMM on the same operands (``mm`` / ``addmm``, which ``F.linear`` runs on
CPU): bit for bit the unfused piece. The pass runs with the stock kernels only (oneDNN's op
writes no ``out``); where a call cannot be fused (another collective path, autograd, autocast,
mixed dtypes) it runs as the linear and the gather it replaced.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from autotp.collectives import ALL_GATHER, GATHERED_LINEAR, Communicator

__all__ = ["GATHERED_LINEAR", "GatheredLinear", "fuse_gathered_linears"]


class GatheredLinear(nn.Module):
    """``all_gather(F.linear(x, weight, bias), dim)`` along the output's last dim, computed in place."""

    def __init__(self, comm: Communicator) -> None:
        super().__init__()
        self.comm = comm

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], dim: int,
                replicas: int = 1, size: Optional[int] = None) -> torch.Tensor:
        if _fusable(x, weight, bias, dim, replicas) and self.comm.sums_gathers(x.dtype):
            whole = _gathered_in_place(self.comm, x, weight, bias)
        else:
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


def _gathered_in_place(comm: Communicator, x: torch.Tensor, weight: torch.Tensor,
                       bias: Optional[torch.Tensor]) -> torch.Tensor:
    width, rank = weight.shape[0], dist.get_rank(comm.group)
    whole = x.new_empty(list(x.shape[:-1]) + [width * comm.world_size])
    if whole.numel() == 0:
        return whole
    own = whole.narrow(-1, rank * width, width)
    rows, flat = own.view(-1, width), x.reshape(-1, x.shape[-1])
    if bias is None:
        torch.mm(flat, weight.t(), out=rows)
    else:
        torch.addmm(bias, flat, weight.t(), out=rows)
    for peer in range(comm.world_size):  # summed: adding zeros is exact
        if peer != rank:
            whole.narrow(-1, peer * width, width).zero_()
    return comm.all_reduce_(whole)


def fuse_gathered_linears(gm: fx.GraphModule) -> int:
    """Where gathers are sums (the fast all-reduce), replace each gather of a linear's output,
    where the gather is the linear's only use, by one :class:`GatheredLinear` call (which checks
    the rest at each call); returns how many. Leaves generating
    the code to the caller (as the kernel passes do)."""
    gather = getattr(gm, ALL_GATHER, None)
    if gather is None or gather.comm.fast is None:  # gathered by sends and receives: nothing to gain
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
