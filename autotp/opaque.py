"""Opaque modules: a submodule torch.export cannot trace runs whole, in eager PyTorch, on every rank.

A mixture of experts written to loop over only the experts a batch routes to (DBRX's, older
Mixtral code, most remote-code MoE) branches on the data: ``for i in mask.nonzero(): ...`` or
``if idx.shape[0] == 0: continue``. torch.export refuses such code (a guard on a data-dependent
size), which used to make autotp refuse the whole model. Instead, :func:`autotp.capture.capture`
retries with the class of the innermost module the failure happened in made *opaque*: each of
its calls is traced as one node, ``autotp::opaque(activations + the module's own tensors)``, and
after export that node becomes a ``call_module`` of an :class:`OpaqueCall`, which runs the
module's own ``forward`` (``torch.func.functional_call`` on a data-less template) on the tensors
the graph passes it. Everything else in the model is planned as before.

Why this is sound: the planner sees a ``call_module``, which no rule covers, so no sharded value
enters it (its inputs are whole, its outputs whole) and its parameters are graph inputs like any
other (loaded whole on every rank, listed in the plan). What export needs to know about the call
is the shapes it returns; those come from running the module twice on zeros for its weights and
inputs of two sets of sizes, each output dim matched to an input dim (or a product of two, or a
constant) that explains both runs. A module that writes into its inputs or buffers is refused
(the node would hide the write). At run time each call checks that its outputs have the
structure and the shapes the graph was captured with, so a module whose output shape depends on
the data raises instead of feeding later ops a tensor of another shape.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import re
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

__all__ = ["OpaqueCall", "OpaqueModuleError", "untraceable_module", "opaque_calls", "install_opaque_calls",
           "opaque_paths"]

_PROBE_STEP = 3  # the second probe's sizes: each symbol's hint plus this times (its index + 1)


class OpaqueModuleError(Exception):
    """A module could not be made opaque (its outputs' shapes cannot be derived, or it writes
    into its inputs or buffers)."""


@torch.library.custom_op("autotp::opaque", mutates_args=())
def _opaque(inputs: list[torch.Tensor], call: str) -> list[torch.Tensor]:
    raise RuntimeError("autotp::opaque stands for a module call only while a model is captured; "
                       "the captured graph calls the module itself")


@_opaque.register_fake
def _opaque_fake(inputs: list[torch.Tensor], call: str) -> list[torch.Tensor]:
    record = _RECORDS[call]
    activations = inputs[:record.activations]
    return [torch.empty([_size(rule, activations) for rule in rules], dtype=dtype, device=activations[0].device)
            for rules, dtype in zip(record.shapes, record.dtypes)]


# The call records of the captures under way, by call key: the fake implementation above can
# only be reached through the op's arguments. Entries live as long as their `opaque_calls`.
_RECORDS: dict[str, "_Record"] = {}


# An output dim, as a function of the call's activations' sizes:
# ("const", n) | ("dim", i, d) | ("mul", (i, d), (j, e))
_Rule = tuple


@dataclass
class _Record:
    """One traced call of an opaque module: how to rebuild its arguments from the tensors the
    node passes, and what it returns."""
    path: str
    module: nn.Module              # a data-less (meta) copy of the module
    why: str
    in_spec: Any                   # pytree spec of (args, kwargs)
    leaves: list[Any]              # their leaves, tensors as _Slot
    activations: int               # how many of the node's tensors are arguments (the rest: state)
    state_names: list[str]         # the module's own tensors, in the node's order
    out_spec: Any
    out_leaves: list[Any]          # the output's leaves, tensors as _Slot
    shapes: list[list[_Rule]]
    dtypes: list[torch.dtype]


class _Slot:
    """Where a tensor was among a call's (or an output's) leaves. Equal to any other slot, so
    that a record's deep copy compares equal."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Slot)

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "<tensor>"


def _holes(leaves: Sequence[Any]) -> list[Any]:
    return [_Slot() if isinstance(x, torch.Tensor) else x for x in leaves]


def _filled(holes: Sequence[Any], tensors: Sequence[torch.Tensor]) -> list[Any]:
    given = iter(tensors)
    return [next(given) if isinstance(x, _Slot) else x for x in holes]


