"""What a model's own code reads and keeps by name, found from its bytecode: the module globals
and class attributes its forward reads (what a captured graph bakes in besides the instances'
attributes), and the attributes Hugging Face's ``generate()`` keeps on the model object
(:func:`generation_state`, which are not the forward's).

``SCALE = 1.0`` at the top of a model's file, read in ``forward``, is a constant of the captured
graph. Set to 2.0 after ``parallelize``, the eager model doubles its output and the graph does
not (0.998 off, then 4.99 with a dict entry changed too: found 2026-12-01). A global is data the
graph depends on as much as an attribute is, so :class:`autotp.call_checks.ModelState` records
these and every call compares them, and :mod:`autotp.cache_key` puts their values in the graph
cache's key (a value set before ``parallelize`` in one run must not reuse another run's graph).

Which globals: the names loaded by ``LOAD_GLOBAL`` in each module class's ``forward`` (outside
torch, whose own code reads no model data this way) and in each forward hook, followed into what it calls by name: the
functions of its own module (``apply_rotary_pos_emb``), the methods of its class
(``self._helper(...)``) and the function a decorator wraps. Found from the bytecode, so a name
only an attribute shares (``self.SCALE``) is not mistaken for one. A global that holds a
function, class or module is code, which the cache key describes on its own; one unbound when
recorded (a builtin) is left out. A name the forward reads as an attribute (``self.FACTOR``)
that a class of its MRO defines as data is a class attribute read (changed with
``Model.FACTOR = 2.0``, it went unseen as a global did). Not followed: functions of other
modules, and globals read through a module (``config_module.SCALE``).
"""

from __future__ import annotations

import dis
import functools
import inspect
import types
from typing import Any, Iterator

import torch.nn as nn

__all__ = ["globals_read", "forward_reads", "generation_state"]

_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME"})
_CODE = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, type, types.ModuleType)


def globals_read(model: nn.Module) -> list[tuple[str, Any, str]]:
    """``(what, namespace, name)`` of each value outside the model's instances that its forward
    code reads by name: a module global holding data (``namespace``: the module's globals), or a
    class attribute holding data read as ``self.NAME`` (``namespace``: the defining class's
    ``__dict__``). Code (functions, classes, modules) is left out. In a stable order."""
    return forward_reads(model)[0]


def forward_reads(model: nn.Module) -> tuple[list[tuple[str, Any, str]], frozenset[str]]:
    """One walk of the model's forward code: :func:`globals_read`'s values, and every name the
    code uses (attributes among them, for :func:`generation_state`)."""
    found: dict[tuple[int, str], tuple[str, Any, str]] = {}
    done = _forward_code(model, found)
    names = frozenset(name for code, _ in done for name in _attribute_names(code))
    return sorted(found.values(), key=lambda item: item[0]), names


def generation_state(model: nn.Module, names_read: frozenset[str]) -> frozenset[str]:
    """The attributes Hugging Face's ``generate()`` keeps on the model object between calls
    (``self._previous_max_cache_length = ...`` for a static cache): each name its generation
    code assigns to ``self``, found from the bytecode of the model's classes defined in
    ``transformers.generation``, less any name the forward code reads. They are generate's
    bookkeeping, not the forward's inputs: a call that finds one added or changed was refused as
    a model changed after parallelize (every static-cache generate on a fresh model, and every
    call after it; found by an adversarial review). ``names_read``: from :func:`forward_reads`."""
    kept: set[str] = set()
    for cls in type(model).__mro__:
        if not cls.__module__.startswith("transformers.generation"):
            continue
        for value in vars(cls).values():
            value = getattr(value, "__func__", value)
            if isinstance(value, types.FunctionType):
                kept.update(_assigned_to_self(value.__code__))
    return frozenset(kept - names_read)


