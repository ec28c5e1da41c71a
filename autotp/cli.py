"""The ``autotp`` command line: a thin layer over the Python API.

    autotp plan MODEL --tp N [--format table|json|hf]
    autotp convert MODEL --tp N -o OUT [--overwrite]
    autotp verify MODEL --tp N
    torchrun --nproc-per-node N -m autotp run OUT --input-ids 1,2,3 | --prompt TEXT
    torchrun --nproc-per-node N -m autotp generate OUT --prompt TEXT --max-new-tokens 64

Bad input (missing files, unknown model types, corrupt shards, wrong world size) prints one
line, ``autotp: error: ...``, and exits with status 2. A parity failure in ``verify`` exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, NoReturn, Optional, Sequence

EXAMPLES = """examples:
  autotp plan ./Llama-3-70B --tp 8                 # table of every parameter's sharding
  autotp plan ./Llama-3-70B --tp 8 --format hf     # the same as a Hugging Face tp_plan dict
  autotp plan mypkg.models:make_model --tp 2       # a factory returning an nn.Module
  autotp convert ./llama --tp 2 -o ./llama-tp2     # per-rank shard files
  autotp verify ./llama --tp 2                     # sharded vs unsharded on N local ranks
  torchrun --nproc-per-node 2 -m autotp run ./llama-tp2 --input-ids 1,2,3
  torchrun --nproc-per-node 2 -m autotp generate ./llama-tp2 --prompt "Once upon a time" --max-new-tokens 64

MODEL is a Hugging Face model directory (config.json, weights optional) or
package.module:factory, a callable returning an nn.Module or (module, example_inputs).

run and generate keep each rank's rewritten graphs in a cache, so the next start skips the
capture: ~/.cache/autotp, or $AUTOTP_CACHE_DIR (AUTOTP_CACHE_DIR=off turns it off), kept under
$AUTOTP_CACHE_MAX_MB (1024 by default) by dropping the least recently used entries.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autotp", description="Automatic tensor parallelism: the sharding plan comes from the model's graph.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plan = sub.add_parser("plan", help="print the plan (no weights are read)",
                          description="Capture MODEL on the meta device and print how every parameter is sharded, and why.")
    plan.add_argument("model", metavar="MODEL")
    plan.add_argument("--tp", type=int, required=True, help="tensor-parallel size")
    plan.add_argument("--format", choices=("table", "json", "hf"), default="table",
                      help="table (default), json (the Plan), or hf (a Hugging Face tp_plan dict)")
    plan.add_argument("--json", action="store_const", const="json", dest="format", help="same as --format json")
    plan.add_argument("--only-sharded", action="store_true", help="table: list sharded parameters only")

    convert = sub.add_parser("convert", help="write per-rank shard files from a checkpoint",
                             description="Read MODEL's weights (*.safetensors, else pytorch_model*.bin) tensor by tensor and "
                                         "write OUT/autotp.json and "
                                         "one rank-XXXXX-of-YYYYY.safetensors per rank. OUT appears only when complete.")
    convert.add_argument("model", metavar="MODEL")
    convert.add_argument("--tp", type=int, required=True, help="tensor-parallel size")
    convert.add_argument("-o", "--out", required=True, metavar="OUT", help="output directory (must not exist)")
    convert.add_argument("--overwrite", action="store_true", help="replace OUT once the new one is complete")
    convert.add_argument("--no-progress", action="store_true", help="no progress bar")

    verify = sub.add_parser("verify", help="compare sharded and unsharded outputs on N local ranks",
                            description="Start N local ranks (gloo), run MODEL sharded and unsharded on the same random "
                                        "inputs and print the max difference per output. Weights are MODEL's own when it "
                                        "has them and N copies fit in memory, random (seeded) otherwise. With its own, "
                                        "the unsharded model is loaded by transformers' from_pretrained and each rank of "
                                        "the sharded one reads its slices of the checkpoint, as parallelize(..., "
                                        "checkpoint=DIR) does: the check covers reading the checkpoint too.")
    verify.add_argument("model", metavar="MODEL")
    verify.add_argument("--tp", type=int, required=True, help="number of local ranks")
    verify.add_argument("--batch", type=int, default=2)
    verify.add_argument("--seq", type=int, default=16)
    verify.add_argument("--tolerance", type=float, default=1e-4, help="max |diff| / max |reference| (default 1e-4)")
    verify.add_argument("--random-weights", action="store_true", help="ignore MODEL's weights")

    run = sub.add_parser("run", help="(under torchrun) load a converted model and print the last position's logits",
                         description="Each rank loads only its own shard file from OUT; rank 0 prints the logits of the "
                                     "last position.")
    _add_tokens(run)
    run.add_argument("--top-k", type=int, default=5, help="how many top tokens to print (default 5)")
    run.add_argument("--save", metavar="FILE", help="rank 0 saves the last position's logits here (torch.save)")

    gen = sub.add_parser("generate", help="(under torchrun) generate text from a converted model",
                         description="Each rank loads only its own shard file from OUT; Hugging Face's generate() runs "
                                     "with the KV cache sharded by heads; rank 0 prints the text (or the token ids when OUT "
                                     "has no tokenizer) and the decoding speed.")
    _add_tokens(gen)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0, help="random seed for sampling (the same on every rank)")
    gen.add_argument("--no-warmup", action="store_true",
                     help="do not run a 2-token generation first (its graph captures then count in the timing)")
    return parser


