"""Repeated layers, traced once: capture copies a layer's graph to the identical layers after it.

Capture's cost is torch.export's symbolic trace: ~0.1 s per decoder layer (fake-tensor and SymInt
bookkeeping for ~60 aten ops), 9 s of an 80-layer model's plan. Most of those layers run the same
code on the same state with inputs of the same metadata, so each records the same nodes, up to
which parameters they read. Here the first such layer (the *representative*) is traced as usual,
and a later *member* gets a copy of the representative's nodes, wired to the member's inputs and
parameters and labelled with the member's module path, instead of running its forward.

A member takes the representative's graph only if all of these hold (else it is traced as usual):

- **Structure**: the same class at every relative module path, the same parameter and buffer
  names, shapes, dtypes and tying, no submodule or tensor reached from outside the layer.
- **State**: every other attribute of every submodule equal in type and value, except attributes
  that differ (``layer_idx``) but that the representative's forward never read. Reads are watched
  by a descriptor put on the class for the duration of the capture: a forward that reads no
  differing value runs step for step as the representative's did.
- **Inputs**: the same argument structure; tensors with the same fake metadata (symbolic sizes,
  strides, dtype, device), none a constant; other values equal in type and value.
- **The representative's trace**: made no new symbol (a data-dependent size), read no constant
  tensor but small ones (each copy gets its own, equal by value), called no higher-order op,
  wrote no attribute, mutated nothing it did not create, and returned no view of an input. No
  module inside the layer has hooks (a copy calls none of them).
- **Routing**: the calls reach this module through the layer's class ``forward``, replaced for
  the capture, so that ``self`` is what the tracer called (export's attribute proxy, where it
  makes them) and module paths are the tracer's own.
- **Confirmation**: the first member that qualifies is also traced as usual, and its nodes must
  be the representative's (op by op, with the same arguments and output metadata). Only later
  members are copied. This catches what the rules cannot see, where it already shows in the first
  member: a forward that reads global state the previous layer changed, or reads an attribute
  through ``__dict__``. It cannot catch a difference that first shows in a later member (below).

Copying a member without running its forward is sound only if nothing the member's forward reads
differs from the representative's where the watch cannot see it: an attribute read through
``self.__dict__`` or ``vars(self)``, a module global or a shared object that changes between layer
calls. The confirmation catches such a change only when it already shows in the first member
(state that differs from the third layer on is copied wrong). So by default only layers whose code
is transformers' modeling code or torch's own modules share (``checked_code``): those are checked
family by family (``scripts/repeats_check.py`` compares every family's graph and plan with and
without copying). Other code shares when asked: ``AUTOTP_SHARE_LAYERS=1`` (or ``capture(...,
share_layers=True)``); ``AUTOTP_SHARE_LAYERS=0`` (or ``share_layers=False``) traces every layer.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from autotp.layer_state import (MISSING, ROUTE_PREFIX, LayerState, Watch, differing, hooked, layer_state,
                                tensor_meta, unchanged)
from autotp.layer_trace import (LayerCall, TracedLayer, canonical, graph_signature, input_nodes, input_object,
                                is_sym, own_copy, proxy_node, record, renamed_stack)

__all__ = ["share_repeated_layers", "graph_signature", "checked_code", "SHARE_MODES"]

_ROUTE = ROUTE_PREFIX + "route"  # on a layer that may share: (group index, path)
# off: trace every layer; checked: share the layers whose code is checked_code's; all: any layer
SHARE_MODES = ("off", "checked", "all")
# The packages whose layers share by default: see the module docstring.
_CHECKED_PACKAGES = frozenset({"transformers", "torch"})


class _Sharing:
    """For one capture: which layers may share, what each traced, and the watches on classes."""

    def __init__(self) -> None:
        self.traced: dict[int, list[TracedLayer]] = {}  # group index -> representatives
        self.watched: dict[int, set[tuple[str, str]]] = {}  # group index -> attributes watched
        # the layers being traced, innermost last: (their modules' paths, the watched reads so far)
        self.watching: list[tuple[dict[int, str], set[tuple[str, str]]]] = []
        self.notes: list[tuple[str, str]] = []  # (layer path, what was done and why), in call order
        self.active: set[int] = set()  # layers (by id(vars(layer))) whose call is being handled

    def touched(self, obj: Any, name: str) -> None:
        """A watched attribute was read or written: a read of every layer being traced that
        holds ``obj`` (a layer inside a layer reads for both)."""
        for paths, reads in self.watching:
            if (path := paths.get(id(vars(obj)))) is not None:
                reads.add((path, name))

    def forward(self, group: int, path: str, layer: nn.Module, original: Callable[..., Any],
                *args: Any, **kwargs: Any) -> Any:
        """The routed forward of a layer that may share: copy, or trace (and record) as usual."""
        from torch.fx.experimental.proxy_tensor import get_proxy_mode

        mode = get_proxy_mode()
        if mode is None:
            return original(*args, **kwargs)
        tracer = mode.tracer
        frames = getattr(tracer, "module_stack", None)
        if frames:  # the layer's own frame: its path as the tracer names it in nn_module_stack
            path = next(reversed(frames.values()))[0]
        leaves, spec = pytree.tree_flatten((args, kwargs))
        call = LayerCall(spec, leaves)
        call_key = call.key()
        state = layer_state(layer)
        refusal = None
        if call_key is None:
            refusal = "an argument is a symbolic number, a constant tensor or an object"
        elif hooked(layer):
            refusal, call_key = "a module inside it has hooks (a copy would call none of them)", None
        reps = self.traced.setdefault(group, [])
        rep = next((r for r in reps if self._may_take(r, group, state, call_key)), None) if call_key else None
        if rep is not None and rep.confirmed:
            copied = self._copy(rep, path, state, call, tracer)
            if copied is not MISSING:
                for rel, name in rep.reads:  # the reads its forward would have made, for a layer around it
                    self.touched(layer.get_submodule(rel) if rel else layer, name)
                self.notes.append((path, f"copied from {rep.path}"))
                return copied
        mine, out = self._trace(layer, state, call, call_key, refusal, tracer, original, args, kwargs)
        if isinstance(mine, str):
            note = f"traced: {mine}"
        elif rep is None:
            note = "traced: the first of its kind"
            reps.append(mine)
        elif canonical(mine) == canonical(rep):
            note = f"traced: confirms {rep.path}"
            rep.confirmed = True
        else:  # neither is copied; this one may be confirmed by a later layer
            note = f"traced: differs from {rep.path}, which is not copied"
            rep.failed = True
            reps.append(mine)
        if not isinstance(mine, str):
            mine.path = path
        self.notes.append((path, note))
        return out

    @property
    def copied(self) -> int:
        return sum(note.startswith("copied") for _, note in self.notes)

    def _may_take(self, rep: TracedLayer, group: int, state: LayerState, call_key: tuple) -> bool:
        """Whether a layer in ``state``, called as ``call_key``, would trace as ``rep`` did."""
        if rep.failed or rep.call_key != call_key:
            return False
        differ = differing(rep.state, state)
        return differ is not None and differ <= self.watched[group] and not differ & rep.reads

    def _trace(self, layer: nn.Module, state: LayerState, call: LayerCall, call_key: Optional[tuple],
               refusal: Optional[str], tracer: Any, original: Callable[..., Any], args: tuple,
               kwargs: dict) -> tuple["TracedLayer | str", Any]:
        """Trace ``layer`` as usual, recording what it read and the nodes it added: (the record, or
        why these nodes can never be copied (``refusal``, if the caller knows already); the
        layer's output)."""
        graph = tracer.graph
        last = next(iter(reversed(graph.nodes)))
        # the inputs' nodes before the call: an op such as a no-op .to() tracks the same tensor again
        inputs = input_nodes(call, state, tracer) if call_key is not None else None
        shape_env = next((leaf.fake_mode.shape_env for leaf in call.leaves if hasattr(leaf, "fake_mode")), None)
        symbols = len(shape_env.var_to_range) if shape_env is not None else None
        reads: set[tuple[str, str]] = set()
        self.watching.append((state.paths, reads))
        try:
            out = original(*args, **kwargs)
        finally:
            self.watching.pop()
        if refusal is not None:
            return refusal, out
        if inputs is None:
            return "an argument or parameter has no node", out
        if shape_env is None or len(shape_env.var_to_range) != symbols:
            return "it made a new symbol (a data-dependent size)", out
        if not unchanged(state, layer_state(layer)):
            return "it wrote an attribute", out
        return record("", state, call, call_key, reads, inputs, last, tracer, out), out

    def _copy(self, rep: TracedLayer, path: str, state: LayerState, call: LayerCall, tracer: Any) -> Any:
        """The member's nodes: the representative's, copied with the member's inputs."""
        from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, track_tensor_tree

        given: dict[fx.Node, Any] = {}  # representative's input node -> the member's (node, object)
        for node, where in rep.inputs.items():
            obj = input_object(call, state, where)
            found = proxy_node(obj, tracer)
            if found is None:
                return MISSING
            given[node] = (found, obj)
        env = {node: found for node, (found, _) in given.items()}
        graph = tracer.graph
        outer_stack = {key: (fqn, f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else cls)
                       for key, (fqn, cls) in tracer.module_stack.items()}  # as the tracer's create_node writes it
        keys: dict[str, str] = {}
        for node in rep.nodes:
            if is_sym(node):
                env[node] = node  # a symbolic size is the same value wherever it was computed
                continue
            if node.op == "get_attr":
                name = tracer.get_fresh_qualname("_tensor_constant")
                setattr(tracer.root, name, own_copy(getattr(tracer.root, node.target)))
                copy = graph.get_attr(name)
                tracer.tensor_attrs[getattr(tracer.root, name)] = name
            else:
                copy = graph.node_copy(node, lambda n: env.get(n, n))
            copy.meta = {key: list(value) if isinstance(value, list) else value  # no list shared with the original
                         for key, value in node.meta.items()}
            if "nn_module_stack" in node.meta:
                copy.meta["nn_module_stack"] = renamed_stack(node.meta["nn_module_stack"], rep.path, path, outer_stack,
                                                              keys, tracer.num_calls)
            env[node] = copy
        for where, node in rep.retracked.items():  # as the trace would have left them
            proxy = fx.Proxy(env[node], tracer)
            track_tensor_tree(input_object(call, state, where), proxy, constant=None, tracer=tracer)
        results = []
        made = {}
        for out in rep.outputs:
            if not isinstance(out, fx.Node):
                results.append(out)
            elif out in given:
                results.append(given[out][1])
            elif out in made:
                results.append(made[out])
            else:
                val = out.meta["val"]
                with disable_proxy_modes_tracing(), val.fake_mode:
                    fresh = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=val.device)
                track_tensor_tree(fresh, fx.Proxy(env[out], tracer), constant=None, tracer=tracer)
                made[out] = fresh
                results.append(fresh)
        return pytree.tree_unflatten(results, rep.out_spec)


