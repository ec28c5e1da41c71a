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
    # In processes of their own: the OpInfo database imports torch's test utilities, which change
    # global torch state. What it runs: fp32 every placement at tp 2 and 3 (and 4 for chunks
    # rank pairs share); fp64, where rounding hides less, at tp 2. Two halves at once (one per
    # core; ~330 s in one process here), their reports added up.
    halves = [(tmp_path / f"conformance-{k}.json", subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "conformance.py"), "--json", str(tmp_path / f"conformance-{k}.json"),
         "--part", f"{k}/2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)) for k in range(2)]
    outputs = [proc.communicate(timeout=900) for _, proc in halves]
    for (path, proc), (out, err) in zip(halves, outputs):
        assert path.exists(), err[-3000:]
        assert proc.returncode == 0 or json.loads(path.read_text())["failures"], out[-3000:]
    parts = [conformance.Report.from_dict(json.loads(path.read_text())) for path, _ in halves]
    report = conformance.Report()
    for part in parts:
        report += part
    with capsys.disabled():
        print(f"\nrule conformance: {report.summary().rsplit(', in ', 1)[0]} "
              f"(two processes: {', '.join(f'{p.seconds:.1f} s' for p in parts)})")
    assert not report.failures, "\n".join(report.failures[:20])
    unreached = sorted({str(op) for op in RULES} - report.ops() - UNREACHED)
    assert not unreached, f"registered ops no sample reached: {unreached}"
    assert report.samples > 5000 and sum(report.checked.values()) > 15000, report.summary()  # the harness reaches

