"""Export a plan in other tools' vocabularies.

:func:`to_hf_tp_plan` writes the Hugging Face ``tp_plan`` dict (module-name patterns ->
``colwise`` / ``rowwise`` / ``packed_colwise`` / ``embedding_rowwise`` / ...), the format
transformers' ``from_pretrained(tp_plan=...)`` reads and DeepSpeed and vLLM also understand.
Most transformers families carry no hand-written plan, so the export is useful on its own.

Hugging Face styles assume ``nn.Linear``'s ``[out, in]`` weight layout and shard whole
modules, so some autotp decisions have no equivalent; they are returned as a list of
sentences instead of being approximated.
"""

from __future__ import annotations

import re
from typing import Optional

from autotp.placement import Shard
from autotp.plan import ParamSpec, Plan

__all__ = ["to_hf_tp_plan"]

_LAYER_INDEX = re.compile(r"\.\d+(?=\.|$)")


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _style(spec: ParamSpec, gathered: set[Optional[str]]) -> Optional[str]:
    """The Hugging Face style of one sharded weight, or None if it has none."""
    shard = spec.placement
    assert isinstance(shard, Shard)
    if spec.module_type == "Linear" and spec.name.endswith(".weight"):
        if spec.style == "colwise" and shard.dim == 0 and spec.region in gathered and shard.blocks == 1:
            return "colwise_gather_output"  # its output is a model output, all-gathered
        if spec.style == "colwise" and shard.dim == 0:
            return {1: "colwise", 2: "packed_colwise"}.get(shard.blocks)  # type: ignore[arg-type]
        if spec.style == "rowwise" and shard.dim == 1:
            return {1: "rowwise", 2: "packed_rowwise"}.get(shard.blocks)  # type: ignore[arg-type]
    if spec.module_type == "Embedding" and spec.name.endswith(".weight") and shard.blocks == 1:
        return {0: "embedding_rowwise", 1: "embedding_colwise"}.get(shard.dim)
    return None


def to_hf_tp_plan(plan: Plan) -> tuple[dict[str, str], list[str]]:
    """The plan as a Hugging Face ``tp_plan`` and what it cannot express.

    Returns:
        ``(tp_plan, not_expressible)``: module-name patterns (layer indices as ``*``, from the
        top-level model) mapped to styles; and one sentence per decision without a style.
    """
    styles: dict[str, set[str]] = {}
    missing: list[str] = []
    gathered = {c.region for c in plan.collectives if c.kind == "all_gather"}
    for spec in plan.sharded_params():
        if not spec.name.endswith(".weight"):
            continue  # biases follow their module's style
        style = _style(spec, gathered)
        key = _LAYER_INDEX.sub(".*", _module(spec.name))
        if style is None:
            missing.append(f"{spec.name}: {spec.style} {spec.placement} of a {spec.module_type or 'tensor'} "
                           "(Hugging Face styles shard nn.Linear [out, in] weights in at most 2 blocks)")
            continue
        styles.setdefault(key, set()).add(style)
    tp_plan = {}
    for key, found in styles.items():
        if len(found) == 1:
            tp_plan[key] = found.pop()
        else:
            missing.append(f"{key}: layers differ ({', '.join(sorted(found))})")
    for item in plan.slices:
        missing.append(f"{item.node}: a replicated input sliced locally to {item.placement} ({item.reason})")
    return dict(sorted(tp_plan.items())), _dedupe(missing)


def _dedupe(lines: list[str]) -> list[str]:
    """One line per pattern: layer indices collapsed, duplicates dropped, order kept."""
    seen, out = set(), []
    for line in lines:
        key = _LAYER_INDEX.sub(".*", line)
        if key not in seen:
            seen.add(key)
            out.append(key)
    return out
