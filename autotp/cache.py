"""Graph cache: a rank's rewritten graph and its plan, kept on disk between runs.

Capture is most of the time to a ready model: torch.export traces the model symbolically
(1.9 s of 3.6 s for the 191M-parameter Llama of the benchmarks), and every run of the same
model on the same ranks traces the same graph. An entry holds what :func:`autotp.rewrite.rewrite`
produced for one rank, before any weight is loaded: the graph (nodes as JSON), the plan, the
input guards export made, the constants the model created while it was traced, and whatever
the caller keeps with it. A hit rebuilds the graph module in milliseconds; loading then goes
on as after a capture.

The key is a sha256 over everything that shapes that graph, so that no stale entry is used:

- Python, torch and transformers versions, a digest of autotp's own source, and
  ``TRANSFORMERS_*`` environment variables (transformers' modeling code reads some);
- per module of the model: its class, with per class of its MRO the file defining it, the
  functions its body holds now and the functions, classes and function registries (such as
  ``ALL_ATTENTION_FUNCTIONS``) its module's globals name now, one module deep (so a method or
  helper replaced after import counts, ``functools.wraps`` or not: functions are named by
  where their code was compiled); its plain attributes (head counts, scaling, configs as JSON
  with their ``*_implementation`` choices, ...); the names, shapes and dtypes of its tensors;
- which names are the same tensor or module (tied weights, shared layers);
- the example inputs' structure and sizes, and the caller's settings (tp size, rank, device,
  what the graph is for).

Code must come from an installed package (or autotp): a model defined in a script may call
helpers from other files of the user's, which the key would not see. Anything the key cannot
describe (a hook, an attribute of an unknown type, a graph op it cannot name) makes the call
uncacheable: it is captured every time, as without the cache.

Where: ``$AUTOTP_CACHE_DIR`` (``off`` turns the cache off), else ``$XDG_CACHE_HOME/autotp``,
else ``~/.cache/autotp``. An entry is written under a temporary name and renamed, so a reader
sees a whole entry or none; an entry that cannot be read is reported, ignored and rewritten.

Size: every change of autotp, torch, transformers or the model's code makes new keys, so old
entries would pile up. After each write, while the entries take more than
``$AUTOTP_CACHE_MAX_MB`` (1024 MiB by default; an entry is 60-160 KB for an 8-layer Llama), the least
recently used are deleted (see :func:`prune`).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import hashlib
import importlib
import json
import marshal
import math
import os
import re
import sys
import sysconfig
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils import _pytree as pytree

from autotp.capture import structure_key
from autotp.collectives import ALL_GATHER, ALL_REDUCE, AllGather, AllReduce, Communicator
from autotp.errors import AutotpError
from autotp.plan import Plan

__all__ = ["GraphCache", "CachedGraph", "CacheSlot", "Uncacheable", "cache_dir", "cache_off", "user_cache_dir",
           "graph_key", "slot", "prune",
           "max_bytes", "encode_guards", "decode_guards"]

FORMAT = 1  # bump when the entry layout changes
_ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.pt")
_GUARDS = "_guards_fn"
_OUR_MODULES = {ALL_REDUCE: AllReduce, ALL_GATHER: AllGather}
_PLAIN = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)
# attributes every nn.Module has (hooks among them are checked on their own)
_MODULE_INTERNALS = frozenset(vars(nn.Module())) - {"training"}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
          "_backward_hooks", "_backward_pre_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks")
# python functions a graph may call: resolved by module and name when an entry is read
_FUNCTION_MODULES = ("_operator", "operator", "math", "builtins", "torch", "autotp")


class Uncacheable(Exception):
    """The key or the entry cannot describe this model or graph; it is captured every time."""


def cache_dir() -> Optional[Path]:
    """Where entries live, or ``None`` when ``AUTOTP_CACHE_DIR=off`` (or no folder is known)."""
    configured = os.environ.get("AUTOTP_CACHE_DIR")
    if configured is not None:
        return None if cache_off() else Path(configured)
    return user_cache_dir()


def cache_off() -> bool:
    """Whether ``AUTOTP_CACHE_DIR`` says autotp keeps nothing on disk (``off``, ``0``, ``false``
    or empty; unset means the default folder)."""
    configured = os.environ.get("AUTOTP_CACHE_DIR")
    return configured is not None and configured.strip().lower() in ("off", "0", "false", "")


def user_cache_dir() -> Optional[Path]:
    """autotp's folder in the user's cache: ``$XDG_CACHE_HOME/autotp``, else ``~/.cache/autotp``
    (``None`` with no home directory, as in some containers)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except (RuntimeError, KeyError):
            return None
    return Path(base) / "autotp"


