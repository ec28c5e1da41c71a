"""Generation figures: tokens/s at tp 2 vs unsharded, per-step time at several cache
lengths, KV-cache bytes per rank. Unsharded and tp runs happen in the same invocation on the
same machine, one thread per process.

    python -m benchmarks.generation [--model llama-200m] [--tp 2] [--new-tokens 64] [--positions 16,512]
    python -m benchmarks.generation --model mistral-200m --positions 128,1024,2048

Decoding speed: greedy ``generate`` of ``--new-tokens`` after a 16-token prompt (graphs are
captured by a warm-up first). Per-step time: with a cache already holding P tokens (each P of
``--positions``), the median (and range) of 10 single-token steps after 2 warm-up steps. If the
prefix were recomputed, the step at 512 would cost ~32x the step at 16; attending over a cache
it costs little more. With a sliding window (mistral-200m: 256 tokens) the cache stops growing
once the window is full: steps at 1024 and 2048 cached tokens should cost the same.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

def _step_times(model, config, position: int, steps: int = 10, warmup: int = 2) -> tuple[list[float], int]:
    """Seconds of each decode step with ``position`` tokens cached (after ``warmup`` steps,
    which capture the graphs a new cache length needs); the cache's bytes."""
    from transformers import DynamicCache

    prompt = torch.randint(3, config.vocab_size, (1, position), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=config)
    with torch.no_grad():
        logits = model(prompt, cache=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        cache_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        times = []
        for step in range(warmup + steps):
            if step == warmup:
                gc.collect()  # what a capture in the warm-up left behind is not collected while timing
            start = time.perf_counter()
            logits = model(token, cache=cache, use_cache=True).logits
            if step >= warmup:
                times.append(time.perf_counter() - start)
            token = logits[:, -1:].argmax(-1)
    return times, cache_bytes


def measure(model, new_tokens: int, positions: list[int]) -> dict:
    config = model.config
    prompt = torch.randint(3, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    options = dict(do_sample=False, pad_token_id=0, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    with torch.no_grad():
        model.generate(prompt, **{**options, "min_new_tokens": 2, "max_new_tokens": 2})  # warm-up, graph captures
        start = time.perf_counter()
        model.generate(prompt, **options)
        seconds = time.perf_counter() - start
    result = {"tokens_per_s": new_tokens / seconds}
    for position in positions:
        steps, cache_bytes = _step_times(model, config, position)
        result[f"steps_s@{position}"] = steps
        result[f"cache_bytes@{position}"] = cache_bytes
    return result


def _spread(times: list[float]) -> str:
    return f"{statistics.median(times) * 1e3:.1f} ms [{min(times) * 1e3:.1f}-{max(times) * 1e3:.1f}]"


def worker(model_name: str, new_tokens: int, positions: list[int], report: str, sharded: bool) -> None:
    import autotp
    from benchmarks.models import build

    torch.set_num_threads(1)
    model = build(model_name)
    if sharded:
        model = autotp.parallelize(model)
    result = measure(model, new_tokens, positions)
    rank = getattr(model, "rank", 0)
    Path(f"{report}.{'tp' if sharded else 'ref'}.{rank}").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-200m")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--positions", default="16,512",
                        help="comma-separated cache lengths at which single decode steps are timed (default 16,512)")
    parser.add_argument("--worker", nargs=2, metavar=("REPORT", "SHARDED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        positions = list(dict.fromkeys(int(p) for p in args.positions.split(",")))
    except ValueError:
        parser.error(f"--positions takes comma-separated integers, got {args.positions!r}")
    if args.worker:
        worker(args.model, args.new_tokens, positions, args.worker[0], args.worker[1] == "1")
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        report = str(Path(tmp) / "r")
        common = ["-m", "benchmarks.generation", "--model", args.model, "--new-tokens", str(args.new_tokens),
                  "--positions", args.positions]
        subprocess.run([sys.executable, *common, "--worker", report, "0"], check=True, env=env)
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        done = subprocess.run([torchrun, "--standalone", "--nproc-per-node", str(args.tp), *common, "--worker", report, "1"],
                              env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"the tp={args.tp} run failed:\n{done.stderr[-4000:]}")
        ref = json.loads(Path(f"{report}.ref.0").read_text())
        tp = [json.loads(Path(f"{report}.tp.{r}").read_text()) for r in range(args.tp)]
    rank0 = tp[0]
    print(f"{args.model}, greedy, batch 1, 16-token prompt, {args.new_tokens} new tokens, 1 thread per process")
    print(f"  tokens/s: unsharded {ref['tokens_per_s']:.1f}, tp={args.tp} {rank0['tokens_per_s']:.1f} "
          f"({rank0['tokens_per_s'] / ref['tokens_per_s']:.2f}x)")
    for position in positions:
        print(f"  decode step with {position} cached tokens: unsharded {_spread(ref[f'steps_s@{position}'])}, "
              f"tp={args.tp} {_spread(rank0[f'steps_s@{position}'])} (median [min-max] of 10)")
    first, last = positions[0], positions[-1]
    for name, run in (("unsharded", ref), (f"tp={args.tp}", rank0)):
        ratio = statistics.median(run[f"steps_s@{last}"]) / statistics.median(run[f"steps_s@{first}"])
        print(f"  step@{last} / step@{first}, {name}: {ratio:.2f} (prefix recompute would be ~{last / first:.0f}x)")
    kv = ref[f"cache_bytes@{last}"]
    per_rank = [r[f"cache_bytes@{last}"] for r in tp]
    print(f"  KV cache at {last} tokens: unsharded {kv / 2**20:.1f} MiB, per rank "
          f"{', '.join(f'{b / 2**20:.1f}' for b in per_rank)} MiB ({per_rank[0] / kv:.3f} of unsharded)")


if __name__ == "__main__":
    main()
