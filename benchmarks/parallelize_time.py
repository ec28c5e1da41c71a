"""Time ``autotp.parallelize`` per stage on a model config, under torchrun.

    torchrun --nproc-per-node 2 -m benchmarks.parallelize_time --model llama-200m --repeat 3

Prints, per rank, the median over ``--repeat`` runs of each stage (capture, plan, rewrite,
load) and the total, plus parameter count and per-rank bytes. Building the model (random
init) is not counted.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import autotp
from benchmarks.models import CONFIGS, build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-200m", choices=sorted(CONFIGS))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    laps: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        model = build(args.model)
        params = sum(p.numel() for p in model.parameters())
        start = time.perf_counter()
        tp_model = autotp.parallelize(model)
        total = time.perf_counter() - start
        for name, seconds in {**tp_model.timings, "total": total}.items():
            laps.setdefault(name, []).append(seconds)
        if dist.is_initialized():
            dist.barrier()
    stages = "  ".join(f"{k} {statistics.median(v):.2f}s" for k, v in laps.items())
    print(f"[rank {tp_model.rank}/{tp_model.tp_size}] {args.model}: {params / 1e6:.1f}M params, "
          f"{tp_model.local_bytes() / 2**20:.0f} MiB on this rank; parallelize median of {args.repeat}: {stages}",
          flush=True)


if __name__ == "__main__":
    main()
