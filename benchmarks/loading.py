"""Loading figures for issue #3: convert throughput, peak RSS per rank, 70B plan time.

    python -m benchmarks.loading [--model llama-200m] [--tp 2]

1. saves the model (random weights, fp32) with ``save_pretrained`` to a temporary directory;
2. ``autotp.convert`` it for ``--tp`` ranks: MB/s of tensor bytes written;
3. starts ``--tp`` ranks with torchrun twice, loading from the converted shards
   (``autotp.load``) and from the Hugging Face checkpoint (``parallelize(meta model,
   checkpoint=DIR)``); each rank reports its RSS before loading (interpreter, torch and
   transformers imported) and its peak RSS, next to the bytes it holds;
4. plans a Llama-3-70B ``config.json`` (no weights) with ``autotp plan`` in a subprocess:
   wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.peers import peak_rss_mib, rss_mib

LLAMA_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def worker(mode: str, path: str, report: str) -> None:
    """One rank (under torchrun): load, then write RSS figures as JSON to ``report.<rank>``."""
    import torch
    import transformers  # noqa: F401  imported before the baseline, as a user would have

    import autotp

    torch.set_num_threads(1)
    before = rss_mib()
    start = time.perf_counter()
    if mode == "shards":
        tp_model = autotp.load(path)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        with autotp.init_empty_weights():
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).eval()
        tp_model = autotp.parallelize(model, checkpoint=path)
    seconds = time.perf_counter() - start
    Path(f"{report}.{tp_model.rank}").write_text(json.dumps(dict(
        mode=mode, rank=tp_model.rank, before_mib=before, peak_mib=peak_rss_mib(), after_mib=rss_mib(),
        held_mib=tp_model.local_bytes() / 2**20, seconds=seconds)))


def _torchrun(tp: int, mode: str, path: Path, report: Path) -> list[dict]:
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--nproc-per-node", str(tp), "-m", "benchmarks.loading", "--worker", mode, str(path),
                    str(report)], capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    return [json.loads(Path(f"{report}.{r}").read_text()) for r in range(tp)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-200m")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "PATH", "REPORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    import autotp
    from benchmarks.models import build

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build(args.model)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp / "hf")
        del model
        start = time.perf_counter()
        out = autotp.convert(tmp / "hf", args.tp, tmp / "out", progress=False)
        seconds = time.perf_counter() - start
        written = sum(p.stat().st_size for p in out.glob("rank-*.safetensors"))
        read = sum(p.stat().st_size for p in (tmp / "hf").glob("*.safetensors"))
        print(f"{args.model}: {params / 1e6:.1f}M params, checkpoint {read / 2**20:.0f} MiB")
        print(f"convert tp={args.tp}: {seconds:.2f} s, {written / 2**20:.0f} MiB written "
              f"({written / 2**20 / seconds:.0f} MB/s written, {read / 2**20 / seconds:.0f} MB/s of checkpoint)")
        for mode, path in (("shards", out), ("checkpoint", tmp / "hf")):
            for r in _torchrun(args.tp, mode, path, tmp / f"report-{mode}"):
                print(f"  load from {mode:<10} rank {r['rank']}: RSS before {r['before_mib']:.0f} MiB, peak {r['peak_mib']:.0f} MiB "
                      f"(+{r['peak_mib'] - r['before_mib']:.0f}), holds {r['held_mib']:.0f} MiB, {r['seconds']:.2f} s")
        (tmp / "l70").mkdir()
        (tmp / "l70" / "config.json").write_text(json.dumps(LLAMA_70B))
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "autotp", "plan", str(tmp / "l70"), "--tp", "8"], check=True,
                       capture_output=True)
        wall = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"plan Llama-3-70B config at tp=8: {wall:.1f} s wall (process start included), peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