# ---- the key ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _file_digest(path: str) -> str:
    """A file's size and modification time: what Python itself checks before it reuses the
    bytecode compiled from it (a source it would not recompile is not what runs either).
    Reading and hashing the ~100 files a model's code reaches cost 40 ms per process."""
    stat = os.stat(path)
    return f"{stat.st_size}:{stat.st_mtime_ns}"


@functools.lru_cache(maxsize=1)
def _autotp_digest() -> str:
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _installed_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple({os.path.realpath(paths[k]) for k in ("purelib", "platlib", "stdlib", "platstdlib") if k in paths})


def _code_id(obj: Any) -> list[Any]:
    """A class or function as the key sees it: its name and the digest of its file. A Python
    function is named by where its code object was compiled (file and line), not by its
    ``__module__``/``__qualname__``, which ``functools.wraps`` copies from the function a
    patch replaces; the functions it wraps are named too."""
    code = getattr(obj, "__code__", None)
    if isinstance(obj, types.FunctionType) and isinstance(code, types.CodeType):
        where = f"{code.co_filename}:{code.co_firstlineno}:{code.co_name}"
        if os.path.isabs(code.co_filename):
            digest = _installed_file_digest(code.co_filename)
        else:  # generated, not read from a file (a dataclass's __eq__): its bytecode
            digest = hashlib.sha256(marshal.dumps(code)).hexdigest()
        if digest is None and not _is_autotp_file(code.co_filename):
            raise Uncacheable(f"{obj.__module__}.{obj.__qualname__} is defined outside an installed package "
                              f"({code.co_filename})")
        wrapped = getattr(obj, "__wrapped__", None)
        return [where, digest, _name_id(wrapped) if callable(wrapped) and wrapped is not obj else None]
    module = sys.modules.get(getattr(obj, "__module__", "") or "")
    name = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"
    if module is not None and module.__name__.split(".")[0] == "autotp":
        return [name]  # autotp's source is in the key as a whole
    path = getattr(module, "__file__", None)
    if path is None:
        # built into the interpreter, or a compiled part of torch (torch._C._nn.gelu): its
        # version is in the key
        if module is not None and (module.__name__ in sys.builtin_module_names
                                   or module.__name__.split(".")[0] == "torch"):
            return [name]
        raise Uncacheable(f"{name} has no source file")
    digest = _installed_file_digest(path)
    if digest is None:
        raise Uncacheable(f"{name} is defined outside an installed package ({path})")
    return [name, digest]


def _is_autotp_file(path: str) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(Path(__file__).parent) + os.sep)


@functools.lru_cache(maxsize=None)
def _installed_file_digest(path: str) -> Optional[str]:
    """The digest of a file of an installed package; None for any other file. (Per process:
    an installed file that changes under a running process is not seen.)"""
    real = os.path.realpath(path)
    return _file_digest(real) if real.startswith(_installed_roots()) else None


def _class_id(cls: type, seen: Optional[dict[Any, Any]] = None) -> list[str]:
    """A class as the key sees it: per class of its MRO, its file's digest, the functions its
    body holds now, and the functions and classes its module's globals name now. A method or a
    module function replaced after import (as kernel-patching libraries do) changes the key."""
    seen = {} if seen is None else seen
    if ("class", cls) not in seen:  # a digest: a hundred modules of the same class repeat it
        described = [_base_id(base, seen) for base in cls.__mro__ if base is not object]
        seen[("class", cls)] = [cls.__qualname__, _digest(described)]
    return seen[("class", cls)]


