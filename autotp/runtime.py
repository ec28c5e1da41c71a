"""Runtime: the process group from the torchrun environment, and :func:`parallelize`.

``parallelize`` is the whole pipeline for one rank: capture (fake weights) -> plan (same on
every rank, checked) -> rewrite for this rank -> load this rank's tensors from the model ->
release the model's full copies of sharded tensors. It returns a
:class:`TensorParallelModule`: an ``nn.Module`` called like the original model that returns
the original output type.

Only this module, :mod:`autotp.rewrite` and :mod:`autotp.loading` know the rank.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn

from autotp import hf
from autotp.capture import bind_inputs, capture, model_device, structure_key
from autotp.errors import AutotpError
from autotp.loading import (
    CheckpointSource,
    FirstOf,
    ModuleSource,
    SafetensorsCheckpoint,
    ShardFileSource,
    aliases,
    check_checkpoint,
    load_into,
    named_tensors,
)
from autotp.placement import Placement
from autotp.plan import Plan
from autotp.planner import plan_graph
from autotp.rewrite import rewrite

__all__ = ["parallelize", "load", "TensorParallelModule", "TPContext", "init_tp", "plan_model"]

DEFAULT_TIMEOUT_S = float(os.environ.get("AUTOTP_TIMEOUT", "300"))


@dataclass
class TPContext:
    """Where this process sits in the tensor-parallel group."""

    rank: int
    tp_size: int
    group: Optional[dist.ProcessGroup]
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.tp_size > 1


def _default_device(model: Optional[nn.Module]) -> torch.device:
    device = model_device(model) if model is not None else torch.device("cpu")
    if device.type == "cpu" and model is not None and all(
        t.device.type == "meta" for t in list(model.parameters())[:1]
    ) and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_tp(tp_size: Optional[int] = None, device: Optional[torch.device] = None) -> TPContext:
    """Join (or start) the process group that torchrun describes in the environment.

    Without torchrun (no ``WORLD_SIZE``) and no process group, this is a group of one.
    gloo is used on CPU, nccl on CUDA. ``tp_size`` defaults to the world size; a smaller one
    must divide it, and consecutive ranks form each tensor-parallel group.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT_S))
    world = dist.get_world_size() if dist.is_initialized() else 1
    tp = world if tp_size is None else int(tp_size)
    if tp < 1 or world % tp:
        raise ValueError(f"tp_size={tp} must be >= 1 and divide the world size {world}")
    if tp == world:
        rank = dist.get_rank() if dist.is_initialized() else 0
        return TPContext(rank, tp, None, device)
    group, _ = dist.new_subgroups(group_size=tp)
    return TPContext(dist.get_rank(group), tp, group, device)


def plan_model(model: nn.Module, tp_size: int, example_inputs: Any = None) -> Plan:
    """Capture ``model`` (no weights read) and plan it for ``tp_size`` ranks."""
    captured = capture(model, example_inputs)
    return plan_graph(captured.graph, tp_size, model=_model_label(model), inputs=captured.input_names)


def _model_label(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None) if hf.is_hf_model(model) else None
    return f"{type(model).__name__} ({kind})" if kind else type(model).__name__


def _placements(plan: Plan) -> dict[str, Placement]:
    return {name: spec.placement for name, spec in plan.params.items()}


def _check_same_plan(plan: Plan, ctx: TPContext) -> None:
    """Every rank plans on its own; a disagreement would compute garbage, so fail loudly."""
    if not ctx.distributed:
        return
    digest = hashlib.sha256(plan.to_json(indent=None).encode()).hexdigest()
    digests: list[Any] = [None] * ctx.tp_size
    dist.all_gather_object(digests, digest, group=ctx.group)
    if len(set(digests)) != 1:
        raise RuntimeError(f"autotp: ranks computed different plans ({sorted(set(digests))}); "
                           "every rank must build the same model and call with the same inputs")


