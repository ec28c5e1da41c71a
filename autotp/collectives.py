"""The collectives the rewrite inserts into a graph, and how a rank runs them.

A :class:`Communicator` holds the tensor-parallel process group and, on one machine, an
optional fast all-reduce: DeepSpeed's shared-memory kernel (``pip install 'autotp[fast]'``),
~90x faster than gloo for a decode step's 4 KiB vectors here. ``AUTOTP_ALLREDUCE`` chooses:
``auto`` (the default: the fast kernel when it is installed, all ranks are on this machine
and a self-check passes), ``deepspeed`` (required), or ``gloo`` (the process group).
Over gloo on CPU, where each rank on this machine has a core of its own, a rank waits for an
all-reduce by polling it and yielding the core between polls (:func:`wait_polled`), not by
sleeping until gloo's worker thread wakes it (see :func:`polling_pays`).
``AUTOTP_REDUCE_DTYPE=float32`` sums bf16 and fp16 partial results in fp32 (each rank's
partial is widened, summed and rounded once), at twice the bytes moved; by default a value is
summed in its own dtype, as Hugging Face's ``tp_plan`` and DeepSpeed do.

The inserted ops are ``call_module`` nodes (``autotp_all_reduce``, ``autotp_all_gather``) so the
graph can be counted and printed and the communicator lives on the module, not in a global.
At world size 1 they are the identity. They are for inference: no autograd through them.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from autotp.errors import AutotpError
from autotp.health import PeerFailure, Watchdog, describe_failure
from autotp.fast_allreduce import FastAllReduce, deepspeed_all_reduce
from autotp.shm_gather import SharedGather
from autotp.shm_kernel import KernelUnavailable

__all__ = ["Communicator", "AllReduce", "AllGather", "ALL_REDUCE", "ALL_GATHER", "GATHERED_LINEAR", "count_collectives",
           "select_all_reduce", "reduce_dtype_from_env", "polling_pays", "wait_polled", "usable_cores",
           "cgroup_cpu_limit"]

ALL_REDUCE = "autotp_all_reduce"
ALL_GATHER = "autotp_all_gather"
GATHERED_LINEAR = "autotp_gathered_linear"  # a linear and the gather of its output (autotp.gathered_linear)
_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# How long a polled wait polls before it blocks as usual: longer than an all-reduce of a
# prefill's activations takes here (~1-5 ms), short enough that a peer that is late (or gone,
# which only the blocking wait's timeout reports) costs little CPU.
POLL_LIMIT_S = 0.01


class Communicator:
    """How this rank sums and gathers over its tensor-parallel group."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, world_size: int = 1,
                 fast: Optional[FastAllReduce] = None, name: str = "process group",
                 reduce_dtype: Optional[torch.dtype] = None, poll: bool = False) -> None:
        self.group, self.world_size, self.fast, self.name = group, world_size, fast, name
        self.reduce_dtype = reduce_dtype  # sum narrower floating values in this dtype
        self.poll = poll  # wait for the process group's all-reduces with wait_polled
        # the fast path cannot time out: a watchdog ends this rank if a peer stops meanwhile
        self.watchdog = Watchdog(group) if fast is not None else None
        # with the fast path, gathers copy through shared memory (the kernel only sums)
        self.shared_gather = (SharedGather(group, world_size, self._meet)
                              if fast is not None and world_size > 1 else None)
        self._zeros = torch.zeros(8)

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the group, in place."""
        wide = self.reduce_dtype
        if self.world_size > 1 and wide is not None and x.is_floating_point() and x.element_size() < wide.itemsize:
            return x.copy_(self.all_reduce_(x.to(wide)))
        if self.world_size > 1:
            if self.fast is not None and x.dtype in _FAST_DTYPES and x.is_contiguous():
                with self.watchdog.waiting():
                    _run(lambda: self.fast(x), self.group)
            elif self.poll:
                _run(lambda: wait_polled(dist.all_reduce(x, group=self.group, async_op=True)), self.group)
            else:
                _run(lambda: dist.all_reduce(x, group=self.group), self.group)
        return x

    def _meet(self) -> None:
        """Return once every rank has called this: a sum of zeros over the fast kernel."""
        self.all_reduce_(self._zeros)

    def all_gather(self, x: torch.Tensor, dim: int, replicas: int = 1) -> torch.Tensor:
        """Concatenate every rank's ``x`` along ``dim`` (one piece per chunk when ``replicas``
        ranks share each). With the fast all-reduce, through shared memory
        (:mod:`autotp.shm_gather`)."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        rank = dist.get_rank(self.group)
        dim = dim % x.dim()
        if x.numel() == 0:
            return x.new_empty(self._gathered_shape(x, dim, replicas))
        piece = self.shared_gather.slot(list(x.shape), x.dtype) if self.shared_gather is not None else None
        if piece is not None:
            piece.copy_(x)
            return self.shared_gather.gather(piece, dim, replicas)  # type: ignore[union-attr]
        if dist.get_backend(self.group) == "gloo":
            return self._exchange(x, dim, replicas, rank)
        pieces = [torch.empty_like(x) for _ in range(self.world_size)]
        _run(lambda: dist.all_gather(pieces, x, group=self.group), self.group)
        return torch.cat(pieces[::replicas], dim)  # ranks sharing a chunk hold the same piece

    def _exchange(self, x: torch.Tensor, dim: int, replicas: int, rank: int) -> torch.Tensor:
        """The gather over gloo as direct sends: each chunk's first holder sends it to every
        other rank, which receives it straight into place when the chunk is contiguous there
        (a gather along the leading dims), else in slabs of rows through a small staging
        buffer (see :func:`_receive_strided`).

        gloo's ``all_gather`` writes into a flat buffer it allocates, then copies out each
        piece, and the pieces are concatenated again: three passes over the whole output (the
        logits: 62.5 MiB for 4 x 128 tokens of a 32000 vocabulary). Receiving a piece whole
        into a buffer of its own cost a fresh 31 MiB, whose pages the kernel maps one fault at
        a time (~1.5 us each here, 12 ms for the buffer)."""
        whole = x.new_empty(self._gathered_shape(x, dim, replicas))
        if whole.numel() == 0:
            return whole
        owners = range(0, self.world_size, replicas)  # ranks within the group
        in_place = whole.narrow(dim, 0, x.shape[dim]).is_contiguous()  # a chunk along the leading dims
        rows = math.prod(x.shape[:dim]) if in_place else _slab_rows(x, dim)  # in place: one slab

        def exchange() -> None:
            sends = ([dist.isend(slab, group=self.group, group_dst=peer) for peer in range(self.world_size)
                      if peer != rank for slab in _slabs(x, dim, rows)] if rank in owners else [])
            for chunk, owner in enumerate(owners):
                place = whole.narrow(dim, chunk * x.shape[dim], x.shape[dim])
                if owner == rank:
                    place.copy_(x)
                elif in_place:
                    dist.recv(place, group=self.group, group_src=owner)
                else:  # gloo receives into contiguous memory only
                    _receive_strided(place, dim, rows, self.group, owner)
            for send in sends:
                send.wait()

        with torch.profiler.record_function("autotp::all_gather"):  # one collective to a profiler, not its messages
            _run(exchange, self.group)
        return whole

    def _gathered_shape(self, x: torch.Tensor, dim: int, replicas: int) -> list[int]:
        shape = list(x.shape)
        shape[dim] *= self.world_size // replicas
        return shape


