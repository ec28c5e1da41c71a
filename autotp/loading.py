"""Loading: put this rank's tensors into a rewritten graph module.

Consumes a graph module whose parameters and buffers are fake (from capture), the plan, and a
source of tensors; produces the graph module holding real tensors: this rank's slice for
sharded ones, the tensor itself for replicated ones.

Sources answer ``has(name)`` and ``read(name, placement, rank, world_size)``, so a source
reads only the slice it is asked for:

- :class:`ModuleSource`: tensors of a module in memory (sliced copies; the full tensors can
  then be released);
- :class:`CheckpointSource`: a Hugging Face checkpoint (:mod:`autotp.checkpoints`): its
  ``*.safetensors`` files, read with one contiguous read per run of its slice (a rank reads its
  bytes and nothing else), or its ``pytorch_model*.bin`` files, memory-mapped; under the names
  transformers loads them as (:mod:`autotp.conversions`), built by :func:`checkpoint_source`;
- :class:`ShardFileSource`: one rank file written by :mod:`autotp.convert`;
- :class:`FirstOf`: the first source that has the tensor (a checkpoint, then the model's own
  non-persistent buffers such as rotary frequencies, which checkpoints do not hold).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor

from autotp.checkpoints import Checkpoint, LoadError, SafetensorsCheckpoint, TorchCheckpoint, open_checkpoint
from autotp.conversions import converted
from autotp.placement import Placement, Shard, local_chunk
from autotp.safetensors_io import SafetensorsReader
from autotp.plan import Plan

__all__ = [
    "TensorSource", "ModuleSource", "CheckpointSource", "ShardFileSource", "FirstOf", "SafetensorsCheckpoint",
    "TorchCheckpoint", "Checkpoint", "open_checkpoint", "load_into", "LoadError", "named_tensors", "aliases",
    "check_checkpoint", "checkpoint_names", "checkpoint_source", "non_persistent_buffers",
]


class TensorSource(Protocol):
    def has(self, name: str) -> bool: ...

    def read(self, name: str, placement: Placement, rank: int, world_size: int) -> torch.Tensor: ...


def named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer under every name it has (tied weights appear twice)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in module.named_parameters(remove_duplicate=False):
        out[name] = t
    for name, t in module.named_buffers(remove_duplicate=False):
        out[name] = t
    return out


class ModuleSource:
    """Tensors of an in-memory module; sharded ones are copied as slices, replicated ones shared."""

    def __init__(self, module: nn.Module, device: Optional[torch.device] = None) -> None:
        self.tensors = named_tensors(module)
        self.module = module
        self.device = device

    def has(self, name: str) -> bool:
        return name in self.tensors and self.tensors[name].device.type != "meta"

    def read(self, name: str, placement: Placement, rank: int, world_size: int) -> torch.Tensor:
        if name not in self.tensors:
            raise LoadError(f"{type(self.module).__name__} has no parameter or buffer named {name!r}")
        full = self.tensors[name]
        if full.device.type == "meta":
            raise LoadError(f"{name} is on the meta device: the model holds no data for it "
                            "(pass checkpoint=DIR, or build the model with its weights)")
        if isinstance(placement, Shard):
            # clone: the slice must not keep the full tensor's storage alive
            return local_chunk(full, placement, rank, world_size).to(self.device or full.device).clone()
        return full if self.device is None else full.to(self.device)

    def release(self, names: Iterable[str], local: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Free the named tensors of the source module: each becomes this rank's tensor of the
        same name from ``local`` (a slice, so the module keeps a real device but no full copy),
        or an empty ``meta`` tensor."""
        local = local or {}
        replacement: dict[int, Optional[torch.Tensor]] = {}
        for name in names:
            if name in self.tensors:
                key = id(self.tensors[name])
                replacement[key] = local.get(name, replacement.get(key))  # tied names share one tensor
        for module in self.module.modules():
            for store in (module._parameters, module._buffers):
                for key, t in list(store.items()):
                    if t is None or id(t) not in replacement:
                        continue
                    new = replacement[id(t)]
                    if new is None:
                        new = torch.empty_like(t, device="meta")
                    store[key] = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) and not isinstance(new, nn.Parameter) else new
        self.tensors = named_tensors(self.module)


