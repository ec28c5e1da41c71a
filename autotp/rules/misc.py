"""Ops that read only a tensor's shape or metadata, embedding lookups, indexing by index
tensors, and triangular masks."""

from __future__ import annotations

import torch
import torch.fx as fx

from autotp.placement import Partial, Replicate, Shard
from autotp.rules import Cannot, Inputs, Out, Result, ndim, norm_dim, rule, sizes

aten = torch.ops.aten


@rule(aten.sym_size.int, reads=("self",), periodic=True)
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


@rule(aten._assert_tensor_metadata.default, reads=(), metadata=("a",), padded=True, whole_blocks=True, periodic=True)
def metadata_rule(node: fx.Node, inputs: Inputs) -> Result:
    """Checks dtype/device/layout only, which sharding does not change (in any layout)."""
    return Replicate()


@rule(aten.new_ones.default, aten.new_zeros.default, aten.new_empty.default, aten.new_full.default, reads=(),
      metadata=("self",), padded=True, whole_blocks=True, periodic=True)
def new_tensor_rule(node: fx.Node, inputs: Inputs) -> Result:
    """``x.new_*(size)`` reads only x's dtype and device; its size is given explicitly."""
    return Replicate()


@rule(aten.embedding.default, reads=("weight", "indices"), padded=True)
def embedding_rule(node: fx.Node, inputs: Inputs) -> Result:
    """Row lookup. A table sharded on the hidden dim gives a hidden-sharded output. A table
    sharded on the vocabulary (rows) is vocabulary-parallel: each rank looks up the ids it
    owns and writes zeros for the others, so the output is a sum over ranks (Partial)."""
    table, ids = inputs[node.args[0]], inputs[node.args[1]]
    if isinstance(table, Shard) and isinstance(ids, Shard):
        return Cannot("embedding with both table and indices sharded")
    if getattr(ids, "padded", False) or (isinstance(table, Shard) and table.padded and table.dim != 0):
        return Cannot(f"embedding of a padded {'table' if isinstance(table, Shard) else 'index'} dim other "
                      "than the vocabulary")
    if isinstance(table, Shard):
        if table.dim == 0 and table.blocks == 1 and table.replicas == 1:
            return Out(Partial(), local_op="vocab_parallel_embedding")
        if table.dim != 1:
            return Cannot(f"embedding table sharded as {table}")
        return table.with_dim(ndim(node) - 1)
    if isinstance(ids, Shard):
        return ids
    return Cannot(f"embedding inputs {table}, {ids}")


@rule(aten.tril.default, aten.triu.default, reads=("self",))
def triangle_rule(node: fx.Node, inputs: Inputs) -> Result:
    """Keeps or zeroes each element by its index in the last two dims (a causal mask over
    ``[batch, heads, chunk, chunk]``): any other dim may stay sharded."""
    src = inputs[node.args[0]]
    if isinstance(src, Shard) and src.dim < ndim(node.args[0]) - 2:
        return src
    return Cannot(f"{node.target} masks by position in the last two dims, one of them the sharded dim")


@rule(aten.index.Tensor, reads=("self", "indices"))
def index_rule(node: fx.Node, inputs: Inputs) -> Result:
    """``x[..., idx, ...]`` with replicated integer index tensors on dims other than the sharded
    one. Advanced indexing replaces the indexed dims by the indices' broadcast dims, in place
    when the indexed dims are adjacent, else in front; the sharded dim moves accordingly (and
    must keep its size, checked on the output's shape). A table sharded on its rows and looked
    up by one index tensor on them is a vocabulary-parallel lookup (Partial)."""
    src, indices = inputs[node.args[0]], list(node.args[1])
    given = [i for i in indices if i is not None]
    if not isinstance(src, Shard) or any(not isinstance(inputs[i], Replicate) for i in given):
        return Cannot(f"index of a {src} tensor by {', '.join(str(inputs[i]) for i in given)} indices")
    if any(i.meta["val"].dtype in (torch.bool, torch.uint8) for i in given):
        return Cannot("index by a mask: which dims it selects depends on the mask's rank")
    indexed = [d for d, i in enumerate(indices) if i is not None]
    if indexed == [0] == [src.dim] and len(indices) == 1 and src.blocks == 1 and src.replicas == 1:
        # rows of a table looked up by id (``weight[position_ids]``): as a vocabulary-parallel
        # embedding, each rank reads the rows it holds and zeroes the others
        return Out(Partial(), local_op="vocab_parallel_index")
    if src.dim in indexed:
        return Cannot(f"index.Tensor selects along the sharded dim {src.dim}")
    width = max(ndim(i) for i in given)
    if indexed == list(range(indexed[0], indexed[-1] + 1)):
        out = src.dim if src.dim < indexed[0] else src.dim - len(indexed) + width
    else:
        out = width + sum(1 for d in range(src.dim) if d not in indexed)
    if sizes(node)[out] != sizes(node.args[0])[src.dim]:
        return Cannot(f"index.Tensor: the sharded dim {src.dim} is not output dim {out}")
    return src.with_dim(out)
