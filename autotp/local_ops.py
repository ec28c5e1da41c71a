"""Rank-aware implementations of ops whose sharded form is not the op on local tensors.

A rule names one of these in ``Out.local_op``; the rewrite replaces the node's target by it
and passes ``rank`` and ``world_size``. Each returns this rank's part of the result as the
rule's placement describes it (here: a summand of the full result, ``Partial``).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

__all__ = ["LOCAL_OPS", "LOOKUPS", "vocab_parallel_embedding", "vocab_parallel_index", "partial_mean"]


def vocab_parallel_embedding(
    weight: torch.Tensor, indices: torch.Tensor, padding_idx: int = -1, scale_grad_by_freq: bool = False,
    sparse: bool = False, *, rank: int, world_size: int, whole_rows: Optional[int] = None,
) -> torch.Tensor:
    """Lookup in this rank's rows ``[rank * V/N, (rank + 1) * V/N)`` of a ``(V, H)`` table.

    Ids owned by other ranks read row 0 and are then zeroed, so summing over ranks (the
    all-reduce the planner puts after this node) gives the full lookup. An id outside the whole
    table (``whole_rows``, V) raises, as the unsharded lookup does: no rank owns it, and the sum
    would be a row of zeros.
    """
    _check_ids(indices, 0, whole_rows)
    outside, local = _rows_held(indices, weight.shape[0], rank)
    out = torch.ops.aten.embedding.default(weight, local)
    return out.masked_fill_(outside.unsqueeze(-1), 0)


def vocab_parallel_index(table: torch.Tensor, indices: list, *, rank: int, world_size: int,
                         whole_rows: Optional[int] = None) -> torch.Tensor:
    """``table[idx]`` on this rank's rows of a table sharded on dim 0 (``weight[position_ids]``):
    the rows of other ranks read row 0 and are zeroed, so the sum over ranks is the full lookup.
    Negative ids count from the end of the whole table, as they do unsharded; ids outside
    ``[-V, V)`` raise, as they do unsharded."""
    (ids,) = indices
    _check_ids(ids, -whole_rows if whole_rows is not None else 0, whole_rows)
    rows = table.shape[0]
    outside, local = _rows_held(torch.where(ids < 0, ids + rows * world_size, ids), rows, rank)
    return table[local].masked_fill_(outside.reshape(outside.shape + (1,) * (table.dim() - 1)), 0)


def _check_ids(ids: torch.Tensor, low: int, high: Optional[int]) -> None:
    """Raise (without a host sync on an accelerator) unless every id is in ``[low, high)``."""
    if high is not None:
        torch._assert_async(((ids >= low) & (ids < high)).all(),
                            f"index out of range: a vocabulary-parallel lookup takes ids in [{low}, {high})")


def _rows_held(ids: torch.Tensor, rows: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which ids fall outside this rank's ``rows`` rows, and every id as a local row (0 for those)."""
    start = rank * rows
    outside = (ids < start) | (ids >= start + rows)
    return outside, torch.where(outside, torch.zeros_like(ids), ids - start)


_NARROW = (torch.float16, torch.bfloat16)  # float types torch reduces in float32


def partial_mean(x: torch.Tensor, dim: Optional[list[int]] = None, keepdim: bool = False, *,
                 dtype: Optional[torch.dtype] = None, rank: int, world_size: int) -> torch.Tensor:
    """This rank's summand of a mean over dims that include the sharded one: its chunk's sum
    over (its chunk's count x ``world_size``), so that summing over ranks (the all-reduce after
    this node) gives the mean. That divisor is the whole count when each chunk is one rank's,
    and the whole count x r when r ranks share each chunk (and add it r times)."""
    reduced = range(x.dim()) if not dim else dim
    count = math.prod(x.shape[d] for d in reduced) * world_size
    if x.dtype in _NARROW and dtype in (None, x.dtype):
        # torch accumulates a half-precision mean in float32; so must a rank's piece of it: its chunk's
        # sum can overflow float16 where the mean does not, but the sum over the count cannot
        return (torch.sum(x, dim, keepdim, dtype=torch.float32) / count).to(x.dtype)
    return torch.sum(x, dim, keepdim, dtype=dtype) / count


LOCAL_OPS: dict[str, Callable[..., torch.Tensor]] = {
    "vocab_parallel_embedding": vocab_parallel_embedding,
    "vocab_parallel_index": vocab_parallel_index,
    "partial_mean": partial_mean,
}

# The local ops that are a vocabulary-parallel lookup (the planner names their tables' style).
LOOKUPS = frozenset({"vocab_parallel_embedding", "vocab_parallel_index"})
