"""autotp's placements against Hugging Face's own hand-written plans, applied by Hugging Face's
code (scripts/hf_plan_compare.py): on a dense family and an MoE family autotp shards every
parameter the hand-written plan shards, on the same dim. The full sweep is the script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_autotp_shards_what_the_hand_written_plans_shard(tmp_path):
    out = tmp_path / "compare.json"
    done = subprocess.run(  # a process of its own: the script sets up a (fake) default process group
        [sys.executable, "scripts/hf_plan_compare.py", "--tp", "2", "--archs", "llama", "qwen3_moe", "gpt2",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["arch"]: r for r in json.loads(out.read_text())}
    assert results["gpt2"].get("no_plan"), "GPT-2 ships no hand-written plan"
    for arch in ("llama", "qwen3_moe"):
        counts = results[arch]["counts"]
        assert counts.get("replicated", 0) == 0 and counts.get("other dim", 0) == 0, results[arch]["differ"]
        # q, k, v, o and the MLP's (or experts') projections of 2 layers, the embedding and the head
        assert counts["same dim"] >= 12, counts
