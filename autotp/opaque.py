"""Opaque modules: a submodule torch.export cannot trace runs whole, in eager PyTorch, on every rank.

A mixture of experts written to loop over only the experts a batch routes to (DBRX's, older
Mixtral code, most remote-code MoE) branches on the data: ``for i in mask.nonzero(): ...`` or
``if idx.shape[0] == 0: continue``. torch.export refuses such code (a guard on a data-dependent
size), which used to make autotp refuse the whole model. Instead, :func:`autotp.capture.capture`
retries with the class of the innermost module the failure happened in made *opaque*
(:mod:`autotp.opaque_failures`): each of
its calls is traced as one node, ``autotp::opaque(activations + the module's own tensors)``, and
after export that node becomes a ``call_module`` of an :class:`OpaqueCall`, which runs the
module's own ``forward`` (``torch.func.functional_call`` on a data-less template) on the tensors
the graph passes it. Everything else in the model is planned as before.

Why this is sound: the planner sees a ``call_module``, which no rule covers, so no sharded value
enters it (its inputs are whole, its outputs whole) and its parameters are graph inputs like any
other (loaded whole on every rank, listed in the plan). What export needs to know about the call
is the shapes it returns (:mod:`autotp.opaque_probe`: from running it on zeros at two sets of
sizes). A module that writes into what it is passed or holds, or changes an object it is passed
(a cache it updates), is refused: the node would hide the write. The module's own hooks run in
the graph (export traced them around the node), not again inside it. At run time each call
checks that its outputs have the structure and the shapes the graph was captured with, so a
module whose output shape follows its inputs in a way the probes did not see raises instead of
feeding later ops a tensor of another shape.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from autotp.opaque_probe import (OpaqueModuleError, Rule, call_sizes, call_unchanging, filled, holes, module_state,
                                 probe_shapes, size_of)

__all__ = ["OpaqueCall", "OpaqueModuleError", "opaque_calls", "install_opaque_calls", "opaque_paths"]


@torch.library.custom_op("autotp::opaque", mutates_args=())
def _opaque(inputs: list[torch.Tensor], sizes: list[int], call: str) -> list[torch.Tensor]:
    raise RuntimeError("autotp::opaque stands for a module call only while a model is captured; "
                       "the captured graph calls the module itself")


@_opaque.register_fake
def _opaque_fake(inputs: list[torch.Tensor], sizes: list[int], call: str) -> list[torch.Tensor]:
    record = _RECORDS[call]
    known = call_sizes(inputs[:record.activations], sizes)
    device = inputs[0].device
    return [torch.empty([size_of(rule, known) for rule in rules], dtype=dtype, device=device)
            for rules, dtype in zip(record.shapes, record.dtypes)]


# The call records of the captures under way, by call key: the fake implementation above can
# only be reached through the op's arguments. Entries live as long as their `opaque_calls`.
_RECORDS: dict[str, "_Record"] = {}

# functional_call puts the graph's tensors on a call's data-less module and takes them off after:
# two threads (the simulator's ranks) in calls of one module would run on each other's tensors,
# or on none. Calls of opaque modules take turns, process-wide.
_CALLING = threading.Lock()


@dataclass
class _Record:
    """One traced call of an opaque module: how to rebuild its arguments from what the node
    passes (its tensor arguments, the module's tensors, its size arguments), and what it returns."""
    path: str
    module: nn.Module              # a data-less (meta) copy of the module, without its own hooks
    why: str
    in_spec: Any                   # pytree spec of (args, kwargs)
    slots: list[Any]               # their leaves, tensors and sizes as Slots
    activations: int               # how many tensor arguments the node passes first
    state_names: list[str]         # the module's own tensors, passed next
    sizes: int                     # how many size arguments come last
    out_spec: Any
    out_slots: list[Any]           # the output's leaves, tensors as Slots
    shapes: list[list[Rule]]
    dtypes: list[torch.dtype]


def opaque_paths(root: nn.Module, classes: frozenset[type]) -> list[str]:
    """The submodules of ``root`` that are instances of ``classes``, outermost first, without
    those inside another (it runs whole, with them in it)."""
    kept: list[str] = []
    for path, module in root.named_modules():
        if module is not root and type(module) in classes and not any(path.startswith(p + ".") for p in kept):
            kept.append(path)
    return kept


@contextlib.contextmanager
def opaque_calls(skeleton: nn.Module, model: nn.Module, classes: dict[type, str]) -> Iterator[dict[str, _Record]]:
    """While entered, every call of a ``skeleton`` submodule of one of ``classes`` (mapped to why
    it is opaque) traces as one ``autotp::opaque`` node. ``model``: the module the skeleton was
    copied from (its submodules give the data-less copies the calls will run). Yields the call
    records, by key, for :func:`install_opaque_calls`."""
    records: dict[str, _Record] = {}
    if not classes:  # the common case: nothing to patch
        yield records
        return
    probed: dict[tuple, tuple] = {}
    token = f"{id(records):x}"
    patched = []
    for path in opaque_paths(skeleton, frozenset(classes)):
        module = skeleton.get_submodule(path)
        template = _data_less(model.get_submodule(path))
        why = classes[type(module)]
        module.__dict__["forward"] = _traced_forward(module, path, template, why, records, probed, token)
        patched.append(module)
    try:
        yield records
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
        for key in records:
            _RECORDS.pop(key, None)


_OWN_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
              "_forward_hooks_always_called")