def _add_tokens(parser: argparse.ArgumentParser) -> None:
    """OUT and where the tokens come from (run and generate)."""
    parser.add_argument("out", metavar="OUT")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input-ids", help="comma-separated token ids, e.g. 1,2,3")
    source.add_argument("--prompt", help="text, tokenized with OUT's tokenizer")


def _positive(value: int, what: str) -> int:
    from autotp.errors import AutotpError

    if value < 1:
        raise AutotpError(f"{what} must be >= 1, got {value}")
    return value


def cmd_plan(args: argparse.Namespace) -> int:
    from autotp.errors import AutotpError
    from autotp.heap import collector_paused
    from autotp.interop import to_hf_tp_plan
    from autotp.runtime import plan_model
    from autotp.source import resolve_model

    tp = _positive(args.tp, "--tp")
    source = resolve_model(args.model)
    start = time.perf_counter()
    with collector_paused():  # meta tensors only: nothing large to free early (70B config 8.0 -> 6.8 s here)
        model, example = source.build("meta")
        plan = plan_model(model, tp, example)
    seconds = time.perf_counter() - start
    if tp > 1 and not plan.sharded_params():
        raise AutotpError(f"tp={tp} divides no shardable dimension of {args.model}: nothing would be sharded")
    if args.format == "json":
        print(plan.to_json())
    elif args.format == "hf":
        tp_plan, missing = to_hf_tp_plan(plan)
        print(json.dumps(tp_plan, indent=2))
        for line in missing:
            print(f"# not expressible: {line}", file=sys.stderr)
    else:
        print(plan.to_table(only_sharded=args.only_sharded))
        print(f"planned {source.name} in {seconds:.1f} s")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from autotp.convert import convert

    start = time.perf_counter()
    out = convert(args.model, _positive(args.tp, "--tp"), args.out, overwrite=args.overwrite,
                  progress=False if args.no_progress else None)
    print(f"wrote {out} for tp={args.tp} in {time.perf_counter() - start:.1f} s")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from autotp.launch import run_local
    from autotp.source import resolve_model
    from autotp.verify_rank import fits_in_memory, verify_rank

    tp = _positive(args.tp, "--tp")
    batch, seq = _positive(args.batch, "--batch"), _positive(args.seq, "--seq")
    source = resolve_model(args.model)
    use_weights = source.has_checkpoint and not args.random_weights and fits_in_memory(source, tp)
    weights = ("its own weights (unsharded: from_pretrained; sharded: each rank reads its slices)" if use_weights
               else "random weights (seed 0)")
    if source.has_checkpoint and not use_weights and not args.random_weights:
        weights += f": {tp} copies of the checkpoint do not fit in memory"
    print(f"verify {source.name} at tp={tp} on {tp} local ranks (gloo), {weights}", flush=True)
    results = run_local(verify_rank, tp, args.model, use_weights, batch, seq)
    failed = False
    print(f"{'output':<24} {'shape':<18} {'max|diff|':>10} {'max|ref|':>10} {'relative':>10}")
    names = [row[0] for row in results[0]["rows"]]
    for i, name in enumerate(names):
        shape = results[0]["rows"][i][1]
        diff = max(r["rows"][i][2] for r in results)  # the worst rank
        scale = results[0]["rows"][i][3]
        rel = diff / scale if scale else diff
        ok = rel <= args.tolerance
        failed |= not ok
        print(f"{name:<24} {str(shape):<18} {diff:>10.2e} {scale:>10.2e} {rel:>10.2e}  {'OK' if ok else 'FAIL'}")
    print(f"{results[0]['sharded']} parameters sharded; {results[0]['bytes'] / 2**20:.1f} MiB on rank 0")
    return 1 if failed else 0


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    import autotp

    tp_model = autotp.load(args.out)
    ids, _ = _prompt_ids(args, tp_model)
    with torch.no_grad():
        logits = tp_model(torch.tensor([ids])).logits[0, -1].float()
    if tp_model.rank == 0:
        top = torch.topk(logits, min(args.top_k, logits.numel()))
        print(f"logits of position {len(ids) - 1}: shape {tuple(logits.shape)}, tp={tp_model.tp_size}")
        for value, index in zip(top.values.tolist(), top.indices.tolist()):
            print(f"  token {index:>8}  logit {value:+.4f}")
        if args.save:
            torch.save(logits, args.save)
    return 0


