"""DeepSpeed's shared-memory all-reduce (``pip install 'autotp[fast]'``) as a rank's fast path:
every rank loads and initialises the kernel together, or none does, and a self-check decides.
:func:`autotp.collectives.select_all_reduce` chooses between it and the process group."""

from __future__ import annotations

import os
import platform
import warnings
from typing import Any, Callable

import torch
import torch.distributed as dist

from autotp.shm_kernel import KernelUnavailable, load_kernel

__all__ = ["FastAllReduce", "deepspeed_all_reduce", "prebuild_fast_path"]

FastAllReduce = Callable[[torch.Tensor], object]


def deepspeed_all_reduce(world_size: int) -> FastAllReduce:
    """DeepSpeed's kernel, initialised and checked on every rank.

    Every rank must take the same path: a rank inside the kernel's ``initialize`` waits, with
    no timeout, for every other rank's segment. So the ranks agree (over the process group)
    before it, and if one cannot use the kernel, none does. (After it, a rank whose self-check
    fails falls back alone; :func:`autotp.group.init_tp` then finds the ranks' paths differ
    and puts every rank on the process group.)

    Raises:
        ImportError: DeepSpeed is not installed (here; another rank's reason is named).
        KernelUnavailable: this rank or another cannot use the kernel.
    """
    try:
        kernel, reason = _usable_kernel(world_size), None
    except (ImportError, KernelUnavailable) as exc:
        kernel, reason = None, exc
    except Exception as exc:  # a broken install: this rank must still answer the others
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        kernel, reason = None, KernelUnavailable(f"DeepSpeed's shared-memory kernel failed to load: "
                                                 f"{type(exc).__name__}: {first}")
    if not _every_rank(kernel is not None):
        raise reason or KernelUnavailable("another rank cannot use DeepSpeed's shared-memory all-reduce")
    kernel.initialize(world_size, dist.get_rank())  # waits until every rank's segment exists
    all_reduce = torch.ops.deepspeed.inference_all_reduce_
    probe = torch.full((8,), float(dist.get_rank() + 1))
    all_reduce(probe)
    # Every rank has now mapped every rank's segment (its init waits for all of them).
    dist.barrier()
    _unlink_own_segment()
    if not torch.equal(probe, torch.full((8,), world_size * (world_size + 1) / 2)):
        raise KernelUnavailable("DeepSpeed's shared-memory all-reduce failed its self-check")
    if _vector_level(kernel) < 2:  # its bf16/fp16 sums need AVX-512BW: those go to the process group
        return lambda x: all_reduce(x) if x.dtype == torch.float32 else dist.all_reduce(x)
    return all_reduce


def _usable_kernel(world_size: int) -> Any:
    """This rank's kernel module, if this rank can run it."""
    kernel = load_kernel()
    if not (hasattr(kernel, "initialize") and hasattr(torch.ops.deepspeed, "inference_all_reduce_")):
        raise KernelUnavailable("this DeepSpeed's shared-memory kernel lacks initialize() or "
                                "torch.ops.deepspeed.inference_all_reduce_: upgrade DeepSpeed")
    # The kernel maps the ranks' segments only when LOCAL_SIZE says every rank is local (an
    # all-reduce without them crashes the process); it names them after MASTER_ADDR/PORT,
    # which torchrun sets.
    os.environ.setdefault("LOCAL_SIZE", str(world_size))
    if os.environ["LOCAL_SIZE"] != str(world_size):
        raise KernelUnavailable(f"LOCAL_SIZE={os.environ['LOCAL_SIZE']} but {world_size} ranks share this machine, "
                                "so DeepSpeed's shared-memory all-reduce would not map them")
    if _vector_level(kernel) < 1:  # its fp32 sum needs AVX2; without it the kernel faults
        raise KernelUnavailable("this CPU lacks the AVX2 DeepSpeed's shared-memory all-reduce needs")
    return kernel


def _vector_level(kernel: Any) -> int:
    """The vector instructions the kernel may use: 2 with AVX-512BW, 1 with AVX2, else 0. The
    kernel says so itself since DeepSpeed added the check; before, the CPU's flags tell."""
    if hasattr(kernel, "vector_kernel_level"):
        return int(kernel.vector_kernel_level())
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return 2  # what DeepSpeed's own check answers off x86
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return 0
    return 2 if "avx512bw" in flags else 1 if "avx2" in flags else 0


def _every_rank(ok: bool) -> bool:
    """Whether ``ok`` holds on every rank of the world (a collective: all ranks must call it)."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


# The segments this process unlinked. DeepSpeed's kernel initialises once per process (a later
# ``initialize`` returns at once, keeping the first segments), so a second parallelize in the
# process finds its segment already gone: no leak to warn about.
_UNLINKED: set[str] = set()


def _unlink_own_segment() -> None:
    """Remove this rank's shared-memory segment name. DeepSpeed never unlinks it, so every
    run left ~68 MB per rank in /dev/shm until reboot (23 GB here after a day of tests). The
    mappings stay valid; the memory is freed when the last rank using it exits, killed or not."""
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    if name in _UNLINKED:
        return
    try:
        os.unlink(name)
        _UNLINKED.add(name)
    except FileNotFoundError:
        warnings.warn(f"DeepSpeed's shared-memory segment {name} was not found: it may be left in /dev/shm")


def prebuild_fast_path() -> bool:
    """Compile DeepSpeed's shared-memory all-reduce now (it is otherwise built on first use,
    ~25 s here, inside the first ``parallelize``). Returns whether it is available."""
    try:
        load_kernel()
    except (ImportError, KernelUnavailable):
        return False
    return True
