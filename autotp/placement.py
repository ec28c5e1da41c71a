"""Placements: how one tensor value is laid out across the ranks of a tensor-parallel group.

The three kinds follow DTensor's vocabulary:

- ``Replicate()``: every rank holds the whole value.
- ``Shard(dim, blocks)``: the value is split along ``dim``. With ``blocks == 1`` rank ``r`` holds
  the ``r``-th contiguous chunk. With ``blocks > 1`` the dimension is a concatenation of equal
  parts (a fused ``q|k|v`` or ``gate|up`` projection) and rank ``r`` holds its chunk of *every*
  part, concatenated. ``blocks`` may also be a tuple of part sizes when the parts differ
  (``q|k|v`` with fewer kv heads).
- ``Partial()``: every rank holds a summand; an all-reduce turns it into ``Replicate()``.

``Shard(dim, blocks, replicas=k)`` splits the dim into ``world_size / k`` chunks only, and
rank ``r`` holds chunk ``r // k``: groups of ``k`` consecutive ranks hold the same chunk. It
is how 2 kv heads serve 4 ranks (each pair of ranks computes the kv head its query heads
read, as vLLM does). ``replicas == world_size`` is ``Replicate()``; going from more replicas
to fewer is a local slice (:func:`refine`), never communication.

``Shard(dim, blocks, whole=(1, 2))`` is a fused dim whose listed blocks every rank holds whole:
a ``q|k|v`` projection with one kv head (multi-query attention) keeps its q heads sharded and
its k and v whole. Only a matmul (which keeps the layout) and the split that takes the blocks
apart accept it: the whole blocks come out ``Replicate()``.

``Shard(dim, padded=True)`` is for a dim that does not split evenly (a vocabulary of 50257
over 2 ranks): every rank holds ``ceil(size / world_size)`` elements, its chunk of the dim and
zeros after the end. Megatron pads its vocabulary the same way. The padding is garbage once
an op has run on it, so only the rules that keep it apart accept such a shard (a matmul whose
output keeps the dim, an elementwise op, the embedding lookup); the gather at the model output
drops it. Anything else refuses it (``autotp.rules.apply_rule``).

``Shard(dim, period=p)`` is a dim that holds a sharded dim merged with the dims before it: a
run of equal blocks of ``p`` elements (as many as the dim holds: a dynamic batch), each split
into chunks, rank ``r`` holding its chunk of every block. Bloom folds its heads into the batch
(``[batch * heads, seq, head_dim]``), a gated-delta-net norm reads ``[batch * seq * heads,
head_dim]``: each rank's rows are those of its heads, in every batch (and position). Only the
rules that keep every block apart accept it (elementwise ops, batched matmuls, views, reductions
over other dims); a view that splits the blocks off again gives a plain shard back.

Placements are frozen dataclasses: hashable, comparable, and printable as ``Shard(2, blocks=3)``,
which is also their JSON form (:func:`parse_placement` reads it back).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

__all__ = ["Placement", "Replicate", "Shard", "Partial", "parse_placement", "block_sizes", "padded_length",
           "valid_length", "zero_padded", "periodic_size", "local_size"]


@dataclass(frozen=True)
class Replicate:
    def __str__(self) -> str:
        return "Replicate()"


@dataclass(frozen=True)
class Partial:
    def __str__(self) -> str:
        return "Partial()"


@dataclass(frozen=True)
class Shard:
    dim: int
    blocks: Union[int, tuple[int, ...]] = 1
    replicas: int = 1
    padded: bool = False  # an uneven dim, every chunk padded to ceil(size / chunks): see above
    whole: tuple[int, ...] = ()  # blocks every rank holds whole (a fused q|k|v's one kv head)
    period: int = 0  # a run of equal blocks of this many elements, each sharded (see above)

    def __post_init__(self) -> None:
        if self.dim < 0:
            raise ValueError(f"Shard dim must be normalised to >= 0, got {self.dim}")
        if self.replicas < 1:
            raise ValueError(f"Shard replicas must be >= 1, got {self.replicas}")
        if isinstance(self.blocks, list):
            object.__setattr__(self, "blocks", tuple(self.blocks))
        if self.padded and (self.blocks != 1 or self.replicas != 1):
            raise ValueError("a padded Shard has one block and no replicas")
        if self.whole:
            object.__setattr__(self, "whole", tuple(sorted(set(self.whole))))
            if self.padded or self.replicas != 1 or not 0 <= self.whole[0] <= self.whole[-1] < self.num_blocks:
                raise ValueError(f"whole blocks {self.whole} of a Shard of {self.num_blocks} blocks, "
                                 f"replicas {self.replicas}")
            if len(self.whole) == self.num_blocks:
                raise ValueError("a Shard with every block whole is Replicate()")
        if self.period and (self.period < 0 or self.blocks != 1 or self.replicas != 1 or self.padded or self.whole):
            raise ValueError(f"a Shard with period {self.period} has one block, no replicas, padding or whole blocks")

    @property
    def num_blocks(self) -> int:
        return len(self.blocks) if isinstance(self.blocks, tuple) else self.blocks

    def with_dim(self, dim: int) -> "Shard":
        return Shard(dim, self.blocks, self.replicas, self.padded, self.whole, self.period)

    def with_blocks(self, blocks: Union[int, tuple[int, ...]]) -> "Shard":
        return Shard(self.dim, blocks, self.replicas, self.padded)

    def chunks(self, world_size: int) -> int:
        """How many different pieces the ranks hold."""
        return world_size // self.replicas

    def __str__(self) -> str:
        extra = ("" if self.blocks == 1 else f", blocks={self.blocks}") + ("" if self.replicas == 1 else f", replicas={self.replicas}")
        whole = f", whole={self.whole}".replace(",)", ")") if self.whole else ""
        period = f", period={self.period}" if self.period else ""
        return f"Shard({self.dim}{extra}{', padded' if self.padded else ''}{whole}{period})"


Placement = Union[Replicate, Shard, Partial]

_SHARD_RE = re.compile(r"^Shard\((\d+)(?:, blocks=(\d+|\([\d, ]*\)))?(?:, replicas=(\d+))?(, padded)?(?:, whole=\(([\d, ]*)\))?(?:, period=(\d+))?\)$")


def parse_placement(text: str) -> Placement:
    """Inverse of ``str(placement)``."""
    if text == "Replicate()":
        return Replicate()
    if text == "Partial()":
        return Partial()
    match = _SHARD_RE.match(text)
    if not match:
        raise ValueError(f"not a placement: {text!r}")
    dim, blocks, replicas = int(match.group(1)), match.group(2), int(match.group(3) or 1)
    if match.group(4):
        return Shard(dim, padded=True)
    if match.group(6):
        return Shard(dim, period=int(match.group(6)))
    whole = tuple(int(b) for b in (match.group(5) or "").split(",") if b.strip())
    if blocks is None:
        return Shard(dim, 1, replicas)
    if blocks.startswith("("):
        return Shard(dim, tuple(int(b) for b in blocks.strip("()").split(",") if b.strip()), replicas, whole=whole)
    return Shard(dim, int(blocks), replicas, whole=whole)


def periodic_size(size, period: int) -> bool:
    """Whether a dim of ``size`` elements (an int, or a sympy expression of dynamic sizes) is a
    whole number of blocks of ``period``: ``16 * s0`` is, for a period of 16 or 8."""
    if isinstance(size, int):
        return size % period == 0
    import sympy

    return sympy.Mod(size, period) == 0


def block_sizes(shard: Shard, size: int) -> list[int]:
    """Global sizes of the parts of a dimension of ``size`` elements laid out as ``shard``."""
    if shard.period:
        if size % shard.period:
            raise ValueError(f"dimension of size {size} is not a run of blocks of {shard.period}")
        return [shard.period] * (size // shard.period)
    if isinstance(shard.blocks, tuple):
        if sum(shard.blocks) != size:
            raise ValueError(f"blocks {shard.blocks} do not add up to dimension size {size}")
        return list(shard.blocks)
    if size % shard.blocks:
        raise ValueError(f"dimension of size {size} does not split into {shard.blocks} blocks")
    return [size // shard.blocks] * shard.blocks


def divides(shard: Shard, size: int, world_size: int) -> bool:
    """Whether every part of a ``size``-long dimension splits evenly into the shard's chunks;
    for a padded shard, whether the dim is one that needs padding (an even one is a plain shard)
    and has a real element for every rank."""
    if shard.padded:  # and every rank holds a real element: not 128 rows over 256 ranks
        return size % world_size != 0 and (world_size - 1) * padded_length(size, world_size) < size
    if shard.period:  # every block splits (a dynamic size holds whole blocks: see periodic_size)
        return shard.period % world_size == 0 and periodic_size(size, shard.period)
    if world_size % shard.replicas:
        return False
    try:
        parts = block_sizes(shard, size)
    except ValueError:
        return False
    return all((p % shard.chunks(world_size) == 0 or b in shard.whole) and p > 0 for b, p in enumerate(parts))



def local_size(shard: Shard, size: int, world_size: int) -> int:
    """Elements a rank holds of a dim of ``size`` laid out as ``shard``: its chunk of every
    block, every block held whole in full; a padded chunk with its padding."""
    if shard.padded:
        return padded_length(size, world_size)
    return sum(p if b in shard.whole else p // shard.chunks(world_size) for b, p in enumerate(block_sizes(shard, size)))


def local_chunk(tensor, shard: Shard, rank: int, world_size: int):
    """Rank ``rank``'s piece of a full ``tensor`` laid out as ``shard`` (a view when possible).

    With several blocks, the rank's chunk of every block is taken and concatenated, so a fused
    ``q|k|v`` weight gives ``q_r|k_r|v_r``.
    """
    return refine(tensor, shard, world_size, rank)


def padded_length(size: int, world_size: int) -> int:
    """Elements every rank holds of a dim of ``size`` laid out as a padded shard."""
    return -(-size // world_size)


def valid_length(shard: Shard, size: int, rank: int, world_size: int) -> int:
    """How many of the elements rank ``rank`` holds of a full dim of ``size`` are real (all of
    them, but for a padded shard)."""
    if not shard.padded:
        return size // shard.chunks(world_size)
    length = padded_length(size, world_size)
    return max(0, min(length, size - rank * length))


def zero_padded(t, dim: int, length: int):
    """``t`` with zeros appended along ``dim`` up to ``length`` (``t`` itself when it is that long)."""
    import torch

    gap = list(t.shape)
    gap[dim] = length - t.shape[dim]
    return torch.cat([t, t.new_zeros(gap)], dim) if gap[dim] else t


def refine(local, shard: Shard, held_replicas: int, rank: int):
    """From a local tensor held with ``held_replicas`` (the world size for a full tensor) to
    this rank's piece of ``shard`` (fewer replicas): a slice of every block, no communication.
    A padded piece is a copy with zeros after the dim's end."""
    import torch

    if shard.period:  # from a whole value (the only way to one): its chunk of every block
        step = shard.period // held_replicas
        blocks = local.unflatten(shard.dim, (-1, shard.period))
        return blocks.narrow(shard.dim + 1, (rank % held_replicas) * step, step).flatten(shard.dim, shard.dim + 1)
    if shard.padded:  # the range a loader reads, then the zeros it adds
        size = local.shape[shard.dim]
        (start, end), = rank_ranges(shard, size, rank, held_replicas)
        return zero_padded(local.narrow(shard.dim, start, end - start), shard.dim, padded_length(size, held_replicas))
    pieces = [local.narrow(shard.dim, start, end - start)
              for start, end in piece_ranges(shard, local.shape[shard.dim], held_replicas, rank)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, shard.dim)


