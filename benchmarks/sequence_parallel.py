"""Sequence parallelism, measured where it would change anything: at a layer boundary.

    torchrun --nproc-per-node 2 -m benchmarks.sequence_parallel [--hidden 1024] [--tokens 128 512]

Between a row-parallel exit and the next column-parallel entry, tensor parallelism (what autotp
does) all-reduces the exit's partial sums, and every rank then adds the residual and normalises
all tokens. Sequence parallelism (Megatron-LM's) reduce-scatters the partial sums over the
tokens instead, so each rank adds and normalises 1/N of them, and all-gathers the normalised
tokens before the next matmul. The bytes moved are the same (an all-reduce is a reduce-scatter
and an all-gather); what SP saves is the norm and the add on (N-1)/N of the tokens, and what it
costs is a second collective call.

This times both patterns on every collective path this machine has, with the Llama-191M
benchmark's sizes (hidden 1024, 1 x 128 and 4 x 128 tokens, fp32, one thread per rank):

- gloo: ``all_reduce`` vs ``reduce_scatter_tensor`` + ``all_gather_into_tensor``;
- shared memory (DeepSpeed's kernel, all-reduce only): the all-reduce, vs the same all-reduce
  then a slice (no reduce-scatter exists there) + the all-gather over the shared-memory
  all-reduce (each rank's rows written into zeros, summed), as autotp gathers on that path.

Prints, per path and size, the median time of one boundary each way (with the spread over
rounds) and the difference over one forward of the 8-layer model (16 boundaries). Medians of
``--repeats`` calls after warm-up, in ``--rounds`` rounds, ranks aligned by a barrier.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable

import torch
import torch.distributed as dist


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


def _timed(step: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _patterns(tokens: int, hidden: int, world: int, all_reduce: Callable[[torch.Tensor], object],
              scatter: Callable[[torch.Tensor], torch.Tensor],
              gather: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Callable[[], object]]:
    partial = torch.randn(tokens, hidden)
    residual = torch.randn(tokens, hidden)
    residual_shard = residual[: tokens // world].clone()
    weight = torch.ones(hidden)

    def tensor_parallel() -> object:
        y = partial.clone()
        all_reduce(y)
        return _rms_norm(residual + y, weight)

    def sequence_parallel() -> object:
        y = scatter(partial.clone())
        return gather(_rms_norm(residual_shard + y, weight))

    return {"TP: all-reduce, add + norm on all tokens": tensor_parallel,
            "SP: reduce-scatter, add + norm on 1/N, all-gather": sequence_parallel}


def _gloo_paths(world: int) -> tuple[Callable, Callable, Callable]:
    def scatter(x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(x.shape[0] // world, x.shape[1])
        dist.reduce_scatter_tensor(out, x)
        return out

    def gather(x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(x.shape[0] * world, x.shape[1])
        dist.all_gather_into_tensor(out, x)
        return out

    return dist.all_reduce, scatter, gather


def _shm_paths(world: int) -> tuple[Callable, Callable, Callable]:
    from autotp.collectives import select_all_reduce

    fast, _ = select_all_reduce(None, world, torch.device("cpu"))
    if fast is None:
        raise RuntimeError("DeepSpeed's shared-memory all-reduce is not available here")
    rank = dist.get_rank()

    def scatter(x: torch.Tensor) -> torch.Tensor:
        fast(x)
        rows = x.shape[0] // world
        return x[rank * rows:(rank + 1) * rows]

    def gather(x: torch.Tensor) -> torch.Tensor:
        whole = x.new_zeros(x.shape[0] * world, x.shape[1])
        whole[rank * x.shape[0]:(rank + 1) * x.shape[0]].copy_(x)
        fast(whole)
        return whole

    return fast, scatter, gather


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--layers", type=int, default=8, help="boundaries per forward: 2 per layer")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch renames the collectives
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    paths = {"gloo": _gloo_paths(world)}
    try:
        paths["shared memory"] = _shm_paths(world)
    except Exception as exc:  # noqa: BLE001  reported, the gloo figures still stand
        if rank == 0:
            print(f"shared memory: not measured ({type(exc).__name__}: {exc})")
    rows = []
    for path, (all_reduce, scatter, gather) in paths.items():
        for tokens in args.tokens:
            patterns = _patterns(tokens, args.hidden, world, all_reduce, scatter, gather)
            rounds = {name: [_timed(step, args.repeats) for _ in range(args.rounds)] for name, step in patterns.items()}
            rows.append((path, tokens, rounds))
    if rank == 0:
        print(f"one layer boundary, hidden {args.hidden}, {world} ranks, fp32, 1 thread per rank; "
              f"median of {args.repeats} calls, median (range) over {args.rounds} rounds")
        for path, tokens, rounds in rows:
            tp, sp = (statistics.median(r) for r in rounds.values())
            print(f"\n{path}, {tokens} tokens:")
            for name, times in rounds.items():
                print(f"  {name}: {statistics.median(times) * 1e3:.3f} ms "
                      f"({min(times) * 1e3:.3f}-{max(times) * 1e3:.3f})")
            boundaries = 2 * args.layers
            print(f"  SP - TP: {(sp - tp) * 1e3:+.3f} ms per boundary, {(sp - tp) * boundaries * 1e3:+.2f} ms "
                  f"per forward of {args.layers} layers ({sp / tp:.2f}x)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
