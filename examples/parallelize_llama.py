"""Parallelize a Llama model built from a config, and check it against the unsharded model.

Run on 2 ranks (CPU, gloo):

    torchrun --nproc-per-node 2 examples/parallelize_llama.py

Every rank builds the same seeded model, computes the unsharded logits for reference, then
calls ``autotp.parallelize``: the plan comes from the model's graph. Each rank prints the
max difference to the reference and the weight bytes it holds.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.utils import logging

import autotp


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64 or 128,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab, max_position_embeddings=2048,
    )
    torch.manual_seed(0)  # the same weights on every rank
    return AutoModelForCausalLM.from_config(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256, help="hidden size (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads (default 8)")
    parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads, GQA (default 4)")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size (default 1024)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--show-plan", action="store_true", help="print the full plan table on rank 0")
    args = parser.parse_args()
    logging.set_verbosity_error()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    model = build_model(args)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids).logits

    start = time.perf_counter()
    tp_model = autotp.parallelize(model)
    ready_s = time.perf_counter() - start
    with torch.no_grad():
        logits = tp_model(input_ids).logits

    rank, tp = tp_model.rank, tp_model.tp_size
    if rank == 0:
        print(tp_model.plan.to_table() if args.show_plan else tp_model.plan.summary(), flush=True)
        print(f"collectives: {tp_model.collective_path}, linear kernels: {tp_model.kernels}", flush=True)
    diff = (logits - reference).abs().max().item()
    bound = 1e-4 * reference.abs().max().item()
    for turn in range(tp):  # one rank at a time, so lines do not interleave
        if tp > 1:
            torch.distributed.barrier()
        if turn == rank:
            print(
                f"[rank {rank}/{tp}] logits {tuple(logits.shape)}  max|diff| {diff:.2e} (bound {bound:.2e}: "
                f"{'OK' if diff <= bound else 'MISMATCH'})  weights {tp_model.local_bytes() / 2**20:.2f} MiB "
                f"of {full_bytes / 2**20:.2f} MiB unsharded  parallelize {ready_s:.2f} s",
                flush=True,
            )
    if diff > bound:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
