"""Whether a captured graph serves a call: export's input guards, checked before the call.

torch.export makes a graph valid for a region of input sizes. Where the model branches on a
size (a sliding window full or not yet full, a size it specialises to a constant), export
records a guard, and the graph it returns asserts them all on each call (its ``_guards_fn``).
autotp keeps, per kind of call, every graph it captured (its *variants*) and runs the first
whose guards hold; a call that none serves is captured again with its own sizes.

A rank's graph takes its pieces of sharded inputs (a cache sharded by heads), so the rewrite
drops ``_guards_fn``; :class:`Guards` checks the same code on the call's *global* view: the
pieces' shapes with each sharded dim at its whole size.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import torch
from torch.utils import _pytree as pytree

from autotp.errors import AutotpError

__all__ = ["Guards", "Sized", "value_at"]

Recorded = tuple[list[str], list[tuple]]  # (guard code, the input path of each flat argument)


class Sized:
    """A tensor seen by its shape only: what the guards read of a cache piece's global view
    (a data-less tensor costs ~5 us to make; a decode step checks one per cached layer)."""

    __slots__ = ("shape", "dtype")

    def __init__(self, shape: Any, dtype: torch.dtype) -> None:
        self.shape, self.dtype = torch.Size(shape), dtype

    def size(self, dim: Optional[int] = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self.shape)

    def as_tensor(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


class Guards:
    """Export's input guards for one graph (``recorded`` as :mod:`autotp.capture` records
    them; ``None``: the graph has none)."""

    def __init__(self, recorded: Optional[Recorded]) -> None:
        self.recorded = recorded
        self._check = None
        # guards that read more than sizes (strides, ...) get data-less tensors instead of Sized
        methods = {m for code in (recorded[0] if recorded else []) for m in re.findall(r"\]\.(\w+)\(", code)}
        self._reads_tensors = bool(methods - {"size", "dim"})
        if recorded is not None and recorded[0]:
            from torch.export._unlift import _convert_guards_code_to_fn

            self._check = _convert_guards_code_to_fn(list(recorded[0]), list(recorded[1]))

    @classmethod
    def of_captured(cls, captured: Any) -> "Guards":
        """The guards of a fresh capture (a :class:`autotp.capture.Captured`)."""
        checks = any(n.op == "call_module" and n.target == "_guards_fn" for n in captured.graph_module.graph.nodes)
        if checks and captured.guards is None:  # this torch hides them: no call could be checked
            raise AutotpError("this torch does not let autotp read the input guards of its captures")
        return cls(captured.guards)

    def hold(self, inputs: Mapping[str, Any]) -> bool:
        """Whether every guard holds for ``inputs`` (keyword arguments at their global shapes)."""
        if self._check is None:
            return True
        args = [value_at(inputs, path) for path in self.recorded[1]]
        if self._reads_tensors:
            args = [a.as_tensor() if isinstance(a, Sized) else a for a in args]
        try:
            self._check(*args)
        except AssertionError:
            return False
        return True

    def __repr__(self) -> str:
        codes = self.recorded[0] if self.recorded else []
        return f"Guards({len(codes)} checks)"


def value_at(inputs: Mapping[str, Any], path: tuple) -> Any:
    """The value at a pytree key path (``['past_keys'][3]``) of keyword arguments."""
    value: Any = inputs
    for entry in path:
        if isinstance(entry, pytree.MappingKey):
            value = value[entry.key]
        elif isinstance(entry, pytree.SequenceKey):
            value = value[entry.idx]
        elif isinstance(entry, pytree.GetAttrKey):
            value = getattr(value, entry.name)
        else:
            raise AutotpError(f"an input guard reads an input at {pytree.keystr(path)}, which autotp cannot follow")
    return value
