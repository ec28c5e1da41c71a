"""Ops that read only a tensor's shape or metadata, and embedding lookups."""

from __future__ import annotations

import torch
import torch.fx as fx

from autotp.placement import Partial, Replicate, Shard
from autotp.rules import Cannot, Inputs, Out, Result, ndim, norm_dim, rule

aten = torch.ops.aten


@rule(aten.sym_size.int, reads=("self",))
def sym_size_rule(node: fx.Node, inputs: Inputs) -> Result:
    """A size of an unsharded dim is the same on every rank; of the sharded dim it is not."""
    src = inputs[node.args[0]]
    dim = norm_dim(node.args[1], ndim(node.args[0]))
    if isinstance(src, Shard) and src.dim == dim:
        return Cannot("the size of the sharded dim is read as a value")
    return Replicate()


@rule(aten.sym_numel.default, aten.sym_stride.int, aten.sym_storage_offset.default, reads=("self",))
def sym_numel_rule(node: fx.Node, inputs: Inputs) -> Result:
    return Cannot(f"{node.target} of a sharded value")


@rule(aten._assert_tensor_metadata.default, reads=(), metadata=("a",))
def metadata_rule(node: fx.Node, inputs: Inputs) -> Result:
    """Checks dtype/device/layout only, which sharding does not change."""
    return Replicate()


@rule(aten.new_ones.default, aten.new_zeros.default, aten.new_empty.default, aten.new_full.default, reads=(),
      metadata=("self",))
def new_tensor_rule(node: fx.Node, inputs: Inputs) -> Result:
    """``x.new_*(size)`` reads only x's dtype and device; its size is given explicitly."""
    return Replicate()


@rule(aten.embedding.default, reads=("weight", "indices"))
def embedding_rule(node: fx.Node, inputs: Inputs) -> Result:
    """Row lookup. A table sharded on the hidden dim gives a hidden-sharded output. A table
    sharded on the vocabulary (rows) is vocabulary-parallel: each rank looks up the ids it
    owns and writes zeros for the others, so the output is a sum over ranks (Partial)."""
    table, ids = inputs[node.args[0]], inputs[node.args[1]]
    if isinstance(table, Shard) and isinstance(ids, Shard):
        return Cannot("embedding with both table and indices sharded")
    if isinstance(table, Shard):
        if table.dim == 0 and table.blocks == 1 and table.replicas == 1:
            return Out(Partial(), local_op="vocab_parallel_embedding")
        if table.dim != 1:
            return Cannot(f"embedding table sharded as {table}")
        return table.with_dim(ndim(node) - 1)
    if isinstance(ids, Shard):
        return ids
    return Cannot(f"embedding inputs {table}, {ids}")
