"""Rule conformance: every propagation rule against PyTorch's OpInfo samples, on simulated ranks.

What each test checks, and where to look when it fails:

- ``test_rules_read_every_tensor_argument``: each registered op's rule names, between the
  arguments it reads and those the op reads only for metadata, exactly the tensor arguments of
  the op's schema. A failure names the op and the argument: fix the ``reads=`` of its
  ``@rule`` (or the rule, if it really ignores an operand).
- ``test_elementwise_family_from_schema``: which ops the pointwise tag makes elementwise.
- ``test_opinfo_conformance``: :mod:`autotp.testing.conformance` over every OpInfo sample of
  every op with a rule (at the sizes of ``EVEN_SIZES``) and the hand-written samples: in fp32
  every placement at tp 2 and 3 (tp 4 for chunks shared by rank pairs), in fp64 at tp 2. A failure
  line names the sample, tp, the input placements and the rank and output that differ;
  ``python scripts/conformance.py --only NAME`` reruns one OpInfo.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autotp.rules import METADATA_ARGS, READS, RULES, rule_for, schema_tensor_args
from autotp.testing import conformance

aten = torch.ops.aten
ROOT = Path(__file__).resolve().parents[1]

# Registered ops no sample reaches, and why that is safe.
UNREACHED = {
    # export emits it for no tensor it can see; its rule refuses every sharded input
    "aten.sym_storage_offset.default",
}


def _resolve(op):
    if not isinstance(op, str):
        return op
    namespace, name, overload = op.split(".")
    conformance.hand_samples()  # loads transformers' custom ops, when installed
    packet = getattr(getattr(torch.ops, namespace, None), name, None)
    return getattr(packet, overload, None) if packet is not None else None


@pytest.mark.parametrize("op", sorted(RULES, key=str), ids=str)
def test_rules_read_every_tensor_argument(op) -> None:
    resolved = _resolve(op)
    if resolved is None or not hasattr(resolved, "_schema"):
        assert READS[op] == frozenset(), f"{op} has no schema, so its rule can read no named argument"
        return
    declared = READS[op] | METADATA_ARGS.get(op, frozenset())
    assert declared == set(schema_tensor_args(resolved)), (
        f"{op}: the rule reads {sorted(READS[op])}, ignores {sorted(METADATA_ARGS.get(op, ()))}; "
        f"the schema's tensor arguments are {schema_tensor_args(resolved)}")


def test_elementwise_family_from_schema() -> None:
    from autotp.rules.pointwise import elementwise_rule

    for op in (aten.div.Tensor_mode, aten.min.other, aten.where.self, aten.clamp.Tensor):
        fn, reads = rule_for(op)
        assert fn is elementwise_rule and reads == set(schema_tensor_args(op)), op
    # not elementwise: draws random numbers, mutates its input, or takes a list of tensors
    for op in (aten.bernoulli.default, aten.add_.Tensor, aten.cat.default, aten.tril.default):
        found = rule_for(op)
        assert found is None or found[0] is not elementwise_rule, op


def test_opinfo_conformance(capsys, tmp_path) -> None:
    # In a process of its own: the OpInfo database imports torch's test utilities, which change
    # global torch state. What it runs: fp32 every placement at tp 2 and 3 (and 4 for chunks
    # rank pairs share); fp64, where rounding hides less, at tp 2 (~130 s here; budget 3 min).
    report_file = tmp_path / "conformance.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "conformance.py"), "--json", str(report_file)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert report_file.exists(), done.stderr[-3000:]
    report = json.loads(report_file.read_text())
    with capsys.disabled():
        print(f"\nrule conformance: {report['summary']}")
    assert not report["failures"], "\n".join(report["failures"][:20])
    assert done.returncode == 0, done.stdout[-3000:]
    reached = set(report["checked"]) | set(report["refused"])
    unreached = sorted({str(op) for op in RULES} - reached - UNREACHED)
    assert not unreached, f"registered ops no sample reached: {unreached}"
    assert report["samples"] > 5000 and sum(report["checked"].values()) > 15000, report["summary"]  # the harness reaches
