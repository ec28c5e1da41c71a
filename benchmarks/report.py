"""Write a benchmark run as JSON, a markdown table and a PNG chart, with ratios computed from
figures of the same run: latency / HF's (lower is better), tokens/s / HF's (higher is
better), speed-up over the unsharded model, and TP scaling: speed-up over the same
implementation at tp 1 on the same kernels (what tensor parallelism itself gives). The kernel
effect, autotp at tp 1 over autotp at tp 1 on PyTorch's own GEMM, is a line of its own."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional

MIB = 2**20


def _ratio(value: Optional[float], base: Optional[float]) -> Optional[float]:
    return value / base if value and base else None


# the figures a speed-up is read from: latencies (lower is better) and a rate
_SPEEDS = {"prefill_b1": "prefill_b1_s", "prefill_b4": "prefill_b4_s", "decode": "decode_tok_s"}


def _speedup(before: Optional[float], after: Optional[float], key: str) -> Optional[float]:
    return _ratio(after, before) if key.endswith("tok_s") else _ratio(before, after)


def enrich(rows: list[dict]) -> list[dict]:
    """Add to every row its figures over HF's (raw ratios), its speed-ups over the unsharded
    model, and its TP scaling (speed-up over its own tp 1 on the same kernels)."""
    by = {r["implementation"]: r for r in rows}
    hf, ref = by.get("hf_tp_plan", {}), by.get("unsharded", {})
    for row in rows:
        if "error" in row:
            continue
        tp1 = by.get(row.get("tp1", ""), {})
        for key, speed in _SPEEDS.items():
            row[key + "_vs_hf"] = _ratio(row.get(speed), hf.get(speed))
            row[key + "_speedup"] = _speedup(ref.get(speed), row.get(speed), speed)
            row[key + "_tp_scaling"] = _speedup(tp1.get(speed), row.get(speed), speed)
        row["ready_vs_hf"] = _ratio(row.get("ready_s"), hf.get("ready_s"))
        row["first_run_vs_hf"] = _ratio(row.get("ready_first_run_s"), hf.get("ready_s"))
    return rows


def kernel_effect(rows: list[dict]) -> Optional[str]:
    """One line: what autotp's kernel choice alone gives at tp 1 (no tensor parallelism)."""
    by = {r["implementation"]: r for r in rows if "error" not in r}
    chosen, stock = by.get("autotp_1_process"), by.get("autotp_1_process_aten")
    if not chosen or not stock:
        return None
    figures = " / ".join(f"{_speedup(stock[k], chosen[k], k):.2f}x" for k in _SPEEDS.values())
    if chosen.get("kernels") == "aten":
        return (f"**Kernel effect**: none; autotp chose PyTorch's GEMM on this machine, so its two tp 1 rows "
                f"run the same kernels and differ by launch-to-launch spread alone ({figures}, prefill 1x128 / "
                f"4x128 / decode).")
    return (f"**Kernel effect** (autotp at tp 1, {chosen.get('kernels')} over aten; prefill 1x128 / 4x128 / "
            f"decode): {figures}. It is not tensor parallelism: the *TP scaling* column leaves it out.")


# figures whose median over rounds is reported, with their range: timings and ratios taken
# within each round (the machine drifts between rounds; a ratio of one round's figures does not)
_TIMED = ("prefill_b1_s", "prefill_b4_s", "decode_tok_s", "ready_first_run_s")
_RATIOS = tuple(f"{k}_{kind}" for kind in ("tp_scaling", "vs_hf", "speedup") for k in _SPEEDS) + ("first_run_vs_hf",)


def merge(rounds: list[list[dict]]) -> list[dict]:
    """One row per implementation: the first round's, with each timing and ratio the median over
    rounds (ratios taken within a round first) and its range as ``<key>_range``."""
    merged = []
    for i, first in enumerate(rounds[0]):
        failed = next((r[i] for r in rounds if "error" in r[i]), None)
        if failed is not None:
            merged.append(failed)
            continue
        row = dict(first)
        for key in _TIMED + _RATIOS:
            values = [r[i][key] for r in rounds if r[i].get(key) is not None]
            if values:
                row[key], row[key + "_range"] = statistics.median(values), [min(values), max(values)]
        merged.append(row)
    return merged