class _LocalSource:
    """Tensors already local to this rank, from another graph of the same model."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.tensors = dict(gm.named_parameters(remove_duplicate=False)) | dict(gm.named_buffers(remove_duplicate=False))

    def read(self, name: str, placement: Placement, rank: int, world_size: int) -> torch.Tensor:
        return self.tensors[name]


class TensorParallelModule(nn.Module):
    """This rank's part of a tensor-parallel model. Call it like the original model.

    Attributes:
        graph_module: the rewritten graph for the inputs given to :func:`parallelize`.
        plan: the plan it carries out (the same on every rank).
        rank, tp_size: this rank and the size of its tensor-parallel group.
        timings: seconds per stage of :func:`parallelize` (capture, plan, rewrite, load).
    """

    def __init__(self, gm: fx.GraphModule, plan: Plan, ctx: TPContext, source: nn.Module, key: tuple) -> None:
        super().__init__()
        self.graph_module = gm
        self.plan = plan
        self.rank, self.tp_size = ctx.rank, ctx.tp_size
        self.timings: dict[str, float] = {}
        # Not submodules: the source's sharded tensors are on meta now; it serves only as the
        # skeleton for capturing another input structure.
        self.__dict__["_ctx"] = ctx
        self.__dict__["_source"] = source
        self.__dict__["_graphs"] = {key: gm}
        if hf.is_hf_model(source):
            self.__dict__["config"] = source.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        inputs = bind_inputs(self._source, args, kwargs)
        key = structure_key(inputs)
        gm = self._graphs.get(key)
        if gm is None:
            gm = self._graph_for(key, inputs)
        return gm(**inputs)

    def _graph_for(self, key: tuple, inputs: dict[str, Any]) -> fx.GraphModule:
        """A call with other arguments than the capture's: capture and plan again (all ranks do)."""
        captured = capture(self._source, inputs, device=self._ctx.device, bump_unit_dims=True)
        plan = plan_graph(captured.graph, self.tp_size, model=self.plan.model, inputs=captured.input_names)
        if _placements(plan) != _placements(self.plan):
            raise RuntimeError(
                f"autotp: a call with arguments {captured.input_names} plans the parameters differently "
                f"from the capture with {self.plan.inputs}; parallelize with example_inputs like this call"
            )
        _check_same_plan(plan, self._ctx)
        gm = rewrite(captured.graph_module, plan, self.rank, group=self._ctx.group)
        load_into(gm, plan, self.rank, _LocalSource(self.graph_module))
        self._graphs[key] = gm
        return gm

    def local_bytes(self) -> int:
        """Bytes of the parameters and buffers this rank holds (each storage counted once)."""
        seen, total = set(), 0
        for t in list(self.graph_module.parameters()) + list(self.graph_module.buffers()):
            key = (t.untyped_storage().data_ptr(), t.device)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total

    def extra_repr(self) -> str:
        return f"model={self.plan.model}, rank={self.rank}, tp_size={self.tp_size}"


def _agree(ctx: TPContext, fn: Callable[[], Any]) -> Any:
    """Run a check on every rank; if any rank fails it, every rank raises (naming the failed
    ranks) instead of the healthy ones waiting in the next collective."""
    error, value = None, None
    try:
        value = fn()
    except AutotpError as exc:
        error = str(exc)
    errors: list[Any] = [error]
    if ctx.distributed:
        errors = [None] * ctx.tp_size
        dist.all_gather_object(errors, error, group=ctx.group)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        raise AutotpError("; ".join(f"rank {r}: {e}" for r, e in failed) if ctx.distributed else failed[0][1])
    return value


def _build(
    model: nn.Module, example_inputs: Any, ctx: TPContext, source: Any, clock: "_Stopwatch",
    *, expected: Optional[Plan] = None, gather_outputs: bool = True,
) -> TensorParallelModule:
    """The pipeline for this rank: capture -> plan (checked) -> rewrite -> load."""
    captured = clock.lap("capture", capture(model, example_inputs, device=ctx.device))
    plan = plan_graph(captured.graph, ctx.tp_size, model=_model_label(model), inputs=captured.input_names,
                      gather_outputs=gather_outputs)
    if expected is not None and _placements(plan) != _placements(expected):
        differ = sorted(n for n in plan.params if str(plan.params[n].placement) != str(getattr(expected.params.get(n), "placement", None)))
        raise AutotpError(f"the stored plan differs from this autotp's plan for {differ[:3]}: convert the model again")
    _check_same_plan(plan, ctx)
    clock.lap("plan")
    gm = clock.lap("rewrite", rewrite(captured.graph_module, plan, ctx.rank, group=ctx.group))
    _agree(ctx, lambda: load_into(gm, plan, ctx.rank, source))
    clock.lap("load")
    tp_model = TensorParallelModule(gm, plan, ctx, model, captured.key)
    tp_model.timings = clock.laps
    return tp_model


