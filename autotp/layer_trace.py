"""A layer's nodes in a trace: what it was given, what it added, and how to copy them.

:mod:`autotp.repeats` records the nodes a layer's trace adds (:func:`record`), compares two
such records (:func:`canonical`) and copies one with another layer's inputs and module paths
(:func:`renamed_stack`, :func:`own_copy`). :func:`graph_signature` is the whole-graph form of
the comparison, for checks against tracing every layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from autotp.layer_state import PLAIN, LayerState, outside_the_trace
from autotp.propagate import schema_arguments

__all__ = ["LayerCall", "TracedLayer", "is_sym", "proxy_node", "tensor_inputs", "input_object", "input_nodes",
           "record", "canonical", "own_copy", "renamed_stack", "graph_signature"]


@dataclasses.dataclass
class LayerCall:
    """How a layer was called: argument structure, and per leaf its tensor metadata or value."""

    spec: Any
    leaves: list[Any]

    def key(self) -> Optional[tuple]:
        """What must match between two calls; None where a call can never share."""
        out = []
        for leaf in self.leaves:
            if isinstance(leaf, torch.Tensor):
                if getattr(leaf, "constant", None) is not None or not hasattr(leaf, "fake_mode"):
                    return None
                out.append(("t", tuple(map(str, leaf.shape)), tuple(map(str, leaf.stride())), str(leaf.dtype),
                            str(leaf.device), leaf.requires_grad, str(leaf.storage_offset())))
            elif isinstance(leaf, PLAIN) and not isinstance(leaf, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                out.append(("v", type(leaf), leaf))
            else:
                return None
        aliases = tuple(next(j for j, other in enumerate(self.leaves) if other is leaf)
                        for leaf in self.leaves if isinstance(leaf, torch.Tensor))
        return (str(self.spec), tuple(out), aliases)


@dataclasses.dataclass
class TracedLayer:
    """A layer traced as usual: its state, call, reads and the nodes it added."""

    path: str
    state: LayerState
    call_key: tuple
    reads: set[tuple[str, str]]
    nodes: list[fx.Node]
    inputs: dict[fx.Node, tuple]  # a node the layer's nodes read from outside -> ("arg", i) / ("tensor", name)
    outputs: list[Any]  # per output leaf: a node, or the leaf itself (a plain value)
    out_spec: Any
    constants: dict[str, tuple]  # a constant tensor the layer made (get_attr target) -> its value
    retracked: dict[tuple, fx.Node]  # an input ("arg", i) / ("tensor", name) -> the node it is tracked under after
    confirmed: bool = False
    failed: bool = False


def is_sym(node: Any) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))


def proxy_node(tensor: torch.Tensor, tracer: Any) -> Optional[fx.Node]:
    from torch.fx.experimental.proxy_tensor import get_proxy_slot

    slot = get_proxy_slot(tensor, tracer, None)
    return None if slot is None else slot.proxy.node


def _unshareable_node(nodes: list[fx.Node], constants: dict[str, tuple]) -> Optional[str]:
    """Why a layer's nodes cannot be copied (None if they can): they must be plain calls (no
    higher-order op) or reads of small constants, mutating only what they made."""
    made = set(nodes)
    for node in nodes:
        if node.op == "get_attr" and node.target in constants:
            continue
        if node.op != "call_function" or isinstance(node.target, torch._ops.HigherOrderOperator):
            return f"{node.name} is a {node.op} of {node.target}"
        # a Python function on SymInts (operator.mul, sym_size) has no schema, and mutates nothing
        for arg, value in schema_arguments(node):
            if (arg.alias_info is not None and arg.alias_info.is_write
                    and not (isinstance(value, fx.Node) and value in made)):
                return f"{node.name} ({node.target}) mutates what the layer did not make"
    return None


def _views_an_input(node: fx.Node, made: set[fx.Node]) -> bool:
    """Whether ``node`` may share memory with something the layer did not make (its outputs are
    given to members as fresh tensors, which would break that aliasing)."""
    seen = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current not in made:
            return True
        schema = getattr(current.target, "_schema", None)
        if schema is None or not any(r.alias_info is not None for r in schema.returns):
            continue
        for arg, value in zip(schema.arguments, current.args):
            if arg.alias_info is not None and isinstance(value, fx.Node):
                stack.append(value)
    return False


def canonical(traced: TracedLayer) -> tuple:
    """The layer's nodes with their references resolved relative to the layer: what two traces
    of equal layers must agree on."""
    index = {node: i for i, node in enumerate(n for n in traced.nodes if not is_sym(n))}

    def ref(value: Any) -> Any:
        if isinstance(value, fx.Node):
            if is_sym(value):
                return ("sym", str(value.meta["val"]))
            if value in index:
                return ("node", index[value])
            return ("in", traced.inputs.get(value, ("outside", value.name)))
        return value

    rows = []
    for node in traced.nodes:
        if is_sym(node):
            continue
        if node.op == "get_attr":
            rows.append(("constant", traced.constants[node.target]))
            continue
        val = node.meta.get("val")
        meta = pytree.tree_map(lambda v: (tuple(map(str, v.shape)), str(v.dtype), tuple(map(str, v.stride())))
                               if isinstance(v, torch.Tensor) else v, val)
        rows.append((node.op, str(node.target), pytree.tree_map(ref, node.args), pytree.tree_map(ref, node.kwargs),
                     str(meta)))
    return tuple(rows), tuple(ref(o) for o in traced.outputs), str(traced.out_spec)


def _constant_value(value: Any) -> Optional[tuple]:
    """A small constant tensor's metadata and values (what two traces' constants must agree on);
    None for anything else."""
    if (not isinstance(value, torch.Tensor) or hasattr(value, "fake_mode") or value.device.type == "meta"
            or value.numel() > 64):
        return None
    with outside_the_trace():
        values = value.flatten().tolist()
    if not all(type(v) in (bool, int, float, complex) for v in values):  # symbolic (torch.tensor(u0 == 1))
        return None
    return (tuple(value.shape), str(value.dtype), tuple(values))


def own_copy(constant: torch.Tensor) -> torch.Tensor:
    """A constant of a copied layer is its own object, as each trace makes one: export lifts
    constants by identity, under the path of the layer that uses them."""
    with outside_the_trace():
        return constant.clone()  # real data (_constant_value)


def renamed_stack(stack: dict, rep_path: str, member_path: str, outer: dict, keys: dict[str, str],
                   num_calls: dict[str, int]) -> dict:
    """A copied node's ``nn_module_stack``: the member's call stack, then the representative's
    frames inside the layer with the member's paths. A frame's key is its path, with ``@n`` from
    the second call of that module on: ``keys`` (the representative's key -> the member's, for
    this copy) and the tracer's ``num_calls`` are kept as the tracer's own module calls keep them."""
    out = dict(outer)
    for key, (fqn, cls) in stack.items():
        if not fqn.startswith(rep_path + "."):
            continue  # a frame around the layer, or the layer's own: ``outer`` has the member's
        if key not in keys:
            new_fqn = member_path + fqn[len(rep_path):]
            calls = num_calls.get(new_fqn, 0)
            keys[key] = f"{new_fqn}@{calls}" if calls else new_fqn
            num_calls[new_fqn] = calls + 1
        out[keys[key]] = (member_path + fqn[len(rep_path):], cls)
    return out


def tensor_inputs(call: LayerCall, state: LayerState) -> list[tuple[tuple, torch.Tensor]]:
    """Each tensor a layer is given or holds, by where it is: ("arg", leaf index) or ("tensor",
    relative name)."""
    given = [(("arg", i), leaf) for i, leaf in enumerate(call.leaves) if isinstance(leaf, torch.Tensor)]
    return given + [(("tensor", name), tensor) for name, tensor in state.tensors.items()]


def input_object(call: LayerCall, state: LayerState, where: tuple) -> torch.Tensor:
    """The tensor at ``where`` (a key of :func:`tensor_inputs`)."""
    kind, at = where
    return call.leaves[at] if kind == "arg" else state.tensors[at]


def input_nodes(call: LayerCall, state: LayerState, tracer: Any) -> Optional[dict[fx.Node, tuple]]:
    """The node of each tensor a layer is given or holds -> where it is (the first place, for a
    tensor given twice); None if one has no node."""
    inputs: dict[fx.Node, tuple] = {}
    for where, tensor in tensor_inputs(call, state):
        if (found := proxy_node(tensor, tracer)) is None:
            return None
        inputs.setdefault(found, where)
    return inputs


def record(path: str, state: LayerState, call: LayerCall, call_key: tuple, reads: set[tuple[str, str]],
           inputs: dict[fx.Node, tuple], last: fx.Node, tracer: Any, out: Any) -> "TracedLayer | str":
    """The record of a layer just traced, whose nodes follow ``last``; why they cannot be copied
    where they cannot."""
    nodes = []
    node = last.next
    while node.op != "root":
        nodes.append(node)
        node = node.next
    made = set(nodes)
    for node in nodes:  # every outside tensor a node reads is an argument or the layer's own
        for used in node.all_input_nodes:
            if used not in made and used not in inputs and not is_sym(used) and not is_sym(node):
                return f"{node.name} reads {used.name}, neither an argument nor the layer's own"
    constants = {}
    for node in nodes:
        if node.op == "get_attr" and (value := _constant_value(getattr(tracer.root, node.target, None))) is not None:
            constants[node.target] = value
    if (refusal := _unshareable_node(nodes, constants)) is not None:
        return refusal
    retracked = {}  # an input a no-op (``x.to(x.dtype)``) returned as itself is tracked under the new node
    before = {where: node for node, where in inputs.items()}
    for where, tensor in tensor_inputs(call, state):
        now = proxy_node(tensor, tracer)
        if now in made:
            retracked[where] = now
        elif where in before and now is not before[where]:
            return f"an input is tracked under another node after the call ({now})"
    out_leaves, out_spec = pytree.tree_flatten(out)
    outputs: list[Any] = []
    for leaf in out_leaves:
        if isinstance(leaf, torch.Tensor):
            found = proxy_node(leaf, tracer)
            if found is None or (found not in made and found not in inputs):
                return "an output is neither an input nor made by the layer"
            if found in made and _views_an_input(found, made):
                return "an output is a view of an input"
            outputs.append(found)
        elif isinstance(leaf, PLAIN) and not isinstance(leaf, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            outputs.append(leaf)
        else:
            return f"an output is a {type(leaf).__name__}"
    return TracedLayer(path, state, call_key, reads, nodes, inputs, outputs, out_spec, constants, retracked)


def graph_signature(graph: fx.Graph) -> list[tuple]:
    """A graph as a run and the planner read it: per node, in order, its op, target, arguments
    (nodes as their positions), module stack (keys and paths) and output shape. Copied layers give the
    signature of tracing every layer; node *names* may differ (a copy reuses the
    representative's size reads, so later names are numbered lower)."""
    index = {node: i for i, node in enumerate(graph.nodes)}

    def ref(value: Any) -> Any:
        return ("node", index[value]) if isinstance(value, fx.Node) else value

    rows = []
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        val = node.meta.get("val")
        rows.append((node.op, node.name if node.op == "placeholder" else str(node.target),
                     str(pytree.tree_map(ref, node.args)), str(pytree.tree_map(ref, node.kwargs)),
                     tuple((key, path) for key, (path, _) in stack.items()), str(getattr(val, "shape", type(val).__name__))))
    return rows
