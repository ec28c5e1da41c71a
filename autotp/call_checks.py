"""What a call of a :class:`~autotp.module.TensorParallelModule` must agree with before it runs
a graph, checked on every call (each check costs microseconds):

- **The model as it was captured.** A graph keeps what the trace read: the train/eval mode
  (dropout, batch norm), plain attributes (a head count, ``scaling``, a norm's ``eps``), config
  values (``output_hidden_states``), hooks, which tensor objects the modules hold. Changed after
  ``parallelize``, none of it reaches the graph: ``model.eval()`` left GPT-2's dropout on (it is
  in training mode from ``from_config``), a norm's epsilon changed was ignored (0.38 off in
  Llama's logits), a hook registered later never ran (found by adversarial reviews). So every
  call checks :class:`ModelState` and refuses a model that changed, naming where.
- **No gradients.** The collectives have no autograd formula: a backward through them gave
  gradients 0.68 off with only torch's warning. A call with grad mode on and an input that
  requires grad is refused (``torch.no_grad()`` or ``torch.inference_mode()`` around it), and
  every graph runs under ``torch.no_grad()``: with parameters that require grad (the default),
  a backward from the output reached the norms' weights with gradients 0.2-22 off and the
  sharded weights not at all, silently; now the output has no gradient function.
- **One calling thread at a time.** The ranks pair their collectives in the order each issues
  them. Two threads calling one rank's model at once interleave their collectives in an order
  the other rank does not share, and each call sums the other's partial results: wrong
  numbers, no error (found by an adversarial review: every call of two threads off, on real
  ranks). Waiting for the first call would not help (the other rank may serve the threads the
  other way round), so a call entering while another thread's runs is refused, on the rank
  where they overlap. Calls nested in one thread (``generate()`` calling the model) pass.
  What no rank can see alone stays the caller's to keep: every rank must make the same calls
  in the same order, as in any program of collectives (two threads taking turns in a
  different order on each rank still pair different calls).
- **Inputs laid out as captured.** Capture traces contiguous inputs; a transposed or sliced
  tensor is given to the graph as a contiguous copy (:func:`contiguous_arguments`), and refused
  where the graph writes into its inputs.
- **The same random numbers on every rank.** A graph that draws (dropout in training mode,
  ``rand_like`` noise) draws on whole, replicated tensors: the planner never shards through a
  random op. Each rank draws from its own generator, so ranks seeded differently (or whose
  generators moved apart) computed different "replicated" values and summed them: 0.15 off the
  unsharded model seeded alike, on real ranks. Before such a graph runs, every rank takes rank
  0's random state (:func:`draws_random_numbers`, :func:`autotp.group.share_rng`); the draws are
  then the unsharded model's own, in its order.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import threading
import types
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import _pytree as pytree

from autotp.aliasing import written_groups
from autotp.code_globals import forward_reads, generation_state
from autotp.errors import AutotpError
from autotp.loading import named_tensors
from autotp.opaque import OpaqueCall

__all__ = ["ModelState", "OneCaller", "check_no_gradients", "contiguous_arguments", "draws_random_numbers"]


_PLAIN = (bool, int, float, str, bytes, type(None), torch.dtype, torch.device)
_CONTAINERS = (tuple, list, dict, set, frozenset)
_INTERNALS = frozenset(vars(nn.Module())) - {"training"}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
# torch's hooks on every module (register_module_forward_hook): run in a trace, not after it
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


_MISSING = object()
_DEPTH = 3  # how deep inside attributes the record goes (an attribute's partial's keywords' values)


class _Items:
    """A list or tuple read as ``get(index, default)``, as the record reads a dict."""

    __slots__ = ("items",)

    def __init__(self, items: Any) -> None:
        self.items = items

    def get(self, index: int, default: Any = None) -> Any:
        return self.items[index] if index < len(self.items) else default


class _Cells(_Items):
    """A function's closure cells, read as their contents."""

    def get(self, index: int, default: Any = None) -> Any:
        try:
            return self.items[index].cell_contents
        except ValueError:  # an empty cell
            return default


def _plain(value: object, depth: int = 0) -> bool:
    """A value compared by value: a scalar, or a container of plain values (a list of layer
    types, a dict of flags), a few levels deep."""
    if type(value) in _PLAIN:
        return True
    if type(value) not in _CONTAINERS or depth > 2:
        return False
    items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
    return all(_plain(v, depth + 1) for v in items)


def _snapshot(value: object) -> object:
    """``value`` as recorded: a container copied (one changed in place is then told apart)."""
    return copy.deepcopy(value) if type(value) in _CONTAINERS else value