def _spread(row: dict, key: str, pattern: str, scale: float = 1.0) -> str:
    low, high = row.get(key + "_range", (None, None))
    return f"{pattern.format(low * scale)}-{pattern.format(high * scale)}" if low is not None else "-"


def spread_table(rows: list[dict], rounds: int) -> list[str]:
    """The range over rounds of each timed figure and TP scaling (a row per implementation)."""
    lines = [f"Range over {rounds} rounds (each round launches every implementation once, in turn):", "",
             "| implementation | prefill 1x128 (ms) | prefill 4x128 (ms) | decode (tok/s) | TP scaling 1x128 "
             "| TP scaling 4x128 | TP scaling decode | x HF 1x128 | x HF 4x128 | first run (s) | first run x HF ready |",
             "|---" * 11 + "|"]
    for r in rows:
        if "error" in r:
            continue
        lines.append(f"| {r['implementation']} | {_spread(r, 'prefill_b1_s', '{:.0f}', 1e3)} "
                     f"| {_spread(r, 'prefill_b4_s', '{:.0f}', 1e3)} | {_spread(r, 'decode_tok_s', '{:.1f}')} "
                     + "".join(f"| {_spread(r, k + '_tp_scaling', '{:.2f}')} " for k in _SPEEDS)
                     + f"| {_spread(r, 'prefill_b1_vs_hf', '{:.2f}')} | {_spread(r, 'prefill_b4_vs_hf', '{:.2f}')} "
                     f"| {_spread(r, 'ready_first_run_s', '{:.2f}')} | {_spread(r, 'first_run_vs_hf', '{:.2f}')} |")
    return lines


def _fmt(value: Optional[float], pattern: str) -> str:
    return pattern.format(value) if value is not None else "-"


_HEADER = ("| implementation | collectives | GEMM | ready (s) | first run (s) | peak RSS/rank at load / whole run (MiB) "
           "| params/rank (MiB) | KV/rank (MiB) | prefill 1x128 (ms) | x HF | speed-up | prefill 4x128 (ms) | x HF "
           "| speed-up | decode (tok/s) | x HF | speed-up | TP scaling 1x128 / 4x128 / decode | collectives/forward "
           "| MiB moved |")
