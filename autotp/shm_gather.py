"""A gather over shared memory, for the ranks that sum over DeepSpeed's shared-memory kernel.

That kernel only sums, so a gather used to be a sum: each rank wrote its piece into a
zero-filled output and the outputs were summed. For the logits of 1 x 128 tokens of a 32000
vocabulary at tp 2 that is 8 MiB of zeros written and a 16 MiB sum, whose kernel copies the
whole output into shared memory and back. Here each rank copies only its piece into a segment
of its own that every rank maps (or computes it there: :mod:`autotp.gathered_linear`), the ranks
meet, and each copies every piece into its output: no zeros, and half the bytes moved.

*Meeting* is a sum of a few zeros over the fast kernel: a rank returns from a sum only once
every rank has entered it (it has read their values), so after the first meeting every piece
is written, and after the second every rank has read every other's segment, which may then be
written again. Copies are exact, and unlike a sum with zeros they keep ``-0.0``.

Segments are created on the first gather and grown (to a power of two, every rank together: a
gather is collective, so each rank asks for the same size at the same call) when a larger one
comes; they are files in ``/dev/shm`` unlinked once every rank has mapped them, so the memory
goes when the last rank holding it exits, killed or not. Their memory is reserved when they are
made (``posix_fallocate``): where ``/dev/shm`` is too small on any rank (a container's default
is 64 MiB, and a long prompt's logits take more), every rank gathers that size over the process
group instead, with a warning, where writing into an unreserved segment would end the process
with a bus error.
"""

from __future__ import annotations

import mmap
import os
import secrets
import warnings
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

__all__ = ["SharedGather"]

_MIN_BYTES = 1 << 20


class SharedGather:
    """One rank's side of gathers through shared memory.

    ``meet`` returns once every rank of ``group`` has called it (the fast kernel's sum of zeros);
    the segments are set up over ``group`` itself (a process group of ranks on this machine).
    """

    def __init__(self, group: Optional[dist.ProcessGroup], world_size: int, meet: Callable[[], None]) -> None:
        self.group, self.world_size, self.meet = group, world_size, meet
        self.rank = dist.get_rank(group)
        self._segments: list[mmap.mmap] = []
        self._nbytes = 0
        self._too_large = float("inf")  # the smallest size some rank could not reserve

    def slot(self, shape: list[int], dtype: torch.dtype) -> Optional[torch.Tensor]:
        """This rank's segment as a contiguous tensor of ``shape``: where its piece goes; or
        ``None`` on every rank where some rank cannot reserve that much shared memory (gather
        another way). Every rank must call it with the same shape (it grows the segments together)."""
        nbytes = max(1, torch.Size(shape).numel()) * dtype.itemsize
        if nbytes > self._nbytes and not self._grow(nbytes):
            return None
        return self._view(self.rank, shape, dtype)

    def gather(self, piece: torch.Tensor, dim: int, replicas: int = 1) -> torch.Tensor:
        """Every rank's piece (each in its :meth:`slot`) concatenated along ``dim``; with
        ``replicas`` ranks sharing each chunk, the chunk of the first of them."""
        self.meet()  # every piece is written
        shape = list(piece.shape)
        whole = piece.new_empty(shape[:dim] + [shape[dim] * (self.world_size // replicas)] + shape[dim + 1:])
        for chunk, owner in enumerate(range(0, self.world_size, replicas)):
            source = piece if owner == self.rank else self._view(owner, shape, piece.dtype)
            whole.narrow(dim, chunk * shape[dim], shape[dim]).copy_(source)
        self.meet()  # every rank has read every segment: each may be written again
        return whole

    def _view(self, rank: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        count = torch.Size(shape).numel()
        return torch.frombuffer(self._segments[rank], dtype=dtype, count=count).view(shape)

    def _grow(self, nbytes: int) -> bool:
        """New segments of at least ``nbytes`` on every rank (collective, over the process
        group); ``False`` on every rank where some rank cannot reserve its segment."""
        if nbytes >= self._too_large:
            return False
        size = max(_MIN_BYTES, 1 << (nbytes - 1).bit_length())
        name = f"/dev/shm/autotp_gather_{os.getuid()}_{os.getpid()}_{secrets.token_hex(6)}"
        fd, error = None, ""
        try:
            fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            os.posix_fallocate(fd, 0, size)  # a full /dev/shm fails here, not at the first write
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc.strerror or exc}"
        answers: list[Any] = [None] * self.world_size  # (segment name, why it could not be made) per rank
        dist.all_gather_object(answers, (name, error), group=self.group)
        try:
            failed = [f"rank {r}: {why}" for r, (_, why) in enumerate(answers) if why]
            if failed:
                self._too_large = nbytes
                warnings.warn(f"autotp: /dev/shm cannot hold a {size / 2**20:.0f} MiB gather segment "
                              f"({'; '.join(failed)}): gathers of {nbytes / 2**20:.1f} MiB or more go over the "
                              "process group (slower); a larger /dev/shm (docker run --shm-size) avoids it")
                return False
            segments = []
            for peer_name, _ in answers:
                peer = fd if peer_name == name else os.open(peer_name, os.O_RDWR)
                try:
                    segments.append(mmap.mmap(peer, size))
                finally:
                    if peer != fd:
                        os.close(peer)
            dist.barrier(group=self.group)  # every rank has mapped every segment
        finally:
            if fd is not None:
                os.close(fd)
                os.unlink(name)
        self._segments, self._nbytes = segments, size
        return True
