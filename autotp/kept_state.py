"""State a forward keeps in its modules between calls, which a captured graph cannot carry.

A captured graph computes each call from its inputs and the model's tensors as loaded; the
model's ``forward`` never runs again. A forward that keeps state in a module and reads it on
the next call computes something else from the second call on, on every rank and at tp 1 too.
Capture finds two kinds and refuses them (:func:`kept_state`):

- **a buffer given a new tensor** (``self.ema = ...`` on a registered buffer, or
  ``register_buffer`` in forward): export traces the assignment as nothing, so the graph reads
  the buffer as loaded on every call (an EMA kept in forward was off by 0.027, then 0.043);
- **a plain attribute the forward reads as the call before left it, and changes**: a call
  counter, a flag set on the first call, a running value kept in a plain attribute. The graph
  bakes what the capture read (``self.calls += 1`` then ``* self.calls``: the second call was
  1.05 off, the third 2.10).

A plain attribute the forward writes but whose old value it never reads carries nothing into
the call: attention maps kept for inspection, a cache rebuilt on each call, a flag set and
reset within the call. Those are allowed. Telling them apart needs the reads, which only a
descriptor on the class sees; so the export records which plain attributes end the call with
another value than they started with (by identity, or by value for plain scalars), and only if
some do, a second export (:func:`first_reads`) watches those names for a read before the
instance's first write. Models that keep nothing pay for one ``__setattr__`` hook.

A third kind needs no second look: **a list, dict, set or deque attribute changed in place**
(``self.cache.append(k)`` then ``torch.cat(self.cache)``, a count kept in ``self.stats[...]``).
Changing it in place reads the attribute, so it carries the previous call's contents in; the
contents (by item identity) are compared before and after the export. Refused too, even where
the forward only collects (a list of attention maps it never reads back): autotp cannot tell.

Not seen: state kept deeper (a list inside a list, an object's own attributes), outside the
modules (a global, the config), or in a module run whole (:mod:`autotp.opaque` checks those on
each call).
"""

from __future__ import annotations

import collections
import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

from autotp.layer_state import MISSING, Watch

__all__ = ["KeptState", "kept_state"]

_SCALARS = (bool, int, float, complex, str, bytes, type(None))
# what nn.Module itself keeps in its __dict__ or routes elsewhere: not a forward's state
_MODULE_SLOTS = ("_parameters", "_buffers", "_modules")
_CONTAINERS = (list, dict, set, collections.deque, bytearray)


@dataclass
class KeptState:
    """What one export saw the forward keep (see the module docstring)."""

    buffers: list[str] = field(default_factory=list)  # "Class.name" of buffers given a new tensor
    # (id(module.__dict__), name) -> (its class in the model, the value before the call's first write)
    _starts: dict[tuple[int, str], tuple[type, Any]] = field(default_factory=dict)
    _ends: dict[tuple[int, str], Any] = field(default_factory=dict)  # the value last written (export restores the old)
    _read_first: set[tuple[int, str]] = field(default_factory=set)  # names read before written (second pass)
    # "Class.name" -> (the container, its items before the export, its length then)
    _containers: dict[str, tuple[Any, list[Any], int]] = field(default_factory=dict)

    def refusal(self, model: str, second_look: bool) -> Optional[str]:
        """Why the capture of ``model`` is refused, if it is (``second_look``: an export under
        :func:`first_reads`, which alone sees which changed attributes were read first)."""
        kept = "state kept between calls, which a captured graph does not carry"
        if self.buffers:
            return (f"{model}'s forward assigns a new tensor to the buffer(s) {', '.join(self.buffers)}: {kept} (it "
                    "would compute with the loaded value on every call)")
        asked = "pass it in as an input, or keep it out of forward"
        in_place = self.changed_in_place()
        if in_place:
            return (f"{model}'s forward changes {', '.join(in_place)} in place: {kept} (from the second call on it "
                    f"would compute with what the capture read); {asked}")
        carried = self.carried() if second_look else []
        if carried:
            return (f"{model}'s forward reads and changes {', '.join(carried)}: {kept} (from the second call on it "
                    f"would compute with the value the capture read); {asked}")
        return None

    def changed_in_place(self) -> list[str]:
        """``Class.name (n -> m items)`` of each container attribute whose items the export changed."""
        out = []
        for label, (container, before, length) in self._containers.items():
            after = _items(container)
            if len(after) != len(before) or any(a is not b for a, b in zip(after, before)):
                out.append(f"{label} ({length} -> {len(container)} items)")
        return sorted(out)

    def changed(self) -> list[tuple[type, str]]:
        """The (class, name) of plain attributes that end the call with another value."""
        found = {(cls, key[1]) for key, (cls, start) in self._starts.items() if not _same(start, self._ends[key])}
        return sorted(found, key=lambda c: (c[0].__name__, c[1]))

    def carried(self) -> list[str]:
        """``Class.name (before -> after)`` of each changed attribute that the forward read as the
        call before left it (recorded only by an export under :func:`first_reads`)."""
        out = []
        for key, (cls, start) in self._starts.items():
            end = self._ends[key]
            if key in self._read_first and not _same(start, end):
                out.append(f"{cls.__name__}.{key[1]} ({_shown(start)} -> {_shown(end)})")
        return sorted(set(out))


def _current(module: nn.Module, name: str) -> Any:
    """The value ``module.name`` has in its ``__dict__``, else its class's, read without calling
    a descriptor."""
    value = module.__dict__.get(name, MISSING)
    if value is not MISSING:
        return value
    value = inspect.getattr_static(type(module), name, MISSING)
    return value.previous if isinstance(value, _FirstRead) else value


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, _SCALARS):
        return bool(a == b)
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return False


