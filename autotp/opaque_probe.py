"""The shapes an opaque module's call returns, found by running it (:mod:`autotp.opaque`).

An opaque call is one graph node; export must be told the shapes of what it returns, as
expressions of the sizes it is called with (a batch, a sequence length), since the graph serves
every size. They come from *probes*: the module's own ``forward`` run outside the trace, on zeros
for its tensors and example inputs, first at the sizes of the trace, then with the sizes
shifted. Each output dim is then the input size (a dim of a tensor argument, or a size argument)
that took the same values in both runs, a product of two, or a constant.

Sizes that were equal in the trace are shifted together (a mask's batch and the hidden states'
batch are separate symbols to export until some traced op compares them); a group whose shift
the module refuses (a hidden size its weights fix) keeps its size, and the dims it sets come out
constant. A call whose outputs do not fit the derived shapes raises at run time
(:class:`autotp.opaque.OpaqueCall`), so a probe that missed a dependence costs an error, not a
wrong number.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from autotp.errors import first_line

__all__ = ["OpaqueModuleError", "Slot", "holes", "filled", "probe_shapes", "size_of", "call_unchanging"]

_STEP = 3  # the second probe's sizes: each group's value plus this times (its index + 1)


class OpaqueModuleError(Exception):
    """A module could not be made opaque: its outputs' shapes cannot be derived, it writes into
    what it is passed or holds, or it fails on the probes. ``cls``: the module's class."""

    def __init__(self, message: str, cls: type | None = None) -> None:
        super().__init__(message)
        self.cls = cls


class Slot:
    """Where a tensor (or, ``size=True``, a size) was among a call's or an output's leaves.
    Slots of a kind compare equal, so that a record's deep copy compares equal."""

    def __init__(self, size: bool = False) -> None:
        self.size = size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Slot) and other.size == self.size

    def __hash__(self) -> int:
        return int(self.size)

    def __repr__(self) -> str:
        return "<size>" if self.size else "<tensor>"


def holes(leaves: Sequence[Any]) -> list[Any]:
    """``leaves`` with each tensor and each symbolic int replaced by a :class:`Slot`."""
    return [Slot() if isinstance(x, torch.Tensor) else Slot(size=True) if isinstance(x, torch.SymInt) else x
            for x in leaves]


def filled(slots: Sequence[Any], tensors: Sequence[Any], sizes: Sequence[Any] = ()) -> list[Any]:
    """The leaves ``slots`` stands for, given its tensors and sizes in order."""
    given, counts = iter(tensors), iter(sizes)
    return [(next(counts) if x.size else next(given)) if isinstance(x, Slot) else x for x in slots]


# An output dim, as a function of a call's sizes (its tensors' dims, then its size arguments):
# ("const", n) | ("at", k) | ("mul", k, l)
Rule = tuple


def size_of(rule: Rule, sizes: Sequence[Any]) -> Any:
    if rule[0] == "const":
        return rule[1]
    if rule[0] == "at":
        return sizes[rule[1]]
    return sizes[rule[1]] * sizes[rule[2]]


def call_sizes(activations: Sequence[torch.Tensor], counts: Sequence[Any]) -> list[Any]:
    """The sizes rules index: every dim of every tensor argument, then the size arguments."""
    return [d for x in activations for d in x.shape] + list(counts)


def probe_shapes(template: nn.Module, path: str, slots: list[Any], in_spec: Any, activations: list[torch.Tensor],
                 counts: list[Any]) -> tuple:
    """Run ``template`` (data-less) on zeros at the sizes of ``activations`` and ``counts`` (the
    call's tensor and size arguments, traced: sizes may be symbols) and at shifted sizes; return
    (out_spec, out_slots, shapes (a Rule per dim of each output tensor), dtypes)."""
    traced = call_sizes(activations, counts)
    for size in traced:
        if not isinstance(size, int) and size.node.hint is None:
            raise OpaqueModuleError(f"{path} is called with a size known only from the data")
    groups = _groups(traced)

    def run(shifted: Sequence[int]) -> tuple:
        values = _shifted(traced, groups, shifted)
        return _run(template, path, slots, in_spec, activations, values), values

    first, first_values = run(())
    second, second_values = _second_probe(run, len(groups))
    if first[0] != second[0] or first[1] != second[1] or first[3] != second[3] or len(first[2]) != len(second[2]):
        raise OpaqueModuleError(f"{path}: its output's structure changes with its inputs' sizes")
    shapes = [_rules(a, b, first_values, second_values, path) for a, b in zip(first[2], second[2])]
    return first[0], first[1], shapes, first[3]


def _groups(traced: Sequence[Any]) -> list[list[Any]]:
    """The symbols of ``traced``'s sizes, grouped by their value in the trace (their hint)."""
    by_hint: dict[int, list[Any]] = {}
    for size in traced:
        if not isinstance(size, int):
            for symbol in size.node.expr.free_symbols:
                group = by_hint.setdefault(int(_hints(size)[symbol]), [])
                if symbol not in group:
                    group.append(symbol)
    return [by_hint[h] for h in sorted(by_hint)]


def _hints(size: torch.SymInt) -> Any:
    env = size.node.shape_env
    return getattr(env, "backed_var_to_val", None) or env.var_to_val  # renamed in torch 2.13