def _base_id(base: type, seen: dict[Any, Any]) -> str:
    """The digest of one class of an MRO (shared by every class deriving from it)."""
    if ("base", base) not in seen:
        seen[("base", base)] = _digest([_code_id(base), _namespace_id(vars(base)), _globals_id(base.__module__, seen)])
    return seen[("base", base)]


def _digest(described: Any) -> str:
    """A description's sha256. Descriptions shared between classes (a base class, a module's
    globals) enter the key as digests: described in full they made 2.6 MB of JSON per key."""
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()


def _functions(value: Any) -> list[Any]:
    """The functions behind a class attribute (methods, static/class methods, properties)."""
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    if isinstance(value, property):
        return [f for f in (value.fget, value.fset) if f is not None]
    return [value] if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)) else []


def _namespace_id(namespace: Mapping[str, Any]) -> list[Any]:
    return [[k, [_code_id(f) for f in _functions(v)]] for k, v in sorted(namespace.items()) if _functions(v)]


def _globals_id(module_name: str, seen: dict[Any, Any], hops: int = 1) -> str:
    """The digest of the functions and classes a module's globals name (what its code calls by
    name), the functions in registries it names (transformers' ``ALL_ATTENTION_FUNCTIONS``,
    where ``config._attn_implementation`` is looked up), and, ``hops`` modules deep, the same for
    the modules those functions come from (a helper patched in ``masking_utils``)."""
    key = ("globals", module_name)
    if key in seen:
        return seen[key]
    seen[key] = "(cycle)"
    module = sys.modules.get(module_name)
    out, reached = [], set()
    for k, v in sorted(vars(module).items() if module is not None else []):
        if k.startswith("__"):
            continue
        if isinstance(v, (types.FunctionType, type)):
            out.append([k, _code_id(v)])
            reached.add(getattr(v, "__module__", None))
        elif _is_registry(v):
            functions = sorted((str(name), f) for name, f in v.items() if isinstance(f, types.FunctionType))
            out.append([k, [[name, _code_id(f)] for name, f in functions]])
            reached.update(f.__module__ for _, f in functions)
        elif isinstance(v, types.ModuleType) and _is_package_module(v):  # ``F.silu(x)``: what its names hold now
            out.append([k, _namespace_digest(v, seen)])
    if hops > 0:
        package = module_name.split(".")[0]
        for name in sorted(n for n in reached if n and n != module_name and n.split(".")[0] == package):
            out.append([name, _globals_id(name, seen, hops - 1)])
    seen[key] = _digest(out)
    return seen[key]


# module name -> (what its names held when it was last described, by identity; the digest)
_NAMESPACES: dict[str, tuple[tuple, str]] = {}


def _namespace_digest(module: types.ModuleType, seen: dict[Any, Any]) -> str:
    """The digest of the functions and classes a module's names hold now (``torch.nn.functional``
    as a model's code reaches it through ``F``): replacing ``F.silu`` changes it, and so does
    putting it back. A module described before is described again only if one of its names
    holds another object (or function code) than then: ``torch`` alone names ~2000."""
    key = ("namespace", module.__name__)
    if key not in seen:
        with warnings.catch_warnings():  # some modules warn when a deprecated name is touched
            warnings.simplefilter("ignore")
            named = [(k, v) for k, v in vars(module).items()
                     if not k.startswith("__") and isinstance(v, (types.FunctionType, types.BuiltinFunctionType, type))]
        held = tuple((k, id(v), id(getattr(v, "__code__", None))) for k, v in named)
        known = _NAMESPACES.get(module.__name__)
        if known is None or known[0] != held:
            out = [[k, _name_id(v)] for k, v in sorted(named, key=lambda item: item[0])]
            known = _NAMESPACES[module.__name__] = (held, _digest(out))
        seen[key] = known[1]
    return seen[key]


@functools.lru_cache(maxsize=None)
def _package_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple({os.path.realpath(paths[k]) for k in ("purelib", "platlib") if k in paths})


def _is_package_module(module: types.ModuleType) -> bool:
    """A module of an installed package (torch, transformers, ...), not of the standard library:
    the standard library's namespaces change with run-time settings (``warnings.showwarning``
    under ``catch_warnings``) that shape no graph."""
    path = getattr(module, "__file__", None)
    return bool(path) and os.path.realpath(path).startswith(_package_roots())


