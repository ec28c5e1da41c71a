"""autotp's placements against every hand-written Hugging Face ``tp_plan``, parameter by parameter.

    python scripts/hf_plan_compare.py [--tp 2] [--archs llama qwen3 ... | --all] [--out FILE] [--json FILE]
    python scripts/hf_plan_compare.py --archs beam xlnet --merge OLD.json --json NEW.json --out FILE

For each family with a hand-written plan, the same small seeded model (``scripts/arch_configs.py``)
is planned twice, with no weights read and no ranks started:
- by Hugging Face's own code: the model resolves its plan (``_resolve_parallel_plans``) and
  ``apply_tensor_parallelism`` shards it over a fake process group of ``--tp`` ranks; each
  parameter that becomes a ``DTensor`` with a ``Shard(d)`` placement is sharded on dim ``d``;
- by ``autotp.plan``.

Each parameter Hugging Face shards is counted as *same dim* (autotp shards that dim too, in one
block or several), *other dim*, or *replicated* by autotp, with autotp's reason. Parameters
autotp shards and Hugging Face does not are counted too (the coverage run checks those are
exact). Totals are by count and by bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

OUTCOMES = ("same dim", "other dim", "replicated", "autotp only")


def hf_sharded_dims(model, tp: int) -> Optional[dict[str, int]]:
    """The dim Hugging Face's own plan shards for each parameter it shards (None: the family
    has no plan). ``model`` is sharded in place: pass a copy."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from transformers.distributed import DistributedConfig
    from transformers.distributed.tensor_parallel import apply_tensor_parallelism

    if not getattr(model, "tp_plan", None):
        return None
    tp_plan, _, _ = model._resolve_parallel_plans(DistributedConfig(tp_size=tp))
    apply_tensor_parallelism(model, init_device_mesh("cpu", (tp,)), tp_plan)
    dims = {}
    for name, param in model.named_parameters():
        if isinstance(param, DTensor):
            # Shard(d), or _StridedShard(d) for a packed weight (not a Shard subclass)
            shards = [p for p in param.placements if p.is_shard() or hasattr(p, "split_factor")]
            if shards:
                dims[name] = shards[0].dim % param.ndim
    return dims


def compare(arch: str, tp: int) -> dict:
    """One family's counts (and bytes) per outcome, and the parameters that differ."""
    import copy

    import autotp
    from arch_configs import build_and_run

    model = build_and_run(arch)[0]  # a config that runs: one that only builds may not capture
    hf = hf_sharded_dims(copy.deepcopy(model), tp)
    if hf is None:
        return {"arch": arch, "no_plan": True}
    plan = autotp.plan(model, tp)
    counts, nbytes, differ = Counter(), Counter(), []
    for name, param in model.named_parameters():
        spec = plan.params.get(name)
        ours = spec.placement.dim if spec is not None and spec.sharded else None
        theirs = hf.get(name)
        if theirs is None and ours is None:
            continue
        outcome = ("autotp only" if theirs is None else "replicated" if ours is None
                   else "same dim" if ours == theirs else "other dim")
        counts[outcome] += 1
        nbytes[outcome] += param.numel() * param.element_size()
        if outcome in ("replicated", "other dim"):
            why = spec.reason if spec is not None else "not read by the graph"
            differ.append(f"{name} (HF dim {theirs}, autotp {'dim %d' % ours if ours is not None else 'replicated'}"
                          f"{': ' + why if why else ''})")
    return {"arch": arch, "counts": counts, "bytes": nbytes, "differ": differ}


