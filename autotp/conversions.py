"""A checkpoint read under the names transformers gives its tensors on load.

transformers (5.x) renames and merges checkpoint tensors when it loads them: a Mixtral or
Qwen-MoE checkpoint stores every expert's ``w1`` / ``w3`` / ``w2`` (``gate_proj`` / ``up_proj`` /
``down_proj``) apart, which the model holds stacked and fused as ``experts.gate_up_proj`` and
``experts.down_proj``; a legacy checkpoint says ``LayerNorm.gamma`` for ``LayerNorm.weight``.
``save_pretrained`` writes that stored layout back, so these are the checkpoints users hold.
:func:`converted` reads one as transformers does, by transformers' own rules for the model
(``get_model_conversion_mapping`` and ``rename_source_key``), so that autotp loads exactly what
``from_pretrained`` loads:

- a renamed tensor is read under its stored key, slice by slice, as any other;
- a merged one (``MergeModulelist``: experts stacked; ``Concatenate``: gate and up side by side;
  ``Chunk``: q, k, v cut from a fused tensor) is described as stacks, concatenations and
  slices of stored tensors, so a rank's slice of the result is read as slices of the stored
  tensors: each rank still reads only its own part;
- any other conversion (transposes, permutations, quantisation) runs transformers' own
  operations on the whole stored tensors, then the rank keeps its slice: right, at the cost of
  holding one whole converted tensor at a time.

Every conversion is first run on meta tensors of the stored shapes (names and shapes, no data);
a description as slices is used only where it gives the same. A checkpoint that holds a model
tensor twice (whole, and inside a fused tensor) is refused: which copy transformers loads
depends on the order it meets them. Whole shapes are checked against the model's by
:func:`autotp.loading.check_checkpoint`.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from autotp.checkpoints import Checkpoint, LoadError, Sliced, joined, ranges_of

__all__ = ["converted", "ConvertedCheckpoint"]

Ranges = Optional[list[tuple[int, int]]]


class _Stored:
    """A tensor as the checkpoint stores it."""

    def __init__(self, checkpoint: Checkpoint, key: str) -> None:
        self.checkpoint, self.key = checkpoint, key
        self.shape = list(checkpoint.shape(key))

    def read(self, dim: Optional[int], ranges: Ranges) -> torch.Tensor:
        return self.checkpoint.read_ranges(self.key, dim, ranges)


class _Stacked:
    """``torch.stack(parts, dim)``: a range along ``dim`` picks parts, along another dim slices each."""

    def __init__(self, parts: list[Any], dim: int) -> None:
        if len({tuple(p.shape) for p in parts}) != 1:
            raise ValueError(f"cannot stack shapes {[p.shape for p in parts]}")
        self.parts, self.dim = parts, dim % (len(parts[0].shape) + 1)
        self.shape = list(parts[0].shape)
        self.shape.insert(self.dim, len(parts))

    def read(self, dim: Optional[int], ranges: Ranges) -> torch.Tensor:
        if dim is None:
            return torch.stack([p.read(None, None) for p in self.parts], self.dim)
        if dim != self.dim:
            return torch.stack([p.read(dim if dim < self.dim else dim - 1, ranges) for p in self.parts], self.dim)
        picked = [i for a, b in ranges for i in range(a, b)]
        if not picked:  # an empty range (a padded rank past the end): no part is read, only its dtype
            empty = list(self.shape)
            empty[self.dim] = 0
            first = self.parts[0]
            return (first.read(0, [(0, 0)]) if first.shape else first.read(None, None)).new_empty(empty)
        return torch.stack([self.parts[i].read(None, None) for i in picked], self.dim)


class _Concatenated:
    """``torch.cat(parts, dim)``: a range along ``dim`` reads the part(s) it overlaps."""

    def __init__(self, parts: list[Any], dim: int) -> None:
        self.parts, self.dim = parts, dim % len(parts[0].shape)
        others = {tuple(s for i, s in enumerate(p.shape) if i != self.dim) for p in parts}
        if len(others) != 1 or len({len(p.shape) for p in parts}) != 1:
            raise ValueError(f"cannot concatenate shapes {[p.shape for p in parts]} along dim {self.dim}")
        self.shape = list(parts[0].shape)
        self.shape[self.dim] = sum(p.shape[self.dim] for p in parts)

    def read(self, dim: Optional[int], ranges: Ranges) -> torch.Tensor:
        if dim != self.dim:
            return joined([p.read(dim, ranges) for p in self.parts], self.dim)
        pieces = []
        for a, b in ranges:
            start = 0
            for part in self.parts:
                end = start + part.shape[dim]
                if max(a, start) < min(b, end):
                    pieces.append(part.read(dim, [(max(a, start) - start, min(b, end) - start)]))
                start = end
        return joined(pieces, dim) if pieces else self.parts[0].read(dim, [(0, 0)])


class _Narrowed:
    """``part.narrow(dim, start, length)``: one chunk of a fused tensor."""

    def __init__(self, part: Any, dim: int, start: int, length: int) -> None:
        self.part, self.dim, self.start, self.length = part, dim % len(part.shape), start, length
        self.shape = list(part.shape)
        self.shape[self.dim] = length

    def read(self, dim: Optional[int], ranges: Ranges) -> torch.Tensor:
        if dim == self.dim:
            return self.part.read(dim, [(self.start + a, self.start + b) for a, b in ranges])
        own = [(self.start, self.start + self.length)]
        if dim is None:
            return self.part.read(self.dim, own)
        # ranges of another dim are read across every chunk, then this chunk's copied out (so
        # that the others' are freed): one read per range, at the cost of reading the other chunks'
        return ranges_of(self.part.read(dim, ranges), self.dim, own).clone()


class _Group:
    """The stored tensors one of transformers' converters turns into model tensors: ``sources``
    maps each of its source patterns to the stored keys it matched, in transformers' order."""

    def __init__(self, converter: Any, first_name: str) -> None:
        self.converter, self.first_name = converter, first_name
        self.sources: dict[str, list[str]] = {}

    def run(self, tensors: Callable[[str], torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """transformers' own conversion of the stored tensors ``tensors(key)`` gives."""
        converter = copy.deepcopy(self.converter)
        for pattern, keys in self.sources.items():
            for key in keys:
                converter.add_tensor(self.first_name, key, pattern, tensors(key))
        out = converter.convert(self.first_name, model=model, config=getattr(model, "config", None))
        return {name: value[0] if isinstance(value, list) else value for name, value in out.items()}

    def described(self, checkpoint: Checkpoint, model: nn.Module) -> Optional[dict[str, Any]]:
        """Each model tensor as stacks, concatenations and chunks of stored tensors, where the
        converter's operations are only those (else None)."""
        from transformers.core_model_loading import Chunk, Concatenate, MergeModulelist

        values: dict[str, Any] = {p: [_Stored(checkpoint, k) for k in keys] for p, keys in self.sources.items()}
        sources, targets = self.converter.source_patterns, self.converter.target_patterns
        for op in self.converter.operations:
            if type(op) is MergeModulelist:
                size = len(values)
                values = {op.get_target_pattern(size, p, targets): _Stacked(parts, op.dim) for p, parts in values.items()}
            elif type(op) is Concatenate:
                parts = [x for p in sources if p in values for x in _listed(values[p])]
                values = {op.get_target_pattern(targets): _Concatenated(parts, op.dim)}
            elif type(op) is Chunk and op.num_shards_attribute is None and len(values) == 1:
                whole, = _listed(next(iter(values.values())))
                size = whole.shape[op.dim % len(whole.shape)]
                step = -(-size // len(targets))  # torch.chunk's
                values = {t: _Narrowed(whole, op.dim, i * step, min(step, size - i * step))
                          for i, t in enumerate(targets) if i * step < size}
            else:
                return None
        full_name = self.first_name.replace("*.", "0.")
        found = next((k for k in values if k in full_name), None)
        if found is None:
            return None
        prefix, _, suffix = full_name.partition(found)
        return {prefix + k + suffix: v for k, v in values.items()}


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


class _Converted:
    """A model tensor only transformers' own operations give: converted whole, then sliced."""

    def __init__(self, view: "ConvertedCheckpoint", group: _Group, name: str, shape: list[int]) -> None:
        self.view, self.group, self.name, self.shape = view, group, name, shape

    def read(self, dim: Optional[int], ranges: Ranges) -> torch.Tensor:
        whole = self.view.run(self.group)[self.name]
        if list(whole.shape) != self.shape:  # the slices are cut by the shape the meta run gave
            raise LoadError(f"checkpoint {self.view.directory}: transformers' conversion gave {self.name} the shape "
                            f"{list(whole.shape)} on the stored tensors, {self.shape} on their shapes alone")
        return whole if dim is None else ranges_of(whole, dim, ranges).clone()


class ConvertedCheckpoint(Sliced):
    """``checkpoint`` under the model's names (see the module's docstring). Keys transformers
    would not load into the model keep their stored names, so a check reports them."""

    def __init__(self, checkpoint: Checkpoint, model: nn.Module) -> None:
        self.checkpoint, self.model = checkpoint, model
        self.tensors: dict[str, Any] = {}  # name -> how it is read (a stored tensor, or stacks, ... of them)
        self.directory: Path = checkpoint.directory
        self._last: tuple[Optional[_Group], dict[str, torch.Tensor]] = (None, {})

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def nbytes(self) -> int:
        return self.checkpoint.nbytes()

    def shape(self, name: str) -> list[int]:
        return list(self.tensors[name].shape)

    def read_ranges(self, name: str, dim: Optional[int], ranges: Ranges) -> torch.Tensor:
        return self.tensors[name].read(dim, ranges)

    def run(self, group: _Group) -> dict[str, torch.Tensor]:
        """The group's tensors converted whole (the last group's are kept: its other outputs are
        usually read next)."""
        if self._last[0] is not group:
            self._last = (None, {})  # release the last group's before converting the next
            self._last = (group, group.run(lambda key: self.checkpoint.read_ranges(key, None, None), self.model))
        return self._last[1]

    def close(self) -> None:
        self._last = (None, {})
        self.checkpoint.close()


def _why_not(group: _Group, checkpoint: Checkpoint, exc: Exception) -> str:
    """Why the stored tensors of a group do not convert, in the checkpoint's terms where it can."""
    unmatched = [p for p in group.converter.source_patterns if p not in group.sources]
    if unmatched:
        return f"no stored tensor matches {', '.join(unmatched)}"
    for keys in group.sources.values():
        odd = next((k for k in keys if checkpoint.shape(k) != checkpoint.shape(keys[0])), None)
        if odd is not None:
            return f"{odd} has shape {checkpoint.shape(odd)}, {keys[0]} {checkpoint.shape(keys[0])}"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _meta_outputs(group: _Group, checkpoint: Checkpoint, model: nn.Module) -> dict[str, torch.Tensor]:
    """The group's conversion run on meta tensors of the stored shapes: names and shapes, no data."""
    try:
        return group.run(lambda key: torch.empty(checkpoint.shape(key), device="meta"), model)
    except LoadError:
        raise
    except Exception as exc:  # noqa: BLE001  an operation transformers defines, on any input
        count = sum(len(keys) for keys in group.sources.values())
        raise LoadError(f"checkpoint {checkpoint.directory}: cannot convert {count} stored tensor(s) into "
                        f"{group.first_name} as transformers does: {_why_not(group, checkpoint, exc)}") from None


def _group_tensors(view: "ConvertedCheckpoint", group: _Group) -> dict[str, Any]:
    """How each model tensor a group gives is read: as slices of the stored tensors where the
    conversion is described so (and gives the shapes transformers' own run gives), else whole."""
    expected = {n: list(t.shape) for n, t in _meta_outputs(group, view.checkpoint, view.model).items()}
    try:
        described = group.described(view.checkpoint, view.model)
    except ValueError:  # shapes the description cannot combine: converted whole instead
        described = None
    if described is not None and {n: list(v.shape) for n, v in described.items()} == expected:
        return described
    return {n: _Converted(view, group, n, shape) for n, shape in expected.items()}


def _transforms(model: nn.Module) -> Optional[tuple[list[Any], list[Any]]]:
    """transformers' renamings and converters for ``model`` (None: not a transformers model, or a
    transformers without load-time conversions or with another way of matching keys)."""
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return None
    # the matching this module mirrors (transformers 5.2x): another version's may differ, and a
    # checkpoint is then read under its stored names (a mismatch is a LoadError, not a guess)
    matching = inspect.signature(rename_source_key).parameters
    if not isinstance(model, PreTrainedModel) or "meta_state_dict" not in matching:
        return None
    transforms = get_model_conversion_mapping(model)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def converted(checkpoint: Checkpoint, model: nn.Module) -> Checkpoint:
    """``checkpoint`` under the names ``model`` gives its tensors, where transformers renames or
    converts any of its keys when loading it into ``model`` (beyond adding or dropping the base
    model's prefix); else ``checkpoint`` itself.

    Raises:
        LoadError: a conversion transformers defines fails on the stored tensors' shapes, or the
            checkpoint holds a model tensor twice (stored whole and in a fused tensor, say),
            where which one transformers loads depends on the order it meets them.
    """
    rules = _transforms(model)
    if rules is None:
        return checkpoint
    from transformers.core_model_loading import dot_natural_key, rename_source_key

    renamings, converters = rules
    names = {n: True for n in model.state_dict(keep_vars=True)}
    prefix = getattr(model, "base_model_prefix", None)
    matched, changed = [], False
    # as transformers' convert_and_load_state_dict_in_model matches keys, in its order (experts
    # 0, 1, ..., 10), each key once (some renamings keep state from one key to the next)
    for key in sorted(checkpoint.keys(), key=dot_natural_key):
        plain = rename_source_key(key, [], [], prefix, names)[0]  # the base model's prefix alone
        name, pattern = rename_source_key(key, renamings, converters, prefix, names)
        if name not in names and key in names:
            name, pattern = plain, None
        changed = changed or pattern is not None or name != plain
        matched.append((key, name, pattern))
    if not changed:  # names as stored, but for the prefix: read as they are (loading.checkpoint_names)
        return checkpoint
    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    view = ConvertedCheckpoint(checkpoint, model)
    origin: dict[str, str] = {}
    groups: dict[str, _Group] = {}
    for key, name, pattern in matched:
        if name not in names:  # not the model's: kept under its stored name, for the check to name
            view.tensors[key], origin[key] = _Stored(checkpoint, key), key
        elif pattern is None:
            _add(view, origin, name, _Stored(checkpoint, key), key)
        else:
            groups.setdefault(name, _Group(by_pattern[pattern], name)).sources.setdefault(pattern, []).append(key)
    for group in groups.values():
        first = next(iter(group.sources.values()))[0]
        for name, tensor in _group_tensors(view, group).items():
            _add(view, origin, name, tensor, f"part of what transformers converts from {first} ...")
    return view


def _add(view: ConvertedCheckpoint, origin: dict[str, str], name: str, tensor: Any, source: str) -> None:
    if name in origin:
        raise LoadError(f"checkpoint {view.directory} holds {name} twice: as {origin[name]} and as {source}")
    view.tensors[name], origin[name] = tensor, source
