"""Candidates: the parameters worth sharding, found on one captured graph (the planner's step 1).

A candidate is a parameter and the node that consumes it: a matmul (``linear``, ``addmm``,
``mm``, ``bmm``, ``matmul``, or an ``einsum`` of two) that reads it directly or through
transposes, casts and copies, or a piece of a stack of them (``W[e]``: an expert's matrix);
or a table looked up by id (an embedding, ``weight[ids]``). Also here: the names a region is
known by (the module of a parameter, the decoder layer it sits in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.fx as fx

from autotp.rules import ndim
from autotp.rules.matmul import matmul_spec

__all__ = ["Candidate", "find_candidates", "param_source", "module_of", "common_module", "layer_of", "WEIGHT_CHAIN",
           "PIECE_CHAIN"]

aten = torch.ops.aten

# Ops between a parameter and the matmul that uses it (GPT-2 uses W as stored, Falcon
# ``matmul(x, W.T)``, quantised or mixed-precision models cast it first).
WEIGHT_CHAIN = {
    aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default,
    aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default,
    aten.alias.default, aten.contiguous.default, aten.clone.default, aten.detach.default,
}


@dataclass(frozen=True)
class Candidate:
    """A parameter worth sharding and the node that consumes it: a matmul (seeded so that its
    output columns are sharded) or an embedding lookup (seeded on the vocabulary)."""

    matmul: fx.Node
    param: fx.Node

    @property
    def module(self) -> str:
        return module_of(str(self.param.target))

    @property
    def is_lookup(self) -> bool:
        return _is_lookup(self.matmul)


# Ops that take one parameter's piece out of a stack of them: an expert's weight ``W[e]`` of
# ``[experts, out, in]`` read with ``select`` (or a range of them with ``slice``). A matmul that
# reads a parameter through them is a candidate too; which dim of the stack its columns are is
# derived by propagation like any other (the dim selected is never one).
PIECE_CHAIN = {aten.select.int, aten.slice.Tensor}
CANDIDATE_CHAIN = frozenset(WEIGHT_CHAIN | PIECE_CHAIN)


def param_source(arg: object, through: frozenset = frozenset(WEIGHT_CHAIN)) -> Optional[fx.Node]:
    """The parameter a matmul operand is, through transposes, casts and copies, or the ops in
    ``through`` (None if none)."""
    while isinstance(arg, fx.Node) and arg.op == "call_function" and arg.target in through:
        arg = arg.args[0]
    return arg if isinstance(arg, fx.Node) and arg.op == "get_attr" else None


def find_candidates(graph: fx.Graph) -> list[Candidate]:
    """Matmuls with a parameter operand of rank >= 2, and tables looked up by id, in graph order."""
    found, seen = [], set()
    for node in graph.nodes:
        # the weight's slot first (a linear's, the right operand of a matmul or einsum): where
        # both operands are the module's own tensors (learned queries, a memory held in a
        # buffer), the projection is the one worth sharding, not what it projects
        for operand in reversed(_candidate_operands(node)):
            param = param_source(operand, CANDIDATE_CHAIN)
            if param is not None and param not in seen and ndim(param) >= 2:
                found.append(Candidate(node, param))
                seen.add(param)
                break
    return found


def _candidate_operands(node: fx.Node) -> list:
    """The operands of ``node`` that may be a parameter worth sharding: a matmul's, a table's,
    or those of an einsum of two (``ibh,hnd->ibnd``: a projection to heads written as one)."""
    if node.op != "call_function":
        return []
    if _is_lookup(node):
        return [node.args[0]]
    if node.target is aten.einsum.default:
        return list(node.args[1]) if len(node.args[1]) == 2 else []
    spec = matmul_spec(node.target)
    return [node.args[pos] for pos in spec[0]] if spec else []


def _is_lookup(node: fx.Node) -> bool:
    """An embedding, or rows of a table taken by one index tensor (``weight[position_ids]``)."""
    if node.target is aten.index.Tensor:
        indices = node.args[1]
        return len(indices) == 1 and isinstance(indices[0], fx.Node)
    return node.target is aten.embedding.default


def module_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def common_module(names: Iterable[str]) -> str:
    names = list(names)  # read twice below
    parts = [module_of(n).split(".") for n in names]
    common = []
    for column in zip(*parts):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    return ".".join(common) or module_of(names[0])


def layer_of(region: str) -> Optional[str]:
    """The decoder layer a region sits in: its path up to the first index (``model.layers.3``,
    ``encoder.block.0``); a region outside any indexed container has none."""
    parts = region.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[: digits[0] + 1]) if digits else None
