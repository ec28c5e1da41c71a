"""Aliasing as captured: an op that returns a view or a copy depending on its input's strides
returns, on each rank, what it returned in the captured graph.

``reshape``, ``contiguous``, ``flatten``, ``to`` and their kin are CompositeImplicitAutograd
ops whose schema says the result *may* alias the input (``Tensor(a)``): each returns a view
where the input's strides allow one, else a copy. A rank runs the op on its piece, whose
strides are not the whole value's: a ``[B, 4, T, 12]`` transpose of 4 heads is not contiguous,
so ``contiguous()`` copies it, but over 4 ranks each rank holds ``[B, 1, T, 12]``, which torch
calls contiguous (the stride of a size-1 dim does not count), so the same call returns a view.
An in-place op on the result then writes into the value it came from, which the captured
graph never did: a wrong number, with no error.

So, where the graph writes into a value in place, each such op whose result or input belongs to
a written value's alias group is followed by :func:`as_captured`, which makes the rank's result
a copy where the capture's was one (``clone`` of a view), and raises where the capture's was a
view and the rank's is a copy (the write could not reach the value as it did in the capture).
Whether the capture's was a view is read from the fake tensors export leaves on the nodes:
they share storage as the real tensors did.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from autotp.errors import AutotpError
from autotp.propagate import schema_arguments

__all__ = ["AliasingError", "as_captured", "captured_aliasing", "keep_captured_aliasing", "written_groups"]


class AliasingError(AutotpError, RuntimeError):
    """A rank's op returned a copy where the captured graph's returned a view that is written."""


def _may_alias(op: Any) -> bool:
    """Whether ``op`` returns a view or a copy as its input's strides allow: a schema return that
    may alias an argument (not a write) and a CompositeImplicitAutograd kernel, which picks one
    at run time (``reshape``, ``contiguous``, ``to``), unlike a view op's own kernel."""
    if not isinstance(op, torch._ops.OpOverload):
        return False
    returns = op._schema.returns
    if len(returns) != 1 or returns[0].alias_info is None or returns[0].alias_info.is_write:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd")


def _aliased_argument(node: fx.Node) -> Optional[fx.Node]:
    """The argument whose alias set ``node``'s (single) return shares."""
    wanted = set(node.target._schema.returns[0].alias_info.before_set)
    for argument, value in schema_arguments(node):
        info = argument.alias_info
        if info is not None and wanted & set(info.before_set) and isinstance(value, fx.Node):
            return value
    return None


def _storage(value: Any) -> Optional[Any]:
    if not isinstance(value, torch.Tensor):
        return None
    return torch.multiprocessing.reductions.StorageWeakRef(value.untyped_storage())


class _Groups:
    """Union-find over the nodes that may share memory (a view and its base, an in-place op's
    result and what it wrote, a list of views and its items)."""

    def __init__(self) -> None:
        self.parent: dict[fx.Node, fx.Node] = {}

    def find(self, node: fx.Node) -> fx.Node:
        root = node
        while self.parent.get(root, root) is not root:
            root = self.parent[root]
        self.parent[node] = root
        return root

    def union(self, a: fx.Node, b: fx.Node) -> None:
        self.parent[self.find(a)] = self.find(b)


def written_groups(graph: fx.Graph) -> tuple[_Groups, set[fx.Node]]:
    """The alias groups of ``graph``'s values, and the roots of those some op writes into."""
    groups, written = _Groups(), set()
    for node in graph.nodes:
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            groups.union(node, node.args[0])  # an item of a list of views (split, unbind)
            continue
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None:
            continue
        returned = {name for r in schema.returns if r.alias_info is not None for name in r.alias_info.before_set}
        for argument, value in schema_arguments(node):
            info = argument.alias_info
            values = value if isinstance(value, (list, tuple)) else [value]
            for item in (v for v in values if isinstance(v, fx.Node)):
                if info is not None and returned & set(info.before_set):
                    groups.union(node, item)
                if info is not None and info.is_write:
                    written.add(item)
    return groups, {groups.find(node) for node in written}


def captured_aliasing(graph: fx.Graph) -> dict[str, bool]:
    """For each op of ``graph`` that may return a view or a copy, and whose value is in an alias
    group some op writes into: whether it returned a view of its input in the capture (by
    name). Empty for a graph that writes into nothing, which is most."""
    groups, written = written_groups(graph)
    if not written:
        return {}
    found = {}
    for node in graph.nodes:
        if node.op != "call_function" or not _may_alias(node.target) or groups.find(node) not in written:
            continue
        source = _aliased_argument(node)
        out, before = _storage(node.meta.get("val")), _storage(source.meta.get("val") if source is not None else None)
        if out is None or before is None:
            raise AliasingError(f"{node.name} ({node.target}) may return a view or a copy of a value that is "
                                f"written in place, and the capture does not say which it returned")
        found[node.name] = out == before
    return found


def as_captured(out: torch.Tensor, source: torch.Tensor, aliases: bool, name: str) -> torch.Tensor:
    """``out``, an op's result from ``source``, as the captured graph had it: a view of
    ``source`` if ``aliases``, else memory of its own (a graph call target)."""
    shares = out.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()
    if shares == aliases:
        return out
    if not aliases:
        return out.clone()
    raise AliasingError(f"{name} returned a view of its input in the captured graph, and a copy on this rank "
                        f"(the piece's strides differ); a later in-place write would not reach the input")


def keep_captured_aliasing(gm: fx.GraphModule, aliasing: dict[str, bool]) -> int:
    """Follow each node named in ``aliasing`` (from :func:`captured_aliasing` on the graph
    before the rewrite) by :func:`as_captured`; returns how many were. Recompiles if any."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.name not in aliasing:
            continue
        source = _aliased_argument(node)
        with gm.graph.inserting_after(node):
            kept = gm.graph.call_function(as_captured, (node, source, aliasing[node.name], node.name))
        node.replace_all_uses_with(kept, delete_user_cb=lambda user: user is not kept)
        kept.meta = dict(node.meta)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count
