"""Write a benchmark run as JSON, a markdown table and a PNG chart, with ratios computed from
figures of the same run: latency / HF's (lower is better), tokens/s / HF's (higher is
better), and speed-up over the unsharded model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

MIB = 2**20


def _ratio(value: Optional[float], base: Optional[float]) -> Optional[float]:
    return value / base if value and base else None


def enrich(rows: list[dict]) -> list[dict]:
    """Add ratios to HF and speed-ups over unsharded to every row."""
    by = {r["implementation"]: r for r in rows}
    hf, ref = by.get("hf_tp_plan", {}), by.get("unsharded", {})
    for row in rows:
        if "error" in row:
            continue
        for key in ("prefill_b1_s", "prefill_b4_s"):
            row[key.replace("_s", "_vs_hf")] = _ratio(row.get(key), hf.get(key))
            row[key.replace("_s", "_speedup")] = _ratio(ref.get(key), row.get(key))
        row["decode_vs_hf"] = _ratio(row.get("decode_tok_s"), hf.get("decode_tok_s"))
        row["decode_speedup"] = _ratio(row.get("decode_tok_s"), ref.get("decode_tok_s"))
        row["ready_vs_hf"] = _ratio(row.get("ready_s"), hf.get("ready_s"))
    return rows


def _fmt(value: Optional[float], pattern: str) -> str:
    return pattern.format(value) if value is not None else "-"


_HEADER = ("| implementation | collectives | GEMM | ready (s) | first run (s) | peak RSS/rank at load / whole run (MiB) "
           "| params/rank (MiB) | KV/rank (MiB) | prefill 1x128 (ms) | x HF | speed-up | prefill 4x128 (ms) | x HF "
           "| speed-up | decode (tok/s) | x HF | speed-up | collectives/forward | MiB moved |")
_COLUMNS = _HEADER.count("|") - 1


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"# {meta['model']} ({meta['params'] / 1e6:.0f}M parameters), tp={meta['tp']}",
        "",
        f"{meta['date']}, {meta['machine']}, torch {meta['torch']}, fp32. Prefill: median of {meta['repeats']} "
        f"forwards after warm-up; decode: median of {meta.get('decode_repeats', 1)} generations of 64 tokens. "
        "*x HF*: this figure / Hugging Face `tp_plan` figure from the same run "
        "(latency: lower is better; tokens/s: higher is better). *speed-up*: over the unsharded model "
        "(one process, one thread), same run.",
        "",
        f"*ready*: seconds from nothing imported but transformers to a model ready to call, on its slowest "
        f"rank (median of {meta.get('ready_launches', 1)} launches); *first run*: the same "
        "for autotp with an empty graph cache (a launch of its own). *GEMM*: what runs the linear layers: "
        "`aten` is PyTorch's default (MKL on CPU); `onednn` is oneDNN's GEMM on the same dense weights, which "
        "autotp picks when a probe measures it faster (`autotp.kernels`). `autotp_1_process` is autotp at "
        "tp 1: its speed-up is the kernels' alone.",
        "",
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
            f"| {r['collectives']} | {r['collective_bytes'] / MIB:.1f} |"
        )
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], meta: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "error" not in r and r["implementation"] != "unsharded"]
    names = [r["implementation"] for r in ok]
    metrics = [("prefill_b1_speedup", "prefill 1x128"), ("prefill_b4_speedup", "prefill 4x128"), ("decode_speedup", "decode")]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / len(metrics)
    for i, (key, label) in enumerate(metrics):
        speed.bar([x + i * width for x in range(len(ok))], [r.get(key) or 0 for r in ok], width, label=label)
    speed.axhline(1.0, color="grey", linewidth=0.8)
    speed.axhline(meta["tp"], color="grey", linewidth=0.8, linestyle="--")
    speed.set_xticks([x + width for x in range(len(ok))], names, rotation=20, ha="right")
    speed.set_ylabel("speed-up over unsharded")
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


def write_reports(rows: list[dict], meta: dict, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = enrich(rows)
    stem = folder / f"{meta['model']}-tp{meta['tp']}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    paths[1].write_text(markdown(rows, meta))
    try:
        chart(rows, meta, stem.with_suffix(".png"))
        paths.append(stem.with_suffix(".png"))
    except ImportError:  # matplotlib is in the bench extra only
        pass
    return paths