def _forward_code(model: nn.Module, found: dict) -> set[tuple[types.CodeType, type]]:
    """Walk what each module's forward and each forward hook run by name (see the module
    docstring), recording data globals and class attributes in ``found``; the code visited."""
    done: set[tuple[types.CodeType, type]] = set()
    for cls in {type(m) for m in model.modules()}:
        forward = inspect.getattr_static(cls, "forward", None)
        if isinstance(forward, types.FunctionType) and not _torchs(forward):
            _read_by(forward, cls, found, done)
    for module in model.modules():  # hooks run in the trace too: what they read is baked in as well
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for hook in hooks.values():
                hook = getattr(hook, "__func__", hook)  # a bound method
                if isinstance(hook, types.FunctionType):
                    _read_by(hook, type(module), found, done)
    return done


def _torchs(code: Any) -> bool:
    """Whether a function or class is torch's own."""
    module = code.__globals__.get("__name__", "") if isinstance(code, types.FunctionType) else code.__module__
    return str(module).split(".")[0] == "torch"


def _data(value: Any) -> bool:
    return not isinstance(value, _CODE) and not callable(value) and not hasattr(value, "__get__")


def _read_by(function: types.FunctionType, cls: type, found: dict, done: set) -> None:
    """Record the data ``function`` reads by name, following what it calls by name: functions
    of its own module, methods of ``cls`` (``self.helper(...)``), and the function a decorator
    wraps (``__wrapped__``)."""
    code, names = function.__code__, function.__globals__
    if (code, cls) in done or _torchs(function):
        return
    done.add((code, cls))
    wrapped = getattr(function, "__wrapped__", None)
    if isinstance(wrapped, types.FunctionType):
        _read_by(wrapped, cls, found, done)
    for name in _loaded_names(code):
        value = names.get(name, _UNBOUND)
        if isinstance(value, types.FunctionType) and value.__globals__ is names:
            _read_by(value, cls, found, done)
        elif value is not _UNBOUND and _data(value):
            found.setdefault((id(names), name), (f"global {names.get('__name__', '?')}.{name}", names, name))
    for name in _attribute_names(code):  # self.helper(...) and self.NAME
        owner = next((c for c in cls.__mro__ if name in vars(c)), None)
        if owner is None or _torchs(owner):
            continue
        value = vars(owner)[name]
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, types.FunctionType):
            _read_by(value, cls, found, done)
        elif _data(value):
            found.setdefault((id(owner), name), (f"class attribute {owner.__module__}.{owner.__qualname__}.{name}",
                                                 vars(owner), name))


_UNBOUND = object()


def _nested(code: types.CodeType) -> Iterator[types.CodeType]:
    """``code`` and the code it defines (functions, lambdas, comprehensions), depth first."""
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _nested(const)


@functools.lru_cache(maxsize=4096)
def _assigned_to_self(code: types.CodeType) -> tuple[str, ...]:
    """The names ``code`` (and the code it defines) assigns as ``self.NAME = ...``."""
    names = []
    for each in _nested(code):
        instructions = list(dis.get_instructions(each))
        names += [str(store.argval) for load, store in zip(instructions, instructions[1:])
                  if store.opname == "STORE_ATTR" and load.opname == "LOAD_FAST" and load.argval == "self"]
    return tuple(dict.fromkeys(names))


@functools.lru_cache(maxsize=4096)
def _attribute_names(code: types.CodeType) -> tuple[str, ...]:
    """Every name ``code`` and the code it defines use (attributes among them)."""
    return tuple(dict.fromkeys(name for each in _nested(code) for name in each.co_names))


@functools.lru_cache(maxsize=4096)
def _loaded_names(code: types.CodeType) -> tuple[str, ...]:
    """The names ``code`` (and the functions, lambdas and comprehensions it defines) loads as
    globals. Per code object, which does not change (reading bytecode is ~0.1 ms a function)."""
    return tuple(dict.fromkeys(str(i.argval) for each in _nested(code) for i in dis.get_instructions(each)
                               if i.opname in _LOADS))