def _size(rule: _Rule, tensors: Sequence[torch.Tensor]) -> Any:
    if rule[0] == "const":
        return rule[1]
    if rule[0] == "dim":
        return tensors[rule[1]].shape[rule[2]]
    (i, d), (j, e) = rule[1], rule[2]
    return tensors[i].shape[d] * tensors[j].shape[e]


# What a failure that comes from reading a tensor's values says, where its type does not:
# numpy() and data_ptr() of the fake tensors export traces with.
_READS_DATA = (".numpy() is not supported for tensor subclasses", "Cannot access data pointer of Tensor",
               "Cannot access storage of")


def untraceable_module(exc: BaseException, root: nn.Module) -> Optional[tuple[str, nn.Module, str]]:
    """Where and why export failed on code that needs the data: the innermost submodule of
    ``root`` (neither ``root`` itself nor one of torch.nn's own classes) running when it failed on
    a guard on a data-dependent size or on reading a tensor's values, as (path, module, why);
    None for any other failure."""
    failure = _data_failure(exc)
    if failure is None:
        return None
    paths = {id(m): p for p, m in root.named_modules(remove_duplicate=False)
             if m is not root and not type(m).__module__.startswith("torch.nn.")}
    found = None
    tb = failure.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if id(owner) in paths:
            found = (paths[id(owner)], owner)
        tb = tb.tb_next
    if found is None:
        return None
    guard = re.search(r"data-dependent expression (.+?) \(unhinted", str(failure))
    first = (str(failure).strip().splitlines() or [type(failure).__name__])[0]
    why = (f"it branches on a size known only from the data: {guard.group(1)}" if guard
           else f"it reads tensor data: {type(failure).__name__}: {first}")
    return found[0], found[1], why


def _data_failure(exc: BaseException) -> Optional[BaseException]:
    """The exception in ``exc``'s chain that says the code needed the data, if one does."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    seen: set[int] = set()
    failure: Optional[BaseException] = exc
    while failure is not None and id(failure) not in seen:
        if isinstance(failure, OpaqueModuleError):
            return None  # a module made opaque could not be: reported as such
        typed = (GuardOnDataDependentSymNode, DataDependentOutputException, DynamicOutputShapeException)
        if isinstance(failure, typed) or any(text in str(failure) for text in _READS_DATA):
            return failure
        seen.add(id(failure))
        failure = failure.__cause__ or failure.__context__
    return None


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


def _data_less(module: nn.Module) -> nn.Module:
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        made = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(made, requires_grad=False) if isinstance(tensor, nn.Parameter) else made
    routed = [(m, m.__dict__.pop("forward")) for m in module.modules() if "forward" in m.__dict__]
    try:
        return copy.deepcopy(module, memo)
    finally:
        for owner, forward in routed:
            owner.__dict__["forward"] = forward


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _traced_forward(module: nn.Module, path: str, template: nn.Module, why: str, records: dict[str, _Record],
                    probed: dict[tuple, tuple], token: str):
    def forward(*args: Any, **kwargs: Any) -> Any:
        leaves, in_spec = pytree.tree_flatten((args, kwargs))
        activations = [x for x in leaves if isinstance(x, torch.Tensor)]
        if not activations:
            raise OpaqueModuleError(f"{path} ({type(module).__name__}) takes no tensor")
        state = _state(module)
        key = (path, in_spec, tuple(_signature(x) for x in leaves))  # per instance: its attributes may decide shapes
        if key not in probed:
            probed[key] = _probe(template, path, _holes(leaves), in_spec, activations)
        out_spec, out_leaves, shapes, dtypes = probed[key]
        call = f"{token}:{len(records)}"
        records[call] = _Record(path, template, why, in_spec, _holes(leaves),
                                len(activations), list(state), out_spec, out_leaves, shapes, dtypes)
        _RECORDS[call] = records[call]
        outputs = _opaque(activations + list(state.values()), call)
        return pytree.tree_unflatten(_filled(out_leaves, outputs), out_spec)

    return forward


def _signature(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("tensor", x.dtype, tuple(str(s) for s in x.shape))
    return ("value", repr(x))


def _hint(size: Any) -> int:
    if isinstance(size, int):
        return size
    hint = size.node.hint
    if hint is None:
        raise OpaqueModuleError("it is called with a size known only from the data")
    return int(hint)


def _probe(template: nn.Module, path: str, leaves: list[Any], in_spec: Any,
           activations: list[torch.Tensor]) -> tuple:
    """Run the module on zeros at the activations' example sizes and at other sizes; derive each
    output dim from the activations' dims. Returns (out_spec, out_leaves, shapes, dtypes)."""
    symbolic = [d for x in activations for d in x.shape if not isinstance(d, int)]
    first = [[_hint(d) for d in x.shape] for x in activations]
    hints = {s: v for d in symbolic for s, v in _backed_hints(d.node.shape_env).items()
             if s in d.node.expr.free_symbols}
    ordered = sorted(hints.items(), key=lambda kv: str(kv[0]))
    shift = {s: int(v) + _PROBE_STEP * (i + 1) for i, (s, v) in enumerate(ordered)}
    second = [[d if isinstance(d, int) else int(d.node.expr.xreplace(shift)) for d in x.shape] for x in activations]
    runs = [_run(template, path, leaves, in_spec, activations, sizes) for sizes in (first, second)]
    (spec_a, leaves_a, shapes_a, dtypes_a), (spec_b, leaves_b, shapes_b, dtypes_b) = runs
    if spec_a != spec_b or leaves_a != leaves_b or dtypes_a != dtypes_b or len(shapes_a) != len(shapes_b):
        raise OpaqueModuleError(f"{path}: its output's structure changes with its inputs' sizes")
    return spec_a, leaves_a, [_dim_rules(a, b, first, second, path) for a, b in zip(shapes_a, shapes_b)], dtypes_a


