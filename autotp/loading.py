"""Loading: put this rank's tensors into a rewritten graph module.

Consumes a graph module whose parameters and buffers are fake (from capture), the plan, and a
source of full tensors; produces the graph module holding real tensors: this rank's slice
for sharded ones, the tensor itself (shared, not copied) for replicated ones.

Sources implement one method, ``read(name, placement, rank, world_size)``, so a source can
read only the slice it is asked for; :class:`ModuleSource` slices tensors that are already
in memory and can release them once taken.
"""

from __future__ import annotations

from typing import Iterable, Optional, Protocol

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensor

from autotp.placement import Placement, Shard, local_chunk
from autotp.plan import Plan

__all__ = ["TensorSource", "ModuleSource", "load_into", "LoadError", "named_tensors"]


class LoadError(RuntimeError):
    """A tensor the graph needs is missing from the source, or has the wrong shape."""


class TensorSource(Protocol):
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

    def read(self, name: str, placement: Placement, rank: int, world_size: int) -> torch.Tensor:
        if name not in self.tensors:
            raise LoadError(f"{type(self.module).__name__} has no parameter or buffer named {name!r}")
        full = self.tensors[name]
        if full.device.type == "meta":
            raise LoadError(f"{name} is on the meta device: the model holds no data for it "
                            "(load from a checkpoint instead)")
        if isinstance(placement, Shard):
            # clone: the slice must not keep the full tensor's storage alive
            return local_chunk(full, placement, rank, world_size).to(self.device or full.device).clone()
        return full if self.device is None else full.to(self.device)

    def release(self, names: Iterable[str]) -> None:
        """Move the named tensors of the source module to ``meta``, freeing their memory."""
        doomed = {id(self.tensors[n]) for n in names if n in self.tensors}
        for module in self.module.modules():
            for store in (module._parameters, module._buffers):
                for key, t in list(store.items()):
                    if t is not None and id(t) in doomed:
                        meta = torch.empty_like(t, device="meta")
                        store[key] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta
        self.tensors = named_tensors(self.module)


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


def load_into(gm: fx.GraphModule, plan: Plan, rank: int, source: TensorSource) -> fx.GraphModule:
    """Fill every tensor ``gm`` reads with this rank's data from ``source``.

    Raises:
        LoadError: a tensor is missing from the source or its shape is not the planned one.
    """
    for name in _graph_tensor_names(gm):
        current = gm.get_parameter(name) if _is_param(gm, name) else _get_attr(gm, name)
        spec = plan.params.get(name)
        if spec is None:
            if isinstance(current, FakeTensor):
                raise LoadError(f"the graph reads {name!r}, which the plan does not list")
            continue  # a real constant captured with the graph
        value = source.read(name, spec.placement, rank, plan.tp_size)
        expected = spec.local_shape(plan.tp_size)
        if list(value.shape) != expected:
            raise LoadError(f"{name}: got shape {list(value.shape)}, expected {expected} for rank {rank}")
        _set_tensor(gm, name, value)
    return gm


def _is_param(gm: fx.GraphModule, name: str) -> bool:
    owner_name, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    return attr in owner._parameters


def _get_attr(gm: fx.GraphModule, name: str) -> object:
    value: object = gm
    for part in name.split("."):
        value = getattr(value, part)
    return value
