"""Which module to run whole, read from export's failures, and the capture's retry loop.

:func:`export_making_opaque` runs an export with no module opaque; where it fails on code that
needs the data (a guard on a data-dependent size, a read of a tensor's values) inside a
submodule (:func:`untraceable_modules`), it runs it again with that submodule's class made
opaque (:mod:`autotp.opaque`), and so on; where a class cannot be made opaque (its probes fail,
:mod:`autotp.opaque_probe`), the next one out on the failing stack is tried.
"""

from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterator, Optional, TypeVar

import torch.nn as nn

from autotp.errors import CaptureError, first_line
from autotp.opaque_probe import OpaqueModuleError

__all__ = ["export_making_opaque", "failures_read", "untraceable_modules", "opaque_failure"]

_T = TypeVar("_T")

# What a failure that comes from reading a tensor's values says, where its type does not:
# numpy() and data_ptr() of the fake tensors export traces with.
_READS_DATA = (".numpy() is not supported for tensor subclasses", "Cannot access data pointer of Tensor",
               "Cannot access storage of")


def untraceable_modules(exc: BaseException, root: nn.Module) -> Optional[tuple[list[type], str]]:
    """Where and why export failed on code that needs the data (a guard on a data-dependent
    size, a read of a tensor's values): the classes of the submodules of ``root`` running when it
    failed, innermost first (``root``'s own class and torch.nn's left out), and why; None for any
    other failure. By class, not by object: export may trace a copy of ``root``'s modules (it
    does when one is reachable at two paths)."""
    failure = _data_failure(exc)
    if failure is None:
        return None
    inside = {type(m) for m in root.modules() if m is not root} - {type(root)}
    running: list[type] = []
    tb = failure.__traceback__
    while tb is not None:
        cls = type(tb.tb_frame.f_locals.get("self"))
        if cls in inside and not cls.__module__.startswith("torch.nn.") and cls not in running:
            running.insert(0, cls)
        tb = tb.tb_next
    if not running:
        return None
    guard = re.search(r"data-dependent expression (.+?) \(unhinted", str(failure))
    why = (f"it branches on a size known only from the data: {guard.group(1)}" if guard
           else f"it reads tensor data: {first_line(failure)}")
    return running, why


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, then what caused it or was being handled when it was raised, and so on."""
    seen: set[int] = set()
    failure: Optional[BaseException] = exc
    while failure is not None and id(failure) not in seen:
        yield failure
        seen.add(id(failure))
        failure = failure.__cause__ or failure.__context__


def _data_failure(exc: BaseException) -> Optional[BaseException]:
    """The exception in ``exc``'s chain that says the code needed the data, if one does."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    typed = (GuardOnDataDependentSymNode, DataDependentOutputException, DynamicOutputShapeException)
    for failure in _chain(exc):
        if isinstance(failure, OpaqueModuleError):
            return None  # a module made opaque could not be: reported as such
        if isinstance(failure, typed) or any(text in str(failure) for text in _READS_DATA):
            return failure
    return None


def opaque_failure(exc: BaseException) -> Optional[OpaqueModuleError]:
    """The :class:`OpaqueModuleError` in ``exc``'s chain, if any."""
    return next((failure for failure in _chain(exc) if isinstance(failure, OpaqueModuleError)), None)


class _Untraceable(Exception):
    """Export failed on code that needs the data inside submodules of these classes (innermost
    first; :func:`autotp.opaque.untraceable_modules`)."""

    def __init__(self, classes: list[type], why: str) -> None:
        super().__init__(why)
        self.classes, self.why = classes, why


class _OpaqueFailed(Exception):
    """A class made opaque could not be (:class:`autotp.opaque.OpaqueModuleError`)."""

    def __init__(self, cls: type, why: str) -> None:
        super().__init__(why)
        self.cls, self.why = cls, why


_MOST_OPAQUE_CLASSES = 4
_MOST_ATTEMPTS = 8


def export_making_opaque(attempt: Callable[[dict[type, str]], _T], name: str) -> _T:
    """``attempt(opaque)`` (an export of model ``name`` with the classes of ``opaque`` made
    opaque, its failures read by :func:`failures_read`), first with none, then making opaque the
    class of the innermost submodule in which export failed on code that needs the data, and
    again; where that class cannot be made opaque (its probes fail), the next one out.

    Raises:
        CaptureError: no class could be made opaque, or the export failed otherwise.
    """
    opaque: dict[type, str] = {}
    refused: dict[type, str] = {}
    first: Optional[_Untraceable] = None
    for _ in range(_MOST_ATTEMPTS):
        try:
            return attempt(opaque)
        except _Untraceable as found:
            first = first or found
            untried = [cls for cls in found.classes if cls not in opaque and cls not in refused]
            if not untried or len(opaque) >= _MOST_OPAQUE_CLASSES:
                break
            opaque[untried[0]] = found.why
        except _OpaqueFailed as failed:
            refused[failed.cls] = failed.why
            opaque.pop(failed.cls, None)
        except Exception as exc:
            if not opaque:
                raise
            names = ", ".join(cls.__name__ for cls in opaque)
            raise CaptureError(f"torch.export could not capture {name}: {next(iter(opaque.values()))}; running "
                               f"{names} whole instead failed: {first_line(exc)}") from exc
    assert first is not None
    if not refused:  # nothing could even be tried: the root itself needs the data
        raise CaptureError(f"torch.export could not capture {name}: {first_line(first.__cause__ or first)}") \
            from first.__cause__
    raise CaptureError(f"torch.export could not capture {name}: {first.why}; running "
                       f"{', '.join(cls.__name__ for cls in refused)} whole instead failed: "
                       f"{'; '.join(refused.values())}") from first.__cause__


@contextlib.contextmanager
def failures_read(skeleton: nn.Module) -> Iterator[None]:
    """Around an export of ``skeleton``: a failure on code that needs the data becomes
    ``_Untraceable`` (the classes of the submodules it happened in), one of a module made opaque
    ``_OpaqueFailed``, for :func:`export_making_opaque`; others pass unchanged."""
    try:
        yield
    except Exception as exc:
        failed = opaque_failure(exc)
        if failed is not None and failed.cls is not None:
            raise _OpaqueFailed(failed.cls, str(failed)) from exc
        found = untraceable_modules(exc, skeleton)
        if found is None:
            raise
        raise _Untraceable(*found) from exc
