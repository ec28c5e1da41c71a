"""The tensor-parallel process group and the checks every rank runs together.

Only this module, :mod:`autotp.runtime`, :mod:`autotp.module`, :mod:`autotp.rewrite` and
:mod:`autotp.loading` know about ranks.
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from autotp.collectives import Communicator, _run, polling_pays, reduce_dtype_from_env, select_all_reduce
from autotp.errors import AutotpError
from autotp.health import last_call_raised, register
from autotp.kernels import choose_kernels
from autotp.plan import Plan

__all__ = ["TPContext", "init_tp", "agree", "check_same_plan", "share_rng", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = float(os.environ.get("AUTOTP_TIMEOUT", "300"))


@dataclass
class TPContext:
    """Where this process sits in the tensor-parallel group."""

    rank: int
    tp_size: int
    group: Optional[dist.ProcessGroup]
    device: torch.device
    comm: Communicator = field(default_factory=Communicator)  # what the inserted collectives use
    kernels: str = "aten"  # the GEMM the linears run on (autotp.kernels): the same on every rank

    @property
    def distributed(self) -> bool:
        return self.tp_size > 1


def _destroy_if_still_ours(created: "weakref.ref[dist.ProcessGroup]") -> None:
    """At exit, destroy the default process group :func:`init_tp` started, unless it is gone,
    was replaced by one the user made (theirs to end), or autotp's last call raised.

    Why: a process that leaves a gloo group alive tears it down during interpreter
    finalization, when a gloo worker thread that drops a Python reference can no longer take
    the GIL; the thread is unwound inside C++ that may not throw, and the process aborts
    ("terminate called without an active exception", SIGABRT) after its work is done. It is a
    rare race (one rank of one CI run; none in 35 runs here). ``atexit`` runs before
    finalization, and destroying the group joins its threads while the interpreter is whole.

    Not after a call that raised: destroying waits for every pending collective, and one that
    call left behind ends only when the peers join it or the timeout passes (measured: a rank
    leaving a pending all-reduce waited in the destroy until its peer exited, 15 s later). An
    exit in error leaves at once, as without this handler."""
    if last_call_raised() or not dist.is_initialized():
        return
    if dist.distributed_c10d._get_default_group() is created():
        dist.destroy_process_group()


def init_tp(tp_size: Optional[int] = None, device: Optional[torch.device] = None) -> TPContext:
    """Join (or start) the process group that torchrun describes in the environment.

    Without torchrun (no ``WORLD_SIZE``) and no process group, this is a group of one.
    gloo is used on CPU, nccl on CUDA. ``tp_size`` defaults to the world size; a smaller one
    must divide it, and consecutive ranks form each tensor-parallel group. A group this starts
    is destroyed at exit (see :func:`_destroy_if_still_ours`); one the caller started is theirs.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT_S))
        atexit.register(_destroy_if_still_ours, weakref.ref(dist.distributed_c10d._get_default_group()))
    world = dist.get_world_size() if dist.is_initialized() else 1
    tp = world if tp_size is None else int(tp_size)
    if tp < 1 or world % tp:
        raise ValueError(f"tp_size={tp} must be >= 1 and divide the world size {world}")
    if tp == world:
        rank = dist.get_rank() if dist.is_initialized() else 0
        ctx = TPContext(rank, tp, None, device)
    else:
        group, _ = dist.new_subgroups(group_size=tp)
        ctx = TPContext(dist.get_rank(group), tp, group, device)
    register()
    fast, name, kernels, error, wide = None, "process group", "aten", None, None
    try:  # an error is told to every rank below: the others would wait in the gather
        fast, name = select_all_reduce(ctx.group, tp, device)
        kernels = choose_kernels(device)
        wide = reduce_dtype_from_env()
    except AutotpError as exc:
        error = str(exc)
    names, choices, errors, widths = zip(*_from_every_rank(ctx, (name, kernels, error, str(wide))))
    _raise_failures(ctx, errors)
    if len(set(names)) != 1:  # one path for all, or they would wait on each other forever
        fast, name = None, "process group"
    if len(set(widths)) != 1:
        raise AutotpError(f"AUTOTP_REDUCE_DTYPE differs across ranks: {list(widths)}")
    poll = fast is None and polling_pays(ctx.group, device)
    ctx.comm = Communicator(ctx.group, tp, fast, name, wide, poll)
    ctx.kernels = kernels if len(set(choices)) == 1 else "aten"  # replicated layers must agree bit for bit
    return ctx


def _from_every_rank(ctx: TPContext, value: Any) -> list[Any]:
    """``value`` of every rank of the group, in rank order (``[value]`` for a group of one)."""
    if not ctx.distributed:
        return [value]
    values: list[Any] = [None] * ctx.tp_size
    dist.all_gather_object(values, value, group=ctx.group)
    return values


def agree(ctx: TPContext, fn: Callable[[], Any]) -> Any:
    """Run a check on every rank; if any rank fails it, every rank raises (naming the failed
    ranks) instead of the healthy ones waiting in the next collective."""
    error, value = None, None
    try:
        value = fn()
    except AutotpError as exc:
        error = str(exc)
    _raise_failures(ctx, _from_every_rank(ctx, error))
    return value


def _raise_failures(ctx: TPContext, errors: Sequence[Optional[str]]) -> None:
    """Raise on every rank, naming each rank whose entry in ``errors`` (rank order) is set."""
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        raise AutotpError("; ".join(f"rank {r}: {e}" for r, e in failed) if ctx.distributed else failed[0][1])


def check_same_plan(plan: Plan, ctx: TPContext) -> None:
    """Every rank plans on its own; a disagreement would compute garbage, so fail loudly."""
    if not ctx.distributed:
        return
    digests = _from_every_rank(ctx, hashlib.sha256(plan.to_json(indent=None).encode()).hexdigest())
    if len(set(digests)) != 1:
        raise AutotpError(f"ranks computed different plans ({sorted(set(digests))}); "
                          "every rank must build the same model and call it with the same inputs")


def share_rng(ctx: TPContext) -> None:
    """Give every rank rank 0's random state (the CPU generator's, and the device's when it has
    its own, as CUDA does), so that sampling and dropout draw the same numbers everywhere. One
    broadcast of the states' bytes (5 KiB for the CPU's), which names a peer that stopped."""
    if not ctx.distributed:
        return
    device = _device_generators(ctx.device)
    states = [torch.get_rng_state()] + ([device.get_rng_state(ctx.device)] if device is not None else [])
    packed = torch.cat(states).to(ctx.device)  # nccl sends device memory only
    src = dist.get_global_rank(ctx.group, 0) if ctx.group else 0
    _run(lambda: dist.broadcast(packed, src=src, group=ctx.group), ctx.group)
    cpu_state, device_state = packed.cpu().split([len(states[0]), len(packed) - len(states[0])])
    torch.set_rng_state(cpu_state.clone())
    if device is not None:
        device.set_rng_state(device_state.clone(), ctx.device)


def _device_generators(device: torch.device) -> Any:
    """The module holding ``device``'s own default generators (``torch.cuda``), or None for CPU."""
    if device.type == "cpu":
        return None
    module = torch.get_device_module(device.type)
    return module if hasattr(module, "get_rng_state") else None
