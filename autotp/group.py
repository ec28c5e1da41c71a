"""The tensor-parallel process group and the checks every rank runs together.

Only this module, :mod:`autotp.runtime`, :mod:`autotp.module`, :mod:`autotp.rewrite` and
:mod:`autotp.loading` know about ranks.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from autotp.errors import AutotpError
from autotp.plan import Plan

__all__ = ["TPContext", "init_tp", "agree", "check_same_plan", "share_rng", "PeerFailure", "register", "mark_failed",
           "describe_failure", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = float(os.environ.get("AUTOTP_TIMEOUT", "300"))


@dataclass
class TPContext:
    """Where this process sits in the tensor-parallel group."""

    rank: int
    tp_size: int
    group: Optional[dist.ProcessGroup]
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.tp_size > 1


def init_tp(tp_size: Optional[int] = None, device: Optional[torch.device] = None) -> TPContext:
    """Join (or start) the process group that torchrun describes in the environment.

    Without torchrun (no ``WORLD_SIZE``) and no process group, this is a group of one.
    gloo is used on CPU, nccl on CUDA. ``tp_size`` defaults to the world size; a smaller one
    must divide it, and consecutive ranks form each tensor-parallel group.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT_S))
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
    register(ctx)
    return ctx


def agree(ctx: TPContext, fn: Callable[[], Any]) -> Any:
    """Run a check on every rank; if any rank fails it, every rank raises (naming the failed
    ranks) instead of the healthy ones waiting in the next collective."""
    error, value = None, None
    try:
        value = fn()
    except AutotpError as exc:
        error = str(exc)
    errors: list[Any] = [error]
    if ctx.distributed:
        errors = [None] * ctx.tp_size
        dist.all_gather_object(errors, error, group=ctx.group)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        raise AutotpError("; ".join(f"rank {r}: {e}" for r, e in failed) if ctx.distributed else failed[0][1])
    return value


def check_same_plan(plan: Plan, ctx: TPContext) -> None:
    """Every rank plans on its own; a disagreement would compute garbage, so fail loudly."""
    if not ctx.distributed:
        return
    digest = hashlib.sha256(plan.to_json(indent=None).encode()).hexdigest()
    digests: list[Any] = [None] * ctx.tp_size
    dist.all_gather_object(digests, digest, group=ctx.group)
    if len(set(digests)) != 1:
        raise AutotpError(f"ranks computed different plans ({sorted(set(digests))}); "
                          "every rank must build the same model and call it with the same inputs")


def share_rng(ctx: TPContext) -> None:
    """Give every rank rank 0's random state, so sampling draws the same tokens everywhere."""
    if not ctx.distributed:
        return
    state = [torch.get_rng_state() if ctx.rank == 0 else None]
    dist.broadcast_object_list(state, src=dist.get_global_rank(ctx.group, 0) if ctx.group else 0, group=ctx.group)
    torch.set_rng_state(state[0])


class PeerFailure(AutotpError):
    """A collective failed because another rank stopped; the message names it when it can."""


def _store() -> Any:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no process group, or a store this torch cannot reach
        return None


def register(ctx: TPContext) -> None:
    """Record where this rank runs, so that a peer can tell later whether it died."""
    store = _store()
    if store is not None and ctx.distributed:
        store.set(f"autotp/where/{dist.get_rank()}", f"{socket.gethostname()}:{os.getpid()}")


def mark_failed(reason: str) -> None:
    """Record that this rank is about to stop with an error (read by the peers it leaves)."""
    store = _store()
    if store is not None and dist.is_initialized():
        try:
            store.set(f"autotp/failed/{dist.get_rank()}", reason[:300])
        except Exception:  # the store may be gone too; the peers still see the connection drop
            pass


def describe_failure(group: Optional[dist.ProcessGroup], error: BaseException) -> str:
    """Which ranks of ``group`` raised (they recorded it) or died (their process is gone)."""
    store, me = _store(), dist.get_rank() if dist.is_initialized() else 0
    ranks = [r for r in (dist.get_process_group_ranks(group) if group is not None else range(dist.get_world_size())) if r != me]
    found: list[str] = []
    deadline = time.monotonic() + 3  # a peer that just died may still be on its way out
    while store is not None and not found and time.monotonic() < deadline:
        found = _stopped_peers(store, ranks)
        if not found:
            time.sleep(0.2)
    cause = "; ".join(found) or "a peer rank stopped or timed out"
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return f"rank {me}: a collective failed: {cause} ({first})"


def _stopped_peers(store: Any, ranks: list[int]) -> list[str]:
    found = []
    for rank in ranks:
        try:
            if store.check([f"autotp/failed/{rank}"]):
                found.append(f"rank {rank} raised {store.get(f'autotp/failed/{rank}').decode()}")
            elif store.check([f"autotp/where/{rank}"]) and not _alive(store.get(f"autotp/where/{rank}").decode()):
                found.append(f"rank {rank} died (its process is gone)")
        except Exception:  # the store went away with its host
            break
    return found


def _alive(where: str) -> bool:
    """Whether the process at ``host:pid`` still runs (a zombie does not); True if remote."""
    host, _, pid = where.rpartition(":")
    if host != socket.gethostname():
        return True  # cannot tell from here
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        return True