def _kept_by_identity(value: object) -> bool:
    """An attribute compared by identity: a function or other callable the forward calls (a
    module's ``act_fn``), never a module (children are recorded as such) or a tensor."""
    return callable(value) and not isinstance(value, (nn.Module, torch.Tensor))


class ModelState:
    """What a call's graph was traced with besides tensors' values, recorded once. Per module:
    its training flag and plain attributes (head counts, ``scaling``, a norm's ``eps``, lists and
    dicts of such values, copied), its submodules, functions and tensors by identity (with
    their dtypes, devices and shapes: ``model.double()`` converts in place), the version of a
    tensor kept as a plain attribute (the graph holds a copy of it: a write into it after the
    capture never reaches the graph), how many attributes and hooks it has. Per Hugging Face
    config, its plain values. The version of each tensor of which this rank holds a piece
    (``sharded``): written in place after parallelize (``weight[3].fill_(0.5)``), the edit lands
    in other rows on each rank (8.7 off; found by an adversarial review). And torch's global
    module hooks, and the module globals and class attributes the forward code reads by name
    (:func:`autotp.code_globals.globals_read`). Not the attributes ``generate()`` keeps on the
    model (:func:`autotp.code_globals.generation_state`).
    :meth:`first_change` finds the first that differs now, in ~0.08 ms for an 8-layer Llama: flat
    lists compared in one pass."""

    def __init__(self, model: nn.Module, sharded: Iterable[str] = ()) -> None:
        self.model = model
        self._equal: list[tuple[str, dict, str, object]] = []  # compared by value
        self._same: list[tuple[str, dict, str, object]] = []  # compared by identity
        self._sizes: list[tuple[str, Any, int]] = []  # dicts whose length must hold
        self._kinds: list[tuple[str, torch.Tensor, torch.dtype, torch.device, tuple]] = []  # in-place conversions
        self._versions: list[tuple[str, torch.Tensor, int]] = []  # tensors the graph holds copies of
        self._inside: set[int] = set()  # objects whose insides are recorded
        configs: set[int] = set()
        read, names_read = forward_reads(model)
        generation = generation_state(model, names_read)  # generate()'s own bookkeeping on the model object
        self._counted: list[tuple[str, dict, frozenset[str], int]] = []  # dicts whose names but those must hold
        for path, module in model.named_modules():
            where, prefix, d = path or "the model", f"{path}." if path else "", module.__dict__
            self._record_attributes(prefix, d, generation if module is model else frozenset())
            for store in (d["_parameters"], d["_buffers"], d["_modules"]):
                self._same += [(prefix + k, store, k, t) for k, t in store.items()]
                self._sizes.append((f"{where}: its {'submodules' if store is d['_modules'] else 'tensors'}", store,
                                    len(store)))
                self._kinds += [(f"{prefix}{k}: its dtype, device or shape", t, t.dtype, t.device, tuple(t.shape))
                                for k, t in store.items() if isinstance(t, torch.Tensor)]
            if module is model:
                self._counted.append((f"{where}: its attributes", d, generation, len(d.keys() - generation)))
            else:
                self._sizes.append((f"{where}: its attributes", d, len(d)))
            self._sizes += [(f"{where}: its hooks", d[h], len(d[h])) for h in _HOOKS]
            for h in _HOOKS:  # a hook's closure and what it holds
                for key in list(d[h]):
                    self._record_value(f"{where}: its hook {key}", d[h], key)
            config = d.get("config")
            if config is not None and id(config) not in configs:
                configs.add(id(config))
                c = vars(config)
                self._equal += [(f"{prefix}config.{k}", c, k, _snapshot(v)) for k, v in c.items() if _plain(v)]
                self._sizes.append((f"{prefix}config", c, len(c)))
        hooks = torch.nn.modules.module
        self._sizes += [(f"torch's {name.strip('_')}", getattr(hooks, name), len(getattr(hooks, name)))
                        for name in _GLOBAL_HOOKS]
        for what, names, name in read:  # SCALE = 1.0 at the top of the model's file
            self._record_value(f"the {what}", names, name)
        tensors = named_tensors(model)
        for name in (n for n in sharded if n in tensors):  # an edit by index lands in other rows on each rank
            self._versions.append((f"{name}: written in place, where this rank holds a piece of it", tensors[name],
                                   tensors[name]._version))

    def _record_attributes(self, prefix: str, d: dict, skipped: frozenset[str] = frozenset()) -> None:
        for k, v in d.items():
            if k not in _INTERNALS and k not in skipped:
                self._record_value(prefix + k, d, k)

    def _record_value(self, where: str, d: Any, k: Any, depth: int = 0) -> None:
        """``d[k]`` (``d``: a dict, or a view with ``get``): a plain value by value, a tensor by
        identity and version, a callable by identity; and, a few levels deep, what a callable or
        an object holds (:meth:`_record_inside`)."""
        v = d.get(k)
        if _plain(v):
            self._equal.append((where, d, k, _snapshot(v)))
            return
        if isinstance(v, torch.Tensor):
            self._same.append((where, d, k, v))
            self._versions.append((f"{where}: written in place", v, v._version))
            return
        if _kept_by_identity(v):
            self._same.append((where, d, k, v))
        if depth < _DEPTH and id(v) not in self._inside:
            self._inside.add(id(v))
            self._record_inside(where, v, depth + 1)

    def _record_inside(self, where: str, v: Any, depth: int) -> None:
        """What ``v`` holds that a forward may read through it: the items of a list, tuple or
        dict (one holding tensors is not a plain value); a function's closure cells; a
        ``functools.partial``'s arguments; the fields of a dataclass or namespace object. Each
        was unseen when changed after parallelize (a partial's keyword edited: 0.59 off, a
        closure cell: 1.86, a dataclass field: 1.32, a tensor in a list filled: 1.24; found by an
        adversarial review)."""
        if type(v) in (list, tuple):  # exact types: a subclass may read otherwise (a registry's own get)
            if isinstance(v, list):
                self._sizes.append((f"{where}: its length", v, len(v)))
            for i in range(len(v)):
                self._record_value(f"{where}[{i}]", _Items(v), i, depth)
        elif type(v) is dict:
            self._sizes.append((f"{where}: its length", v, len(v)))
            for key in list(v):
                self._record_value(f"{where}[{key!r}]", v, key, depth)
        elif isinstance(v, functools.partial):
            self._record_value(f"{where} (its arguments)", {"args": v.args}, "args", depth)
            self._record_value(f"{where} (its keywords)", {"keywords": v.keywords}, "keywords", depth)
        elif isinstance(v, types.FunctionType) and v.__closure__:
            for i, name in enumerate(v.__code__.co_freevars):
                self._record_value(f"{where} (its closure's {name})", _Cells(v.__closure__), i, depth)
        elif (dataclasses.is_dataclass(v) and not isinstance(v, type) or type(v) is types.SimpleNamespace) \
                and not callable(getattr(v, "to_json_string", None)):  # a Hugging Face config: recorded on its own
            self._sizes.append((f"{where}: its fields", vars(v), len(vars(v))))
            for key in list(vars(v)):
                self._record_value(f"{where}.{key}", vars(v), key, depth)

    def first_change(self) -> Optional[str]:
        """Where the model differs from the record (``None``: nowhere)."""
        for where, mapping, key, value in self._equal:
            now = mapping.get(key, _MISSING)
            if now is not value and now != value:
                return where
        for where, mapping, key, value in self._same:
            if mapping.get(key, _MISSING) is not value:
                return where
        for where, mapping, size in self._sizes:
            if len(mapping) != size:
                return where
        for where, mapping, skipped, size in self._counted:
            if len(mapping.keys() - skipped) != size:
                return where
        for where, tensor, dtype, device, shape in self._kinds:
            if tensor.dtype is not dtype or tensor.device != device or tensor.shape != shape:
                return where
        for where, tensor, version in self._versions:
            if tensor._version != version:
                return where
        return None

    def check(self) -> None:
        """Raise if the model changed since the record, naming where."""
        where = self.first_change()
        if where is None:
            return
        mode = where == "training" or where.endswith(".training")
        raise AutotpError(
            f"{type(self.model).__name__} changed after parallelize ({where}): a captured graph keeps what it was "
            f"traced with, so {'set the mode' if mode else 'make the change'} before parallelize"
            + (" (model.eval() for inference)" if mode else ", or build the model again and parallelize that"))


