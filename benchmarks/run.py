"""autotp against its peers, measured side by side in one run on this machine.

    python -m benchmarks.run --tp 2 --model llama-200m [--impls autotp_shm hf_tp_plan ...]

For each implementation (``benchmarks/peers.py``: unsharded, Hugging Face ``tp_plan="auto"``,
DeepSpeed AutoTP over its shared-memory all-reduce and over gloo, a hand-written DTensor
Megatron plan, and autotp over both paths and at tp 1 in one process, each with its own kernel
choice and again on PyTorch's GEMM as the peers run) this launches ``--tp`` ranks with
torchrun (the tp 1 ones in one process), one thread per process, all reading the same saved
checkpoint, and measures on every rank:

- time to a ready model (load + plan + rewrite) on the slowest rank (the median of
  ``--ready-launches`` launches) and peak RSS at load, and over the whole run
  (weights mapped from the checkpoint are read when first used, after load); for autotp also on a
  first run, a launch of its own with an empty graph cache (``autotp.cache``), as a model's
  first start on a machine set up as ``make`` leaves it (DeepSpeed's kernel built, and autotp's
  record of it in the user's cache folder), one per round (the median, its range, and its
  ratio to HF's ready);
- this rank's parameter bytes and KV-cache bytes (batch 1 x 128 tokens);
- forward (prefill) latency for batch 1 x 128 and 4 x 128: median of ``--repeats`` after
  warm-up, ranks aligned by a barrier before each;
- decode: tokens/s of a greedy ``generate`` of 64 new tokens after a 16-token prompt (the
  median of 3);
- collectives per forward and the bytes they move (counted with the profiler).

Results go to ``benchmarks/results/<model>-tp<N>.{json,md,png}`` (the table is printed too)
with ratios to HF's figures, speed-ups over the unsharded model, and TP scaling: speed-up over
the same implementation at tp 1 on the same kernels (the unsharded model for the peers), all
from the same run. The kernel effect (autotp's GEMM choice at tp 1) is a line of its own.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from benchmarks.peers import CACHED, IMPLEMENTATIONS, param_bytes, peak_rss_mib, rss_mib

RESULTS = Path(__file__).parent / "results"
PREFILL = {"prefill_b1": (1, 128), "prefill_b4": (4, 128)}
DECODE_REPEATS = 3  # 64 greedy tokens each; the median is reported
# dispatcher-level collective ops, recorded on the calling thread (gloo's own worker-thread
# events are not counted: they would count each collective twice); sends and receives too, as
# autotp's gather over gloo is made of them (counted once: they run inside its own
# "autotp::all_gather" event, so they are nested)
_COLLECTIVE = re.compile(r"^(c10d|deepspeed|autotp)::.*(all_?reduce|all_?gather|reduce_?scatter|broadcast|send|recv)", re.IGNORECASE)
# gloo's worker-thread events: the only ones over gloo that record the tensor's shape
_GLOO = re.compile(r"^gloo:(all_?reduce|all_?gather|reduce_?scatter|broadcast|send|recv)", re.IGNORECASE)


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _ids(batch: int, seq: int, vocab: int) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(batch * 1000 + seq))


def _timed(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _input_bytes(event) -> int:
    shapes = [s for s in (event.input_shapes or []) if s]
    return 4 * sum(int(torch.Size(s).numel()) for s in shapes[:1])  # fp32


def _collectives(model, ids: torch.Tensor) -> tuple[int, int]:
    """Collective calls in one forward and the bytes of their inputs, from the profiler
    (outermost collective events only, so wrappers are not counted twice; over gloo, the
    bytes come from gloo's own events, as the dispatcher's hold no shapes)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        model(ids)
    count = nbytes = gloo_bytes = 0
    for event in prof.events():
        if _GLOO.search(event.name):
            gloo_bytes += _input_bytes(event)
        if not _COLLECTIVE.search(event.name):
            continue
        parent, nested = event.cpu_parent, False
        while parent is not None:
            nested |= bool(_COLLECTIVE.search(parent.name))
            parent = parent.cpu_parent
        if nested:
            continue
        count += 1
        nbytes += _input_bytes(event)
    return count, nbytes or gloo_bytes


