"""``run_ranks``: run a function on N real processes joined by a gloo process group.

Ranks are started with ``torch.multiprocessing`` ("spawn"), rendezvous through a file in a
temporary directory (no port to collide on), use gloo with a one-minute timeout, and always
destroy their process group. A rank that raises fails the test with its traceback. Workers
must be top-level functions (spawn pickles them by name); what they return must pickle.
"""

from __future__ import annotations

import datetime
import os
import queue as queue_mod
import tempfile
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

TIMEOUT_S = 60


def _entry(rank: int, world_size: int, init_file: str, fn: Callable, args: tuple, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=TIMEOUT_S),
        )
        try:
            results.put((rank, "ok", fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # report every failure, including asserts, to the parent
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 600) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return their results by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_entry, args=(r, world_size, init_file, fn, args, results)) for r in range(world_size)]
        for p in procs:
            p.start()
        collected: dict[int, tuple[str, Any]] = {}
        try:
            while len(collected) < world_size:
                rank, status, value = results.get(timeout=timeout)
                collected[rank] = (status, value)
        except queue_mod.Empty:
            missing = sorted(set(range(world_size)) - collected.keys())
            raise AssertionError(f"ranks {missing} did not finish within {timeout} s") from None
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    errors = [f"--- rank {r} ---\n{v}" for r, (s, v) in sorted(collected.items()) if s == "error"]
    if errors:
        raise AssertionError("a rank failed:\n" + "\n".join(errors))
    return [collected[r][1] for r in range(world_size)]
