"""Why a capture fails or is refused, said in one line that names the model and what to do.

- :func:`capture_error`: export's own failure (it raises many types), with a hint where a tensor
  reaches ``forward`` only through ``**kwargs``, which export may not take at dynamic sizes;
- :func:`refuse_generators`: a graph holding a ``torch.Generator`` computes other numbers than
  the model from its second call on;
- :func:`refuse_untracked_tensors`: a graph holding a tensor the forward derived from the
  model's own outside the trace (``weight.data``) has no data for it;
- :func:`python_draws_refused`: a forward that draws from Python's or NumPy's random module
  has its draw fixed by the trace;
- :func:`torch_draws_undone`: whatever the capture draws from torch's generators (an opaque
  module's probe runs its forward) is undone, so that the model's calls draw what they would.
"""

from __future__ import annotations

import contextlib
import inspect
import random
import sys
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree

from autotp.errors import CaptureError, first_line
from autotp.loading import _get_attr

__all__ = ["capture_error", "refuse_generators", "refuse_untracked_tensors", "tensors_through_kwargs",
           "python_draws_refused", "torch_draws_undone"]


def refuse_generators(gm: fx.GraphModule, name: str) -> None:
    """A ``torch.Generator`` the trace met becomes one constant of the graph: every call draws on
    from its state, where a forward that makes one (``torch.Generator().manual_seed(0)``) starts
    afresh each call (the second call was 12.1 off, even at tp 1), and ranks in one process
    would share it. Refused: autotp cannot tell a fresh generator from one the model keeps."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and isinstance(_get_attr(gm, node.target), torch.Generator):
            raise CaptureError(f"{name}'s forward draws random numbers from a torch.Generator ({node.target} in the "
                               "graph): a captured graph would keep one generator and draw on from its state on every "
                               "call; draw outside the model and pass the numbers in")


def refuse_untracked_tensors(gm: fx.GraphModule, model_tensors: set[str], name: str) -> None:
    """A fake tensor the graph holds that is none of the model's parameters and buffers: the
    capture ran on fake copies of those, so the forward made it from them where export does not
    trace (``self.proj.bias.data``, read or written into). The graph would hold no data for it
    (a load failed naming ``lifted_tensor_0``) and drops what was written through it."""
    for node in gm.graph.nodes:
        if (node.op == "get_attr" and str(node.target) not in model_tensors
                and isinstance(_get_attr(gm, node.target), FakeTensor)):
            raise CaptureError(f"{name}'s forward uses a tensor made from its parameters or buffers outside what "
                               f"torch.export traces ({node.target} in the graph; `.data` does this): the graph would "
                               "hold no data for it; use the parameter itself (`weight.detach()` to read it)")


@contextlib.contextmanager
def python_draws_refused(name: str) -> Iterator[None]:
    """Refuse a capture whose forward read a number drawn from Python's ``random`` or NumPy's
    global generator (a layer dropped at random, ``if random.random() < p``). The trace runs the
    forward once: the draw it made becomes the graph's for every call (4 of 6 calls 1.1 off),
    and ranks seeded apart traced different branches (found by an adversarial review).

    A draw nothing reads is harmless, and transformers' layer drop draws in eval mode too
    (MusicGen: ``p = random.uniform(0, 1); if self.training and p < self.layerdrop``). So while
    the capture runs, Python's float draws return :class:`_UnreadDraw` objects that record any
    use (a comparison, arithmetic, conversion) and that no C function takes as a number; after
    it, the draws are replayed from the state before, to check that they were all there was.
    torch.export itself draws from neither generator (checked on Llama, GPT-2, Mistral)."""
    numpy = sys.modules.get("numpy")
    before, numpy_before = random.getstate(), _numpy_state(numpy)
    draws: list[_UnreadDraw] = []
    with _python_draws_tracked(draws):
        yield
    python = any(draw.read for draw in draws) or random.getstate() != _replayed(before, draws)
    if python or _numpy_state(numpy) != numpy_before:
        source = "Python" if python else "NumPy"
        raise CaptureError(f"{name}'s forward draws from {source}'s random module: a captured graph keeps the draw "
                           "its trace made for every call; draw with torch (as dropout does) or outside the model")


# Python's float draws (random's module-level functions), each recorded while a capture runs
_FLOAT_DRAWS = ("random", "uniform", "triangular", "gauss", "normalvariate", "lognormvariate", "expovariate",
                "vonmisesvariate", "gammavariate", "betavariate", "paretovariate", "weibullvariate")


class _UnreadDraw:
    """A number drawn during a capture, which records being read: every operator and conversion
    marks it and then works on the number; C functions that take a float refuse it (it is no
    float), so the capture fails rather than keep the number unseen."""

    def __init__(self, function: str, args: tuple, kwargs: dict, value: float) -> None:
        self.function, self.args, self.kwargs, self._value, self.read = function, args, kwargs, value, False

    def _use(self) -> float:
        self.read = True
        return self._value


def _reading(method: str) -> Any:
    def read(self: _UnreadDraw, *args: Any) -> Any:
        return getattr(self._use(), method)(*args)
    return read


for _method in ("__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__", "__bool__", "__float__", "__int__",
                "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
                "__floordiv__", "__rfloordiv__", "__mod__", "__rmod__", "__pow__", "__rpow__", "__neg__", "__pos__",
                "__abs__", "__round__", "__trunc__", "__floor__", "__ceil__", "__hash__", "__format__", "__repr__",
                "__str__", "__divmod__", "__rdivmod__"):
    setattr(_UnreadDraw, _method, _reading(_method))


@contextlib.contextmanager
def _python_draws_tracked(draws: list[_UnreadDraw]) -> Iterator[None]:
    real = {f: getattr(random, f) for f in _FLOAT_DRAWS}

    def tracked(function: str) -> Any:
        def draw(*args: Any, **kwargs: Any) -> _UnreadDraw:
            draws.append(_UnreadDraw(function, args, kwargs, real[function](*args, **kwargs)))
            return draws[-1]
        return draw

    for function in _FLOAT_DRAWS:
        setattr(random, function, tracked(function))
    try:
        yield
    finally:
        for function, original in real.items():
            setattr(random, function, original)


def _replayed(before: Any, draws: list[_UnreadDraw]) -> Any:
    """Python's random state after ``draws`` alone, from ``before``; the state is left as it was."""
    after = random.getstate()
    random.setstate(before)
    for draw in draws:
        getattr(random, draw.function)(*draw.args, **draw.kwargs)
    replayed = random.getstate()
    random.setstate(after)
    return replayed


