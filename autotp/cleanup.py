"""Cleanup of a rewritten graph: drop what only export needed.

``torch.export`` records checks and conversions that cost a Python call per node at run time
and do nothing here: ``_assert_tensor_metadata`` (dtype/device/layout assertions), casts to
the dtype and device the tensor already has, ``alias``. A decode step of a small model runs
a few hundred such calls. This pass removes them, then unused nodes; it reads
``meta["val"]``, which rewrite leaves in place (dtypes and devices do not change with
sharding), and is applied to every rank's graph after :func:`autotp.rewrite.rewrite`.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from autotp.propagate import schema_arguments

__all__ = ["cleanup"]

aten = torch.ops.aten

_CHECKS = {aten._assert_tensor_metadata.default}
_CASTS = {aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default}


def _is_noop_cast(node: fx.Node) -> bool:
    """A cast whose input already has the output's dtype and device (and is not copied on
    purpose: ``copy=True`` or a memory format change keep the node)."""
    if node.target not in _CASTS and node.target is not aten.alias.default:
        return False
    given = {argument.name: value for argument, value in schema_arguments(node)}  # export passes some by position
    if given.get("copy") or given.get("memory_format") not in (None, torch.preserve_format):
        return False
    source, out = node.args[0], node.meta.get("val")
    before = source.meta.get("val") if isinstance(source, fx.Node) else None
    if not isinstance(out, torch.Tensor) or not isinstance(before, torch.Tensor):
        return False
    if node.target is aten._to_copy.default:
        return False  # _to_copy always copies: a later in-place op may rely on it
    return out.dtype == before.dtype and out.device == before.device


def cleanup(gm: fx.GraphModule) -> int:
    """Remove assertions and no-op casts from ``gm``; returns how many nodes went."""
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _CHECKS:
            gm.graph.erase_node(node)
            removed += 1
        elif _is_noop_cast(node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed += 1
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    removed += before - len(gm.graph.nodes)
    gm.graph.lint()
    gm.recompile()
    return removed
