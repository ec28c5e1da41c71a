"""``run_ranks``: run a test worker on N real processes joined by a gloo process group.

A thin wrapper over :func:`autotp.launch.run_local` (spawned processes, file rendezvous,
one-minute group timeout, process group destroyed in ``finally``). A rank that raises fails
the test with its traceback. Workers must be top-level functions; their results must pickle.
"""

from __future__ import annotations

from typing import Any, Callable

from autotp.launch import RankFailed, run_local


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 600) -> list[Any]:
    try:
        return run_local(fn, world_size, *args, timeout=timeout)
    except RankFailed as exc:
        raise AssertionError(f"a rank failed:\n{exc}") from None
