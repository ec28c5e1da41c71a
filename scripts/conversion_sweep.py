"""Every causal-LM family's checkpoint as transformers saves it, read through autotp's view.

    python scripts/conversion_sweep.py [--archs mixtral qwen2_moe ...]

For each family (``scripts/arch_configs.py``'s small config): ``save_pretrained``; where the
stored keys need transformers' load-time conversions, every tensor autotp reads
(``autotp.loading.checkpoint_source``), whole and as each rank's slice in plain, two-block and
padded layouts at 2, 3 and 4 ranks, is compared with what ``from_pretrained`` loads and with
the model that was saved. Prints one JSON line per family and a summary; exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotp.checkpoints import open_checkpoint  # noqa: E402
from autotp.conversions import _Converted, converted  # noqa: E402
from autotp.loading import checkpoint_source  # noqa: E402
from autotp.placement import Replicate, Shard, local_chunk  # noqa: E402
from scripts import arch_configs  # noqa: E402


def layouts(shape: list[int]) -> list[tuple[Shard, int]]:
    out = []
    for dim, size in enumerate(shape):
        for world in (2, 3, 4):
            out += [(Shard(dim), world)] if size % world == 0 else []
            out += [(Shard(dim, blocks=2), world)] if size % (2 * world) == 0 else []
        out += [(Shard(dim, padded=True), 3)] if size > 1 else []
    return out


def check(arch: str) -> dict:
    model = arch_configs.build(arch)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        stored = open_checkpoint(tmp)
        view = converted(stored, model)
        if view is stored:
            return {"arch": arch, "converted": False}
        theirs = type(model).from_pretrained(tmp).state_dict()
        ours = model.state_dict()
        source = checkpoint_source(tmp, model)
        slices, wrong = 0, []
        for name, expected in theirs.items():
            if not source.has(name):
                continue
            whole = source.read(name, Replicate(), 0, 1)
            if not (torch.equal(whole, expected) and torch.equal(whole, ours[name])):
                wrong.append(name)
                continue
            for placement, world in layouts(list(expected.shape)):
                for rank in range(world):
                    got, want = source.read(name, placement, rank, world), local_chunk(expected, placement, rank, world)
                    slices += 1
                    if got.shape != want.shape or not torch.equal(got, want):
                        wrong.append(f"{name} {placement} rank {rank}/{world}")
        source.close()
        whole_converted = sum(isinstance(t, _Converted) for t in view.tensors.values())
        return {"arch": arch, "converted": True, "tensors": len(view.tensors), "converted_whole": whole_converted,
                "slices": slices, "wrong": wrong}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", help="families (default: every causal-LM type)")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per family")
    args = parser.parse_args()
    rows = []
    for arch in args.archs or arch_configs.causal_lm_types():
        signal.alarm(args.timeout)
        try:
            row = check(arch)
        except Exception as exc:  # noqa: BLE001  a family that does not build or save is reported, not fatal
            row = {"arch": arch, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"}
        signal.alarm(0)
        rows.append(row)
        print(json.dumps(row), flush=True)
    done = [r for r in rows if r.get("converted")]
    wrong = [r for r in done if r["wrong"]]
    print(f"{len(rows)} families: {len(done)} need conversions, {sum(r['slices'] for r in done)} slices compared, "
          f"{sum(r['converted_whole'] for r in done)} tensors converted whole, {len(wrong)} wrong, "
          f"{sum('error' in r for r in rows)} did not build or save")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