def _name_id(value: Any) -> list[Any]:
    """What one name of a followed module (or a wrapper's ``__wrapped__``) holds. Python
    functions as :func:`_code_id` names them (one written outside an installed package makes
    the model uncacheable: it may be the patch the model calls). Classes and builtins compiled
    into extensions (``_regex.Match``, a builtin object's method bound to a name) have no
    source to digest: their names say what they are, and replacing one changes its name."""
    try:
        return _code_id(value)
    except Uncacheable:
        if isinstance(value, types.FunctionType):
            raise
        owner = getattr(value, "__self__", None)
        return ["compiled", getattr(value, "__module__", None) or type(owner).__name__, value.__qualname__]


def _is_registry(value: Any) -> bool:
    """A mapping of names to functions that code looks functions up in at run time."""
    from collections.abc import Mapping as AbstractMapping

    if not isinstance(value, AbstractMapping) or isinstance(value, type):
        return False
    try:
        return any(isinstance(f, types.FunctionType) for f in list(value.values())[:64])
    except Exception:
        return False


def _tensor_id(t: torch.Tensor, with_data: bool) -> list[Any]:
    described: list[Any] = ["tensor", list(t.shape), str(t.dtype), t.device.type]
    if with_data and t.device.type != "meta" and not isinstance(t, FakeTensor):
        flat = t.detach().reshape(-1).cpu().contiguous()
        described.append(hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest())
    return described