def _items(container: Any) -> list[Any]:
    """A container's contents, to compare by identity: a dict's keys and values, others' items."""
    return [x for pair in container.items() for x in pair] if isinstance(container, dict) else list(container)


def _containers(classes: tuple[type, ...], root: nn.Module) -> dict[str, tuple[Any, list[Any], int]]:
    """The list, dict, set and deque attributes of ``root``'s modules of ``classes``, with their
    items now (nn.Module's own bookkeeping, the names a bare module has, left out)."""
    own = set(nn.Module().__dict__)
    found = {}
    for module in root.modules():
        if not isinstance(module, classes):
            continue
        for name, value in module.__dict__.items():
            if name not in own and isinstance(value, _CONTAINERS):
                found[f"{type(module).__name__}.{name}"] = (value, _items(value), len(value))
    return found


def _shown(value: Any) -> str:
    if value is MISSING:
        return "unset"
    if isinstance(value, torch.Tensor):
        return "a tensor"
    return repr(value) if isinstance(value, _SCALARS) and len(repr(value)) <= 20 else type(value).__name__


@contextlib.contextmanager
def kept_state(root: nn.Module, skipped: frozenset[type] = frozenset(),
               watched: tuple[tuple[type, str], ...] = ()) -> Iterator[KeptState]:
    """Record, while entered, what the modules of ``root``'s classes keep: buffers given a new
    tensor, and (but in ``skipped``, the modules run whole, which autotp.opaque checks on each
    call) plain attributes written, with their value before the first write; with ``watched``
    (class, name) pairs, also which of those names each instance read before writing it. By
    ``isinstance`` and by the instance's ``__dict__``: export's attribute proxy of a module
    subclasses its class and shares its ``__dict__``."""
    every = tuple({type(m) for m in root.modules()} - {nn.Module})  # a bare container would match every module
    known = set(every) - set(skipped)
    classes = tuple(known)
    kept = KeptState(_containers=_containers(classes, root))
    set_attribute, register = nn.Module.__setattr__, nn.Module.register_buffer

    def recording_buffer(self: nn.Module, name: str, tensor: Any, persistent: bool = True) -> None:
        unchanged = tensor is self.__dict__.get("_buffers", {}).get(name)  # x = x.to(its own dtype): itself
        label = f"{type(self).__name__}.{name}"
        if isinstance(self, every) and not unchanged and label not in kept.buffers:
            kept.buffers.append(label)
        register(self, name, tensor, persistent)

    def recording_attribute(self: nn.Module, name: str, value: Any) -> None:
        key = (id(self.__dict__), name)
        if isinstance(self, classes) and (key in kept._starts or _plain_attribute(self, name, value)):
            if key not in kept._starts:
                cls = next(c for c in type(self).__mro__ if c in known)  # the model's class, not export's proxy of it
                kept._starts[key] = (cls, _current(self, name))
            kept._ends[key] = value
        set_attribute(self, name, value)

    nn.Module.register_buffer = recording_buffer  # type: ignore[method-assign]
    nn.Module.__setattr__ = recording_attribute  # type: ignore[method-assign]
    try:
        with first_reads(watched, kept):
            yield kept
    finally:
        nn.Module.register_buffer = register  # type: ignore[method-assign]
        nn.Module.__setattr__ = set_attribute  # type: ignore[method-assign]


def _plain_attribute(module: nn.Module, name: str, value: Any) -> bool:
    """Whether ``module.name = value`` sets a plain attribute: not a parameter, buffer or
    submodule (nn.Module routes those), nor a class descriptor's (a property keeps its own)."""
    if isinstance(value, (nn.Module, nn.Parameter)) or name == "training":
        return False
    if any(name in module.__dict__.get(slot, ()) for slot in _MODULE_SLOTS):
        return False
    static = inspect.getattr_static(type(module), name, None)
    return not (hasattr(static, "__set__") and not isinstance(static, _FirstRead))


class _FirstRead(Watch):
    """:class:`autotp.layer_state.Watch` (reads and writes reach the instance's ``__dict__``,
    else the class's own value, as before) telling reads from writes: a read by an instance that
    has not written the name yet is recorded in ``kept``."""

    def __init__(self, name: str, previous: Any, kept: KeptState) -> None:
        super().__init__(name, previous, recorder=self)
        self.kept, self.written = kept, set()

    def touched(self, obj: Any, name: str) -> None:
        """Watch's record of any access: reads and writes are told apart below instead."""

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is not None and id(obj.__dict__) not in self.written:
            self.kept._read_first.add((id(obj.__dict__), self.name))
        return super().__get__(obj, owner)

    def __set__(self, obj: Any, value: Any) -> None:
        self.written.add(id(obj.__dict__))
        super().__set__(obj, value)

    def __delete__(self, obj: Any) -> None:
        self.written.add(id(obj.__dict__))
        super().__delete__(obj)


@contextlib.contextmanager
def first_reads(watched: tuple[tuple[type, str], ...], kept: KeptState) -> Iterator[None]:
    """Put a :class:`_FirstRead` on each (class, name) of ``watched`` while entered."""
    installed = []
    try:
        for cls, name in watched:
            previous = cls.__dict__.get(name, MISSING)
            setattr(cls, name, _FirstRead(name, previous, kept))
            installed.append((cls, name, previous))
        yield
    finally:
        for cls, name, previous in reversed(installed):
            if previous is MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, previous)
