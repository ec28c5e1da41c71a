"""Capture: an ``nn.Module`` (real or ``meta`` weights) -> an fx ``GraphModule`` of aten ops.

Consumes a module and example inputs (synthesised from the config for Hugging Face models).
Produces a :class:`Captured`: the graph module of ``torch.export.export(..., strict=False)``
(parameters and buffers as ``get_attr`` nodes named by their fully qualified names, every node
with ``meta["val"]`` (a fake tensor with symbolic batch/sequence sizes) and
``meta["nn_module_stack"]`` (the module path it came from)), and how user arguments map to
the graph's inputs.

Invariants:

- Capture never reads weights: the module is exported as a *skeleton* (a copy of the module
  tree whose tensors are fake: shape, dtype and device, no data), so a 70B configuration
  captures in seconds and the graph module holds no data. Loading fills it later
  (:mod:`autotp.loading`). The model itself may have real or ``meta`` weights.
- Every dim of every tensor input is ``Dim.AUTO``: export keeps dynamic what the model allows,
  so one capture serves every batch and sequence length. Example sizes of 0 or 1 would be
  specialised; synthesised inputs use (2, 8).
- The same model and input structure always gives the same graph and node names, on every
  rank, which is what makes a plan portable across ranks.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.export import Dim
from torch.utils import _pytree as pytree

from autotp.capture_refusals import (capture_error, python_draws_refused, refuse_generators, refuse_untracked_tensors,
                                     tensors_through_kwargs, torch_draws_undone)
from autotp.errors import CaptureError
from autotp import hf
from autotp.export_settings import (deferred_codegen, no_fake_dispatch_cache, no_stack_traces, partial_graph_unprinted,
                                    recorded_guards)
from autotp.heap import old_objects_frozen
from autotp.kept_state import kept_state
from autotp.loading import named_tensors
from autotp.opaque import OpaqueCall, install_opaque_calls, opaque_calls
from autotp.opaque_failures import export_making_opaque, failures_read
from autotp.repeats import share_repeated_layers

__all__ = ["capture", "Captured", "bind_inputs", "forward_signature", "structure_key", "fake_skeleton", "meta_twin",
           "model_device", "graph_inputs", "CaptureError"]


@dataclass
class Captured:
    graph_module: fx.GraphModule
    input_names: list[str]
    key: tuple
    model_name: str = ""
    tensor_names: list[str] = field(default_factory=list)  # parameters and buffers, get_attr order
    # the input checks export put in the graph (its _guards_fn), as (guard code, input paths);
    # None when there are none or they could not be recorded (autotp.cache needs them)
    guards: Optional[tuple[list[str], list[tuple]]] = None
    # layers whose nodes were copied from an identical layer's trace (autotp.repeats)
    copied_layers: int = 0

    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph


def model_device(model: nn.Module) -> torch.device:
    """Where the model runs: its first non-``meta`` tensor's device, else the CPU."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def meta_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every tensor on ``meta`` at its current (global) shape: what
    later captures read once the model's own tensors have been replaced by one rank's pieces."""
    return _copy_with_tensors(model, lambda tensor: torch.empty_like(tensor, device="meta"))


def _routings(model: nn.Module) -> list[tuple[nn.Module, Any]]:
    """Take off the routings of calls autotp put on ``model``'s modules (a parallelized model
    routes its calls to its TensorParallelModule), as (module, routing) to put back. A forward
    the user put on an instance (a patch, accelerate's hooks) is no routing: it stays, and a
    copy computes with it as the model does."""
    return [(m, m.__dict__.pop("forward")) for m in model.modules() if is_routed(m)]


def is_routed(module: nn.Module) -> bool:
    """Whether autotp routed ``module``'s calls to a TensorParallelModule (it was handed over)."""
    return getattr(module.__dict__.get("forward"), "_autotp_routing", False)


def _copy_with_tensors(model: nn.Module, make: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """``deepcopy`` of ``model`` whose parameters and buffers are ``make(tensor)`` (tied tensors
    stay tied), without autotp's routings of calls (:func:`_routings`): the copy keeps the
    class's own forward."""
    memo: dict[int, Any] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) not in memo:
            made = make(tensor)
            memo[id(tensor)] = nn.Parameter(made, requires_grad=False) if isinstance(tensor, nn.Parameter) else made
    routed = _routings(model)
    try:
        return copy.deepcopy(model, memo)
    finally:
        for module, forward in routed:
            module.__dict__["forward"] = forward


def fake_skeleton(model: nn.Module, device: Optional[torch.device] = None) -> tuple[nn.Module, FakeTensorMode]:
    """A copy of ``model`` whose parameters and buffers are fake tensors on ``device``.

    Fake tensors carry shape, dtype and device but no data; exporting the copy records the
    real device in the graph (``arange(..., device='cpu')``) while reading no weights.
    Tied tensors stay tied.
    """
    device = device or model_device(model)
    mode = FakeTensorMode(allow_non_fake_inputs=False)

    def fake(tensor: torch.Tensor) -> torch.Tensor:
        meta = torch.empty_like(tensor, device="meta")
        return mode.fake_tensor_converter.from_meta_and_device(mode, meta, device)

    return _copy_with_tensors(model, fake), mode


def forward_signature(model: nn.Module) -> inspect.Signature:
    """The signature of the model's own ``forward`` (not of autotp's routing put on the instance)."""
    if is_routed(model):
        return inspect.signature(type(model).forward.__get__(model))
    return inspect.signature(model.forward)


def bind_inputs(model: nn.Module, args: tuple, kwargs: Mapping[str, Any],
                signature: Optional[inspect.Signature] = None) -> dict[str, Any]:
    """Map a call's arguments to keyword arguments of ``model.forward`` (``None`` defaults dropped)."""
    sig = signature or forward_signature(model)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{type(model).__name__}.forward{sig}: {exc}") from None
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        param = sig.parameters[name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{type(model).__name__}.forward takes *{name}; pass inputs by name")
        elif not (value is None and param.default is None):
            out[name] = value
    return out


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), value.dim())
    leaves, spec = pytree.tree_flatten(value)
    if len(leaves) == 1 and leaves[0] is value:
        return ("value", repr(value))
    return ("tree", str(spec), tuple(_describe(v) for v in leaves))