def _data_less(module: nn.Module) -> nn.Module:
    """A copy of ``module`` on ``meta`` (:func:`autotp.capture.meta_twin`), without the forward
    hooks put on it (not on its children): export traces those around the node, so they run in
    the graph already."""
    from autotp.capture import meta_twin  # capture imports this module

    made = meta_twin(module)
    for hooks in _OWN_HOOKS:
        getattr(made, hooks, {}).clear()
    return made


def _traced_forward(module: nn.Module, path: str, template: nn.Module, why: str, records: dict[str, _Record],
                    probed: dict[tuple, tuple], token: str):
    def forward(*args: Any, **kwargs: Any) -> Any:
        try:
            return trace(args, kwargs)
        except OpaqueModuleError as exc:
            exc.cls = type(module)
            raise

    def trace(args: tuple, kwargs: dict[str, Any]) -> Any:
        leaves, in_spec = pytree.tree_flatten((args, kwargs))
        activations = [x for x in leaves if isinstance(x, torch.Tensor)]
        counts = [x for x in leaves if isinstance(x, torch.SymInt)]
        if not activations:
            raise OpaqueModuleError(f"{path} ({type(module).__name__}) takes no tensor")
        if any(isinstance(x, (torch.SymFloat, torch.SymBool)) for x in leaves):
            raise OpaqueModuleError(f"{path} ({type(module).__name__}) is passed a symbolic float or bool")
        state = module_state(module)
        slots = holes(leaves)
        key = (path, in_spec, tuple(_signature(x) for x in leaves))  # per instance: its attributes may decide shapes
        if key not in probed:
            probed[key] = probe_shapes(template, path, slots, in_spec, activations, counts)
        out_spec, out_slots, shapes, dtypes = probed[key]
        call = f"{token}:{len(records)}"
        records[call] = _Record(path, template, why, in_spec, slots, len(activations), list(state), len(counts),
                                out_spec, out_slots, shapes, dtypes)
        _RECORDS[call] = records[call]
        outputs = _opaque(activations + list(state.values()), counts, call)
        return pytree.tree_unflatten(filled(out_slots, outputs), out_spec)

    return forward


