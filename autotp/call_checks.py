"""What a call of a :class:`~autotp.module.TensorParallelModule` must agree with before it runs
a graph, checked on every call (each check costs microseconds):

- **The train/eval mode it was captured in.** A graph keeps what the trace saw: dropout in
  training mode, batch norm's batch statistics or running ones. ``model.eval()`` after
  ``parallelize`` does not reach a captured graph, so the call would compute in the old mode
  (GPT-2 built with ``from_config`` is in training mode: its dropout stayed on). A changed mode
  is refused, naming a module whose flag changed.
- **One calling thread at a time.** The ranks pair their collectives in the order each issues
  them. Two threads calling one rank's model at once interleave their collectives in an order
  the other rank does not share, and each call sums the other's partial results: wrong
  numbers, no error (found by an adversarial review: every call of two threads off, on real
  ranks). Waiting for the first call would not help (the other rank may serve the threads the
  other way round), so a call entering while another thread's runs is refused, on the rank
  where they overlap. Calls nested in one thread (``generate()`` calling the model) pass.
  What no rank can see alone stays the caller's to keep: every rank must make the same calls
  in the same order, as in any program of collectives (two threads taking turns in a
  different order on each rank still pair different calls).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import torch.nn as nn

from autotp.errors import AutotpError

__all__ = ["training_flags", "check_mode", "OneCaller"]


def training_flags(model: nn.Module) -> tuple[bool, ...]:
    """Every module's ``training`` flag, in module order."""
    return tuple(m.training for m in model.modules())


def check_mode(model: nn.Module, captured: tuple[bool, ...]) -> None:
    """Raise if any module of ``model`` is not in the mode ``captured`` recorded."""
    now = training_flags(model)
    if now == captured:
        return
    names = [name for name, _ in model.named_modules()]
    changed = [(name, was) for name, was, is_ in zip(names, captured, now) if was != is_] or [("(structure)", None)]
    name, was = changed[0]
    raise AutotpError(
        f"{type(model).__name__} was captured in {'training' if was else 'eval'} mode and {len(changed)} module(s) "
        f"changed since (first: {name or 'the model itself'}): a captured graph keeps the mode it was traced in "
        "(dropout, batch norm), so set it before parallelize (model.eval() for inference)")


class OneCaller:
    """Admits the calls of one thread at a time (see the module docstring); nested calls of the
    thread already inside pass."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: Optional[int] = None

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        me = threading.get_ident()
        if not self._lock.acquire(blocking=False):
            if self._owner == me:  # nested in this thread's call
                yield
                return
            raise AutotpError("another thread is calling this tensor-parallel model: the ranks pair their "
                              "collectives in the order each calls them, so concurrent calls would sum each "
                              "other's results; call it from one thread at a time")
        self._owner = me
        try:
            yield
        finally:
            self._owner = None
            self._lock.release()
