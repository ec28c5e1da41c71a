"""Elementwise ops: unary ops keep their input's placement; n-ary ops broadcast.

Broadcasting maths: operands align from the right. If the output is sharded on dim ``d``, each
operand's aligned dim must be absent or of size 1 (it broadcasts: every rank uses the same
values), or sharded the same way. A replicated operand of full size at ``d`` is sliced locally
(Replicate -> Shard needs no communication).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from autotp.placement import Replicate, Shard
from autotp.rules import Cannot, Inputs, Out, Redistribute, Result, finest, ndim, refinable, rule, sizes

aten = torch.ops.aten

UNARY = [
    aten.neg.default, aten.silu.default, aten.gelu.default, aten.relu.default, aten.tanh.default,
    aten.sigmoid.default, aten.exp.default, aten.log.default, aten.sqrt.default,
    aten.rsqrt.default, aten.abs.default, aten.sin.default, aten.cos.default, aten.erf.default,
    aten.reciprocal.default, aten.square.default, aten.softplus.default, aten.hardtanh.default,
    aten.leaky_relu.default, aten.elu.default, aten.mish.default, aten.hardswish.default,
    aten.hardsigmoid.default, aten.log1p.default, aten.expm1.default, aten.sign.default,
    aten.logical_not.default, aten.bitwise_not.default, aten.isnan.default, aten.isinf.default,
    aten.pow.Tensor_Scalar, aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default,
    aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.rsub.Scalar,
    aten.eq.Scalar, aten.ne.Scalar, aten.lt.Scalar, aten.le.Scalar, aten.gt.Scalar,
    aten.ge.Scalar, aten.nan_to_num.default,
    aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default,
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
    aten.lift_fresh_copy.default, aten.dropout.default, aten.type_as.default,
    aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
    aten.full_like.default, aten.native_dropout.default, aten.feature_dropout.default,
    aten.div.Tensor_mode, aten.round.default, aten.floor.default, aten.ceil.default,
    aten.trunc.default,
]


@rule(*UNARY)
def pointwise_rule(node: fx.Node, inputs: Inputs) -> Result:
    """Elementwise on one tensor: the output keeps the input's placement (``type_as`` reads
    only its reference's dtype, so the reference's placement does not matter)."""
    src = inputs[node.args[0]]
    if node.target is aten.native_dropout.default:
        return (src, src)
    return src


BROADCAST = [
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.rsub.Tensor,
    aten.pow.Tensor_Tensor, aten.maximum.default, aten.minimum.default, aten.where.self,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.eq.Tensor, aten.ne.Tensor,
    aten.lt.Tensor, aten.le.Tensor, aten.gt.Tensor, aten.ge.Tensor, aten.__and__.Tensor,
    aten.__or__.Tensor, aten.logical_and.default, aten.logical_or.default,
    aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.atan2.default, aten.lerp.Scalar,
    aten.lerp.Tensor, aten.addcmul.default, aten.addcdiv.default, aten.copysign.Tensor,
    aten.fmod.Tensor, aten.remainder.Tensor, aten.floor_divide.default,
]


@rule(*BROADCAST)
def broadcast_rule(node: fx.Node, inputs: Inputs) -> Result:
    """n-ary elementwise with broadcasting (see the module docstring for the maths)."""
    out_rank = ndim(node)
    operands = [(i, a) for i, a in enumerate(node.args) if isinstance(a, fx.Node) and _is_tensor(a)]
    aligned = []
    for _, arg in operands:
        p = inputs[arg]
        if isinstance(p, Shard):
            aligned.append(p.with_dim(p.dim + out_rank - ndim(arg)))
        elif not isinstance(p, Replicate):
            return Cannot(f"operand placement {p} not supported")
    if not aligned:
        return Replicate()
    wanted = finest(aligned)
    if isinstance(wanted, Cannot):
        return wanted
    moves = []
    for i, arg in operands:
        dim = wanted.dim - (out_rank - ndim(arg))
        if dim < 0 or sizes(arg)[dim] == 1 or inputs[arg] == wanted.with_dim(dim):
            continue  # broadcast along the sharded dim (identical on every rank), or already right
        if not refinable(inputs[arg], wanted.with_dim(dim), sizes(arg)[dim], inputs.world_size):
            return Cannot(f"operand {i} of size {sizes(arg)[dim]} does not split as {wanted}")
        moves.append(Redistribute((i,), wanted.with_dim(dim)))
    return Out(wanted, tuple(moves))


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)
