"""One job in a child process of its own, limited in time and memory, its result read as JSON.

The sweeps over every transformers family (``coverage.py --all --simulate``,
``hf_plan_compare.py --all``) build each family from its config class at small sizes; a config
whose sub-models keep their default sizes can still build a model of many GiB, or hang. A child
per family keeps one such family from taking the sweep (or the machine) down with it.
"""

from __future__ import annotations

import json
import resource
import subprocess
from typing import Any


def run_isolated(argv: list[str], timeout: float, memory_gib: float) -> dict[str, Any]:
    """Run ``argv``, which prints its result as JSON on its last line of stdout, with at most
    ``memory_gib`` of address space and ``timeout`` seconds; on failure ``{"error": why}``."""

    def limit() -> None:
        cap = int(memory_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired:
        return {"error": f"not done in {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {"error": last[:200]}
    return json.loads(lines[-1])