def check_no_gradients(args: Any, kwargs: Any) -> None:
    """Raise if this call would build an autograd graph through the collectives."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in pytree.tree_leaves((args, kwargs))):
        raise AutotpError("an input requires grad: autotp runs inference only (its collectives have no backward, so "
                          "gradients would be wrong); call it under torch.no_grad(), or detach the inputs")


class OneCaller:
    """Admits the calls of one thread at a time (see the module docstring); nested calls of the
    thread already inside pass."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: Optional[int] = None

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        me = threading.get_ident()
        if not self._lock.acquire(blocking=False):
            if self._owner == me:  # nested in this thread's call
                yield
                return
            raise AutotpError("another thread is calling this tensor-parallel model: the ranks pair their "
                              "collectives in the order each calls them, so concurrent calls would sum each "
                              "other's results; call it from one thread at a time")
        self._owner = me
        try:
            yield
        finally:
            self._owner = None
            self._lock.release()


def contiguous_arguments(gm: fx.GraphModule, arguments: dict[str, Any]) -> dict[str, Any]:
    """``arguments`` with each tensor that is not contiguous replaced by a contiguous copy.

    Capture traces every tensor input as a contiguous one, so what the forward decided from an
    input's strides is decided for a contiguous tensor: ``x.contiguous()`` is ``x`` itself in the
    graph, strides read for ``as_strided`` are a contiguous tensor's. Called with a transposed
    or sliced tensor, such a graph read it in the wrong layout (a sliding window by
    ``as_strided``: 0.45 off, on the first call, with no error; found by an adversarial review).
    On a contiguous copy it computes what the model computes after ``contiguous()``. A graph
    that writes into an input (directly, through a view, or in a module run whole) cannot be
    given a copy: the write must reach the caller's tensor where the model's would, and not
    where the model wrote into its own copy; such a call is refused."""
    leaves, spec = pytree.tree_flatten_with_path(arguments)
    strided = [(path, t) for path, t in leaves if isinstance(t, torch.Tensor) and not t.is_contiguous()]
    if not strided:
        return arguments
    if writes_into_inputs(gm):
        path, t = strided[0]
        name = f"{getattr(path[0], 'key', path[0])}{pytree.keystr(path[1:])}"  # x, or past[0] for a nested one
        raise AutotpError(f"input {name} is not contiguous (shape {list(t.shape)}, strides "
                          f"{list(t.stride())}) and this graph writes into its inputs, as captured with contiguous "
                          "ones: pass it .contiguous()")
    return pytree.tree_unflatten([t.contiguous() if isinstance(t, torch.Tensor) else t for _, t in leaves], spec)