def _backed_hints(shape_env: Any) -> dict:
    return getattr(shape_env, "backed_var_to_val", None) or shape_env.var_to_val  # renamed in torch 2.13


def _dim_rules(out_a: list[int], out_b: list[int], first: list[list[int]], second: list[list[int]],
               path: str) -> list[_Rule]:
    """Each dim of one output, from its sizes in the two probes."""
    if len(out_a) != len(out_b):
        raise OpaqueModuleError(f"{path}: an output's rank changes with its inputs' sizes")
    return [_rule(a, b, first, second, path) for a, b in zip(out_a, out_b)]


def _rule(a: int, b: int, first: list[list[int]], second: list[list[int]], path: str) -> _Rule:
    dims = [(i, d) for i, shape in enumerate(first) for d in range(len(shape))]
    for i, d in dims:
        if first[i][d] == a and second[i][d] == b and a != b:
            return ("dim", i, d)
    for (i, d), (j, e) in itertools.combinations_with_replacement(dims, 2):
        if first[i][d] * first[j][e] == a and second[i][d] * second[j][e] == b and a != b:
            return ("mul", (i, d), (j, e))
    if a == b:
        return ("const", a)
    raise OpaqueModuleError(f"{path}: an output's size ({a}, then {b}) follows from no input size")


def _run(template: nn.Module, path: str, leaves: list[Any], in_spec: Any, activations: list[torch.Tensor],
         sizes: list[list[int]]) -> tuple:
    """One probe, outside the trace: zeros for the module's tensors and its float inputs."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.utils._python_dispatch import _disable_current_modes

    with unset_fake_temporarily(), _disable_current_modes(), torch._C.DisableTorchFunction(), torch.no_grad():
        device = activations[0].device
        # a copy: what the forward leaves on its module (rotary tables computed from these zeros,
        # say) must not stay on the module the graph will run
        probe = copy.deepcopy(template)
        state = {n: torch.zeros(t.shape, dtype=t.dtype, device=device) for n, t in _state(probe).items()}
        real = _filled(leaves, [_example(x, shape) for x, shape in zip(activations, sizes)])
        args, kwargs = pytree.tree_unflatten(real, in_spec)
        try:
            out = _call_unchanging(probe, state, args, kwargs, path)
        except OpaqueModuleError:
            raise
        except Exception as exc:  # noqa: BLE001  the module's own failure on the probe, named
            raise OpaqueModuleError(f"{path} failed on a probe: {type(exc).__name__}: {exc}") from exc
    flat, out_spec = pytree.tree_flatten(out)
    tensors = [x for x in flat if isinstance(x, torch.Tensor)]
    if not tensors:
        raise OpaqueModuleError(f"{path} returns no tensor")
    return (out_spec, _holes(flat), [list(x.shape) for x in tensors],
            [x.dtype for x in tensors])


def _call_unchanging(module: nn.Module, state: dict[str, torch.Tensor], args: Any, kwargs: dict[str, Any],
                     path: str) -> Any:
    """``module``'s forward on ``args``/``kwargs`` with ``state`` for its tensors; raises
    OpaqueModuleError if it wrote into a tensor it was passed or holds, or changed an object it
    was passed (a cache it updates): a graph node's inputs must come out as they went in."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)] + list(state.values())
    versions = [t._version for t in tensors]
    out = torch.func.functional_call(module, state, tuple(args), kwargs)
    if [t._version for t in tensors] != versions:
        raise OpaqueModuleError(f"{path} writes into its inputs or its own tensors")
    now, spec_now = pytree.tree_flatten((args, kwargs))
    if spec_now != spec or len(now) != len(leaves) \
            or any(a is not b and (isinstance(a, torch.Tensor) or a != b) for a, b in zip(now, leaves)):
        raise OpaqueModuleError(f"{path} changes an object it is passed (a cache it updates, say)")
    return out