def _kv_bytes(model, vocab: int) -> int:
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(_ids(1, 128, vocab), cache=cache, use_cache=True)
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def worker(name: str, checkpoint: str, report: str, repeats: int, ready_only: bool = False) -> None:
    """One rank: build the implementation's model and measure it (``ready_only``: only how
    long it takes to be ready)."""
    torch.set_num_threads(1)
    import transformers  # noqa: F401  (imported before the baseline, as a user would have)

    build = IMPLEMENTATIONS[name].build
    result: dict = {"rss_before_mib": rss_mib()}
    rank = int(os.environ.get("RANK", "0"))
    try:
        start = time.perf_counter()
        model = build(checkpoint)
        result["ready_s"] = time.perf_counter() - start
        result["peak_rss_mib"] = peak_rss_mib()
        result["param_bytes"] = param_bytes(getattr(model, "graph_module", model))
        result["kernels"] = getattr(model, "kernels", "aten")  # the GEMM the linears run on (autotp.kernels)
        if ready_only:
            raise _Done
        vocab = model.config.vocab_size
        with torch.no_grad():
            for key, (batch, seq) in PREFILL.items():
                ids = _ids(batch, seq, vocab)
                result[key + "_s"] = _timed(lambda: model(ids), repeats)
            result["collectives"], result["collective_bytes"] = _collectives(model, _ids(1, 128, vocab))
            result["kv_bytes"] = _kv_bytes(model, vocab)
            prompt = _ids(1, 16, vocab)
            options = dict(do_sample=False, pad_token_id=0)
            model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **options)  # warm-up
            seconds = _timed(lambda: model.generate(prompt, max_new_tokens=64, min_new_tokens=64, **options),
                             DECODE_REPEATS, warmup=0)
            result["decode_tok_s"] = 64 / seconds
        result["peak_rss_run_mib"] = peak_rss_mib()
    except _Done:
        pass
    except Exception as exc:  # a peer that cannot run this model is recorded, not fatal
        result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    Path(f"{report}.{rank}").write_text(json.dumps(result))


class _Done(Exception):
    """A ready-only worker has measured what it was launched for."""


def _launch(name: str, tp: int, checkpoint: Path, report: Path, repeats: int, *, ready_only: bool = False,
            env: Optional[dict[str, str]] = None) -> list[dict]:
    distributed = IMPLEMENTATIONS[name].distributed
    args = ["-m", "benchmarks.run", "--worker", name, str(checkpoint), str(report), "--repeats", str(repeats)]
    args += ["--ready-only"] if ready_only else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **(env or {})}
    if distributed:
        command = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", str(tp), *args]
    else:
        command = [sys.executable, *args]
    segments = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    for leaked in set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - segments:
        leaked.unlink(missing_ok=True)  # DeepSpeed's own runs never remove their shared memory
    ranks = tp if distributed else 1
    results = []
    for r in range(ranks):
        path = Path(f"{report}.{r}")
        results.append(json.loads(path.read_text()) if path.exists()
                       else {"error": f"exit code {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"})
    return results


def resolve_auto_kernels() -> tuple[str, float]:
    """autotp's ``auto`` kernel choice, made once for the whole run (one thread, as the workers
    run), and the probe's speed-up it rests on. Each launch probing for itself made the choice
    per launch: the probe sits near its 1.2x bar on some machines, so autotp at tp 2 could run
    oneDNN and autotp at tp 1 MKL, and their ratio would not be TP scaling on the same kernels."""
    from autotp.kernels import probe_kernels

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return probe_kernels(torch.device("cpu"), probes=5)
    finally:
        torch.set_num_threads(threads)


def _ready_s(ranks: list[dict]) -> float:
    """When the slowest rank is ready: a tensor-parallel model's first call waits for every rank
    (rank 0's own figure flattered the implementations whose ranks never meet while loading)."""
    return max(r["ready_s"] for r in ranks)


def summarise(name: str, ranks: list[dict]) -> dict:
    """Rank 0's timings, but time to ready and memory of the worst rank."""
    first = ranks[0]
    if "error" in first:
        return {"implementation": name, "error": first["error"]}
    return {
        "implementation": name, "collective_path": IMPLEMENTATIONS[name].collective_path,
        "tp1": IMPLEMENTATIONS[name].tp1, **{k: v for k, v in first.items()},
        "ready_s": _ready_s(ranks),
        "param_bytes": max(r["param_bytes"] for r in ranks), "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks),
        "peak_rss_run_mib": max(r.get("peak_rss_run_mib", 0) for r in ranks),
        "kv_bytes": max(r["kv_bytes"] for r in ranks),
    }


