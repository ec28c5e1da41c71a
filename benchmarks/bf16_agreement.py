"""bf16 at tp 2: how close tensor-parallel greedy decoding stays to the unsharded bf16 model.

    python -m benchmarks.bf16_agreement [--models llama qwen2 mistral] [--new-tokens 64]

Every tensor-parallel implementation sums partial products in another order than one device
does, so bf16 outputs differ by rounding and greedy tokens can drift apart. For each model
(~40M parameters, seeded random weights saved as a bf16 checkpoint) this launches 2 ranks
with torchrun, one thread each, and compares with the unsharded bf16 model computed on every
rank first:

- autotp, all-reduce in bf16 (the default);
- autotp with ``AUTOTP_REDUCE_DTYPE=float32`` (partials widened, summed in fp32, rounded once);
- Hugging Face ``tp_plan="auto"`` (its all-reduce, in bf16, over gloo).

Figures: of ``--new-tokens`` greedy tokens after a 16-token prompt (batch 1), how many equal
the unsharded model's at the same position and how long the common prefix is; the max
|logit difference| over the prompt's positions; and for autotp the median decode time per
token over 3 runs (the cost of the wider all-reduce). Seeds and prompts are fixed, so reruns
agree; several prompts are summed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=8192, max_position_embeddings=512)
MODELS = {"llama": {}, "qwen2": {}, "mistral": {"sliding_window": 32}}
PROMPTS = 4


def _build(kind: str) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(kind, **SIZES, **MODELS[kind])
    return AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()


def _prompts(vocab: int) -> list[torch.Tensor]:
    return [torch.randint(3, vocab, (1, 16), generator=torch.Generator().manual_seed(100 + i)) for i in range(PROMPTS)]


def _run(model: torch.nn.Module, prompts: list[torch.Tensor], new_tokens: int) -> dict:
    """Greedy tokens, prompt logits and seconds per decoded token of ``model``."""
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    tokens, logits, times = [], [], []
    with torch.no_grad():
        model.generate(prompts[0], **{**options, "max_new_tokens": 2, "min_new_tokens": 2})  # captures, warm-up
        for prompt in prompts:
            logits.append(model(prompt).logits.float())
            start = time.perf_counter()
            tokens.append(model.generate(prompt, **options)[0, prompt.shape[1]:])
            times.append((time.perf_counter() - start) / new_tokens)
    return {"tokens": tokens, "logits": logits, "s_per_token": statistics.median(times)}


def _agreement(reference: dict, got: dict) -> dict:
    same = [int((a == b).sum()) for a, b in zip(reference["tokens"], got["tokens"])]
    prefix = []
    for a, b in zip(reference["tokens"], got["tokens"]):
        differ = (a != b).nonzero()
        prefix.append(int(differ[0, 0]) if len(differ) else len(a))
    diff = max(float((a - b).abs().max()) for a, b in zip(reference["logits"], got["logits"]))
    return {"same": sum(same), "prefix": sum(prefix), "of": sum(len(t) for t in reference["tokens"]),
            "max_logit_diff": diff, "s_per_token": got["s_per_token"]}


def worker(kind: str, checkpoint: str, new_tokens: int, report: str) -> None:
    import autotp
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    prompts = _prompts(SIZES["vocab_size"])
    reference = _run(_build(kind), prompts, new_tokens)
    results = {}
    for name, reduce_dtype in (("autotp, bf16 all-reduce", "auto"), ("autotp, fp32 all-reduce", "float32")):
        os.environ["AUTOTP_REDUCE_DTYPE"] = reduce_dtype
        results[name] = _agreement(reference, _run(autotp.parallelize(_build(kind), cache=False), prompts, new_tokens))
    os.environ.pop("AUTOTP_REDUCE_DTYPE")
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, tp_plan="auto").eval()
    results["Hugging Face tp_plan"] = _agreement(reference, _run(hf, prompts, new_tokens))
    Path(f"{report}.{rank}").write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "CHECKPOINT", "REPORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.new_tokens, args.worker[2])
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    print(f"bf16, tp 2 over gloo, greedy, batch 1, {PROMPTS} prompts of 16 tokens x {args.new_tokens} new tokens; "
          "against the unsharded bf16 model")
    print(f"{'model':8} {'implementation':26} {'tokens same':>12} {'common prefix':>14} {'max |logit diff|':>17} "
          f"{'ms/token':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models:
            checkpoint = str(Path(tmp) / kind)
            _build(kind).save_pretrained(checkpoint)
            report = str(Path(tmp) / f"{kind}.json")
            done = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "benchmarks.bf16_agreement",
                                   "--new-tokens", str(args.new_tokens), "--worker", kind, checkpoint, report],
                                  env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"the {kind} run failed:\n{done.stderr[-4000:]}")
            ranks = [json.loads(Path(f"{report}.{r}").read_text()) for r in range(2)]
            for name, r in ranks[0].items():
                agree = "" if all(x[name]["same"] == r["same"] for x in ranks) else " (ranks differ)"
                print(f"{kind:8} {name:26} {r['same']:>6}/{r['of']:<5} {r['prefix']:>7}/{r['of']:<6} "
                      f"{r['max_logit_diff']:>17.4f} {r['s_per_token'] * 1e3:>9.1f}{agree}")


if __name__ == "__main__":
    main()
