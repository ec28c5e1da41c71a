"""What a layer's forward could read: its state, compared across layers, and reads watched.

:mod:`autotp.repeats` copies one layer's graph to another only where the two would trace the
same. This module says where their state differs (:func:`differing`), whether a forward wrote
any of it (:func:`unchanged`), whether hooks would run inside it (:func:`hooked`), and puts a
:class:`Watch` on a class to record which differing attributes a forward read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn

__all__ = ["LayerState", "layer_state", "same_value", "differing", "unchanged", "hooked", "tensor_meta", "Watch",
           "module_class", "outside_the_trace", "PLAIN", "MISSING", "ROUTE_PREFIX"]

_MODULE_INTERNALS = frozenset({"_parameters", "_buffers", "_modules"})
PLAIN = (int, float, str, bool, type(None), complex, bytes, torch.dtype, torch.device, torch.layout,
         torch.memory_format, enum.Enum, type)
MISSING = object()
ROUTE_PREFIX = "_autotp_"  # attributes autotp itself puts on a layer for the capture: not its state


def same_value(a: Any, b: Any, paths: tuple[dict[int, str], dict[int, str]]) -> bool:
    """Whether two attribute values would steer a forward the same way: equal in type and value,
    containers element by element, modules by their path inside the layer (else by identity),
    tensors by metadata and data, anything else only if it is the same object."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, PLAIN):
        return a == b or (a != a and b != b)  # nan == nan here: the same value steers the same way
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same_value(x, y, paths) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same_value(a[k], b[k], paths) for k in a)
    if isinstance(a, (set, frozenset)):
        return all(isinstance(x, PLAIN) for x in a) and a == b
    if isinstance(a, nn.Module):
        path_a, path_b = paths[0].get(id(vars(a))), paths[1].get(id(vars(b)))
        return path_a is not None and path_a == path_b
    if isinstance(a, functools.partial):
        return same_value(a.func, b.func, paths) and same_value(a.args, b.args, paths) and same_value(a.keywords, b.keywords, paths)
    if callable(a) and hasattr(a, "__func__") and hasattr(a, "__self__"):  # a bound method
        return a.__func__ is b.__func__ and same_value(a.__self__, b.__self__, paths)
    if isinstance(a, torch.Tensor):
        if isinstance(a, nn.Parameter) or a.device.type == "meta" or hasattr(a, "fake_mode") or hasattr(b, "fake_mode"):
            return False
        if a.shape != b.shape or a.dtype != b.dtype or a.stride() != b.stride():
            return False
        with outside_the_trace():
            return torch.equal(a, b)
    return False


@dataclasses.dataclass
class LayerState:
    """A layer's attributes (by relative module path) and tensors (by relative name)."""

    # id(vars(module)) -> relative path, for every module in the layer: by its __dict__, which
    # export's attribute proxies of a module share with it
    paths: dict[int, str]
    attrs: dict[tuple[str, str], Any]  # (relative path, name) -> value
    classes: tuple  # (relative path, class) in order
    tensors: dict[str, torch.Tensor]  # relative name -> tensor (as the forward sees it now)
    tying: tuple  # for each tensor name, the first name holding the same tensor


def layer_state(layer: nn.Module) -> LayerState:
    paths, attrs, classes = {}, {}, []
    for path, module in layer.named_modules(remove_duplicate=False):
        paths.setdefault(id(vars(module)), path)
        classes.append((path, module_class(module)))
        for name, value in vars(module).items():
            if name not in _MODULE_INTERNALS and not name.startswith(ROUTE_PREFIX):
                attrs[(path, name)] = value
    tensors: dict[str, torch.Tensor] = {}
    for kind in ("named_parameters", "named_buffers"):
        for name, tensor in getattr(layer, kind)(remove_duplicate=False):
            tensors[name] = tensor
    first: dict[int, str] = {}
    tying = tuple((name, first.setdefault(id(t), name)) for name, t in tensors.items())
    return LayerState(paths, attrs, tuple(classes), tensors, tying)


@contextlib.contextmanager
def outside_the_trace() -> Iterator[None]:
    """Torch calls made here for autotp's own bookkeeping, on real tensors: neither recorded in
    the graph being traced nor run on fake tensors (every dispatch and torch-function mode off)."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch._C.DisableTorchFunction():
        yield


def module_class(module: nn.Module) -> type:
    """The module's own class: for one of export's attribute proxies (a subclass made per proxy,
    sharing the module's ``__dict__``), the proxied module's."""
    try:
        from torch.fx.experimental.proxy_tensor import _AttrProxy
    except ImportError:  # a torch without them
        return type(module)
    return type(module.get_base()) if isinstance(module, _AttrProxy) else type(module)


def hooked(layer: nn.Module) -> bool:
    """Whether a call of a module inside ``layer`` would run hooks (its own, or global ones): a
    copy runs none of them."""
    from torch.nn.modules import module as torch_module

    hook_stores = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    if any(getattr(torch_module, f"_global{store}", None) for store in hook_stores):
        return True
    return any(getattr(m, store, None) for _, m in list(layer.named_modules())[1:] for store in hook_stores)


def tensor_meta(t: torch.Tensor) -> tuple:
    """What two layers' tensors at one name must agree on: shape, dtype, whether a parameter."""
    return (tuple(map(str, t.shape)), str(t.dtype), t.requires_grad, isinstance(t, nn.Parameter))


def differing(rep: LayerState, member: LayerState) -> Optional[set[tuple[str, str]]]:
    """The attributes in which ``member`` differs from ``rep``; None if they differ in structure
    (classes, attribute names, tensors), which no watching can excuse."""
    if rep.classes != member.classes or rep.attrs.keys() != member.attrs.keys() or rep.tying != member.tying:
        return None
    if any(tensor_meta(rep.tensors[n]) != tensor_meta(member.tensors[n]) for n in rep.tensors):
        return None
    paths = (rep.paths, member.paths)
    return {key for key, value in rep.attrs.items() if not same_value(value, member.attrs[key], paths)}


def unchanged(before: LayerState, after: LayerState) -> bool:
    """Nothing written during a forward: the same attribute objects and tensors."""
    return (before.attrs.keys() == after.attrs.keys() and before.classes == after.classes
            and all(before.attrs[k] is after.attrs[k] for k in before.attrs)
            and all(before.tensors[n] is after.tensors.get(n) for n in before.tensors))


class Watch:
    """A data descriptor put on a class for the capture: reads and writes of one attribute name
    go to the instance's ``__dict__`` as before, and are recorded while a layer is watched."""

    def __init__(self, name: str, previous: Any, recorder: Any) -> None:  # recorder.touched(obj, name)
        self.name, self.previous, self.recorder = name, previous, recorder

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            if self.previous is MISSING:
                raise AttributeError(self.name)
            return self.previous
        self.recorder.touched(obj, self.name)
        try:
            return obj.__dict__[self.name]
        except KeyError:
            pass
        if self.previous is MISSING:
            raise AttributeError(self.name)
        getter = getattr(type(self.previous), "__get__", None)
        return getter(self.previous, obj, type(obj)) if getter else self.previous

    def __set__(self, obj: Any, value: Any) -> None:
        self.recorder.touched(obj, self.name)
        obj.__dict__[self.name] = value

    def __delete__(self, obj: Any) -> None:
        self.recorder.touched(obj, self.name)
        del obj.__dict__[self.name]