def _example(like: torch.Tensor, shape: list[int]) -> torch.Tensor:
    if like.dtype.is_floating_point or like.dtype.is_complex:
        return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(like.dtype).to(like.device)
    if like.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool, device=like.device)
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


class OpaqueCall(nn.Module):
    """A call of an opaque module in a captured graph: takes the call's activations then the
    module's own tensors, runs the module's ``forward`` on them, returns the output's tensors
    (checked against the structure and shapes the graph was captured with)."""

    def __init__(self, record: _Record) -> None:
        super().__init__()
        self.record = record  # its data-less module is no submodule: its meta tensors are no state
        # functional_call puts the tensors on the module for the call and takes them off after:
        # two threads (the simulator's ranks) in one call would run on each other's or on none
        self._calling = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in super().__getstate__().items() if k != "_calling"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._calling = threading.Lock()

    def forward(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        record = self.record
        activations = tensors[:record.activations]
        args, kwargs = pytree.tree_unflatten(_filled(record.leaves, activations), record.in_spec)
        state = dict(zip(record.state_names, tensors[record.activations:]))
        with self._calling:
            try:
                out = _call_unchanging(record.module, state, args, kwargs, record.path)
            except OpaqueModuleError as exc:
                raise RuntimeError(f"autotp: {exc}, which the graph it runs in cannot carry") from None
        flat, spec = pytree.tree_flatten(out)
        outputs = [x for x in flat if isinstance(x, torch.Tensor)]
        expected = [[_size(rule, activations) for rule in rules] for rules in record.shapes]
        if spec != record.out_spec or _holes(flat) != record.out_leaves \
                or [list(x.shape) for x in outputs] != expected or [x.dtype for x in outputs] != record.dtypes \
                or any(x.device != activations[0].device for x in outputs):
            raise RuntimeError(f"autotp: {record.path} ({type(self.record.module).__name__}, run whole) returned "
                               f"{[list(x.shape) for x in outputs]}; the graph was captured for {expected} "
                               "(its output depends on the data in a way the capture could not see)")
        return outputs

    def extra_repr(self) -> str:
        return f"{self.record.path}: {type(self.record.module).__name__}, run whole"


def install_opaque_calls(gm: fx.GraphModule, records: dict[str, _Record]) -> list[str]:
    """Replace every ``autotp::opaque`` node of ``gm`` by a ``call_module`` of an
    :class:`OpaqueCall` (``autotp_opaque_<n>``). Returns the paths made opaque."""
    paths = []
    for index, node in enumerate([n for n in gm.graph.nodes if n.target is torch.ops.autotp.opaque.default]):
        tensors, call = node.args
        record = records[call]
        name = f"autotp_opaque_{index}"
        gm.add_submodule(name, OpaqueCall(record))
        with gm.graph.inserting_before(node):
            replacement = gm.graph.call_module(name, tuple(tensors))
        replacement.meta.update(node.meta)
        replacement.meta["autotp_opaque"] = (f"{record.path} ({type(record.module).__name__}), which runs whole on "
                                             f"every rank: torch.export cannot trace it ({record.why})")
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        paths.append(record.path)
    if paths:
        gm.recompile()
    return paths
