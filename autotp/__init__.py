"""autotp: automatic tensor parallelism for PyTorch models.

The plan comes from the model's graph: capture (torch.export) -> propagate placements ->
plan regions of column/row-parallel matmuls -> rewrite the graph for one rank -> load that
rank's weights -> pick the CPU GEMM its linears run on. Start with :func:`parallelize` (under
torchrun) or :func:`plan`.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from autotp.capture import CaptureError, capture
from autotp.convert import convert  # the function shadows its module, as autotp.plan does below
from autotp.errors import AutotpError
from autotp.hf import params_on_meta as init_empty_weights
from autotp.placement import Partial, Replicate, Shard
from autotp.plan import Plan
from autotp.module import TensorParallelModule
from autotp.runtime import load, parallelize, plan_model

__all__ = [
    "parallelize",
    "plan",
    "convert",
    "load",
    "init_empty_weights",
    "capture",
    "AutotpError",
    "Plan",
    "TensorParallelModule",
    "CaptureError",
    "Replicate",
    "Shard",
    "Partial",
]

from autotp._version import __version__  # noqa: E402


def plan(model: nn.Module, tp_size: int, example_inputs: Any = None) -> Plan:
    """Plan ``model`` for ``tp_size`` ranks without reading its weights or starting processes.

    Args:
        model: any ``nn.Module``, with real or ``meta`` weights.
        tp_size: number of tensor-parallel ranks.
        example_inputs: as for :func:`parallelize` (``None`` for Hugging Face models).

    Returns:
        A rank-independent :class:`Plan`; ``print(plan.to_table())`` explains every decision.

    Example:
        >>> with torch.device("meta"):                                # doctest: +SKIP
        ...     model = AutoModelForCausalLM.from_config(config).eval()
        >>> print(autotp.plan(model, tp_size=8).to_table())           # doctest: +SKIP
    """
    return plan_model(model, tp_size, example_inputs)