def _value_id(value: Any, where: str, seen: dict[Any, Any]) -> Any:
    """A JSON-able description of an attribute value, or Uncacheable."""
    if isinstance(value, _PLAIN) or isinstance(value, enum.Enum):
        return repr(value)
    if id(value) in seen:
        return seen[id(value)]
    if isinstance(value, (tuple, list, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        out: Any = [type(value).__name__, [_value_id(v, where, seen) for v in items]]
    elif isinstance(value, dict):
        out = ["dict", [[repr(k), _value_id(v, where, seen)] for k, v in value.items()]]
    elif isinstance(value, torch.Tensor):
        out = _tensor_id(value, with_data=True)  # an unregistered tensor is baked into the graph
    elif callable(getattr(value, "to_json_string", None)):  # a transformers model or generation config
        chosen = {k: repr(v) for k, v in vars(value).items() if "_implementation" in k}  # not in to_dict()
        out = ["config", _class_id(type(value), seen), _without_origin(json.loads(value.to_json_string(use_diff=False))),
               sorted(chosen.items())]
    elif isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
        out = ["code", _code_id(value)]
    elif isinstance(value, functools.partial):
        out = ["partial", _value_id(value.func, where, seen), _value_id(value.args, where, seen),
               _value_id(value.keywords, where, seen)]
    else:
        raise Uncacheable(f"{where} is a {type(value).__name__}")
    seen[id(value)] = out
    return out


def _without_origin(config: Any) -> Any:
    """A config's fields without where it was read from: the same model in another directory
    has the same graph."""
    if isinstance(config, dict):
        return {k: _without_origin(v) for k, v in config.items() if k not in ("_name_or_path", "_commit_hash")}
    if isinstance(config, list):
        return [_without_origin(v) for v in config]
    return config


def _module_id(name: str, module: nn.Module, seen: dict[Any, Any]) -> list[Any]:
    where = f"module {name or '(root)'} ({type(module).__name__})"
    if any(getattr(module, h, None) for h in _HOOKS):
        raise Uncacheable(f"{where} has hooks")
    attrs = [[k, _value_id(v, f"{where}.{k}", seen)] for k, v in sorted(vars(module).items())
             if k not in _MODULE_INTERNALS]
    tensors = [[k, isinstance(t, nn.Parameter), _tensor_id(t, with_data=False)]
               for k, t in list(module._parameters.items()) + list(module._buffers.items()) if t is not None]
    return [name, _class_id(type(module), seen), attrs, tensors]


def _aliases(named: Any) -> list[list[str]]:
    first: dict[int, str] = {}
    out = []
    for name, obj in named:
        if id(obj) in first:
            out.append([name, first[id(obj)]])
        else:
            first[id(obj)] = name
    return out


def _global_hooks() -> bool:
    from torch.nn.modules import module as torch_module

    return any(getattr(torch_module, n, None) for n in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                        "_global_module_registration_hooks"))


def graph_key(model: nn.Module, inputs: Mapping[str, Any], **settings: Any) -> str:
    """The sha256 naming the entry for ``model`` called with ``inputs`` under ``settings``.

    Raises:
        Uncacheable: something that shapes the graph cannot be described.
    """
    if _global_hooks():
        raise Uncacheable("global module hooks are registered")
    transformers = sys.modules.get("transformers")
    seen: dict[Any, Any] = {}  # per object and per class/module: what was described
    described = {
        "format": FORMAT,
        "versions": [sys.version, torch.__version__, getattr(transformers, "__version__", None), _autotp_digest()],
        "default_dtype": str(torch.get_default_dtype()),
        # read by transformers' modeling code (TRANSFORMERS_SDPA_FORCE_GQA, ...)
        "environment": sorted((k, v) for k, v in os.environ.items() if k.startswith("TRANSFORMERS_")),
        "modules": [_module_id(n, m, seen) for n, m in model.named_modules(remove_duplicate=False)],
        # tied weights and shared modules: per name, the first name of the same object
        "same_as": [_aliases(model.named_modules(remove_duplicate=False)),
                    _aliases(list(model.named_parameters(remove_duplicate=False))
                             + list(model.named_buffers(remove_duplicate=False)))],
        "inputs": [repr(structure_key(inputs)),
                   [list(t.shape) for t in pytree.tree_leaves(dict(inputs)) if isinstance(t, torch.Tensor)]],
        "settings": sorted((k, repr(v)) for k, v in settings.items()),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


# ---- graph <-> JSON -----------------------------------------------------------------------------

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


# ---- the store ----------------------------------------------------------------------------------

@dataclass
class CachedGraph:
    """One rank's rewritten graph module (not yet loaded, its code not yet generated: see
    :func:`decode_graph`) and its plan."""

    graph_module: fx.GraphModule
    plan: Plan
    extra: dict[str, Any] = field(default_factory=dict)


def max_bytes() -> int:
    """The cache's size bound: ``$AUTOTP_CACHE_MAX_MB`` MiB, 1024 by default.

    Raises:
        AutotpError: the setting is not a finite number of MiB, 0 or more.
    """
    configured = os.environ.get("AUTOTP_CACHE_MAX_MB", "1024")
    try:
        megabytes = float(configured)
    except ValueError:
        megabytes = -1.0
    if not (megabytes >= 0 and math.isfinite(megabytes)):  # NaN fails both
        raise AutotpError(f"AUTOTP_CACHE_MAX_MB={configured!r}: expected a number of MiB, 0 or more")
    return int(megabytes * 2**20)


@dataclass
class GraphCache:
    """Entries under ``root``, one file per key (``<key>.pt``), kept under ``limit`` bytes
    (:func:`prune`; ``$AUTOTP_CACHE_MAX_MB``, read when the cache is made)."""

    root: Path
    limit: int = field(default_factory=max_bytes)

    @classmethod
    def from_env(cls) -> Optional["GraphCache"]:
        """The cache the environment configures, or None when it is off.

        Raises:
            AutotpError: ``$AUTOTP_CACHE_MAX_MB`` is not a size (named now, not met as a failed
                write later).
        """
        root = cache_dir()
        return cls(root) if root is not None else None

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def get(self, key: str, comm: Communicator) -> Optional[CachedGraph]:
        path = self.path(key)
        try:
            if not path.is_file():
                return None
        except OSError as exc:  # a folder another user made (permission denied): run without it
            warnings.warn(f"autotp: cannot read the graph cache {self.root}: {exc}", stacklevel=2)
            return None
        try:
            entry = torch.load(path, weights_only=True)
            if entry.get("format") != FORMAT:
                return None
            meta = json.loads(entry["meta"])
            gm = decode_graph(meta["graph"], entry["constants"], comm)
            found = CachedGraph(gm, Plan.from_dict(meta["plan"]), meta["extra"])
        except Exception as exc:  # a damaged or foreign entry is not fatal: capture again
            warnings.warn(f"autotp: ignoring graph cache entry {path}: {type(exc).__name__}: {exc}", stacklevel=2)
            return None
        with contextlib.suppress(OSError):  # its time of use, for pruning (a read-only cache keeps the old one)
            os.utime(path)
        return found

    def put(self, key: str, gm: fx.GraphModule, plan: Plan, guards: Any, extra: Optional[dict[str, Any]] = None) -> None:
        """Write the entry.

        Raises:
            Uncacheable: the graph cannot be described (nothing is written).
        """
        graph, constants = encode_graph(gm, guards)
        meta = json.dumps({"graph": graph, "plan": plan.to_dict(), "extra": extra or {}})
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            torch.save({"format": FORMAT, "meta": meta, "constants": constants}, temporary)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        prune(self.root, self.limit)


def prune(root: Path, limit: int, *, keep_recent_s: float = 600.0) -> list[Path]:
    """Delete the least recently used entries of ``root`` while its entries take more than
    ``limit`` bytes, down to three quarters of it (so that not every write prunes). An entry's
    time of use is its modification time, which a hit refreshes. Entries used in the last
    ``keep_recent_s`` seconds stay, however large the cache: a run on another rank or in
    another process may be about to read them. Only files named as entries are counted or
    deleted (``<sha256>.pt``). Returns the deleted paths."""
    entries = []
    with contextlib.suppress(OSError):
        for item in os.scandir(root):
            if _ENTRY_NAME.fullmatch(item.name):  # only autotp's own: the folder may be a shared one
                with contextlib.suppress(OSError):
                    stat = item.stat()
                    entries.append((stat.st_mtime, stat.st_size, Path(item.path)))
    total = sum(size for _, size, _ in entries)
    if total <= limit:
        return []
    deleted, now = [], time.time()
    for used, size, path in sorted(entries):
        if total <= limit * 3 // 4 or now - used < keep_recent_s:
            break
        with contextlib.suppress(FileNotFoundError):  # another process pruned it first
            path.unlink()
            deleted.append(path)
        total -= size
    return deleted


@dataclass
class CacheSlot:
    """Where one graph is looked up and stored. ``status``: ``off``, ``uncacheable: <why>``,
    ``miss``, ``hit``, ``stored`` or ``not stored: <why>``."""

    store: Optional[GraphCache]
    key: Optional[str]
    status: str

    def get(self, comm: Communicator) -> Optional[CachedGraph]:
        if self.store is None or self.key is None:
            return None
        found = self.store.get(self.key, comm)
        self.status = "hit" if found is not None else "miss"
        return found

    def put(self, gm: fx.GraphModule, plan: Plan, guards: Any, extra: Optional[dict[str, Any]] = None) -> None:
        if self.store is None or self.key is None:
            return
        try:
            self.store.put(self.key, gm, plan, guards, extra)
            self.status = "stored"
        except Uncacheable as exc:
            self.status = f"uncacheable: {exc}"
        except Exception as exc:  # a read-only or full disk costs the next run time, not this one
            self.status = f"not stored: {type(exc).__name__}: {exc}"
            warnings.warn(f"autotp: could not write the graph cache entry {self.store.path(self.key)}: {exc}",
                          stacklevel=2)


def slot(enabled: bool, model: nn.Module, inputs: Mapping[str, Any], **settings: Any) -> CacheSlot:
    """The cache slot for ``model`` called with ``inputs`` under ``settings`` (see
    :func:`graph_key`); status ``off`` when ``enabled`` is False or the cache is turned off."""
    store = GraphCache.from_env() if enabled else None
    if store is None:
        return CacheSlot(None, None, "off")
    try:
        key = graph_key(model, inputs, **settings)
    except Uncacheable as exc:
        return CacheSlot(None, None, f"uncacheable: {exc}")
    except Exception as exc:  # an attribute the key cannot even read (a config that is not JSON, ...)
        return CacheSlot(None, None, f"uncacheable: {type(exc).__name__}: {exc}")
    return CacheSlot(store, key, "miss")