def aliases(module: nn.Module) -> dict[str, list[str]]:
    """For each tensor name, the other names of the same tensor (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, t in named_tensors(module).items():
        by_id.setdefault(id(t), []).append(name)
    return {n: [m for m in names if m != n] for names in by_id.values() for n in names}


def _saved_level(module: nn.Module, stored: Iterable[str]) -> tuple[str, Optional[str]]:
    """The base model's prefix, and how a checkpoint holding the keys ``stored`` spells the
    module's names, decided for the whole checkpoint at once as transformers decides it:
    ``"without"`` the prefix (a model with a head, its checkpoint saved from the base model),
    ``"with"`` it (a base model, a head model's checkpoint), or None (as the module does)."""
    prefix = getattr(module, "base_model_prefix", "") or ""
    if not prefix:
        return prefix, None
    under_prefix = any(k.startswith(prefix + ".") for k in stored)
    has_base = isinstance(getattr(module, prefix, None), nn.Module)
    if has_base and not under_prefix:
        return prefix, "without"
    if not has_base and under_prefix:
        return prefix, "with"
    return prefix, None


def checkpoint_names(module: nn.Module, stored: Iterable[str]) -> dict[str, list[str]]:
    """For each tensor name, the keys a checkpoint holding the keys ``stored`` may hold it
    under, in the order tried: its own and its tied names', and, where the checkpoint was saved
    from another level of the model (:func:`_saved_level`), those names as that level spells
    them: ``transformer.h.0.attn...`` read as ``h.0.attn...`` from a checkpoint saved from
    ``GPT2Model`` (as the classic ``gpt2`` checkpoints are); a base model's names with the
    prefix from a head model's checkpoint (its head is not read)."""
    prefix, level = _saved_level(module, stored)
    rebuilt = non_persistent_buffers(module)
    return {name: [] if name in rebuilt else _spellings([name, *tied], prefix, level)
            for name, tied in aliases(module).items()}


def _spellings(own: list[str], prefix: str, level: Optional[str]) -> list[str]:
    """The keys ``own`` (a tensor's names) may be stored under, given how the checkpoint spells
    the model's names (:func:`_saved_level`)."""
    if level == "without":
        return own + [n[len(prefix) + 1:] for n in own if n.startswith(prefix + ".")]
    if level == "with":
        return [f"{prefix}.{n}" for n in own] + own
    return own


def non_persistent_buffers(module: nn.Module) -> set[str]:
    """The names of buffers registered ``persistent=False`` (rotary ``inv_freq``, causal masks):
    not part of the state dict, so the model computes them from its config at build time.
    transformers never reads them from a checkpoint, even one that holds them (older Llama
    conversions stored ``inv_freq``): a stored copy may have been computed for another config."""
    return {f"{path}.{name}" if path else name
            for path, sub in module.named_modules(remove_duplicate=False)
            for name in sub._non_persistent_buffers_set if sub._buffers.get(name) is not None}


class CheckpointSource:
    """Tensors from a checkpoint under the keys :func:`checkpoint_names` gives for each name."""

    def __init__(self, checkpoint: Checkpoint, keys: dict[str, list[str]]) -> None:
        self.checkpoint = checkpoint
        self.keys = keys

    def _key(self, name: str) -> Optional[str]:
        for key in self.keys.get(name, [name]):
            if key in self.checkpoint:
                return key
        return None

    def has(self, name: str) -> bool:
        return self._key(name) is not None

    def read(self, name: str, placement: Placement, rank: int, world_size: int) -> torch.Tensor:
        key = self._key(name)
        if key is None:
            raise LoadError(f"checkpoint {self.checkpoint.directory} has no tensor {name!r}")
        return self.checkpoint.read(key, placement, rank, world_size)

    def close(self) -> None:
        self.checkpoint.close()


class ShardFileSource:
    """One rank file of a converted directory: its tensors are already this rank's slices."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = SafetensorsReader(path)

    def has(self, name: str) -> bool:
        return name in self._file

    def read(self, name: str, placement: Placement, rank: int, world_size: int) -> torch.Tensor:
        return self._file.read(name, mapped=True)

    def close(self) -> None:
        self._file.close()


class FirstOf:
    """The first of several sources that has a tensor."""

    def __init__(self, *sources: Any) -> None:
        self.sources = [s for s in sources if s is not None]

    def has(self, name: str) -> bool:
        return any(s.has(name) for s in self.sources)

    def read(self, name: str, placement: Placement, rank: int, world_size: int) -> torch.Tensor:
        for source in self.sources:
            if source.has(name):
                return source.read(name, placement, rank, world_size)
        raise LoadError(f"no source holds {name!r}")

    def close(self) -> None:
        for source in self.sources:
            getattr(source, "close", lambda: None)()


def check_checkpoint(checkpoint: Checkpoint, model: nn.Module, stored: Optional[Iterable[str]] = None) -> None:
    """The checkpoint must hold every persistent tensor of ``model`` (under one of the keys
    :func:`checkpoint_names` gives), each of the model's shape, and nothing else, except what
    the model class says to ignore (a checkpoint saved from the base model has no head; a tied
    head is saved once). ``stored``: the keys in the files, where ``checkpoint`` reads them under
    other names (:func:`autotp.conversions.converted`); whether they were saved from a model
    with a head is decided on them.

    Shapes are checked whole, as transformers checks them: a rank's slice alone can hide a
    short tensor (a padded shard of 129 rows has the local shape of one of 131).
    """
    state = model.state_dict(keep_vars=True)
    keys = checkpoint_names(model, checkpoint.keys())
    found = {n: next((k for k in keys.get(n, [n]) if k in checkpoint), None) for n in state}
    missing = sorted(n for n, k in found.items() if k is None)
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
    prefix, level = _saved_level(model, checkpoint.keys() if stored is None else stored)
    if level == "with":  # a base model, a head model's checkpoint: its head is not read
        ignore.append(re.compile(rf"^(?!{re.escape(prefix)}\.)"))
    rebuilt = {k for n in non_persistent_buffers(model) for k in _spellings([n], prefix, level)}  # ignored, as by transformers
    known = {k for names in keys.values() for k in names} | rebuilt
    unexpected = sorted(k for k in checkpoint.keys() if k not in known and not any(p.search(k) for p in ignore))
    where = checkpoint.directory
    if missing:
        raise LoadError(f"checkpoint {where} is missing {len(missing)} tensor(s) the model needs: {', '.join(missing[:3])}"
                        + (" ..." if len(missing) > 3 else ""))
    if unexpected:
        raise LoadError(f"checkpoint {where} holds {len(unexpected)} tensor(s) the model does not have: "
                        f"{', '.join(unexpected[:3])}" + (" ..." if len(unexpected) > 3 else ""))
    wrong = [(n, k) for n, k in found.items() if list(checkpoint.shape(k)) != list(state[n].shape)]
    if wrong:
        name, key = wrong[0]
        raise LoadError(f"checkpoint {where}: {key} has shape {list(checkpoint.shape(key))}, the model's {name} "
                        f"{list(state[name].shape)}" + (f" ({len(wrong) - 1} more differ)" if len(wrong) > 1 else ""))
    for stored_twice in _tied_and_stored_twice(checkpoint, keys):
        _check_copies_equal(checkpoint, stored_twice)


def _tied_and_stored_twice(checkpoint: Checkpoint, keys: dict[str, list[str]]) -> list[list[str]]:
    """The keys the checkpoint holds for one tensor of the model, where it holds more than one:
    the model ties them (``tie_word_embeddings``), yet the checkpoint was saved untied."""
    groups = {frozenset(present) for names in keys.values() if len(present := [k for k in names if k in checkpoint]) > 1}
    return [sorted(group) for group in groups]


def _check_copies_equal(checkpoint: Checkpoint, stored: list[str]) -> None:
    """Two stored copies of one tied tensor must be equal, or the model would read one of them
    for both uses. transformers unties such a model (its config does not describe the
    checkpoint); a captured graph cannot, so it is refused."""
    first, *others = stored
    for other in others:
        if not _stored_equal(checkpoint, first, other):
            raise LoadError(f"checkpoint {checkpoint.directory} holds {first} and {other} with different values, but "
                            "the model ties them (config tie_word_embeddings or tied weights): set "
                            "tie_word_embeddings to false in config.json if the checkpoint is untied")


def _stored_equal(checkpoint: Checkpoint, a: str, b: str, rows: int = 4096) -> bool:
    """Whether two stored tensors are equal, compared ``rows`` at a time: an embedding of
    gigabytes is never read whole."""
    shape = list(checkpoint.shape(a))
    if list(checkpoint.shape(b)) != shape:
        return False
    if not shape:
        return torch.equal(checkpoint.read_ranges(a, None, None), checkpoint.read_ranges(b, None, None))
    return all(torch.equal(checkpoint.read_ranges(a, 0, [(i, min(i + rows, shape[0]))]),
                           checkpoint.read_ranges(b, 0, [(i, min(i + rows, shape[0]))]))
               for i in range(0, shape[0], rows))


def checkpoint_source(directory: str | Path, model: nn.Module, *, mapped: bool = False) -> CheckpointSource:
    """The checkpoint in ``directory`` as a source of ``model``'s tensors: read under the names
    transformers loads them as (:func:`autotp.conversions.converted`: renamed, experts merged),
    checked to hold every tensor the model needs and nothing else (:func:`check_checkpoint`).

    Raises:
        LoadError: no checkpoint there, or it does not match the model.
    """
    files = open_checkpoint(directory, mapped=mapped)
    checkpoint = converted(files, model)
    check_checkpoint(checkpoint, model, stored=files.keys())
    return CheckpointSource(checkpoint, checkpoint_names(model, checkpoint.keys()))


def _set_tensor(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False) if not isinstance(value, nn.Parameter) else value
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)


def _graph_tensor_names(gm: fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "get_attr" and isinstance(n.meta.get("val"), torch.Tensor)]


def load_into(gm: fx.GraphModule, plan: Plan, rank: int, source: TensorSource,
              then: Optional[Callable[[fx.GraphModule], object]] = None) -> fx.GraphModule:
    """Fill every tensor ``gm`` reads with this rank's data from ``source``. ``then``: a pass
    over the loaded graph (kernel selection), run before the graph's code is generated once.

    Raises:
        LoadError: a tensor is missing from the source or its shape is not the planned one.
    """
    for name in _graph_tensor_names(gm):
        current = _get_attr(gm, name)
        spec = plan.params.get(name)
        captured = isinstance(current, torch.Tensor) and not isinstance(current, FakeTensor)
        if spec is None or (captured and not source.has(name)):
            if not captured:
                raise LoadError(f"the graph reads {name!r}, which the plan does not list")
            # a constant the model created during the captured forward: the graph holds its value
            if spec is None or not isinstance(spec.placement, Shard):
                continue
            value = local_chunk(current, spec.placement, rank, plan.tp_size).clone()
        else:
            value = source.read(name, spec.placement, rank, plan.tp_size)
        expected = spec.local_shape(plan.tp_size)
        if list(value.shape) != expected:
            raise LoadError(f"{name}: got shape {list(value.shape)}, expected {expected} for rank {rank}")
        dtype = getattr(torch, spec.dtype)
        if value.dtype != dtype:
            value = value.to(dtype)  # checkpoints in another precision load in the model's
        _set_tensor(gm, name, value)
    getattr(source, "close", lambda: None)()
    if then is not None:
        then(gm)
    _flatten_tensor_reads(gm)
    return gm


def _flatten_tensor_reads(gm: fx.GraphModule) -> None:
    """Point every ``get_attr`` at a flat instance attribute holding the same tensor.

    The generated code then reads ``self._t3`` (a plain instance-dict lookup) instead of
    ``self.model.layers[0].self_attn.q_proj.weight`` (a chain of ``Module.__getattr__`` calls,
    ~140 per decode step of a small model). The tensors stay registered under their names."""
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "get_attr"):
        value = _get_attr(gm, node.target)
        if isinstance(value, torch.Tensor):
            flat = f"_autotp_t{i}"
            gm.__dict__[flat] = value
            node.target = flat
    gm.recompile()


def _get_attr(gm: fx.GraphModule, name: str) -> object:
    """The parameter, buffer or attribute at a dotted name."""
    value: object = gm
    for part in name.split("."):
        value = getattr(value, part)
    return value