def _prompt_ids(args: argparse.Namespace, tp_model: Any) -> tuple[list[int], Any]:
    """Token ids from --input-ids or --prompt (with OUT's tokenizer, returned too)."""
    from autotp.errors import AutotpError

    tokenizer = None
    if args.input_ids is not None:
        try:
            ids = [int(t) for t in args.input_ids.split(",") if t.strip()]
        except ValueError:
            raise AutotpError(f"--input-ids must be comma-separated integers, got {args.input_ids!r}") from None
    else:
        tokenizer = _tokenizer(args.out)
        ids = tokenizer(args.prompt)["input_ids"]
    vocab = tp_model.config.get_text_config().vocab_size if hasattr(tp_model, "config") else None
    if not ids or (vocab and any(not 0 <= i < vocab for i in ids)):
        raise AutotpError(f"token ids must be in [0, {vocab}); got {ids[:8]}")
    return ids, tokenizer


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    import autotp
    from autotp.errors import AutotpError

    if args.do_sample and not args.temperature > 0:
        raise AutotpError(f"--temperature must be > 0 to sample, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise AutotpError(f"--top-p must be in (0, 1], got {args.top_p}")
    max_new_tokens = _positive(args.max_new_tokens, "--max-new-tokens")
    tp_model = autotp.load(args.out)
    ids, tokenizer = _prompt_ids(args, tp_model)
    prompt = torch.tensor([ids])
    options = dict(do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
                   pad_token_id=getattr(tp_model.config, "pad_token_id", None) or 0)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    if not args.no_warmup:
        tp_model.generate(prompt, max_new_tokens=2, **options)  # captures (or reads from the cache) the cached-call graphs
    warm = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        out = tp_model.generate(prompt, max_new_tokens=max_new_tokens, **options)
    seconds = time.perf_counter() - start
    new = out[0, len(ids):].tolist()
    if tp_model.rank == 0:
        print(tokenizer.decode(new, skip_special_tokens=True) if tokenizer else ",".join(map(str, new)))
        print(f"{len(new)} new tokens in {seconds:.2f} s: {len(new) / seconds:.1f} tokens/s at tp={tp_model.tp_size}"
              f" ({tp_model.collective_path}, {tp_model.kernels} linears"
              + (")" if args.no_warmup else f"; warm-up: {warm:.1f} s; graphs: {_cache_summary(tp_model)})"),
              file=sys.stderr)
    return 0


def _cache_summary(tp_model: Any) -> str:
    """How each graph came to be: ``2 hit, 1 stored`` (see autotp.cache)."""
    statuses = [tp_model.cache_status, *tp_model.graph_cache.values()]
    kinds = sorted({s.split(":")[0] for s in statuses})
    return ", ".join(f"{sum(s.split(':')[0] == k for s in statuses)} {k}" for k in kinds)


def _tokenizer(directory: str) -> Any:
    from autotp.errors import AutotpError

    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(directory)
    except Exception:
        raise AutotpError(f"{directory} has no usable tokenizer: pass --input-ids instead of --prompt") from None


COMMANDS = {"plan": cmd_plan, "convert": cmd_convert, "verify": cmd_verify, "run": cmd_run, "generate": cmd_generate}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; its exit status."""
    return _run(_parser().parse_args(argv))


# Commands whose process has nothing left to do once they return: no peers, no files open.
# Their entry point skips the interpreter's teardown, which frees the thousands of modules
# torch and transformers imported: ~1.2 s of `autotp plan`'s 9-10 s wall on a Llama-3-70B
# config (the planning itself: ~8 s).
_NOTHING_LEFT_AT_EXIT = frozenset({"plan"})


def entry_point(argv: Optional[Sequence[str]] = None) -> NoReturn:
    """The ``autotp`` command and ``python -m autotp``: :func:`main`, then exit with its status."""
    args = _parser().parse_args(argv)
    code = _run(args)
    if args.command in _NOTHING_LEFT_AT_EXIT:
        _exit_without_teardown(code)
    sys.exit(code)


def _exit_without_teardown(code: int) -> NoReturn:
    """``sys.exit(code)`` less the module teardown: ``atexit`` handlers still run and the
    standard streams are flushed (a closed pipe, as ``| head`` leaves, is not an error)."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _run(args: argparse.Namespace) -> int:
    from autotp.errors import AutotpError

    try:
        return COMMANDS[args.command](args)
    except AutotpError as exc:
        where = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        text = str(exc)
        # bad input is one line; a rank's traceback (a bug, not bad input) is kept whole
        message = text if "Traceback (most recent call last)" in text else " ".join(text.split())
        print(f"{where}autotp: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autotp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`autotp plan ... | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not raise again
        return 0


if __name__ == "__main__":
    entry_point()
