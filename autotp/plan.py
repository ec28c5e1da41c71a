"""The Plan: what the planner decided, independent of the rank, serialisable and printable.

A plan is the contract between :mod:`autotp.planner` (which writes it) and
:mod:`autotp.rewrite` / :mod:`autotp.loading` (which carry it out for one rank):

- ``params``: every parameter and buffer of the captured graph with its placement
  (``Shard(dim, blocks)`` or ``Replicate()``), its style and the reason for it;
- ``collectives``: the nodes after which an all-reduce goes (row-parallel exits), with the
  position of a bias that must be added once, after the reduction;
- ``edits``: literal sizes in node arguments that become per-rank values (a head count of 32 in
  a ``view`` becomes ``32 // tp``);
- ``slices``: replicated inputs that a node needs sharded, sliced locally (no communication);
- ``regions``: the groups of matmuls sharded together, or replicated with the reason.

Node names refer to the graph that :func:`autotp.capture.capture` produces for the same model and
input structure; capture is deterministic, so a plan applies to any rank's capture.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from autotp.placement import Placement, Replicate, Shard, local_size, parse_placement

__all__ = ["Plan", "ParamSpec", "Collective", "ArgEdit", "LocalSlice", "LocalOp", "ShardedOutput", "ShardedInput", "Region", "FORMAT_VERSION"]

FORMAT_VERSION = 1

_DTYPE_BYTES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
    "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "complex64": 8,
}


def local_shape(shape: list[int], placement: Placement, tp_size: int) -> list[int]:
    """Per-rank shape of a tensor of global ``shape`` laid out as ``placement``."""
    if not isinstance(placement, Shard):
        return list(shape)
    out = list(shape)
    out[placement.dim] = local_size(placement, shape[placement.dim], tp_size)
    return out


@dataclass
class ParamSpec:
    name: str
    shape: list[int]
    dtype: str
    placement: Placement = field(default_factory=Replicate)
    style: str = "replicate"  # colwise | rowwise | sharded | replicate
    region: Optional[str] = None
    reason: str = ""
    module_type: str = ""  # class of the module owning it (Linear, Conv1D, Embedding, ...)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPE_BYTES.get(self.dtype, 4)

    def local_shape(self, tp_size: int) -> list[int]:
        return local_shape(self.shape, self.placement, tp_size)

    def local_nbytes(self, tp_size: int) -> int:
        return math.prod(self.local_shape(tp_size)) * _DTYPE_BYTES.get(self.dtype, 4)

    @property
    def sharded(self) -> bool:
        return isinstance(self.placement, Shard)


@dataclass
class Collective:
    kind: str  # "all_reduce" after ``node``, or "all_gather" of ``node``'s argument at ``path``
    node: str
    region: Optional[str] = None
    bias_path: Optional[list[int]] = None
    path: Optional[list[int]] = None
    dim: Optional[int] = None
    replicas: int = 1  # all_gather of a piece several ranks share: one copy per chunk is kept
    size: Optional[int] = None  # all_gather of a padded shard: the dim's real size, the rest is cut


@dataclass
class LocalOp:
    """``node`` runs a rank-aware implementation (``autotp.local_ops.LOCAL_OPS[op]``)."""

    node: str
    op: str


@dataclass
class ShardedOutput:
    """A model output left sharded (``gather_outputs=False``): each rank returns its part
    (of a padded shard, its real elements only: the dim's whole ``size`` is recorded)."""

    path: list[int]
    placement: Placement
    size: Optional[int] = None


@dataclass
class ShardedInput:
    """A graph input each rank passes its part of (a KV cache it got from a sharded output)."""

    name: str
    placement: Placement


@dataclass
class ArgEdit:
    node: str
    path: list[int]
    old: Union[int, str]  # a literal size, or the name of the node that computes a symbolic one,
    new: int  # the per-rank size; for a symbolic one, what the size is divided by at run time


@dataclass
class LocalSlice:
    """``node``'s input at ``path`` is held by ``held_replicas`` ranks per chunk (the tp size
    for a replicated value) and is sliced locally to ``placement``."""

    node: str
    path: list[int]
    placement: Placement
    reason: str = ""
    held_replicas: int = 0


@dataclass
class Region:
    name: str
    sharded: bool
    entries: list[str] = field(default_factory=list)
    exits: list[str] = field(default_factory=list)
    reason: str = ""
    layer: Optional[str] = None


@dataclass
class Plan:
    """A rank-independent tensor-parallel plan for one captured graph.

    Example:
        >>> plan = autotp.plan(model, tp_size=2)          # doctest: +SKIP
        >>> print(plan.to_table())                        # doctest: +SKIP
        >>> same = Plan.from_json(plan.to_json())         # doctest: +SKIP
    """

    tp_size: int
    params: dict[str, ParamSpec] = field(default_factory=dict)
    collectives: list[Collective] = field(default_factory=list)
    edits: list[ArgEdit] = field(default_factory=list)
    slices: list[LocalSlice] = field(default_factory=list)
    local_ops: list[LocalOp] = field(default_factory=list)
    sharded_outputs: list[ShardedOutput] = field(default_factory=list)
    sharded_inputs: list[ShardedInput] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    model: str = ""
    format_version: int = FORMAT_VERSION

    # ---- summaries ----------------------------------------------------------------------
    def sharded_params(self) -> list[ParamSpec]:
        return [p for p in self.params.values() if p.sharded]

    def bytes_unsharded(self) -> int:
        return sum(p.nbytes for p in self.params.values())

    def bytes_per_rank(self) -> int:
        return sum(p.local_nbytes(self.tp_size) for p in self.params.values())

    def all_reduces_per_layer(self) -> dict[str, int]:
        """All-reduces grouped by the layer (``model.layers.3``) of the region they close."""
        layer_of = {r.name: r.layer for r in self.regions}
        counts: dict[str, int] = {}
        for c in self.collectives:
            if c.kind != "all_reduce":
                continue
            layer = layer_of.get(c.region or "") or "(outside layers)"
            counts[layer] = counts.get(layer, 0) + 1
        return counts

    # ---- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name, spec in self.params.items():
            data["params"][name]["placement"] = str(spec.placement)
        for i, s in enumerate(self.slices):
            data["slices"][i]["placement"] = str(s.placement)
        for key in ("sharded_outputs", "sharded_inputs"):
            for i, s in enumerate(getattr(self, key)):
                data[key][i]["placement"] = str(s.placement)
        return data

    def to_json(self, indent: Optional[int] = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"plan format version {version!r} is not supported (expected {FORMAT_VERSION})")
        params = {
            name: ParamSpec(**{**spec, "placement": parse_placement(spec["placement"])})
            for name, spec in data["params"].items()
        }
        return cls(
            tp_size=data["tp_size"],
            params=params,
            collectives=[Collective(**c) for c in data["collectives"]],
            edits=[ArgEdit(**e) for e in data["edits"]],
            slices=[LocalSlice(**{**s, "placement": parse_placement(s["placement"])}) for s in data["slices"]],
            local_ops=[LocalOp(**o) for o in data.get("local_ops", [])],
            sharded_outputs=[ShardedOutput(o["path"], parse_placement(o["placement"]), o.get("size"))
                             for o in data.get("sharded_outputs", [])],
            sharded_inputs=[ShardedInput(o["name"], parse_placement(o["placement"])) for o in data.get("sharded_inputs", [])],
            regions=[Region(**r) for r in data["regions"]],
            inputs=list(data.get("inputs", [])),
            model=data.get("model", ""),
        )

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls.from_dict(json.loads(text))

    # ---- table ----------------------------------------------------------------------------
    def to_table(self, *, only_sharded: bool = False) -> str:
        """A readable table: parameter, style, global -> local shape, bytes per rank, reason."""
        tp = self.tp_size
        rows = [("parameter", "style", "placement", "global -> local", "bytes/rank", "reason")]
        for spec in self.params.values():
            if only_sharded and not spec.sharded:
                continue
            shapes = f"{_shape(spec.shape)} -> {_shape(spec.local_shape(tp))}" if spec.sharded else _shape(spec.shape)
            rows.append((spec.name, spec.style, str(spec.placement), shapes, _human(spec.local_nbytes(tp)), spec.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows]
        lines.insert(1, "-" * min(160, sum(widths) + 10 + max(len(r[5]) for r in rows)))
        return "\n".join(lines) + "\n\n" + self.summary()

    def summary(self) -> str:
        tp = self.tp_size
        total, per_rank = self.bytes_unsharded(), self.bytes_per_rank()
        sharded = self.sharded_params()
        per_layer = self.all_reduces_per_layer()
        layers = {k: v for k, v in per_layer.items() if k != "(outside layers)"}
        counts = sorted(set(layers.values()))
        lines = [
            f"tp_size: {tp}",
            f"parameters: {len(self.params)} ({len(sharded)} sharded), "
            f"{_human(total)} unsharded",
            f"bytes per rank: {_human(per_rank)} = {per_rank / total:.3f} x unsharded "
            f"(ideal 1/{tp} = {1 / tp:.3f})" if total else "bytes per rank: 0",
            f"all-reduces: {sum(1 for c in self.collectives if c.kind == 'all_reduce')} in total; per decoder layer: "
            + (", ".join(str(c) for c in counts) if counts else "none")
            + (f" ({len(layers)} layers)" if layers else "")
            + (f"; outside layers: {per_layer['(outside layers)']}" if "(outside layers)" in per_layer else ""),
            f"literal sizes localised: {len(self.edits)}; local slices of replicated values: {len(self.slices)}",
        ]
        gathers = [c for c in self.collectives if c.kind == "all_gather"]
        if gathers:
            lines.append(f"outputs gathered (all-gather): {len(gathers)}")
        if self.sharded_outputs:
            lines.append(f"outputs left sharded: {', '.join(str(o.placement) for o in self.sharded_outputs)}")
        rejected = [r for r in self.regions if not r.sharded]
        if rejected:
            lines.append("replicated regions:")
            lines.extend(f"  {r.name}: {r.reason}" for r in rejected)
        return "\n".join(lines)


def _shape(shape: list[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
