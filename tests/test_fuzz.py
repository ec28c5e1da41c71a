"""Differential fuzzing on the in-process simulator: random modules against their unsharded selves.

- ``test_fuzz_budget``: 300 seeded random models (autotp/testing/blocks.py), each at one of
  tp 2, 3, 4 in turn, on two input shapes; none may be wrong or raise anything but a clear
  ``AutotpError``. A failure prints the seed and its shrunk spec; rebuild it with
  ``autotp.testing.blocks.build_model(spec)`` or rerun ``python -m scripts.fuzz --seed S --cases 1``.
- ``test_fuzz_regression``: the shrunk reproducers of every root cause the fuzzer found, each
  named after what it guards; each must be exact.
"""

from __future__ import annotations

import pytest

from autotp.testing import fuzz


def _spec(seed: int, dim: int, blocks: list[dict], *, source: str = "hidden", vocab: int = 16) -> dict:
    return dict(seed=seed, dim=dim, vocab=vocab, input=source, padding_idx=None, head="plain", tied=False,
                batch=2, seq=4, blocks=[dict(kind=k, config=c, residual=False, norm=False) for k, c in blocks])


_ATTENTION = dict(heads=4, kv_heads=2, head_dim=6, fused=False, split="split", bias=False, o_bias=False,
                  view="literal", merge="literal", kind="sdpa", mask="none", gqa="enable_gqa", qk_norm="none",
                  rope="none")

# Shrunk by autotp.testing.fuzz.shrink from seeds that failed before the fixes of issue 13.
REGRESSIONS = {
    # SDPA(enable_gqa) at tp 4 with 2 kv heads: k/v were refined from rank pairs to 4 empty slices
    "gqa_kv_heads_shared_by_rank_pairs": (4, _spec(113, 12, [("attention", _ATTENTION)])),
    # div(scalar, projection): the op was filed as one-tensor, its sharded divisor overlooked
    "division_by_sharded_projection": (2, _spec(117, 24, [("divide", dict(width=8, by="scalar", mode=None, swap=True,
                                                                          then="mean"))])),
    "division_trunc_by_sharded_projection": (3, _spec(202, 36, [("divide", dict(width=24, by="scalar", mode="trunc",
                                                                                swap=True, then="mean"))])),
    # row-parallel addmm became mm but kept its bias position and scalars
    "conv1d_row_parallel_addmm": (2, _spec(76, 32, [("conv1d", dict(width=8, beta=1.0, alpha=1.0))], source="ids",
                                           vocab=24)),
    "conv1d_addmm_beta_alpha": (2, _spec(76, 32, [("conv1d", dict(width=8, beta=0.5, alpha=2.0))])),
    "conv1d_addmm_beta_zero": (3, _spec(76, 30, [("conv1d", dict(width=12, beta=0.0, alpha=1.0))])),
    # rotary pairs unflatten(-1, (hd // 2, 2)) on head-sharded q: the head count was edited
    "rotary_pairs_unflatten_of_head_dim": (2, _spec(77, 30, [("attention", {**_ATTENTION, "heads": 8, "kv_heads": 8,
                                                                             "kind": "manual", "rope": "pairs"})])),
    # a fixed permutation of a column-parallel projection's columns must not be sharded
    "index_select_along_sharded_columns": (2, _spec(1142, 16, [("layout", dict(op="index_select", width=6, bias=True))])),
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_fuzz_regression(name: str) -> None:
    tp, spec = REGRESSIONS[name]
    outcome = fuzz.check(spec, (tp,))[0]
    assert outcome.kind == "exact", f"{name} at tp {tp}: {outcome.kind}: {outcome.detail}"


def test_fuzz_budget(capsys) -> None:
    tps = (2, 3, 4)
    report = fuzz.fuzz(range(300), tps, tp_of=lambda seed: tps[seed % 3])
    with capsys.disabled():
        print(f"\nfuzz (seeds 0-299, one tp each): {report.summary()}")
    assert report.cases == 300
    assert not report.failures, "\n".join(f"tp {f['tp']} {f['kind']}: {f['detail']}\n  {f['shrunk']}"
                                          for f in report.failures)
    for tp in tps:  # the models exercise sharding, not only refusals
        assert report.sharded[tp] >= 80, report.summary()
