"""Layer sharing (``autotp.repeats``) against tracing every layer, family by family.

    python scripts/repeats_check.py [--archs llama gpt2 ... | --all] [--layers 5] [--tp 2]
        [--results R.jsonl] [--part 0/2]

Each family is built as the coverage sweep builds it (``scripts/arch_configs.py``), with
``--layers`` layers instead of 2 so that layers repeat, on ``meta`` (no data). It is captured
twice, with every layer traced (``share_layers=False``) and with repeated layers copied, and
the two are compared:

- the graphs, node by node in order: op, target, arguments (as positions), module path and
  output shape (node *names* may differ: a copy reuses the representative's size reads);
- the plans at ``--tp``: every parameter's placement;
- the capture times.

A family passes when both agree. Prints one line per family and a summary; ``--results``
appends one JSON row per family (skipping those already there) for a run in parts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def check(arch: str, layers: int, tp: int) -> dict[str, Any]:
    import torch
    from arch_configs import _LAYER_COUNTS, _instantiate, ARCHS, config_candidates

    from autotp.capture import capture
    from autotp.layer_trace import graph_signature
    from autotp.module import placements
    from autotp.planner import plan_graph

    row: dict[str, Any] = {"arch": arch}
    model = None
    candidates = config_candidates(arch, **{k: layers for k in _LAYER_COUNTS})
    while model is None:
        try:  # making the next config can raise too (a config class's own validator)
            how, make = next(candidates)
            with torch.device("meta"):
                model = _instantiate(make(), 0, ARCHS.get(arch, (arch,))[0])
            row["config"] = how
        except StopIteration:
            return row
        except Exception as exc:  # noqa: BLE001  the next config may build
            row.setdefault("error", f"build: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
    row.pop("error", None)
    captured = {}
    for share in (False, True):
        start = time.perf_counter()
        try:
            captured[share] = capture(model, share_layers=share)
        except Exception as exc:  # noqa: BLE001  reported per family
            row["error"] = f"capture (share={share}): {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            return row
        row[f"seconds_{'shared' if share else 'traced'}"] = round(time.perf_counter() - start, 3)
    row["copied"] = captured[True].copied_layers
    row["same_graph"] = graph_signature(captured[False].graph) == graph_signature(captured[True].graph)
    plans = [placements(plan_graph(captured[s].graph, tp)) for s in (False, True)]
    row["same_plan"] = plans[0] == plans[1]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+")
    parser.add_argument("--all", action="store_true", help="every causal-LM model type in transformers")
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--results", help="append JSON rows here, skipping families already in it")
    parser.add_argument("--part", default="0/1", help="K/N: the K-th of N interleaved parts of the families")
    args = parser.parse_args()
    from arch_configs import ARCHS, causal_lm_types
    from transformers.utils import logging

    logging.set_verbosity_error()
    archs = args.archs or (causal_lm_types() if args.all else list(ARCHS))
    part, parts = (int(x) for x in args.part.split("/"))
    archs = archs[part::parts]
    done = set()
    if args.results and Path(args.results).exists():
        done = {json.loads(line)["arch"] for line in Path(args.results).read_text().splitlines() if line.strip()}
    rows = []
    for arch in archs:
        if arch in done:
            continue
        row = check(arch, args.layers, args.tp)
        rows.append(row)
        status = row.get("error") or (
            f"copied {row['copied']}, graph {'same' if row['same_graph'] else 'DIFFERENT'}, "
            f"plan {'same' if row['same_plan'] else 'DIFFERENT'}, "
            f"{row['seconds_traced']:.2f} s -> {row['seconds_shared']:.2f} s")
        print(f"{arch}: {status}", flush=True)
        if args.results:
            with open(args.results, "a") as out:
                out.write(json.dumps(row) + "\n")
    checked = [r for r in rows if "same_graph" in r]
    wrong = [r["arch"] for r in checked if not (r["same_graph"] and r["same_plan"])]
    print(f"\n{len(checked)} captured both ways, {sum(r['copied'] > 0 for r in checked)} with layers copied, "
          f"{len(wrong)} differing{': ' + ', '.join(wrong) if wrong else ''}; "
          f"{len(rows) - len(checked)} not built or not captured")
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