def parallelize(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    tp_size: Optional[int] = None,
    device: Optional[torch.device | str] = None,
    checkpoint: Optional[str | os.PathLike] = None,
    gather_outputs: bool = True,
) -> TensorParallelModule:
    """Shard ``model`` over the tensor-parallel group and return this rank's part.

    Call it on every rank (under ``torchrun``) with the same model and inputs. The process
    group is initialised from the environment when needed (gloo on CPU, nccl on CUDA). The
    plan comes from the model's graph: no per-model code, and a layer it cannot shard exactly
    is replicated.

    Args:
        model: an ``nn.Module`` (a Hugging Face model or any other module), with its weights,
            or with parameters on ``meta`` and ``checkpoint`` given. Its sharded weights are
            moved to ``meta`` afterwards, so every rank keeps only its slices; use the
            returned module from then on.
        example_inputs: a tensor, a tuple of arguments or a dict of keyword arguments like the
            calls to come. ``None`` synthesises token ids for a Hugging Face model. Only shapes
            and dtypes are used; batch and sequence sizes stay dynamic.
        tp_size: ranks per tensor-parallel group (default: the world size).
        device: where this rank's shards live and run (default: where the model is).
        checkpoint: a Hugging Face model directory whose ``*.safetensors`` hold the weights;
            each rank reads only its slices of them. Build the model with
            ``autotp.init_empty_weights()`` so that nothing else is allocated.
        gather_outputs: all-gather outputs that come out sharded (the logits of a
            column-parallel LM head), so every rank returns the full output. ``False``
            leaves them sharded: rank r returns its slice (``tp_model.plan.sharded_outputs``
            says which), and saves the gather.

    Returns:
        A :class:`TensorParallelModule`; ``out = tp_model(input_ids)`` returns what the model
        returns (``out.logits`` for a causal LM), the same on every rank.

    Raises:
        ValueError: ``tp_size`` does not divide the world size, or inputs cannot be synthesised.
        autotp.errors.AutotpError: the model cannot be captured, or the checkpoint does not
            match it.

    Example:
        >>> # torchrun --nproc-per-node 2 script.py
        >>> model = AutoModelForCausalLM.from_config(config)          # doctest: +SKIP
        >>> tp_model = autotp.parallelize(model)                      # doctest: +SKIP
        >>> logits = tp_model(input_ids).logits                       # doctest: +SKIP
    """
    clock = _Stopwatch()
    device = torch.device(device) if device is not None else _default_device(model)
    ctx = init_tp(tp_size, device)
    moved = device != model_device(model)
    in_memory = ModuleSource(model, device if moved else None)
    source: Any = in_memory
    if checkpoint is not None:
        files = SafetensorsCheckpoint(checkpoint)
        check_checkpoint(files, model)
        source = FirstOf(CheckpointSource(files, aliases(model)), in_memory)
    tp_model = _build(model, example_inputs, ctx, source, clock, gather_outputs=gather_outputs)
    # the model keeps no full copy of what this rank holds a slice of (or a copy of, on another device)
    in_memory.release(list(named_tensors(model)) if moved else [s.name for s in tp_model.plan.sharded_params()])
    return tp_model


def load(directory: str | os.PathLike, *, device: Optional[torch.device | str] = None, checksum: bool = True) -> TensorParallelModule:
    """This rank's model from a directory written by :func:`autotp.convert`.

    Call it on every rank under ``torchrun --nproc-per-node N`` with N the converted tp size.
    The model is built with its parameters on ``meta`` and filled from this rank's file only.

    Args:
        directory: the output of ``autotp convert``.
        device: where this rank's shards live and run (default: CPU, or this rank's GPU when
            CUDA is available).
        checksum: verify this rank's file against the sha256 in ``autotp.json``.

    Raises:
        autotp.errors.AutotpError: the directory is not a converted model, the world size
            differs from the converted tp size, or a rank's file is missing or corrupt.

    Example:
        >>> # torchrun --nproc-per-node 2 script.py
        >>> tp_model = autotp.load("llama-tp2")                      # doctest: +SKIP
    """
    from autotp.convert import read_manifest, verify_rank_file
    from autotp.source import resolve_model

    clock = _Stopwatch()
    manifest = read_manifest(directory)
    if device is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")
    ctx = init_tp(None, torch.device(device))
    if ctx.tp_size != manifest["tp_size"]:
        raise AutotpError(f"{directory} was converted for tp={manifest['tp_size']}, but the world size is "
                          f"{ctx.tp_size}: start it with torchrun --nproc-per-node {manifest['tp_size']}")
    path = _agree(ctx, lambda: verify_rank_file(directory, manifest, ctx.rank, checksum=checksum))
    model, _ = resolve_model(str(directory)).build("empty")
    source = FirstOf(ShardFileSource(path), ModuleSource(model, torch.device(device)))
    return _build(model, None, ctx, source, clock, expected=Plan.from_dict(manifest["plan"]))


class _Stopwatch:
    """Seconds spent per stage, kept on the returned module as ``timings``."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str, value: Any = None) -> Any:
        now = time.perf_counter()
        self.laps[name] = now - self._last
        self._last = now
        return value