def _numpy_state(numpy: Any) -> Any:
    """NumPy's global generator state, comparable with ``==`` (None if NumPy is not imported)."""
    if numpy is None:
        return None
    name, keys, position, has_gauss, gauss = numpy.random.get_state()
    return name, keys.tobytes(), position, has_gauss, gauss


@contextlib.contextmanager
def torch_draws_undone(device: torch.device) -> Iterator[None]:
    """torch's random state (CPU, and a CUDA device's) as it was before, afterwards: a capture
    that runs a module's forward (an opaque module's probe, on zeros) drew from it, and the
    model's next calls drew other numbers than the unsharded model's (3.09 off)."""
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        yield


def capture_error(name: str, exc: BaseException, through_kwargs: Sequence[str] = ()) -> CaptureError:
    if isinstance(exc, CaptureError):
        return exc
    verb = "reaches" if len(through_kwargs) == 1 else "reach"
    hint = (f" ({', '.join(through_kwargs)} {verb} {name}.forward only through **kwargs, where torch.export may "
            "not take a tensor of dynamic size: leave it out if the model does not read it)") if through_kwargs else ""
    return CaptureError(f"torch.export could not capture {name}: {first_line(exc)}{hint}")


def tensors_through_kwargs(signature: inspect.Signature, inputs: Mapping[str, Any]) -> list[str]:
    """The tensor arguments a ``forward`` of ``signature`` takes only in ``**kwargs`` (xLSTM's
    ``attention_mask``)."""
    params = signature.parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return sorted(k for k, v in inputs.items()
                  if k not in params and any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(v)))
