"""Capture every causal-LM family with fake tensors' dispatch cache on and off: the graphs must
be the same, node for node (``autotp.export_settings.no_fake_dispatch_cache`` turns it off).

Compares each node's op, target, arguments, module stack and output metadata (shape, dtype,
strides), with node names and the text of runtime assertions left out (they name nodes), and
the capture's input guards. Prints one line per family and a summary; CPU seconds per capture
both ways. Exit status 1 if any graph differs.

    python scripts/capture_cache_check.py [--archs llama bamba ...]
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from torch.utils import _pytree as pytree

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arch_configs import ARCHS, build_and_run, causal_lm_types  # noqa: E402

from autotp.capture import capture  # noqa: E402
from autotp.layer_trace import graph_signature  # noqa: E402


def _meta(value: object) -> str:
    return str(pytree.tree_map(lambda v: (tuple(map(str, v.shape)), str(v.dtype), tuple(map(str, v.stride())))
                               if isinstance(v, torch.Tensor) else v, value))


def signature(gm: torch.fx.GraphModule) -> list[tuple]:
    rows = []
    for row, node in zip(graph_signature(gm.graph), gm.graph.nodes):
        if node.target is torch.ops.aten._assert_scalar.default:
            row = row[:2] + (re.sub(r"on node '[^']*'", "on node", row[2]),) + row[3:]  # its message names a node
        rows.append((*row, _meta(node.meta.get("val"))))
    return rows


def captured(model: torch.nn.Module, inputs: dict, cache: bool) -> tuple[float, list[tuple], list[str]]:
    """CPU seconds, graph signature and input guards of one capture, the cache on or off."""
    switch = functools.partial(torch._dynamo.config.patch, fake_tensor_cache_enabled=cache)
    with mock.patch("autotp.capture.no_fake_dispatch_cache", switch), torch.no_grad():
        start = time.process_time()
        result = capture(model, inputs)
        seconds = time.process_time() - start
    return seconds, signature(result.graph_module), list(result.guards[0]) if result.guards else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="*", help="families (default: every causal-LM type and the matrix's)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    archs = args.archs or sorted(set(ARCHS) | set(causal_lm_types()))
    same = differ = skipped = 0
    on_total = off_total = 0.0
    for arch in archs:
        try:
            model, inputs, _, _ = build_and_run(arch)
            on, graph_on, guards_on = captured(model, inputs, cache=True)
            off, graph_off, guards_off = captured(model, inputs, cache=False)
        except Exception as exc:  # a family that does not build or capture here: listed, not compared
            skipped += 1
            print(f"{arch}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''})")
            continue
        on_total, off_total = on_total + on, off_total + off
        if graph_on == graph_off:
            same += 1
            extra = len(set(guards_on) - set(guards_off))
            print(f"{arch}: same graph, CPU {on:.2f} s with the cache, {off:.2f} s without; guards "
                  f"{len(guards_on)} / {len(guards_off)}" + (f" ({extra} only with the cache)" if extra else ""))
        else:
            differ += 1
            first = next(i for i, (a, b) in enumerate(zip(graph_on, graph_off)) if a != b) \
                if len(graph_on) == len(graph_off) else min(len(graph_on), len(graph_off))
            print(f"{arch}: GRAPH DIFFERS at node {first}")
    print(f"{same} same, {differ} differ, {skipped} skipped; CPU {on_total:.1f} s with the cache, "
          f"{off_total:.1f} s without")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