_COLUMNS = _HEADER.count("|") - 1


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# {meta['model']} ({meta['params'] / 1e6:.0f}M parameters), tp={meta['tp']}",
        "",
        f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, fp32. Prefill: median of {meta['repeats']} "
        f"forwards after warm-up; decode: median of {meta.get('decode_repeats', 1)} generations of 64 tokens; "
        f"each the median over {meta.get('rounds', 1)} round(s) of launches. "
        "*x HF*: this figure / Hugging Face `tp_plan` figure from the same run "
        "(latency: lower is better; tokens/s: higher is better). *speed-up*: over the unsharded model "
        "(one process, one thread), same run.",
        "",
        f"*ready*: seconds from nothing imported but transformers to a model ready to call, on its slowest "
        f"rank (median of {meta.get('ready_launches', 1)} launches); *first run*: the same "
        "for autotp with an empty graph cache (a launch of its own, one per round; over HF's *ready* in "
        "the spread table). *GEMM*: what runs the linear layers: "
        "`aten` is PyTorch's default (MKL on CPU); `onednn` is oneDNN's GEMM on the same dense weights, which "
        "autotp picks when a probe measures it at least 1.2x faster (`autotp.kernels`; made once for the run: "
        f"probe {meta.get('kernel_probe', 0):.2f}x, so `{meta.get('auto_kernels', 'aten')}`); the `_aten` rows are autotp on "
        "PyTorch's GEMM, as every peer runs. `autotp_1_process` is autotp at tp 1. *TP scaling*: speed-up "
        "over the same implementation at tp 1 on the same kernels (`tp1` in the JSON): the unsharded model "
        "for the peers, autotp at tp 1 for autotp.",
        "",
        *([line, ""] if (line := kernel_effect(rows)) else []),
        _HEADER,
        "|---" * _COLUMNS + "|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['implementation']} | {r['error']} |" + " |" * (_COLUMNS - 2))
            continue
        lines.append(
            f"| {r['implementation']} | {r['collective_path']} | {r.get('kernels', 'aten')} | {r['ready_s']:.1f} | {_fmt(r.get('ready_first_run_s'), '{:.1f}')} "
            f"| {r['peak_rss_mib']:.0f} / {r.get('peak_rss_run_mib', 0):.0f} "
            f"| {r['param_bytes'] / MIB:.0f} | {r['kv_bytes'] / MIB:.1f} "
            f"| {r['prefill_b1_s'] * 1e3:.0f} | {_fmt(r['prefill_b1_vs_hf'], '{:.2f}')} | {_fmt(r['prefill_b1_speedup'], '{:.2f}x')} "
            f"| {r['prefill_b4_s'] * 1e3:.0f} | {_fmt(r['prefill_b4_vs_hf'], '{:.2f}')} | {_fmt(r['prefill_b4_speedup'], '{:.2f}x')} "
            f"| {r['decode_tok_s']:.1f} | {_fmt(r['decode_vs_hf'], '{:.2f}')} | {_fmt(r['decode_speedup'], '{:.2f}x')} "
            f"| {' / '.join(_fmt(r.get(k + '_tp_scaling'), '{:.2f}') for k in _SPEEDS)} "
            f"| {r['collectives']} | {r['collective_bytes'] / MIB:.1f} |"
        )
    if meta.get("rounds", 1) > 1:
        lines += ["", *spread_table(rows, meta["rounds"])]
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # tp 1 rows (unsharded, autotp in one process) scale by 1 by definition
    ok = [r for r in rows if "error" not in r and r.get("tp1") != r["implementation"]]
    names = [r["implementation"] for r in ok]
    metrics = [(k + "_tp_scaling", label) for k, label in zip(_SPEEDS, ("prefill 1x128", "prefill 4x128", "decode"))]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(metrics)
    for i, (key, label) in enumerate(metrics):
        speed.bar([x + i * width for x in range(len(ok))], [r.get(key) or 0 for r in ok], width, label=label)
    speed.axhline(1.0, color="grey", linewidth=0.8)
    speed.axhline(meta["tp"], color="grey", linewidth=0.8, linestyle="--")
    speed.set_xticks([x + width for x in range(len(ok))], names, rotation=20, ha="right")
    speed.set_ylabel("TP scaling: speed-up over own tp 1, same kernels")
    speed.set_title(f"{meta['model']}, tp={meta['tp']} (dashed: ideal)")
    speed.legend()
    memory.bar(names, [r["param_bytes"] / MIB for r in ok], color="tab:gray")
    memory.set_ylabel("parameter MiB per rank")
    memory.tick_params(axis="x", rotation=20)
    for label in memory.get_xticklabels():
        label.set_ha("right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(rounds: list[list[dict]], meta: dict, folder: Path) -> list[Path]:
    """``rounds``: each round's rows, one per implementation in the same order."""
    folder.mkdir(parents=True, exist_ok=True)
    rounds = [enrich(rows) for rows in rounds]
    rows = merge(rounds)
    stem = folder / f"{meta['model']}-tp{meta['tp']}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps({"meta": meta, "results": rows, "rounds": rounds}, indent=1))
    paths[1].write_text(markdown(rows, meta))
    try:
        chart(rows, meta, stem.with_suffix(".png"))
        paths.append(stem.with_suffix(".png"))
    except ImportError:  # matplotlib is in the bench extra only
        pass
    return paths