def _shifted(traced: Sequence[Any], groups: list[list[Any]], shifted: Sequence[int]) -> list[int]:
    """``traced``'s values with the symbols of the groups numbered in ``shifted`` moved off their
    hints (a group's symbols together)."""
    moved = set(shifted)
    values = []
    for size in traced:
        if isinstance(size, int):
            values.append(size)
            continue
        hints = _hints(size)
        assignment = {symbol: int(hints[symbol]) + (_STEP * (i + 1) if i in moved else 0)
                      for i, group in enumerate(groups) for symbol in group if symbol in size.node.expr.free_symbols}
        values.append(int(size.node.expr.xreplace(assignment)))
    return values


def _second_probe(run: Callable[[Sequence[int]], tuple], groups: int) -> tuple:
    """The probe with every group shifted, or, where the module refuses that, with the groups
    it takes (each tried in turn, kept if the module runs with it and those kept before)."""
    try:
        return run(range(groups))
    except OpaqueModuleError:
        if groups <= 1:
            raise
    kept: list[int] = []
    last = None  # the probe with the groups kept so far, not run again
    for group in range(groups):
        try:
            last = run(kept + [group])
            kept.append(group)
        except OpaqueModuleError:
            continue
    return last if last is not None else run(kept)


def _rules(out_a: list[int], out_b: list[int], first: list[int], second: list[int], path: str) -> list[Rule]:
    """Each dim of one output, from its sizes in the two probes."""
    if len(out_a) != len(out_b):
        raise OpaqueModuleError(f"{path}: an output's rank changes with its inputs' sizes")
    return [_rule(a, b, first, second, path) for a, b in zip(out_a, out_b)]


def _rule(a: int, b: int, first: list[int], second: list[int], path: str) -> Rule:
    if a != b:
        for k in range(len(first)):
            if first[k] == a and second[k] == b:
                return ("at", k)
        for k, m in itertools.combinations_with_replacement(range(len(first)), 2):
            if first[k] * first[m] == a and second[k] * second[m] == b:
                return ("mul", k, m)
        raise OpaqueModuleError(f"{path}: an output's size ({a}, then {b}) follows from no input size")
    return ("const", a)


def _run(template: nn.Module, path: str, slots: list[Any], in_spec: Any, activations: list[torch.Tensor],
         values: list[int]) -> tuple:
    """One probe, outside the trace: zeros for the module's tensors, examples for its tensor
    arguments at the sizes ``values`` gives (their dims, then the size arguments')."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.utils._python_dispatch import _disable_current_modes

    with unset_fake_temporarily(), _disable_current_modes(), torch._C.DisableTorchFunction(), torch.no_grad():
        device = activations[0].device
        # a copy: what the forward leaves on its module (rotary tables computed from these zeros,
        # say) must not stay on the module the graph will run
        probe = copy.deepcopy(template)
        state = {n: torch.zeros(t.shape, dtype=t.dtype, device=device) for n, t in module_state(probe).items()}
        sizes = iter(values)
        examples = [_example(x, [next(sizes) for _ in x.shape]) for x in activations]
        args, kwargs = pytree.tree_unflatten(filled(slots, examples, list(sizes)), in_spec)
        try:
            out = call_unchanging(probe, state, args, kwargs, path)
        except OpaqueModuleError:
            raise
        except Exception as exc:  # noqa: BLE001  the module's own failure on the probe, named
            raise OpaqueModuleError(f"{path} failed on a probe: {first_line(exc)}") from exc
    flat, out_spec = pytree.tree_flatten(out)
    tensors = [x for x in flat if isinstance(x, torch.Tensor)]
    if not tensors:
        raise OpaqueModuleError(f"{path} returns no tensor")
    return out_spec, holes(flat), [list(x.shape) for x in tensors], [x.dtype for x in tensors]


def module_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters and buffers, by name (a tied tensor once)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def call_unchanging(module: nn.Module, state: dict[str, torch.Tensor], args: Any, kwargs: dict[str, Any],
                    path: str) -> Any:
    """``module``'s forward on ``args``/``kwargs`` with ``state`` for its tensors; raises
    OpaqueModuleError if it wrote into a tensor it was passed or holds, or changed an object it
    was passed (a cache it updates): a graph node's inputs must come out as they went in."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)] + list(state.values()) + _plain_tensors(module)
    versions = [t._version for t in tensors]
    out = torch.func.functional_call(module, state, tuple(args), kwargs)
    if [t._version for t in tensors] != versions:
        raise OpaqueModuleError(f"{path} writes into its inputs or its own tensors (a running count, say)")
    now, spec_now = pytree.tree_flatten((args, kwargs))
    if spec_now != spec or len(now) != len(leaves) \
            or any(a is not b and (isinstance(a, torch.Tensor) or a != b) for a, b in zip(now, leaves)):
        raise OpaqueModuleError(f"{path} changes an object it is passed (a cache it updates, say)")
    return out


def _plain_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Tensors ``module`` and its submodules hold as plain attributes (not parameters or buffers)."""
    return [v for m in module.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]


def _example(like: torch.Tensor, shape: list[int]) -> torch.Tensor:
    if like.dtype.is_floating_point or like.dtype.is_complex:
        return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(like.dtype).to(like.device)
    if like.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool, device=like.device)
    return torch.zeros(shape, dtype=like.dtype, device=like.device)
