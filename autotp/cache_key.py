"""The graph cache's key (:mod:`autotp.cache`).

The key is a sha256 over everything that shapes a rank's rewritten graph, so that no stale
entry is used:

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
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import marshal
import os
import sys
import sysconfig
import types
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree

from autotp.capture import structure_key
from autotp.code_globals import globals_read

__all__ = ["graph_key", "Uncacheable", "FORMAT"]

FORMAT = 1  # bump when the entry layout changes
_PLAIN = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)
# attributes every nn.Module has (hooks among them are checked on their own)
_MODULE_INTERNALS = frozenset(vars(nn.Module())) - {"training"}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
          "_backward_hooks", "_backward_pre_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks")


class Uncacheable(Exception):
    """The key or the entry cannot describe this model or graph; it is captured every time."""


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


# where a path really is, per process (~900 lookups per key of an 8-layer Llama, 7000 lstat calls
# uncached: 0.04 s of its 0.13 s); as for the digests below, a link changed under a running
# process is not seen
_real = functools.lru_cache(maxsize=None)(os.path.realpath)


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
    return _real(path).startswith(_real(str(Path(__file__).parent)) + os.sep)


@functools.lru_cache(maxsize=None)
def _installed_file_digest(path: str) -> Optional[str]:
    """The digest of a file of an installed package; None for any other file. (Per process:
    an installed file that changes under a running process is not seen.)"""
    real = _real(path)
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
    return bool(path) and _real(path).startswith(_package_roots())


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


def _globals_values(model: nn.Module, seen: dict[Any, Any]) -> list[Any]:
    """The values of the data globals the model's forward code reads (:mod:`autotp.code_globals`)
    that are values: scalars, tensors and plain containers of such. A logger, a lock or a
    registry object read by name (transformers' ``_CAN_RECORD_REGISTRY``, a dict subclass of
    recorders) shapes no graph by its contents; within a run, every call compares those that do
    (:class:`autotp.call_checks.ModelState`)."""
    out = []
    for where, names, name in globals_read(model):
        value = names[name]
        if type(value) in _PLAIN + (tuple, list, dict, set, frozenset) or isinstance(value, (torch.Tensor, enum.Enum)):
            try:
                out.append([where, _value_id(value, f"the {where}", seen)])
            except Uncacheable:
                continue  # a plain container of other objects: not a value
    return out


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


def _settle_lazy_torch_names() -> None:
    """Fill in a name torch binds lazily, as torch itself would. ``torch._opaque_base`` caches a
    class in a module global on the first ``isinstance`` check of an opaque type, which a
    process's first capture makes: a key described before it and one described after differed,
    so a second ``parallelize`` in one process missed the entry the first had stored."""
    base = sys.modules.get("torch._opaque_base")
    if base is not None and getattr(base, "_FakeScriptObject_cls", False) is None:
        from torch._library.fake_class_registry import FakeScriptObject

        base._FakeScriptObject_cls = FakeScriptObject


def graph_key(model: nn.Module, inputs: Mapping[str, Any], **settings: Any) -> str:
    """The sha256 naming the entry for ``model`` called with ``inputs`` under ``settings``.

    Raises:
        Uncacheable: something that shapes the graph cannot be described.
    """
    if _global_hooks():
        raise Uncacheable("global module hooks are registered")
    _settle_lazy_torch_names()
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
        # data the forward reads by name (SCALE = 1.0 in the model's file, set before parallelize)
        "globals": _globals_values(model, seen),
        "inputs": [repr(structure_key(inputs)),
                   [list(t.shape) for t in pytree.tree_leaves(dict(inputs)) if isinstance(t, torch.Tensor)]],
        "settings": sorted((k, repr(v)) for k, v in settings.items()),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