def writes_into_inputs(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` may write into one of its inputs: an op writes into an alias group holding
    a placeholder (``Tensor(a!)`` in its schema), or a module runs whole (its writes are not
    seen). Worked out once per graph and kept in ``gm.meta``."""
    if "autotp_writes_inputs" not in gm.meta:
        groups, written = written_groups(gm.graph)
        gm.meta["autotp_writes_inputs"] = (
            any(node.op == "placeholder" and groups.find(node) in written for node in gm.graph.nodes)
            or any(isinstance(module, OpaqueCall) for module in gm.modules()))
    return gm.meta["autotp_writes_inputs"]


def draws_random_numbers(gm: fx.GraphModule) -> bool:
    """Whether running ``gm`` may draw from a random generator (:func:`_may_draw`), in the
    graph or a subgraph it calls. Worked out once per graph and kept in ``gm.meta``."""
    if "autotp_draws_random" not in gm.meta:
        gm.meta["autotp_draws_random"] = any(_may_draw(module, node) for module in gm.modules()
                                             if isinstance(module, fx.GraphModule) for node in module.graph.nodes)
    return gm.meta["autotp_draws_random"]


# Namespaces whose ops' tags are kept by PyTorch itself: an op of another (a custom op, whose
# author may not have tagged it) can draw inside unseen (found by an adversarial review).
_TAGGED_NAMESPACES = frozenset({"aten", "prims"})
_SWITCHES = ("train", "training")  # dropout's and rrelu's: False draws nothing


def _may_draw(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An aten op tagged ``nondeterministic_seeded`` that its arguments do not switch off
    (dropout with ``train`` false or a probability of 0, attention with ``dropout_p`` 0); an op
    of another namespace; a module that runs whole in eager PyTorch (an opaque module: whatever
    its ``forward`` draws, from the global generators, is drawn on every rank). A probability of
    0 may still move the generator (``native_dropout`` draws a mask of ones), but no value
    depends on it, and the planner keeps such an op whole, so every rank moves it as the model
    does (``rules.pointwise._training``)."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), OpaqueCall)
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False  # autotp's own functions, getitem
    op = node.target
    if op.namespace not in _TAGGED_NAMESPACES:
        return True
    if torch.Tag.nondeterministic_seeded not in op.tags:
        return False
    dropout = "dropout" in op.name()
    for i, arg in enumerate(op._schema.arguments):
        value = node.args[i] if i < len(node.args) and not arg.kwarg_only else node.kwargs.get(arg.name, arg.default_value)
        if arg.name in _SWITCHES and value is False:
            return False
        if (arg.name == "dropout_p" or (dropout and arg.name == "p")) and isinstance(value, (int, float)) and value == 0:
            return False
    return True
