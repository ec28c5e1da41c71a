"""How torch.export is run for a capture: settings that make it cheaper or record what it
compiles. Each is a context manager that restores what it changed."""

from __future__ import annotations

import contextlib
import io
import sys
from typing import Any, Iterator

import torch
import torch.fx as fx

__all__ = ["no_stack_traces", "no_fake_dispatch_cache", "deferred_codegen", "recorded_guards", "partial_graph_unprinted"]


@contextlib.contextmanager
def no_stack_traces() -> Iterator[None]:
    """Trace without recording each node's Python stack (``node.meta["stack_trace"]``): autotp
    never reads it, and extracting and formatting ~700 stacks took 0.12-0.4 s of a 1.3-1.6 s
    capture of an 8-layer Llama. (A torch without the switch records them, as before.)"""
    import torch.fx.config as fx_config

    before = getattr(fx_config, "do_not_emit_stack_traces", None)
    fx_config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        if before is None:
            del fx_config.do_not_emit_stack_traces
        else:
            fx_config.do_not_emit_stack_traces = before


def no_fake_dispatch_cache() -> contextlib.AbstractContextManager:
    """Fake tensors' dispatch cache off in the fake mode export makes for itself.

    The cache pays where an op meets the same static metadata again. With dynamic batch and
    sequence sizes nearly every lookup misses, and building and checking its key is symbolic
    arithmetic: without it, capturing Llama-191M took 0.90-0.96 s of CPU against 1.16-1.42 s.
    It only memoises what an op computes, so every family's graph stays the same node for node
    (``scripts/capture_cache_check.py``). Input guards differ in 17 families: the 2-18 that the
    cache's own key checks added and no op asked for go (Bamba: 98 guards against 187), and
    where cache hits had skipped an op's shape function its guards now come (Qwen3.5: 1058
    against 945)."""
    return torch._dynamo.config.patch(fake_tensor_cache_enabled=False)


_GENERATE_CODE = fx.GraphModule.recompile


@contextlib.contextmanager
def deferred_codegen() -> Iterator[None]:
    """Inside, ``GraphModule.recompile()`` only marks the module's code out of date; it is
    generated when the module is first called (or recompiled outside). torch.export regenerates
    the Python code of the whole graph after each of its passes, 9 times for one capture, and
    keeps none of those modules: ~0.1 s each for an 80-layer graph of ~5000 nodes. ``.code`` of
    a module left out of date raises rather than showing stale code; code that reads the
    signature of ``forward`` (unlifting, ``ExportedProgram.module()``) must run outside."""
    def deferred(self: fx.GraphModule) -> None:
        codegen = self._graph._codegen
        if isinstance(codegen, torch.fx.graph._PyTreeCodeGen):  # what recompile sets besides the code
            self._in_spec, self._out_spec = codegen.pytree_info.in_spec, codegen.pytree_info.out_spec
        self.__dict__.pop("_code", None)
        type(self).forward = _generate_then_forward  # each GraphModule has a class of its own

    fx.GraphModule.recompile = deferred  # type: ignore[method-assign]
    try:
        yield
    finally:
        fx.GraphModule.recompile = _GENERATE_CODE  # type: ignore[method-assign]


def _generate_then_forward(self: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
    _GENERATE_CODE(self)
    return self.forward(*args, **kwargs)


@contextlib.contextmanager
def recorded_guards() -> Iterator[list[tuple[list[str], list[tuple]]]]:
    """Record the guard code export compiles into the module's ``_guards_fn``, so that
    :mod:`autotp.cache` can rebuild the same check. It is a private torch function: where it
    does not exist nothing is recorded (and graphs with guards are not cached)."""
    import torch.export._unlift as unlift

    original = getattr(unlift, "_convert_guards_code_to_fn", None)
    recorded: list[tuple[list[str], list[tuple]]] = []
    if original is None:
        yield recorded
        return

    def recording(codes: list[str], paths: list[tuple]) -> Any:
        recorded.append((list(codes), [tuple(p) for p in paths]))
        return original(codes, paths)

    unlift._convert_guards_code_to_fn = recording
    try:
        yield recorded
    finally:
        unlift._convert_guards_code_to_fn = original


@contextlib.contextmanager
def partial_graph_unprinted() -> Iterator[None]:
    """torch.export prints to stderr the graph it had traced when it fails (thousands of lines
    for a model). autotp reports a failed capture itself, in one line, and retries some, so that
    print is dropped; anything else written to stderr meanwhile is passed on when this exits."""
    buffer = io.StringIO()
    partial = None
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except BaseException as exc:
        partial = getattr(exc, "partial_fx_graph", None)
        raise
    finally:
        text = buffer.getvalue()
        if partial is not None:
            text = text.replace(f"{partial}\n", "")  # printed by each of its nested wrappers
        if text:
            sys.stderr.write(text)