def _signature(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("tensor", x.dtype, tuple(str(s) for s in x.shape))
    return ("value", repr(x))


class OpaqueCall(nn.Module):
    """A call of an opaque module in a captured graph: takes the call's tensor arguments, the
    module's own tensors, then its size arguments; runs the module's ``forward`` on them; returns
    the output's tensors, checked against the structure and shapes the graph was captured with."""

    def __init__(self, record: _Record) -> None:
        super().__init__()
        self.record = record  # its data-less module is no submodule: its meta tensors are no state
        self.called = False  # a first call may fill what the module keeps (a table built once)

    def forward(self, *values: Any) -> list[torch.Tensor]:
        record = self.record
        activations = values[:record.activations]
        state = dict(zip(record.state_names, values[record.activations:len(values) - record.sizes]))
        counts = values[len(values) - record.sizes:]
        args, kwargs = pytree.tree_unflatten(filled(record.slots, activations, counts), record.in_spec)
        with _CALLING:
            before = _kept_state(record.module)
            try:
                out = call_unchanging(record.module, state, args, kwargs, record.path)
            except OpaqueModuleError as exc:
                raise RuntimeError(f"autotp: {exc}, which the graph it runs in cannot carry") from None
            if self.called and _kept_state(record.module) != before:
                raise RuntimeError(f"autotp: {record.path} ({type(record.module).__name__}, run whole) changed what it "
                                   "keeps between calls (an attribute or buffer it sets in forward): each captured "
                                   "graph runs its own copy of the module, so that state would not be the eager "
                                   "model's")
            self.called = True
        flat, spec = pytree.tree_flatten(out)
        outputs = [x for x in flat if isinstance(x, torch.Tensor)]
        known = call_sizes(activations, counts)
        expected = [[size_of(rule, known) for rule in rules] for rules in record.shapes]
        if spec != record.out_spec or holes(flat) != record.out_slots \
                or [list(x.shape) for x in outputs] != expected or [x.dtype for x in outputs] != record.dtypes \
                or any(x.device != activations[0].device for x in outputs):
            raise RuntimeError(f"autotp: {record.path} ({type(record.module).__name__}, run whole) returned "
                               f"{[list(x.shape) for x in outputs]} for inputs of sizes "
                               f"{[list(x.shape) for x in activations]}; the graph was captured for {expected}: "
                               "its output follows its inputs' sizes or values in a way its probes did not see")
        return outputs

    def extra_repr(self) -> str:
        return f"{self.record.path}: {type(self.record.module).__name__}, run whole"


# nn.Module's own attributes: what a module keeps of its own is anything else in its __dict__
_MODULE_ATTRIBUTES = frozenset(vars(nn.Module())) - {"_parameters", "_buffers"}


def _kept_state(module: nn.Module) -> list[tuple]:
    """What ``module`` and its submodules hold between calls, by identity: their attributes, and
    the names and objects of their parameters and buffers (functional_call puts the graph's
    tensors there only for a call)."""
    kept = []
    for m in module.modules():
        for name, value in vars(m).items():
            if name in ("_parameters", "_buffers"):
                kept.append((id(m), name, tuple((k, id(v)) for k, v in value.items())))
            elif name not in _MODULE_ATTRIBUTES:
                kept.append((id(m), name, _identity(value)))
    return kept


def _identity(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value), value._version)
    if isinstance(value, (int, float, str, bool, type(None))):
        return ("value", value)
    return ("object", id(value))


def install_opaque_calls(gm: fx.GraphModule, records: dict[str, _Record]) -> None:
    """Replace every ``autotp::opaque`` node of ``gm`` by a ``call_module`` of an
    :class:`OpaqueCall` (``autotp_opaque_<n>``)."""
    if not records:
        return
    op = torch.ops.autotp.opaque.default
    for index, node in enumerate([n for n in gm.graph.nodes if n.target is op]):
        tensors, counts, call = node.args
        record = records[call]
        name = f"autotp_opaque_{index}"
        gm.add_submodule(name, OpaqueCall(record))
        with gm.graph.inserting_before(node):
            replacement = gm.graph.call_module(name, (*tensors, *counts))
        replacement.meta.update(node.meta)
        replacement.meta["autotp_opaque"] = (f"{record.path} ({type(record.module).__name__}), which runs whole on "
                                             f"every rank: torch.export cannot trace it ({record.why})")
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
    gm.recompile()