def rank_ranges(shard: Shard, size: int, rank: int, world_size: int) -> list[tuple[int, int]]:
    """Index ranges of rank ``rank``'s part of a full dim of ``size`` laid out as ``shard``
    (one per block): what a loader reads of a checkpoint tensor."""
    if shard.padded:  # the real elements only: the reader pads the rest with zeros
        start = min(size, rank * padded_length(size, world_size))
        return [(start, start + valid_length(shard, size, rank, world_size))]
    block_sizes(shard, size)  # raises where the layout does not fit the size
    return piece_ranges(shard, size, world_size, rank)


def piece_ranges(shard: Shard, local_size: int, held_replicas: int, rank: int) -> list[tuple[int, int]]:
    """Index ranges, one per block, of rank ``rank``'s piece of ``shard`` within a local dim of
    ``local_size`` held with ``held_replicas`` (the world size for a full tensor).

    Rank ``r`` holds chunk ``r // held_replicas`` and wants chunk ``r // shard.replicas``: the
    piece ``(r % held_replicas) // shard.replicas`` of what it holds.
    """
    if held_replicas % shard.replicas or shard.period:  # a period is cut from a whole value only (refine)
        raise ValueError(f"cannot refine a piece held by {held_replicas} ranks into {shard}")
    count = held_replicas // shard.replicas
    index = (rank % held_replicas) // shard.replicas
    ranges, start = [], 0
    for b, part in enumerate(_local_parts(shard, local_size)):
        step = part // count
        ranges.append((start, start + part) if b in shard.whole else (start + index * step, start + (index + 1) * step))
        start += part
    return ranges


def _local_parts(shard: Shard, local_size: int) -> list[int]:
    """Block sizes of a dim held as ``local_size`` elements (global blocks scaled down)."""
    if isinstance(shard.blocks, tuple):
        total = sum(shard.blocks)
        return [b * local_size // total for b in shard.blocks]
    return [local_size // shard.blocks] * shard.blocks