# The slab a strided piece of a gather travels in over gloo: small enough that its staging
# buffers come from memory the allocator reuses rather than fresh pages, large enough that a
# message's own cost (~30 us here) is small against moving it.
SLAB_BYTES = 1 << 20


def _slab_rows(x: torch.Tensor, dim: int) -> int:
    """How many rows (one per index of the dims before ``dim``) one slab of ``x`` holds."""
    return max(1, SLAB_BYTES // max(1, math.prod(x.shape[dim:]) * x.element_size()))


def _as_rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` (a contiguous piece, or its place: a slice along ``dim`` of a contiguous output) as
    a 2-D view, one row per index of the dims before ``dim``, each row contiguous. A view, never
    a copy: ``view`` raises where one is not possible, so nothing lands in a copy unseen."""
    return t.view(math.prod(t.shape[:dim]), -1)


def _slabs(x: torch.Tensor, dim: int, rows: int) -> tuple[torch.Tensor, ...]:
    """``x`` (contiguous) as consecutive slabs of ``rows`` rows, each contiguous: sent as views."""
    return _as_rows(x, dim).split(rows)


def _receive_strided(place: torch.Tensor, dim: int, rows: int, group: Optional[dist.ProcessGroup],
                     owner: int) -> None:
    """Receive ``owner``'s piece into ``place``, a non-contiguous slice of the gathered output,
    slab by slab as :func:`_slabs` sends it: each slab lands in one of two staging buffers and
    is copied into place while the next one arrives."""
    target = _as_rows(place, dim)
    staging = [place.new_empty(min(rows, target.shape[0]), target.shape[1]) for _ in range(2)]
    landing: Optional[tuple[Any, torch.Tensor, torch.Tensor]] = None
    for i, into in enumerate(target.split(rows)):
        buffer = staging[i % 2][: into.shape[0]]
        posted = (dist.irecv(buffer, group=group, group_src=owner), buffer, into)
        if landing is not None:
            _land(*landing)
        landing = posted
    if landing is not None:
        _land(*landing)


def _land(work: Any, buffer: torch.Tensor, into: torch.Tensor) -> None:
    work.wait()
    into.copy_(buffer)


def reduce_dtype_from_env() -> Optional[torch.dtype]:
    """``AUTOTP_REDUCE_DTYPE``: ``float32`` to sum narrower partial results in fp32; unset or
    ``auto``: each value in its own dtype."""
    chosen = os.environ.get("AUTOTP_REDUCE_DTYPE", "auto").strip().lower()
    if chosen in ("", "auto"):
        return None
    if chosen in ("float32", "fp32"):
        return torch.float32
    raise AutotpError(f"AUTOTP_REDUCE_DTYPE={chosen!r}: expected auto or float32")


def select_all_reduce(group: Optional[dist.ProcessGroup], world_size: int,
                      device: torch.device) -> tuple[Optional[FastAllReduce], str]:
    """The fast all-reduce to use, if any, and the name of the path chosen."""
    choice = os.environ.get("AUTOTP_ALLREDUCE", "auto")
    if choice not in ("auto", "deepspeed", "gloo"):
        raise AutotpError(f"AUTOTP_ALLREDUCE={choice!r}: expected auto, deepspeed or gloo")
    backend = dist.get_backend(group) if dist.is_initialized() else "none"
    usable = world_size > 1 and group is None and device.type == "cpu" and _local_ranks() == dist.get_world_size()
    if choice == "gloo" or not usable:
        if choice == "deepspeed" and not usable:
            raise AutotpError("AUTOTP_ALLREDUCE=deepspeed needs CPU tensors and every rank of the world on this machine")
        return None, backend
    try:
        fast = deepspeed_all_reduce(world_size)
    except ImportError:
        if choice == "deepspeed":
            raise AutotpError("AUTOTP_ALLREDUCE=deepspeed needs DeepSpeed: pip install 'autotp[fast]'") from None
        return None, backend
    except KernelUnavailable as exc:
        if choice == "deepspeed":
            raise AutotpError(f"AUTOTP_ALLREDUCE=deepspeed: {exc}") from None
        warnings.warn(f"{exc}: using the process group")
        return None, backend
    return fast, "deepspeed shared memory"


def polling_pays(group: Optional[dist.ProcessGroup], device: torch.device) -> bool:
    """Whether this rank should wait for the process group's all-reduces by polling: gloo on
    CPU, with no more ranks on this machine than cores this process may run on
    (:func:`usable_cores`).

    A blocking wait sleeps until gloo's worker thread signals the end of the work, and on this
    2-core machine waking a sleeping rank costs more than the sum itself: an all-reduce of 4
    KiB after a 0.22 ms GEMM added 1.05-1.16 ms to it blocking and 0.74-0.91 ms polling (2 MiB
    after a 10.7 ms GEMM: 4.4-4.9 and 3.0-3.6 ms). Polling keeps the rank's core busy while it
    waits, which only pays where the core is its own: with more ranks than cores, the core
    would be taken from the rank being waited for. (Spinning without yielding was slower than
    blocking: 2.2 ms, as it starved gloo's own threads of the core.)"""
    if device.type != "cpu" or not dist.is_initialized() or dist.get_backend(group) != "gloo":
        return False
    return _local_ranks() <= usable_cores()


def _local_ranks() -> int:
    """How many ranks run on this machine, as torchrun says (the world's size without it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def usable_cores() -> float:
    """The cores this process may run on: its CPU affinity, capped by a container's CPU quota
    (a container limited to 2 CPUs on a 64-core host still sees 64 in its affinity)."""
    try:
        cores: float = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity call (macOS): the machine's count
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    return min(cores, quota) if quota is not None else cores


def cgroup_cpu_limit(path: str = "/sys/fs/cgroup/cpu.max") -> Optional[float]:
    """cgroup v2's CPU limit, in cores (``"200000 100000"``: 2.0), or ``None`` where there is
    none (``"max ..."``) or the file cannot be read."""
    try:
        with open(path) as limits:
            quota, period = limits.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def wait_polled(work: Any, limit_s: float = POLL_LIMIT_S) -> None:
    """Wait for ``work`` (an asynchronous collective's handle) by polling it, yielding the core
    between polls, for up to ``limit_s``; then, or once it is done, by its own ``wait()``, which
    raises what the work raised (a peer's failure, gloo's timeout)."""
    deadline = time.perf_counter() + limit_s
    while not work.is_completed() and time.perf_counter() < deadline:
        os.sched_yield()
    work.wait()


class AllReduce(nn.Module):
    """Sum over the tensor-parallel group: ``Partial()`` in, ``Replicate()`` out.

    The input is the fresh output of a row-parallel matmul (or a vocabulary-parallel lookup)
    with no other user, so it is reduced in place (no copy).
    """

    def __init__(self, comm: Optional[Communicator] = None) -> None:
        super().__init__()
        self.comm = comm or Communicator()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce_(x)

    def extra_repr(self) -> str:
        return f"world_size={self.comm.world_size}, path={self.comm.name}" + (", polled" if self.comm.poll else "")


class AllGather(nn.Module):
    """Concatenate every rank's shard along ``dim``: ``Shard(dim)`` in, ``Replicate()`` out."""

    def __init__(self, comm: Optional[Communicator] = None) -> None:
        super().__init__()
        self.comm = comm or Communicator()

    def forward(self, x: torch.Tensor, dim: int, replicas: int = 1, size: Optional[int] = None) -> torch.Tensor:
        """``size``: the real size of a padded shard's dim; the padding after it is cut."""
        whole = self.comm.all_gather(x, dim, replicas)
        return whole if size is None else whole.narrow(dim, 0, size)

    def extra_repr(self) -> str:
        return f"world_size={self.comm.world_size}, path={self.comm.name}"


def _run(collective: Callable[[], object], group: Optional[dist.ProcessGroup]) -> None:
    """Run a collective; if a peer has stopped, fail with an error that names it."""
    try:
        collective()
    except (RuntimeError, dist.DistError) as exc:
        raise PeerFailure(describe_failure(group, exc)) from exc


def count_collectives(graph_module: torch.fx.GraphModule) -> dict[str, int]:
    """Number of collective call sites in a rewritten graph, by kind."""
    kinds = {ALL_REDUCE: "all_reduce", ALL_GATHER: "all_gather", GATHERED_LINEAR: "all_gather"}
    counts: dict[str, int] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module" and node.target in kinds:
            counts[kinds[node.target]] = counts.get(kinds[node.target], 0) + 1
    return counts
