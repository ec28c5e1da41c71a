"""A rank's rewritten graph module as JSON and tensors, and back: what an entry of the graph
cache (:mod:`autotp.cache`) holds. Nodes are written as JSON (their targets by name: an aten
op, a python function by module and name, one of autotp's collectives); the tensors the graph
module owns as a dict for ``torch.save``; export's input guards as the data that rebuilds the
same check. Anything that cannot be named raises :class:`~autotp.cache_key.Uncacheable`."""

from __future__ import annotations

import importlib
from typing import Any, Mapping, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils import _pytree as pytree

from autotp.cache_key import Uncacheable
from autotp.collectives import ALL_GATHER, ALL_REDUCE, AllGather, AllReduce, Communicator

__all__ = ["encode_graph", "decode_graph", "encode_guards", "decode_guards"]

_GUARDS = "_guards_fn"
_OUR_MODULES = {ALL_REDUCE: AllReduce, ALL_GATHER: AllGather}
# python functions a graph may call: resolved by module and name when an entry is read
_FUNCTION_MODULES = ("_operator", "operator", "math", "builtins", "torch", "autotp")


def _encode(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(v) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    for kind in (torch.dtype, torch.device, torch.memory_format, torch.layout):
        if isinstance(value, kind):
            return {kind.__name__: str(value)}
    raise Uncacheable(f"a graph argument of type {type(value).__name__}")


def _torch_constant(text: str) -> Any:
    name = text.removeprefix("torch.")
    value = getattr(torch, name, None)
    if value is None:
        raise Uncacheable(f"unknown torch constant {text}")
    return value


def _decode(value: Any, nodes: Mapping[str, fx.Node]) -> Any:
    if not isinstance(value, dict):
        return value
    (kind, item), = value.items()
    if kind == "node":
        return nodes[item]
    if kind in ("list", "tuple"):
        items = [_decode(v, nodes) for v in item]
        return tuple(items) if kind == "tuple" else items
    if kind == "dict":
        return {k: _decode(v, nodes) for k, v in item.items()}
    if kind == "device":
        return torch.device(item)
    return _torch_constant(item)  # dtype, memory_format, layout


def _function_name(fn: Any) -> str:
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if not module or not qualname or module.split(".")[0] not in _FUNCTION_MODULES or "<" in qualname:
        raise Uncacheable(f"the graph calls {fn!r}")
    name = f"{module}:{qualname}"
    if _resolve_function(name) is not fn:
        raise Uncacheable(f"the graph calls {fn!r}, which its name does not resolve to")
    return name


def _resolve_function(name: str) -> Any:
    module, qualname = name.split(":")
    value: Any = importlib.import_module(module)
    for part in qualname.split("."):
        value = getattr(value, part)
    return value


def _encode_target(node: fx.Node) -> Any:
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            return {"op": str(node.target)}
        return {"fn": _function_name(node.target)}
    if node.op == "call_module" and node.target not in (*_OUR_MODULES, _GUARDS):
        raise Uncacheable(f"the graph calls submodule {node.target}")
    return node.target


def _decode_target(target: Any) -> Any:
    if isinstance(target, dict) and "op" in target:
        namespace, name, overload = target["op"].split(".")
        return getattr(getattr(getattr(torch.ops, namespace), name), overload)
    if isinstance(target, dict):
        return _resolve_function(target["fn"])
    return target


def _owner(root: nn.Module, name: str, create: bool = False) -> tuple[nn.Module, str]:
    owner_name, _, attr = name.rpartition(".")
    owner = root
    for part in filter(None, owner_name.split(".")):
        if create and part not in owner._modules:
            owner.add_module(part, nn.Module())
        owner = owner._modules[part]
    return owner, attr


def _tensor_entries(gm: fx.GraphModule) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """What each ``get_attr`` reads: a fake parameter or buffer (only its metadata is kept), or
    a constant the model made while it was traced (kept with its data)."""
    specs, constants = [], {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        owner, attr = _owner(gm, str(node.target))
        value = getattr(owner, attr)
        if not isinstance(value, torch.Tensor):
            raise Uncacheable(f"the graph reads {node.target}, a {type(value).__name__}")
        kind = "parameter" if attr in owner._parameters else "buffer" if attr in owner._buffers else "attribute"
        spec = {"name": str(node.target), "kind": kind, "shape": list(value.shape), "dtype": str(value.dtype),
                "device": str(value.device), "fake": isinstance(value, FakeTensor),
                "persistent": attr not in owner._non_persistent_buffers_set}  # (rotary inv_freq is not)
        if not spec["fake"]:
            constants[str(node.target)] = value.detach().cpu().clone()
        specs.append(spec)
    return specs, constants


def _pytree_info(gm: fx.GraphModule) -> Optional[dict[str, Any]]:
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None:
        return None
    try:
        return {"orig_args": list(info.orig_args), "in_spec": pytree.treespec_dumps(info.in_spec),
                "out_spec": pytree.treespec_dumps(info.out_spec) if info.out_spec is not None else None}
    except Exception as exc:  # a type pytree cannot name
        raise Uncacheable(f"the call's input or output structure: {exc}") from None


def _key_path(path: tuple) -> list[list[Any]]:
    out = []
    for entry in path:
        if isinstance(entry, pytree.MappingKey):
            out.append(["mapping", entry.key])
        elif isinstance(entry, pytree.SequenceKey):
            out.append(["sequence", entry.idx])
        elif isinstance(entry, pytree.GetAttrKey):
            out.append(["attr", entry.name])
        else:
            raise Uncacheable(f"an input path entry {entry!r}")
    return out


def _from_key_path(path: list[list[Any]]) -> tuple:
    kinds = {"mapping": pytree.MappingKey, "sequence": pytree.SequenceKey, "attr": pytree.GetAttrKey}
    return tuple(kinds[kind](value) for kind, value in path)


def encode_guards(guards: Optional[tuple[list[str], list[tuple]]]) -> Optional[list[Any]]:
    """Recorded input guards (code, input paths) as JSON."""
    return None if guards is None else [list(guards[0]), [_key_path(p) for p in guards[1]]]


def decode_guards(guards: Optional[list[Any]]) -> Optional[tuple[list[str], list[tuple]]]:
    return None if guards is None else (list(guards[0]), [_from_key_path(p) for p in guards[1]])


def _guards_module(guards: list[Any]) -> nn.Module:
    """The module export makes to check a call's input sizes, rebuilt from its guard code."""
    from torch.export._unlift import _convert_guards_code_to_fn

    codes, paths = decode_guards(guards)
    return _convert_guards_code_to_fn(codes, paths)


def encode_graph(gm: fx.GraphModule, guards: Optional[tuple[list[str], list[tuple]]]) -> tuple[dict, dict]:
    """The rewritten ``gm`` (fake tensors, not yet loaded) as JSON, plus its constants' data."""
    nodes = [[n.op, n.name, _encode_target(n), _encode(n.args), _encode(n.kwargs)] for n in gm.graph.nodes]
    calls_guards = any(n.op == "call_module" and n.target == _GUARDS for n in gm.graph.nodes)
    if calls_guards and guards is None:
        raise Uncacheable("the graph checks its inputs with guards that were not recorded")
    tensors, constants = _tensor_entries(gm)
    graph = {"nodes": nodes, "tensors": tensors, "pytree": _pytree_info(gm),
             "guards": encode_guards(guards) if calls_guards else None}
    return graph, constants


def decode_graph(graph: Mapping[str, Any], constants: Mapping[str, torch.Tensor], comm: Communicator) -> fx.GraphModule:
    """The graph module :func:`encode_graph` described: fake parameters and buffers (loading
    fills them), real constants, the collectives bound to ``comm``.

    Its code is not generated yet: :func:`autotp.loading.load_into` generates it once, after
    the weights are in and the kernels are chosen (generating it here too cost 11 ms of a
    cache hit's ~50 for Llama's 628 nodes)."""
    gm, mode = fx.GraphModule(nn.Module(), fx.Graph()), FakeTensorMode()
    for spec in graph["tensors"]:
        owner, attr = _owner(gm, spec["name"], create=True)
        dtype = _torch_constant(spec["dtype"])
        if spec["fake"]:
            meta = torch.empty(spec["shape"], dtype=dtype, device="meta")
            value = mode.fake_tensor_converter.from_meta_and_device(mode, meta, torch.device(spec["device"]))
        else:
            value = constants[spec["name"]].to(spec["device"])
        if spec["kind"] == "parameter":
            owner.register_parameter(attr, nn.Parameter(value, requires_grad=False))
        elif spec["kind"] == "buffer":
            owner.register_buffer(attr, value, persistent=spec.get("persistent", True))
        else:  # a constant export lifted: an attribute, as in a fresh capture
            setattr(owner, attr, value)
    for name, make in _OUR_MODULES.items():
        gm.add_module(name, make(comm))
    if graph["guards"] is not None:
        gm.add_module(_GUARDS, _guards_module(graph["guards"]))
    fx_graph, by_name = fx.Graph(owning_module=gm), {}
    for op, name, target, args, kwargs in graph["nodes"]:
        node = fx_graph.create_node(op, _decode_target(target), _decode(args, by_name), _decode(kwargs, by_name),
                                    name=name)
        if node.name != name:
            raise ValueError(f"node {name} was named {node.name}")
        by_name[name] = node
    info = graph["pytree"]
    if info is not None:
        out_spec = pytree.treespec_loads(info["out_spec"]) if info["out_spec"] is not None else None
        fx_graph._codegen = fx.graph._PyTreeCodeGen(
            fx.graph._PyTreeInfo(info["orig_args"], pytree.treespec_loads(info["in_spec"]), out_spec))
    gm._graph = fx_graph  # the ``graph`` setter would generate the code (see above)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            owner, attr = _owner(gm, str(node.target))
            node.meta["val"] = getattr(owner, attr)
    return gm