def structure_key(inputs: Mapping[str, Any]) -> tuple:
    """What must match for a captured graph to serve a call: names, tensor dtypes and ranks,
    and the values of non-tensor arguments (export bakes those in)."""
    return tuple((name, _describe(value)) for name, value in inputs.items())


def _as_fake(value: Any, mode: FakeTensorMode, device: torch.device, bump: bool) -> Any:
    def convert(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        shape = [2 if bump and s in (0, 1) else s for s in t.shape]
        meta = torch.empty(shape, dtype=t.dtype, device="meta")
        return mode.fake_tensor_converter.from_meta_and_device(mode, meta, device)

    return pytree.tree_map(convert, value)


def _dims(value: Any) -> Any:
    """Export's dynamic-shape spec of one argument: ``Dim.AUTO`` per tensor dim, in the shape of
    the argument (a registered pytree class, such as a model output, as its list of children)."""
    if isinstance(value, torch.Tensor):
        return {d: Dim.AUTO for d in range(value.dim())}
    if type(value) is dict:
        return {k: _dims(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_dims(v) for v in value)
    if type(value) in pytree.SUPPORTED_NODES:
        return [_dims(child) for child in pytree.SUPPORTED_NODES[type(value)].flatten_fn(value)[0]]
    return None


def _dynamic_shapes(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """``Dim.AUTO`` on every tensor dim, keyed as export wants: by ``forward``'s parameter
    names, with arguments that land in ``**kwargs`` nested under that parameter's name."""

    params = inspect.signature(model.forward).parameters
    var_keyword = next((n for n, p in params.items() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    shapes: dict[str, Any] = {}
    for name, value in inputs.items():
        spec = _dims(value)
        if name in params or var_keyword is None:
            shapes[name] = spec
        else:
            shapes.setdefault(var_keyword, {})[name] = spec
    return shapes


@old_objects_frozen()
def capture(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    device: Optional[torch.device] = None,
    bump_unit_dims: bool = False,
    share_layers: Optional[bool] = None,
) -> Captured:
    """Export ``model`` to an fx graph of aten ops with dynamic input sizes.

    Args:
        model: any ``nn.Module``; weights may be real or on ``meta`` (they are never read).
        example_inputs: a tensor, a tuple of positional arguments, or a dict of keyword
            arguments. ``None`` synthesises token ids for a Hugging Face model.
        device: where the graph will run (default: where the model's weights are, else CPU).
        bump_unit_dims: use 2 where an example dim is 0 or 1, so that it stays dynamic.
        share_layers: trace a repeated layer once and copy its graph to the identical layers
            after it (:mod:`autotp.repeats`, where the conditions are): True for any layer,
            False for none. Default: ``AUTOTP_SHARE_LAYERS`` (1, 0, or unset: only layers whose
            code is transformers' or torch's own, which are checked family by family).

    Returns:
        A :class:`Captured` whose graph module holds fake (data-less) parameters.

    Raises:
        CaptureError: torch.export could not capture the model with these inputs.

    Example:
        >>> captured = capture(model)                       # doctest: +SKIP
        >>> captured.graph_module.graph.print_tabular()     # doctest: +SKIP
    """
    inputs = normalise_example_inputs(model, example_inputs)
    device = device or model_device(model)
    name = type(model).__name__
    share = share_mode(share_layers)
    with torch_draws_undone(device), python_draws_refused(name):
        exported, sharing, records = _export_or_retry(model, inputs, device, bump_unit_dims, share)
    with recorded_guards() as guards:  # not deferred: unlifting reads the signature of the code
        gm = exported.module()
    refuse_generators(gm, name)
    refuse_untracked_tensors(gm, set(named_tensors(model)), name)
    install_opaque_calls(gm, records)
    _warn_opaque(gm)
    gm = _drop_unused_tensors(gm)
    tensors = [str(n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    return Captured(gm, list(inputs), structure_key(inputs), name, tensors, guards[-1] if guards else None,
                    sharing.copied if sharing is not None else 0)


def _export_or_retry(model: nn.Module, inputs: dict[str, Any], device: torch.device, bump_unit_dims: bool,
                     share: str) -> tuple[Any, Any, dict]:
    """:func:`_export`, making modules opaque where export needs it; if copying repeated layers
    was asked for and the capture fails, once more with every layer traced."""
    name = type(model).__name__
    try:
        return export_making_opaque(
            lambda opaque: _export(model, inputs, device, bump_unit_dims, "off" if opaque else share, opaque), name)
    except Exception as exc:  # export raises many types; one clear error names the model
        failure = capture_error(name, exc, tensors_through_kwargs(forward_signature(model), inputs))
        if share == "off":
            raise failure from exc
        try:  # the trusted path decides, on a fresh copy: every layer traced
            result = export_making_opaque(
                lambda opaque: _export(model, inputs, device, bump_unit_dims, "off", opaque), name)
        except Exception:  # noqa: BLE001  the model's own failure, reported as it was the first time
            raise failure from exc
    warnings.warn(f"autotp: copying {name}'s repeated layers failed ({str(failure).split(': ', 1)[1]}); every "
                  "layer was traced instead (AUTOTP_SHARE_LAYERS=0 skips the attempt)")
    return result


def _export(model: nn.Module, inputs: dict[str, Any], device: torch.device, bump_unit_dims: bool,
            share: str, opaque: dict[type, str], watched: tuple[tuple[type, str], ...] = ()) -> tuple[Any, Any, dict]:
    """torch.export of a fresh fake skeleton of ``model`` (its own shape environment): the
    exported program, the layer sharing used (None when nothing was shared) and the records of
    the calls of ``opaque`` classes (class -> why). Refuses a forward that keeps state between
    calls (:mod:`autotp.kept_state`); ``watched``: the attributes a first export saw changed."""
    skeleton, mode = fake_skeleton(model, device)
    passed = graph_inputs(skeleton, inputs)
    if len(passed) < len(inputs):  # bake the flags **kwargs would take (see graph_inputs)
        skeleton.__dict__["forward"] = functools.partial(skeleton.forward, **{k: v for k, v in inputs.items()
                                                                             if k not in passed})
    fake_inputs = {k: _as_fake(v, mode, device, bump_unit_dims) for k, v in passed.items()}
    run_whole = frozenset(type(m) for outer in skeleton.modules() if type(outer) in opaque for m in outer.modules())
    with failures_read(skeleton), hf.capture_settings(skeleton, inputs), no_stack_traces(), no_fake_dispatch_cache(), \
            torch.no_grad(), deferred_codegen(), partial_graph_unprinted(), \
            kept_state(skeleton, run_whole, watched) as kept, \
            share_repeated_layers(skeleton, share) as sharing, opaque_calls(skeleton, model, opaque) as records:
        exported = torch.export.export(
            skeleton, (), fake_inputs, dynamic_shapes=_dynamic_shapes(skeleton, fake_inputs), strict=False
        )
    refusal = kept.refusal(type(model).__name__, second_look=bool(watched))
    if refusal is not None:
        raise CaptureError(refusal)
    changed = () if watched else tuple(kept.changed())
    if changed:  # which of them the forward read as the call before left them: a second look
        _export(model, inputs, device, bump_unit_dims, "off", opaque, changed)
    return exported, sharing, records


def _warn_opaque(gm: fx.GraphModule) -> None:
    classes = Counter(type(m.record.module).__name__ for m in gm.children() if isinstance(m, OpaqueCall))
    if classes:
        warnings.warn(f"autotp: {', '.join(f'{c} ({n} call(s))' for c, n in sorted(classes.items()))} run(s) whole "
                      "on every rank, since torch.export cannot trace it (it branches on, or reads, the data); the "
                      "plan lists its parameters")


def share_mode(asked: Optional[bool] = None) -> str:
    """The layer sharing mode (autotp.repeats.SHARE_MODES) asked for, or set in the environment."""
    if asked is not None:
        return "all" if asked else "off"
    value = os.environ.get("AUTOTP_SHARE_LAYERS", "").strip().lower()
    modes = {"0": "off", "off": "off", "false": "off", "1": "all", "on": "all", "true": "all", "": "checked",
             "auto": "checked"}
    if value not in modes:
        raise ValueError(f"AUTOTP_SHARE_LAYERS={value!r}: expected 1 (share any repeated layer's trace), 0 (trace "
                         "every layer) or auto (the default: share layers of transformers' and torch's own code)")
    return modes[value]


def graph_inputs(model: nn.Module, inputs: Mapping[str, Any],
                 signature: Optional[inspect.Signature] = None) -> dict[str, Any]:
    """The arguments a captured graph of ``model`` takes: ``inputs`` less the values without a
    tensor that ``forward`` would take in ``**kwargs`` (``return_dict``, ``output_attentions``).
    Capture bakes those in (they are part of the graph's structure key), because export cannot
    take them there: it lists each such argument twice when it checks the dynamic shapes.
    ``signature``: ``model``'s forward signature, if the caller keeps it."""
    params = (signature or forward_signature(model)).parameters
    named = {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
    if len(named) == len(params):
        return dict(inputs)
    return {k: v for k, v in inputs.items() if k in named or any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(v))}


def _drop_unused_tensors(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove what the graph computes and never uses (export keeps a buffer a cache layer made
    and then replaced; its size reads would pin the planner), and tensors the graph never
    reads (a tied weight's second name): loading them would hold a full copy of what is
    sharded under the other name. Ops that mutate or assert stay (fx counts them impure)."""
    held = {str(node.target) for node in gm.graph.nodes if node.op == "get_attr"}
    changed = gm.graph.eliminate_dead_code()  # unread get_attr nodes go too
    unused = held - {str(node.target) for node in gm.graph.nodes if node.op == "get_attr"}
    for target in unused:
        owner_name, _, attr = target.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        for store in (owner._parameters, owner._buffers):
            store.pop(attr, None)
    if changed:  # export's module is compiled already; compiling ~700 nodes again costs ~10 ms
        gm.recompile()
    return gm


def normalise_example_inputs(model: nn.Module, example_inputs: Any) -> dict[str, Any]:
    if example_inputs is None:
        if not hf.is_hf_model(model):
            raise ValueError(
                f"{type(model).__name__} is not a Hugging Face model: pass example_inputs= "
                "(a tensor, a tuple of arguments or a dict of keyword arguments)"
            )
        return hf.example_inputs(model)
    if isinstance(example_inputs, torch.Tensor):
        return bind_inputs(model, (example_inputs,), {})
    if isinstance(example_inputs, Mapping):
        return bind_inputs(model, (), dict(example_inputs))
    if isinstance(example_inputs, (tuple, list)):
        return bind_inputs(model, tuple(example_inputs), {})
    raise TypeError(f"example_inputs must be a tensor, tuple or dict, got {type(example_inputs).__name__}")