def checked_code(layer: nn.Module) -> bool:
    """Whether every module in ``layer`` runs code of transformers' or torch's own: its class,
    the ``forward`` and ``__call__`` it runs, and no ``forward`` set on the instance."""
    for module in layer.modules():
        cls = type(module)
        if "forward" in vars(module):
            return False
        for code in (cls, cls.forward, cls.__call__):
            if (getattr(code, "__module__", None) or "").split(".")[0] not in _CHECKED_PACKAGES:
                return False
    return True


def _groups(root: nn.Module, checked_only: bool) -> list[list[tuple[str, nn.Module, LayerState]]]:
    """Layers that may share, with their states: the children of one container with the same
    classes and tensor shapes, none of whose modules or tensors is also reached from outside the
    layer (and, if ``checked_only``, whose code is :func:`checked_code`)."""
    owners: dict[int, int] = {}
    for _, module in root.named_modules(remove_duplicate=False):
        owners[id(module)] = owners.get(id(module), 0) + 1
    tensor_owners: dict[int, int] = {}
    for kind in ("named_parameters", "named_buffers"):
        for _, tensor in getattr(root, kind)(remove_duplicate=False):
            tensor_owners[id(tensor)] = tensor_owners.get(id(tensor), 0) + 1
    groups = []
    for prefix, container in root.named_modules():
        if not isinstance(container, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            continue
        by_shape: dict[tuple, list[tuple[str, nn.Module, LayerState]]] = {}
        for name, child in container.named_children():
            if checked_only and not checked_code(child):
                continue
            state = layer_state(child)
            if any(owners[id(m)] > 1 for _, m in child.named_modules(remove_duplicate=False)):
                continue
            if any(tensor_owners[id(t)] > 1 for t in state.tensors.values()):
                continue
            shape = (state.classes, state.tying, tuple((n, tensor_meta(t)) for n, t in state.tensors.items()))
            by_shape.setdefault(shape, []).append((f"{prefix}.{name}" if prefix else name, child, state))
        groups.extend(members for members in by_shape.values() if len(members) >= 3)
    return groups


@contextlib.contextmanager
def share_repeated_layers(skeleton: nn.Module, mode: str = "checked") -> Iterator[Optional[_Sharing]]:
    """While this is entered, the layers of ``skeleton`` (a capture's own copy of the model) that
    repeat take their representative's graph when exported (``mode``: one of SHARE_MODES). Yields
    the sharing (``.copied`` counts the layers copied), or None when nothing repeats."""
    if mode not in SHARE_MODES:
        raise ValueError(f"layer sharing mode {mode!r}: expected one of {', '.join(SHARE_MODES)}")
    groups = _groups(skeleton, checked_only=mode == "checked") if mode != "off" else []
    if not groups:
        yield None
        return
    sharing = _Sharing()
    watches: dict[tuple[type, str], Any] = {}
    for index, members in enumerate(groups):  # watch every attribute that differs within a group
        states = [state for _, _, state in members]
        differ = set().union(*(differing(states[0], state) or set() for state in states[1:]))
        sharing.watched[index] = differ
        for rel, name in differ:
            watches.setdefault((type(members[0][1].get_submodule(rel)), name), None)
    installed = []
    try:
        for (cls, name) in watches:
            if isinstance(cls.__dict__.get(name), Watch):
                continue
            previous = cls.__dict__.get(name, MISSING)
            setattr(cls, name, Watch(name, previous, sharing))
            installed.append((cls, name, previous))
        for index, members in enumerate(groups):  # each layer's class routes the calls of the marked ones
            for path, layer, _ in members:
                layer.__dict__[_ROUTE] = (index, path)
                cls = type(layer)
                if cls.__dict__.get("forward") is None or not getattr(cls.__dict__["forward"], "_autotp_routed", False):
                    installed.append((cls, "forward", cls.__dict__.get("forward", MISSING)))
                    setattr(cls, "forward", _routed(cls.forward, sharing))
        yield sharing
    finally:
        for members in groups:
            for _, layer, _ in members:
                layer.__dict__.pop(_ROUTE, None)
        for cls, name, previous in reversed(installed):
            if previous is MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, previous)


def _routed(original: Callable[..., Any], sharing: _Sharing) -> Callable[..., Any]:
    """A class's ``forward`` for the capture: a marked layer's call goes to ``sharing``. It is
    put on the class, not the instance, so that ``self`` is what the tracer called (export's
    attribute proxy of the layer, where it makes them), and the module paths stay its."""
    original = getattr(original, "__wrapped__", original) if getattr(original, "_autotp_routed", False) else original

    @functools.wraps(original)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        route = vars(self).get(_ROUTE)
        if route is None or id(vars(self)) in sharing.active:  # not a layer, or a super() call inside one
            return original(self, *args, **kwargs)
        sharing.active.add(id(vars(self)))
        try:
            return sharing.forward(route[0], route[1], self, functools.partial(original, self), *args, **kwargs)
        finally:
            sharing.active.discard(id(vars(self)))

    forward._autotp_routed = True  # type: ignore[attr-defined]
    return forward
