"""Start N local ranks without torchrun: ``autotp verify`` and the tests use this.

Ranks are ``torch.multiprocessing`` "spawn" processes that rendezvous through a file in a
temporary directory (no port to collide on) and join a gloo group with a timeout. A rank that
raises reports its traceback; :func:`run_local` raises :class:`RankFailed` with every failed
rank's report. The function and its arguments must pickle (top-level functions).
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_mod
import sys
import tempfile
import time
import traceback
import zlib
from typing import Any, Callable

import torch.multiprocessing as mp

from autotp.errors import AutotpError

__all__ = ["run_local", "RankFailed"]


class RankFailed(AutotpError):
    """One or more ranks raised; the message holds their tracebacks (or one-line errors)."""


def _entry(rank: int, world_size: int, init_file: str, timeout_s: float, fn: Callable, args: tuple, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    # this rank's stderr (fd 2 too, for native code) goes to a file the parent reads if it dies
    log = open(f"{init_file}.stderr.{rank}", "w", buffering=1)
    os.dup2(log.fileno(), 2)
    sys.stderr = log
    # MASTER_ADDR/PORT name shared-memory segments (DeepSpeed's all-reduce): unique per launch
    port = str(20000 + zlib.crc32(init_file.encode()) % 40000)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        try:
            # plain pickle copies tensors into the message; the queue's own pickler would
            # share their memory, which dies with this process
            results.put((rank, "ok", pickle.dumps(fn(rank, world_size, *args))))
        finally:
            dist.destroy_process_group()
    except AutotpError as exc:
        results.put((rank, "error", f"{type(exc).__name__}: {exc}"))
    except BaseException:  # report every failure, including asserts, to the parent
        results.put((rank, "error", traceback.format_exc()))


def _last_lines(path: str, count: int = 3) -> str:
    """The last lines a rank wrote to stderr (autotp's own messages first, if any)."""
    try:
        lines = [line.strip() for line in open(path, errors="replace") if line.strip()]
    except OSError:
        return ""
    ours = [line for line in lines if "autotp: error" in line]
    return " | ".join((ours or lines)[-count:])


def run_local(fn: Callable, world_size: int, *args: Any, timeout: float = 600, group_timeout: float = 60) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local processes.

    Returns:
        What each rank returned, by rank.

    Raises:
        RankFailed: a rank raised, or not every rank finished within ``timeout`` seconds.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_entry, args=(r, world_size, init_file, group_timeout, fn, args, results))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        collected: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(collected) < world_size:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - collected.keys())
                    raise RankFailed(f"ranks {missing} did not finish within {timeout:.0f} s")
                try:
                    rank, status, value = results.get(timeout=1)
                    collected[rank] = (status, value)
                except queue_mod.Empty:
                    for rank, p in enumerate(procs):  # a rank killed before it could report
                        if rank not in collected and not p.is_alive() and p.exitcode not in (0, None):
                            last = _last_lines(f"{init_file}.stderr.{rank}")
                            collected[rank] = ("error", f"died with exit code {p.exitcode}" + (f": {last}" if last else ""))
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    by_message: dict[str, list[int]] = {}
    for r, (status, value) in sorted(collected.items()):
        if status == "error":
            by_message.setdefault(value, []).append(r)
    if by_message:  # the same error on every rank is reported once
        raise RankFailed("\n".join(f"rank{'s' if len(rs) > 1 else ''} {','.join(map(str, rs))}: {m}"
                                   for m, rs in by_message.items()))
    return [pickle.loads(collected[r][1]) for r in range(world_size)]