def _init_fake_group(tp: int) -> None:
    """A process group of ``tp`` ranks in this one process, whose collectives do nothing:
    Hugging Face's sharding only needs the group's size and this rank."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=tp)


def _in_child(arch: str, tp: int, timeout: float, memory_gib: float) -> dict:
    """``compare(arch, tp)`` in a process of its own, limited in time and memory (isolated.py)."""
    from isolated import run_isolated

    return {"arch": arch, **run_isolated([sys.executable, __file__, "--tp", str(tp), "--one", arch], timeout, memory_gib)}


def _one(arch: str, tp: int) -> dict:
    try:
        return compare(arch, tp)
    except MemoryError:
        return {"arch": arch, "error": "MemoryError: over the script's memory limit"}
    except Exception as exc:  # a family that cannot be built or planned is listed, not fatal
        text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        return {"arch": arch, "error": f"{type(exc).__name__}: {text}"}


def _line(result: dict) -> str:
    if result.get("no_plan"):
        return ""
    if "error" in result:
        return f"| {result['arch']} | error: {result['error']} | | | | |"
    c = Counter(result["counts"])
    differ = "; ".join(result["differ"][:4]) + (f"; ... {len(result['differ']) - 4} more" if len(result["differ"]) > 4 else "")
    return f"| {result['arch']} | " + " | ".join(str(c[o]) for o in OUTCOMES) + f" | {differ} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--archs", nargs="+", help="model types (default: those of scripts/arch_configs.py)")
    parser.add_argument("--all", action="store_true", help="every model type transformers maps to a causal LM")
    parser.add_argument("--out", help="write the markdown here (default: stdout only)")
    parser.add_argument("--json", help="write each family's counts here as JSON")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per family (default 300)")
    parser.add_argument("--memory-gib", type=float, default=8, help="address space per family (default 8 GiB)")
    parser.add_argument("--merge", help="an earlier --json: every family not in --archs is taken from it, so that "
                                        "rerunning a few families renders the whole table")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one family, JSON on stdout
    args = parser.parse_args()
    import torch

    from arch_configs import ARCHS, causal_lm_types

    torch.set_num_threads(1)
    if args.one:
        _init_fake_group(args.tp)
        print(json.dumps(_one(args.one, args.tp)))
        return
    archs = args.archs or (sorted(set(ARCHS) | set(causal_lm_types())) if args.all else list(ARCHS))
    results, start = [], time.perf_counter()
    for i, arch in enumerate(archs):
        results.append(_in_child(arch, args.tp, args.timeout, args.memory_gib))
        print(f"[{i + 1}/{len(archs)}] {arch}: {'no plan' if results[-1].get('no_plan') else 'ok' if 'counts' in results[-1] else results[-1]['error']}",
              file=sys.stderr, flush=True)
    reran = len(results)
    if args.merge:
        rerun = set(archs)
        earlier = [r for r in json.loads(Path(args.merge).read_text()) if r["arch"] not in rerun]
        results = sorted(earlier + results, key=lambda r: r["arch"])
    compared = [r for r in results if "counts" in r]
    counts = sum((Counter(r["counts"]) for r in compared), Counter())
    nbytes = sum((Counter(r["bytes"]) for r in compared), Counter())
    hf_total = sum(counts[o] for o in OUTCOMES[:3])
    hf_bytes = sum(nbytes[o] for o in OUTCOMES[:3])
    lines = [
        f"# autotp against Hugging Face's hand-written tp_plan (tp={args.tp})", "",
        f"Generated by `python scripts/hf_plan_compare.py` ({time.strftime('%Y-%m-%d')}, transformers "
        f"{__import__('transformers').__version__}) in {time.perf_counter() - start:.0f} s"
        + (f" ({reran} families rerun, the others from an earlier run)" if args.merge else "")
        + f". {len(compared)} families "
        f"with a plan compared; {sum(1 for r in results if r.get('no_plan'))} have none; "
        f"{sum(1 for r in results if 'error' in r)} could not be built or planned.", "",
        f"Of the {hf_total} parameters Hugging Face shards ({hf_bytes / 2**20:.2f} MiB at these sizes), autotp shards "
        + ", ".join(f"{counts[o]} ({100 * counts[o] / max(hf_total, 1):.1f}%; "
                    f"{100 * nbytes[o] / max(hf_bytes, 1):.1f}% of bytes) {'on the same dim' if o == 'same dim' else 'on another dim' if o == 'other dim' else 'not at all'}"
                    for o in OUTCOMES[:3])
        + f". autotp also shards {counts['autotp only']} parameters Hugging Face replicates.", "",
        "| family | " + " | ".join(OUTCOMES) + " | where autotp differs (HF's dim, autotp's, and autotp's reason) |",
        "|---" * (len(OUTCOMES) + 2) + "|",
        *filter(None, (_line(r) for r in results)),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
