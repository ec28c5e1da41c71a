"""Why a capture fails or is refused, said in one line that names the model and what to do.

- :func:`capture_error`: export's own failure (it raises many types), with a hint where a tensor
  reaches ``forward`` only through ``**kwargs``, which export may not take at dynamic sizes;
- :func:`refuse_generators`: a graph holding a ``torch.Generator`` computes other numbers than
  the model from its second call on;
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
from torch.utils import _pytree as pytree

from autotp.errors import CaptureError, first_line
from autotp.loading import _get_attr

__all__ = ["capture_error", "refuse_generators", "tensors_through_kwargs", "python_draws_refused", "torch_draws_undone"]


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


@contextlib.contextmanager
def python_draws_refused(name: str) -> Iterator[None]:
    """Refuse a capture during which Python's ``random`` or NumPy's global generator drew (a
    layer dropped at random, ``if random.random() < p``). The trace runs the forward once: the
    draw it made becomes the graph's for every call (4 of 6 calls 1.1 off), and ranks seeded
    apart traced different branches (found by an adversarial review). torch.export itself draws
    from neither (checked on Llama, GPT-2, Mistral)."""
    numpy = sys.modules.get("numpy")
    before = random.getstate(), _numpy_state(numpy)
    yield
    drew = random.getstate() != before[0]
    if drew or _numpy_state(numpy) != before[1]:
        raise CaptureError(f"{name}'s forward draws from {'Python' if drew else 'NumPy'}'s random module: a captured "
                           "graph keeps the draw its trace made for every call; draw with torch (as dropout does) "
                           "or outside the model")


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
