"""Reductions and normalisations: fine over unsharded dims; over the sharded one, only sums.

Every rule here keeps a strided shard (``Shard(d, period=p)``) of a dim it does not reduce as it
is. A ``sum`` or ``mean`` over the sharded dim is each rank's sum of its chunk: a ``Partial`` value,
all-reduced right after the node. For an RMS norm over a sharded projection (a q/k norm over
all heads, a sub-norm after a projection) that is the statistic, ``[batch, seq, 1]``: far less
than gathering the projection. A mean divides by the whole dim's count, not the chunk's (a
rank-aware op, ``autotp.local_ops.partial_mean``, which also keeps a half-precision piece in range).
A float16 ``sum`` is refused: torch rounds the whole sum once, and a rank's part of it can
overflow where the whole does not. Any other reduction over the sharded dim
(max, var, softmax, a fused layer norm, ...) would need a collective inside the op: ``Cannot``,
and the planner shards less.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from autotp.placement import Partial, Replicate, Shard
from autotp.rules import Cannot, Inputs, Out, Result, ndim, norm_dim, rule

aten = torch.ops.aten


def _reduced(node: fx.Node, inputs: Inputs, dims, keepdim: bool, outputs: int = 1) -> Result:
    src = inputs[node.args[0]]
    if not isinstance(src, Shard):
        return Cannot(f"reduction of a {src} input")
    rank = ndim(node.args[0])
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return Cannot("reduction over all dims of a sharded value")
    dims = [norm_dim(d, rank) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if src.dim in dims:
        return Cannot(f"{node.target} reduces over the sharded dim {src.dim}")
    out = src if keepdim else src.with_dim(src.dim - sum(1 for d in dims if d < src.dim))
    return out if outputs == 1 else tuple([out] * outputs)


def _arg(node: fx.Node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _reduced_dims(node: fx.Node, dims_at: int) -> list[int]:
    dims = _arg(node, dims_at, "dim", None)
    rank = ndim(node.args[0])
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(rank))
    return [norm_dim(d, rank) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]


@rule(aten.sum.dim_IntList, aten.mean.dim, reads=("self",), periodic=True)
def sum_rule(node: fx.Node, inputs: Inputs) -> Result:
    src = inputs[node.args[0]]
    if not (isinstance(src, Shard) and src.dim in _reduced_dims(node, 1)):
        return reduce_rule(node, inputs)
    # Chunks that r ranks share reach the all-reduce r times. A mean still comes out right: each
    # rank divides by its chunk's count x world size, which is the whole count x r. A sum would not.
    if src.replicas > 1 and node.target is not aten.mean.dim:
        return Cannot(f"{node.target} over a dim whose chunks {src.replicas} ranks share would count each "
                      f"{src.replicas} times")
    out = node.meta.get("val")
    if node.target is aten.sum.dim_IntList and getattr(out, "dtype", None) is torch.float16:
        # torch sums float16 in float32 and rounds the whole once; a rank's sum of its chunk is rounded
        # to float16 on its own, and can overflow where the whole does not (halves of opposite signs)
        return Cannot("a float16 sum over the sharded dim: a rank's partial sum can overflow where the whole "
                      "does not")
    return Out(Partial(), local_op="partial_mean" if node.target is aten.mean.dim else None, statistic=True)


@rule(aten.amax.default, aten.amin.default,
      aten.any.dim, aten.all.dim, aten.prod.dim_int, aten.logsumexp.default, aten.norm.ScalarOpt_dim,
      reads=("self",), periodic=True)
def reduce_rule(node: fx.Node, inputs: Inputs) -> Result:
    dims_at = 2 if node.target is aten.norm.ScalarOpt_dim else 1
    keep_at = dims_at + 1
    return _reduced(node, inputs, _arg(node, dims_at, "dim", None), bool(_arg(node, keep_at, "keepdim", False)))


@rule(aten.var.correction, aten.std.correction, aten.var_mean.correction, aten.var.dim, aten.std.dim,
      reads=("self",), periodic=True)
def variance_rule(node: fx.Node, inputs: Inputs) -> Result:
    """``keepdim`` is keyword-only in the ``correction`` overloads, 4th in the ``dim`` ones."""
    outputs = 2 if node.target is aten.var_mean.correction else 1
    return _reduced(node, inputs, _arg(node, 1, "dim", None), bool(_arg(node, 3, "keepdim", False)), outputs)


@rule(aten.max.dim, aten.min.dim, reads=("self",), periodic=True)
def max_dim_rule(node: fx.Node, inputs: Inputs) -> Result:
    return _reduced(node, inputs, node.args[1], bool(_arg(node, 2, "keepdim", False)), outputs=2)


@rule(aten.argmax.default, aten.argmin.default, reads=("self",), periodic=True)
def argmax_rule(node: fx.Node, inputs: Inputs) -> Result:
    return _reduced(node, inputs, _arg(node, 1, "dim", None), bool(_arg(node, 2, "keepdim", False)))


@rule(aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default,
      aten.cumsum.default, reads=("self",), periodic=True)
def along_dim_rule(node: fx.Node, inputs: Inputs) -> Result:
    """Shape-preserving ops along one dim (softmax, cumsum)."""
    return _reduced(node, inputs, node.args[1], keepdim=True)


@rule(aten.sort.default, aten.topk.default, reads=("self",), periodic=True)
def sort_rule(node: fx.Node, inputs: Inputs) -> Result:
    dim_at = 2 if node.target is aten.topk.default else 1
    return _reduced(node, inputs, _arg(node, dim_at, "dim", -1), keepdim=True, outputs=2)


@rule(aten.layer_norm.default, aten.native_layer_norm.default, reads=("input", "weight", "bias"), periodic=True)
@rule(aten.rms_norm.default, reads=("input", "weight"), periodic=True)
def norm_rule(node: fx.Node, inputs: Inputs) -> Result:
    """Normalises over the trailing ``normalized_shape`` dims; weight and bias cover only those."""
    x = node.args[0]
    rank = ndim(x)
    normalised = list(range(rank - len(node.args[1]), rank))
    params = [a for a in node.args[2:4] if isinstance(a, fx.Node)]
    if any(not isinstance(inputs[p], Replicate) for p in params):
        return Cannot("sharded norm weight")
    outputs = 3 if node.target is aten.native_layer_norm.default else 1
    return _reduced(node, inputs, normalised, keepdim=True, outputs=outputs)