def _ready_rounds(rows: list[dict], args: argparse.Namespace, checkpoint: Path, tmp: Path,
                 envs: dict[str, dict[str, str]]) -> None:
    """Launch each implementation ``--ready-launches - 1`` more times, only to time how long it
    takes to be ready, and report the median with its measured run's. The launches go round
    the implementations in turn: this machine's speed drifts by ~10% over minutes (the
    transformers import every launch makes took 0.46-0.50 s, then 0.55 s, twenty minutes apart),
    and launching each implementation's in a row put that drift into their ratios."""
    start = time.perf_counter()
    for row in rows:
        row["ready_launches_s"] = [row["ready_s"]]
    for i in range(args.ready_launches - 1):
        for row in rows:
            name = row["implementation"]
            ready = _launch(name, args.tp, checkpoint, tmp / f"{name}-ready{i}", 1, ready_only=True, env=envs[name])
            if all("ready_s" in r for r in ready):
                row["ready_launches_s"].append(_ready_s(ready))
    for row in rows:
        row["ready_s"] = statistics.median(row["ready_launches_s"])
    print(f"time to ready, {args.ready_launches - 1} more rounds: ok ({time.perf_counter() - start:.0f} s)",
          file=sys.stderr, flush=True)


def _measure_round(args: argparse.Namespace, checkpoint: Path, tmp: Path, envs: dict[str, dict[str, str]],
                   first: bool) -> list[dict]:
    """One launch of every implementation, measured, each of autotp's after a launch of its own
    with an empty graph cache (its first run). In the first round that launch fills the cache the
    measured runs use; later rounds give it a new empty folder, so every round has a first run."""
    tmp.mkdir()
    rows = []
    for name in args.impls:
        start = time.perf_counter()
        first_run = None
        if name in CACHED:
            env = envs[name] if first else {**envs[name], "AUTOTP_CACHE_DIR": str(tmp / f"{name}-first-cache")}
            first_run = _launch(name, args.tp, checkpoint, tmp / f"{name}-first", 1, ready_only=True, env=env)
        ranks = _launch(name, args.tp, checkpoint, tmp / name, args.repeats, env=envs[name])
        rows.append(summarise(name, ranks))
        if first_run and "error" not in rows[-1]:
            rows[-1]["ready_first_run_s"] = _ready_s(first_run) if all("ready_s" in r for r in first_run) else None
        status = rows[-1].get("error", "ok")
        print(f"{name}: {status} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--model", default="llama-200m")
    parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS))
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards per prefill size (median)")
    parser.add_argument("--ready-launches", type=int, default=5,
                        help="launches whose time to a ready model is measured (median; default 5), the "
                             "extra ones in rounds over the implementations")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every implementation this many times, in turn (figures: medians, with "
                             "the range over rounds; ratios are taken within a round)")
    parser.add_argument("--out", default=str(RESULTS), help="results folder (default benchmarks/results)")
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "CHECKPOINT", "REPORT"), help=argparse.SUPPRESS)
    parser.add_argument("--ready-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, repeats=args.repeats, ready_only=args.ready_only)
        return
    from benchmarks.models import build
    from benchmarks.report import write_reports

    import autotp
    from autotp.fast_allreduce import prebuild_fast_path

    # An editable install has no bytecode, and with PYTHONDONTWRITEBYTECODE (set here) none is
    # ever written: every launch compiled autotp's source, 32 of the 48 ms its import took,
    # inside "ready". Compile it as a wheel install does (the peers' packages all have theirs).
    compileall.compile_dir(str(Path(autotp.__file__).parent), quiet=1)
    # The machine as `make` leaves it: DeepSpeed's kernel built and autotp's record of it written
    # (the record is the machine's, outside the graph cache folders the launches are given).
    prebuild_fast_path()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "checkpoint"
        model = build(args.model)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(checkpoint)
        del model
        kernels, probe = resolve_auto_kernels()
        envs = {name: {"AUTOTP_KERNELS": kernels} for name in args.impls}
        for name in set(args.impls) & CACHED:  # the graph cache a first run fills, one per implementation
            envs[name]["AUTOTP_CACHE_DIR"] = str(Path(tmp) / f"cache-{name}")
        rounds = [_measure_round(args, checkpoint, Path(tmp) / f"round{i}", envs, first=i == 0)
                  for i in range(args.rounds)]
        _ready_rounds([row for row in rounds[0] if "error" not in row], args, checkpoint, Path(tmp), envs)
    meta = {"model": args.model, "params": params, "tp": args.tp, "date": time.strftime("%Y-%m-%d"),
            "machine": f"{os.cpu_count()} CPU cores, 1 thread per process", "torch": torch.__version__,
            "repeats": args.repeats, "ready_launches": args.ready_launches, "decode_repeats": DECODE_REPEATS,
            "rounds": args.rounds, "auto_kernels": kernels, "kernel_probe": round(probe, 3)}
    paths = write_reports(rounds, meta, Path(args.out))
    print(paths[1].read_text())
    for path in paths:
        print(path)


if __name__ == "__main__":
    main()
