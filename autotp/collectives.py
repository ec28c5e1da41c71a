"""The collectives the rewrite inserts into a graph, as small modules holding their group.

They are ``call_module`` nodes (``autotp_all_reduce``) so the graph can be counted and printed,
and so the process group lives on the module rather than in a global. At world size 1 they
are the identity. They are for inference: no autograd through the reduction.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from autotp.group import PeerFailure, describe_failure

__all__ = ["AllReduce", "AllGather", "ALL_REDUCE", "ALL_GATHER", "count_collectives"]

ALL_REDUCE = "autotp_all_reduce"


class AllReduce(nn.Module):
    """Sum over the tensor-parallel group: ``Partial()`` in, ``Replicate()`` out.

    The input is the fresh output of a row-parallel matmul with no other user, so it is reduced
    in place (no copy).
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, world_size: int = 1) -> None:
        super().__init__()
        self.group = group
        self.world_size = world_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            _run(lambda: dist.all_reduce(x, group=self.group), self.group)
        return x

    def extra_repr(self) -> str:
        return f"world_size={self.world_size}"


def _run(collective: Callable[[], object], group: Optional[dist.ProcessGroup]) -> None:
    """Run a collective; if a peer has stopped, fail with an error that names it."""
    try:
        collective()
    except (RuntimeError, dist.DistError) as exc:
        raise PeerFailure(describe_failure(group, exc)) from exc


def count_collectives(graph_module: torch.fx.GraphModule) -> dict[str, int]:
    """Number of collective call sites in a rewritten graph, by kind."""
    kinds = {ALL_REDUCE: "all_reduce", ALL_GATHER: "all_gather"}
    counts: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and node.target in kinds:
            counts[kinds[node.target]] = counts.get(kinds[node.target], 0) + 1
    return counts


ALL_GATHER = "autotp_all_gather"


class AllGather(nn.Module):
    """Concatenate every rank's shard along ``dim``: ``Shard(dim)`` in, ``Replicate()`` out."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, world_size: int = 1) -> None:
        super().__init__()
        self.group = group
        self.world_size = world_size

    def forward(self, x: torch.Tensor, dim: int, replicas: int = 1) -> torch.Tensor:
        if self.world_size == 1:
            return x
        x = x.contiguous()
        pieces = [torch.empty_like(x) for _ in range(self.world_size)]
        _run(lambda: dist.all_gather(pieces, x, group=self.group), self.group)
        return torch.cat(pieces[::replicas], dim)  # ranks sharing a chunk hold the same piece

    def extra_repr(self) -> str:
        return f"world_size={self.world_size}"
