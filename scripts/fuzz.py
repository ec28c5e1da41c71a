"""Differential fuzzing from the command line: random modules against their unsharded selves.

    python -m scripts.fuzz --cases 10000 --tp 2,3,4             # a long run
    python -m scripts.fuzz --cases 200 --seed 5000 --out f.json  # failures, shrunk, as JSON

Each case builds a random model (autotp/testing/blocks.py), captures it once and, at each tp,
runs every rank in this process (autotp.simulate) on two input shapes against the unsharded
model. Prints, per tp, how many cases were exact, wrong, internal errors or clear refusals,
and each failure shrunk to a small spec (rebuild it with autotp.testing.blocks.build_model).
Exits 1 if any case was wrong or an internal error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=300, help="random models to build (default 300)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first model; case i uses seed + i")
    parser.add_argument("--tp", default="2,3,4", help="tp sizes, comma-separated (default 2,3,4)")
    parser.add_argument("--rotate", action="store_true", help="each model at one tp in turn, not at every tp")
    parser.add_argument("--no-shrink", action="store_true", help="report failures as drawn, not shrunk")
    parser.add_argument("--out", help="write the failures (with their shrunk specs) to this JSON file")
    args = parser.parse_args(argv)
    try:
        tps = tuple(int(t) for t in args.tp.split(","))
    except ValueError:
        parser.error(f"--tp {args.tp!r}: expected comma-separated integers such as 2,3,4")
    if args.cases < 1 or any(t < 1 for t in tps):
        parser.error("--cases and every --tp must be at least 1")
    logging.disable(logging.CRITICAL)  # fake-tensor tracing logs what it cannot run
    warnings.filterwarnings("ignore")

    from tqdm import tqdm

    from autotp.testing import fuzz

    bar = tqdm(total=args.cases, unit="model", file=sys.stderr)

    def progress(seed: int, outcomes: list) -> None:
        bar.update(1)
        for out in outcomes:
            if out.kind in ("wrong", "internal"):
                bar.write(f"seed {seed} tp {out.tp}: {out.kind}: {out.detail}")

    seeds = range(args.seed, args.seed + args.cases)
    report = fuzz.fuzz(seeds, tps, shrink_failures=not args.no_shrink, progress=progress,
                       tp_of=(lambda seed: tps[seed % len(tps)]) if args.rotate else None)
    bar.close()
    print(f"seeds {args.seed}..{args.seed + args.cases - 1}, tp {args.tp}{' (rotating)' if args.rotate else ''}")
    print(report.summary())
    if report.refusals:
        print("refusals:", ", ".join(f"{n} x {why}" for why, n in report.refusals.most_common(5)))
    for failure in report.failures:
        print(f"FAIL tp {failure['tp']} {failure['kind']}: {failure['detail']}\n  {json.dumps(failure['shrunk'])}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report.failures, f, indent=1)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
