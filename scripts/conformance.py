"""Rule conformance on PyTorch's OpInfo samples, from the command line.

    python scripts/conformance.py                       # what CI runs (fp32 at tp 2, 3; fp64 at tp 2, no in-place;
                                                        # fp32 again at sizes where a rank's piece is one element)
    python scripts/conformance.py --dtypes float32 float64 --tp 2 3 --shared-tp 4
    python scripts/conformance.py --only div add        # some OpInfos, every failure printed

It runs in a process of its own in the tests: importing PyTorch's OpInfo database also
imports torch's internal test utilities, which change global torch state (they forbid
setting torch.backends flags outside a context manager).

Prints the ops reached, samples, placements checked and refused, and every failure (the sample,
tp, input placements, and which rank's output differs). Exits 1 on any failure.
See autotp/testing/conformance.py for what is checked.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=None, help="sample dtypes (default: fp32 everywhere, fp64 at tp 2)")
    parser.add_argument("--tp", nargs="+", type=int, default=[2, 3], help="world sizes for every placement")
    parser.add_argument("--shared-tp", nargs="*", type=int, default=[4], help="world sizes for rank-pair placements")
    parser.add_argument("--only", nargs="+", help="OpInfo names to check (default: every one an op with a rule has)")
    parser.add_argument("--per-op", type=int, default=None, help="at most this many samples per OpInfo and dtype")
    parser.add_argument("--no-hand", action="store_true", help="skip the hand-written samples")
    size_choice = parser.add_mutually_exclusive_group()
    size_choice.add_argument("--pytorch-sizes", action="store_true", help="OpInfo's own sizes (5, 10, 20: few placements split)")
    size_choice.add_argument("--unit-sizes", action="store_true",
                       help="sizes 2, 3, 6 (S, M, L): a rank's piece of a split dim is often one element")
    parser.add_argument("--json", help="also write the report (counts per op, failures) to this file")
    parser.add_argument("--part", help="K/N: only every N-th sample from the K-th (0-based), to split a run over N "
                                       "processes (their --json reports add up to the whole run's)")
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)  # fake-tensor tracing logs every sample it cannot run

    from autotp.testing import conformance

    sizes = None if args.pytorch_sizes else conformance.UNIT_SIZES if args.unit_sizes else conformance.EVEN_SIZES
    k, n = (int(x) for x in args.part.split("/")) if args.part else (0, 1)

    def part(samples):  # this process's share of a sample stream
        return itertools.islice(samples, k, None, n)

    hand = [] if args.no_hand or args.only else conformance.hand_samples()
    if args.dtypes is None:  # the CI configuration
        report = conformance.run(part(itertools.chain(hand, conformance.opinfo_samples(
            (torch.float32,), args.per_op, args.only, sizes))), args.tp, args.shared_tp)
        report += conformance.run(part(conformance.opinfo_samples((torch.float64,), args.per_op, args.only, sizes,
                                                                  with_inplace=False)), args.tp[:1], ())
        if sizes is conformance.EVEN_SIZES:  # and where a piece is one element (squeeze, contiguity, broadcasting)
            report += conformance.run(part(conformance.opinfo_samples((torch.float32,), args.per_op, args.only,
                                                                      conformance.UNIT_SIZES)), args.tp, args.shared_tp)
    else:
        dtypes = tuple(getattr(torch, d) for d in args.dtypes)
        report = conformance.run(part(itertools.chain(hand, conformance.opinfo_samples(dtypes, args.per_op, args.only,
                                                                                       sizes))), args.tp, args.shared_tp)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict()))
    for failure in report.failures:
        print("FAIL", failure)
    print(report.summary())
    for op in sorted(report.ops()):
        print(f"  {op:55s} checked {report.checked[op]:6d}   refused {report.refused[op]:6d}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
