"""Failure reporting between ranks: who raised, who died.

Every rank records where it runs (host:pid) in the process group's store, and an error raised
inside autotp's calls is recorded before it propagates. When a collective then fails on a
surviving rank, :func:`describe_failure` names the rank that raised (with its error) or died
(its process is gone), so the survivors stop with :class:`PeerFailure` instead of waiting.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from typing import Any, Iterator, Optional

import torch.distributed as dist

from autotp.errors import AutotpError

__all__ = ["PeerFailure", "register", "mark_failed", "clear_failed", "note_call_raised", "last_call_raised",
           "describe_failure", "Watchdog"]

# How long a rank waits in a shared-memory collective before it ends itself: for a peer whose
# process is gone, and for a peer that raised but still runs (its caller may have caught the
# error and be on its way to the next call, which clears the mark).
DEAD_PEER_GRACE_S = 2.0
RAISED_PEER_GRACE_S = 30.0


class PeerFailure(AutotpError):
    """A collective failed because another rank stopped; the message names it when it can."""


def _store() -> Any:
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no process group, or a store this torch cannot reach
        return None


def register() -> None:
    """Record where this rank runs, so that a peer can tell later whether it died."""
    store = _store()
    if store is not None and dist.is_initialized() and dist.get_world_size() > 1:
        store.set(f"autotp/where/{dist.get_rank()}", f"{socket.gethostname()}:{os.getpid()}")


# whether this process recorded a failure in the store (so that a clean call costs no round trip)
_recorded = threading.Event()
# whether this process's last autotp call raised (its own error or a peer's): a collective it
# started may still be pending, and shutting the process group down would wait on the peers
_last_call_raised = threading.Event()


def note_call_raised() -> None:
    """Note that an autotp call on this rank is ending in an error (see :func:`last_call_raised`)."""
    _last_call_raised.set()


def last_call_raised() -> bool:
    """Whether this process's last autotp call raised, so that a collective of it may be left
    pending: then the process group is left to the process's exit (autotp.group)."""
    return _last_call_raised.is_set()


def mark_failed(reason: str) -> None:
    """Record that this rank is about to stop with an error (read by the peers it leaves)."""
    store = _store()
    if store is not None and dist.is_initialized():
        try:
            store.set(f"autotp/failed/{dist.get_rank()}", reason[:300])
            _recorded.set()
        except Exception:  # the store may be gone too; the peers still see the connection drop
            pass


def clear_failed() -> None:
    """Take back this rank's failure record: it is making another call, so the error it raised
    before was handled (a refusal every rank raised and the caller caught)."""
    _last_call_raised.clear()
    if not _recorded.is_set():
        return
    store = _store()
    if store is not None and dist.is_initialized():
        with contextlib.suppress(Exception):
            store.delete_key(f"autotp/failed/{dist.get_rank()}")
            _recorded.clear()


def describe_failure(group: Optional[dist.ProcessGroup], error: BaseException) -> str:
    """Which ranks of ``group`` raised (they recorded it) or died (their process is gone)."""
    store, me = _store(), dist.get_rank() if dist.is_initialized() else 0
    ranks = _peers(group, me)
    found: list[str] = []
    deadline = time.monotonic() + 3  # a peer that just died may still be on its way out
    while store is not None and not found and time.monotonic() < deadline:
        found = _stopped_peers(store, ranks)
        if not found:
            time.sleep(0.2)
    cause = "; ".join(found) or "a peer rank stopped or timed out"
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return f"rank {me}: a collective failed: {cause} ({first})"


def _peers(group: Optional[dist.ProcessGroup], me: int) -> list[int]:
    """The global ranks of ``group`` (the whole world when None) other than ``me``."""
    ranks = dist.get_process_group_ranks(group) if group is not None else range(dist.get_world_size())
    return [r for r in ranks if r != me]


def _stopped_peers(store: Any, ranks: list[int], *, waited: float = float("inf")) -> list[str]:
    """Peers that raised or died, described. A peer that raised but still runs counts only once
    this rank has ``waited`` :data:`RAISED_PEER_GRACE_S` (it may have caught its error)."""
    found = []
    for rank in ranks:
        try:
            alive = not store.check([f"autotp/where/{rank}"]) or _alive(store.get(f"autotp/where/{rank}").decode())
            if store.check([f"autotp/failed/{rank}"]) and (not alive or waited >= RAISED_PEER_GRACE_S):
                found.append(f"rank {rank} raised {store.get(f'autotp/failed/{rank}').decode()}")
            elif not alive:
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


class Watchdog(threading.Thread):
    """Guards a rank waiting in a collective that cannot time out (DeepSpeed's shared-memory
    all-reduce spins on flags): if it has waited ``grace`` seconds and a peer has raised or
    died, print the error naming it and end the process, instead of waiting forever."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, grace: float = DEAD_PEER_GRACE_S) -> None:
        super().__init__(name="autotp-watchdog", daemon=True)
        self.group, self.grace = group, grace
        self._since: Optional[float] = None
        self.start()

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        self._since = time.monotonic()
        try:
            yield
        finally:
            self._since = None

    def run(self) -> None:
        while True:
            time.sleep(0.5)
            since = self._since
            if since is None or time.monotonic() - since < self.grace:
                continue
            store, me = _store(), dist.get_rank()
            waited = time.monotonic() - since
            found = _stopped_peers(store, _peers(self.group, me), waited=waited) if store is not None else []
            if found and self._since is not None:
                sys.stderr.write(f"[rank {me}] autotp: error: PeerFailure: rank {me}: a collective failed: "
                                 f"{'; '.join(found)} (waited {time.monotonic() - since:.0f} s in shared memory)\n")
                sys.stderr.flush()
                os._exit(1)
