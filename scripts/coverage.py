"""Coverage of transformers architectures: parity and sharding at each tp, as a markdown table.

    python scripts/coverage.py [--tp 2 4] [--archs llama gpt2 ... | --all] [--out docs/COVERAGE_GLOO.md]
    python scripts/coverage.py --all --simulate --tp 2 4 --out docs/COVERAGE.md
    python scripts/coverage.py --all --simulate --tp 2 4 --results R.jsonl --part 0/2   # and 1/2, at once;
    python scripts/coverage.py --all --simulate --tp 2 4 --results R.jsonl --out F.md   # then the table

With ``--simulate`` each family runs on the in-process simulator (``autotp.simulate``: every
rank's graph in one process, bit for bit what gloo ranks compute at tp 2) in a child process of
its own, limited in time and memory (``--timeout``, ``--memory-gib``): the sweep over every
causal-LM family, some of whose configs build large sub-models. It checks the capture's input
length only, and has no *generate* column.

One group of local ranks per tp checks every architecture in turn: each rank builds the same
seeded model, computes the unsharded output, parallelizes, and compares. Columns: exact
(max abs diff <= 1e-4 x max |reference|), the max diff, the fraction of parameter bytes
sharded, per-rank bytes / (total / tp), all-reduces per decoder layer, and why anything
is replicated; and *generate*: Hugging Face's greedy ``generate()`` (batch 2, left padding, 24 new
tokens, the model's default cache) on the parallelized model against the unsharded model's
tokens: identical, **not identical**, or refused with autotp's reason.
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

from arch_configs import build_and_run, logits_of  # noqa: E402


GENERATE = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0)


def _prompt(config) -> dict:
    """generate()'s inputs: a left-padded batch of 2 (an encoder-decoder's decoder starts at
    token 0 where its config names no start token)."""
    import torch

    ids = torch.randint(3, config.get_text_config().vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    prompt = {"input_ids": ids, "attention_mask": mask}
    if getattr(config, "is_encoder_decoder", False) and getattr(config, "decoder_start_token_id", None) is None:
        prompt["decoder_start_token_id"] = 0
    return prompt


def _generated(model, prompt: dict):
    """Greedy tokens of ``model`` (None: it cannot generate). A model that takes no Hugging
    Face cache (RWKV's own recurrent ``state``) is compared uncached, as autotp generates it."""
    import torch

    from autotp.capture import forward_signature
    from autotp.generation import cache_argument

    if not model.can_generate():
        return None
    uncached = {} if cache_argument(forward_signature(model)) else {"use_cache": False}
    with torch.no_grad():
        return model.generate(**prompt, **GENERATE, **uncached)


def _compare_generation(tp_model, prompt: dict, reference) -> str:
    import torch

    from autotp.errors import AutotpError

    if reference is None:
        return "n/a"
    try:
        with torch.no_grad():
            got = tp_model.generate(**prompt, **GENERATE)
    except AutotpError as exc:
        return f"refused: {str(exc).splitlines()[0][:120]}"
    return "identical" if torch.equal(got, reference) else "**not identical**"


def _summary(arch: str, world: int, model, plan, graph, reference, outputs: list, seconds: float) -> dict:
    """What the matrix reports of one architecture at one tp, from the outputs of its ranks."""
    from autotp.collectives import count_collectives
    from autotp.planner import collapse_layers

    diff = max((got - reference).abs().max().item() for got in outputs)
    scale = reference.abs().max().item()
    per_layer = [v for k, v in plan.all_reduces_per_layer().items() if k != "(outside layers)"]
    reasons = Counter(collapse_layers(f"{r.name}: {r.reason.split(' (at ')[0]}") for r in plan.regions if not r.sharded)
    sharded = sum(p.nbytes for p in plan.sharded_params())
    return dict(
        arch=arch, exact=diff <= 1e-4 * scale, diff=diff, scale=scale,
        sharded_fraction=sharded / max(1, plan.bytes_unsharded()),
        per_rank_ratio=plan.bytes_per_rank() / (plan.bytes_unsharded() / world),
        all_reduces=sorted(set(per_layer)), collectives=count_collectives(graph).get("all_reduce", 0),
        reasons=sorted(reasons), seconds=seconds, params=sum(p.numel() * p.element_size() for p in model.parameters()),
    )


def _described(exc: BaseException) -> str:
    """An exception as a table cell: its type and the first line of its message."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    return f"{type(exc).__name__}: {first}"


def _check(arch: str, rank: int, world: int) -> dict:
    """One rank's view of ``arch`` parallelized over real ranks."""
    import torch

    import autotp

    try:
        model, inputs, reference, how = build_and_run(arch)
    except Exception as exc:  # the family's tiny config does not build or run on CPU: listed with why
        return dict(arch=arch, error=f"cannot build or run unsharded: {_described(exc)}")
    other = {name: ids[:, :6] for name, ids in inputs.items()}  # another length: a second graph if one was specialised
    with torch.no_grad():
        other_reference = logits_of(model(**other))
    prompt = _prompt(model.config)
    try:  # before parallelize, which hands the model object over to the ranks
        generated = _generated(model, prompt)
    except Exception as exc:  # Hugging Face's own generate() fails for this model: nothing to compare
        generated, hf_failure = None, f"n/a (Hugging Face's generate fails: {type(exc).__name__})"
    else:
        hf_failure = None
    start = time.perf_counter()
    with torch.no_grad():
        tp_model = autotp.parallelize(model, inputs)
        seconds = time.perf_counter() - start
        got = logits_of(tp_model(**inputs))
        other_diff = (logits_of(tp_model(**other)) - other_reference).abs().max().item()
    summary = _summary(arch, world, model, tp_model.plan, tp_model.graph_module, reference, [got], seconds)
    summary["config"] = how
    summary["exact"] = summary["exact"] and other_diff <= 1e-4 * other_reference.abs().max().item()
    summary["diff"] = max(summary["diff"], other_diff)
    try:
        summary["generate"] = hf_failure or _compare_generation(tp_model, prompt, generated)
    except Exception as exc:  # reported in the table, not hidden
        summary["generate"] = f"**error**: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
    return summary


def check_simulated(arch: str, world: int) -> dict:
    """``arch`` with every rank simulated in this process (autotp.simulate): what the tests run."""
    model, inputs, reference, how = build_and_run(arch)
    return {**_simulate_built(arch, world, model, inputs, reference), "config": how}


def _simulate_built(arch: str, world: int, model, inputs: dict, reference) -> dict:
    from autotp.simulate import simulate

    start = time.perf_counter()
    sim = simulate(model, inputs, world)
    return _summary(arch, world, model, sim.plan, sim.graphs[0], reference, [logits_of(o) for o in sim.outputs],
                    time.perf_counter() - start)


def _simulated_one(arch: str, world: int) -> dict:
    """``check_simulated`` as a table row's result, with why when the family cannot be checked."""
    try:
        *built, how = build_and_run(arch)
    except Exception as exc:  # the family's tiny config does not build or run on CPU: listed with why
        return dict(arch=arch, error=f"cannot build or run unsharded: {_described(exc)}")
    try:
        return {**_simulate_built(arch, world, *built), "generate": "n/a (simulated)", "config": how}
    except Exception as exc:  # parallelizing or running failed: a row of its own
        return dict(arch=arch, error=_described(exc))


def _simulated(archs: list[str], world: int, timeout: float, memory_gib: float,
               results_file: Optional[Path] = None) -> list[list[dict]]:
    """Each family on the simulator in a child process of its own (results shaped as ranks').
    With ``results_file``, each family's result is appended there as one JSON line as soon as it
    is known, and a family already there is not run again: a long sweep can be resumed, or split
    over processes (``--part``) that share the file."""
    from isolated import run_isolated

    done = _recorded(results_file, world)
    results = []
    for i, arch in enumerate(archs):
        found = done.get(arch)
        if found is None:
            found = run_isolated([sys.executable, __file__, "--one", arch, "--tp", str(world)], timeout, memory_gib)
            found = {"arch": arch, "tp": world, **found}
            if results_file is not None:
                with results_file.open("a") as out:
                    out.write(json.dumps(found) + "\n")
        results.append(found)
        print(f"[{i + 1}/{len(archs)}] {arch} tp={world}: {found.get('error', 'ok')}", file=sys.stderr, flush=True)
    return [results]


def _recorded(results_file: Optional[Path], world: int) -> dict[str, dict]:
    """The results ``results_file`` holds for ``world`` ranks, by family (the last one wins)."""
    if results_file is None or not results_file.exists():
        return {}
    lines = (json.loads(line) for line in results_file.read_text().splitlines() if line.strip())
    return {r["arch"]: r for r in lines if r.get("tp") == world}


def _commit() -> str:
    """``, commit abc1234`` of the checkout the rules come from (nothing outside a git checkout)."""
    import subprocess

    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return f", commit {done.stdout.strip()}" if done.returncode == 0 and done.stdout.strip() else ""


def worker(rank: int, world: int, archs: list[str]) -> list[dict]:
    import traceback

    results = []
    for arch in archs:
        try:
            results.append(_check(arch, rank, world))
        except Exception as exc:  # one architecture failing must not hide the others
            results.append(dict(arch=arch, error=_described(exc), trace=traceback.format_exc()))
    return results


def _row(tp: int, results: list[dict]) -> str:
    r = results[0]
    if "error" in r:
        return f"| {r['arch']} | {tp} | error | | | | | | {r['error']} |"
    diff = max(x.get("diff", float("inf")) for x in results)
    exact = all(x.get("exact") for x in results)
    ar = ", ".join(map(str, r["all_reduces"])) or "0"
    why = "; ".join(r["reasons"]) or ""
    generate = r.get("generate", "") if len({x.get("generate") for x in results}) == 1 else "**ranks differ**"
    made = "" if r.get("config", "small") == "small" else f" ({r['config']})"
    return (f"| {r['arch']}{made} | {tp} | {'yes' if exact else '**no**'} | {generate} | {diff:.1e} | "
            f"{r['sharded_fraction']:.2f} | {r['per_rank_ratio']:.2f} | {ar} | {why} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--archs", nargs="+", help="architectures (default: those of scripts/arch_configs.py)")
    parser.add_argument("--all", action="store_true",
                        help="every model type transformers maps to a causal LM, built from its config class with "
                             "the same small sizes (long: ~10 s per family and tp)")
    parser.add_argument("--out", help="write the markdown here (default: stdout only)")
    parser.add_argument("--traces", action="store_true", help="print tracebacks of failing architectures")
    parser.add_argument("--simulate", action="store_true",
                        help="every rank in one process (autotp.simulate), each family in a child process of its "
                             "own; no generate column")
    parser.add_argument("--timeout", type=float, default=300, help="with --simulate: seconds per family")
    parser.add_argument("--memory-gib", type=float, default=6, help="with --simulate: address space per family")
    parser.add_argument("--results", type=Path,
                        help="with --simulate: a JSON-lines file each family's result is appended to when known; "
                             "families already in it are not run again (resume a sweep, or split it with --part)")
    parser.add_argument("--part", help="with --simulate: K/N runs only every N-th family from the K-th (0-based), "
                                       "to split a sweep over N processes sharing one --results file")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child of --simulate: one family, JSON on stdout
    args = parser.parse_args()
    from arch_configs import ARCHS, causal_lm_types

    from autotp.launch import run_local

    if args.one:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(_simulated_one(args.one, args.tp[0])))
        return
    archs = args.archs or (sorted(set(ARCHS) | set(causal_lm_types())) if args.all else list(ARCHS))
    if args.part:
        if not args.simulate:
            parser.error("--part needs --simulate")
        k, n = (int(x) for x in args.part.split("/"))
        archs = archs[k::n]
    rows, totals = [], Counter()
    for tp in args.tp:
        start = time.perf_counter()
        if args.simulate:
            per_rank = _simulated(archs, tp, args.timeout, args.memory_gib, args.results)
        else:
            per_rank = run_local(worker, tp, archs, timeout=3600)
        print(f"tp={tp}: {len(archs)} architectures in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        for i, arch in enumerate(archs):
            results = [r[i] for r in per_rank]
            rows.append(_row(tp, results))
            ok = "error" not in results[0] and all(x["exact"] for x in results)
            unbuildable = results[0].get("error", "").startswith("cannot build")
            totals[(tp, "exact" if ok else "unbuildable" if unbuildable else "failed")] += 1
            totals[(tp, "ratio")] += results[0].get("per_rank_ratio", 0) if ok else 0
            # the bar: a rank holds <= 0.6 (tp 2) / 0.35 (tp 4) of the unsharded bytes
            bar = {2: 0.6, 4: 0.35}.get(tp, 1.2 / tp)
            totals[(tp, "sharded")] += ok and results[0]["per_rank_ratio"] / tp <= bar
            outcome = results[0].get("generate", "error").split(":")[0].split(" (")[0].strip("*")
            totals[(tp, "generate", outcome)] += 1
            if args.traces and "trace" in results[0]:
                print(results[0]["trace"], file=sys.stderr)
    header = [
        "# Coverage", "",
        f"Generated by `python scripts/coverage.py{' --all' if args.all else ''}{' --simulate' if args.simulate else ''}` "
        f"({time.strftime('%Y-%m-%d')}, torch {__import__('torch').__version__}, "
        f"transformers {__import__('transformers').__version__}, CPU, "
        f"{'every rank simulated in one process (autotp.simulate), each family in a child process' if args.simulate else 'gloo'}"
        f"{_commit()}). "
        "Small seeded configs (`scripts/arch_configs.py`): hidden 64, 2 layers, 4 heads, 2 kv heads where the "
        "config has them, vocab 128; a family whose config refuses those sizes, or whose model does not run at "
        "them, is built from its own defaults with every width divided by one factor (named after it). *exact*: every rank's output within 1e-4 x max |reference| of the unsharded "
        f"model's, for inputs of 9 tokens (the capture's){'' if args.simulate else ' and of 6 (another length)'}. "
        "*sharded*: fraction of parameter bytes that are sharded. *per rank*: a rank's bytes / (total / tp); "
        "1.00 is ideal. *all-reduces*: per decoder layer. "
        + ("*not buildable*: the family's small config does not build or run unsharded (a config problem, not "
           "autotp's). No *generate* column." if args.simulate else
           "*generate*: greedy `generate()`, batch 2 with left "
           "padding, 24 new tokens, the model's default cache (a sliding window of 8 where the config has one; "
           "uncached for a model that keeps its own recurrent state instead of a cache), tokens compared with the "
           "unsharded model's."), "",
    ]
    summary = []
    for tp in args.tp:
        n_ok = totals[(tp, "exact")]
        mean = totals[(tp, "ratio")] / n_ok if n_ok else float("nan")
        built = n_ok + totals[(tp, "failed")]
        summary.append(f"- tp={tp}: {n_ok}/{built} exact ({totals[(tp, 'sharded')]} exact and sharded: a rank holds "
                       f"<= {({2: 0.6, 4: 0.35}.get(tp, 1.2 / tp)):.2f} x the unsharded bytes); "
                       f"{totals[(tp, 'unbuildable')]} not buildable as configured; mean per-rank bytes / (total/tp) "
                       f"over the exact ones: {mean:.2f}")
        outcomes = sorted((key[2], n) for key, n in totals.items() if key[0] == tp and key[1] == "generate")
        if not args.simulate:  # the simulator does not generate
            summary.append(f"- tp={tp} generate: " + ", ".join(f"{n} {outcome}" for outcome, n in outcomes))
    table = ["| architecture | tp | exact | generate | max diff | sharded | per rank | all-reduces | replicated, and why |",
             "|---|---|---|---|---|---|---|---|---|", *rows]
    text = "\n".join(header + summary + [""] + table) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
