"""Runtime: the pipeline for one rank, :func:`parallelize` and :func:`load`.

``parallelize`` runs capture (fake weights) -> plan (the same on every rank, checked) ->
rewrite for this rank -> load this rank's tensors (from the model, or slice by slice from a
checkpoint) -> hand the model object over (its full copies of sharded tensors are dropped and
its calls route to the result). ``load`` does the same from a converted directory, reading
only this rank's file. Both return a :class:`~autotp.module.TensorParallelModule`.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from typing import Any, Optional

import torch
import torch.nn as nn

from autotp import cache as graph_cache
from autotp import hf
from autotp.call_checks import draws_random_numbers
from autotp.capture import capture, forward_signature, is_routed, model_device, normalise_example_inputs, structure_key
from autotp.errors import AutotpError, InputError
from autotp.group import TPContext, agree, check_same_plan, init_tp
from autotp.kernels import kernel_pass
from autotp.loading import FirstOf, ModuleSource, ShardFileSource, checkpoint_source, load_into, named_tensors
from autotp.module import TensorParallelModule, placements
from autotp.plan import Plan
from autotp.planner import plan_graph
from autotp.rewrite import rewrite

__all__ = ["parallelize", "load", "plan_model"]


def _rank_device() -> torch.device:
    """This rank's GPU under torchrun when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _default_device(model: nn.Module) -> torch.device:
    """Where the model's weights are; for a model with no data yet (on meta), the rank's device."""
    has_data = any(t.device.type != "meta" for t in model.parameters())
    return model_device(model) if has_data else _rank_device()


def plan_model(model: nn.Module, tp_size: int, example_inputs: Any = None) -> Plan:
    """Capture ``model`` (no weights read) and plan it for ``tp_size`` ranks."""
    _refuse_handed_over(model)
    captured = capture(model, example_inputs)
    return plan_graph(captured.graph, tp_size, model=_model_label(model), inputs=captured.input_names)


def _model_label(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None) if hf.is_hf_model(model) else None
    return f"{type(model).__name__} ({kind})" if kind else type(model).__name__


def _build(
    model: nn.Module, example_inputs: Any, ctx: TPContext, source: Any, clock: "_Stopwatch",
    *, expected: Optional[Plan] = None, gather_outputs: bool = True, cache: bool = True,
) -> TensorParallelModule:
    """The pipeline for this rank: capture -> plan (checked) -> rewrite, or all three from the
    graph cache -> load."""
    inputs = normalise_example_inputs(model, example_inputs)
    slot = graph_cache.slot(cache, model, inputs, graph="call", tp_size=ctx.tp_size, rank=ctx.rank,
                            device=str(ctx.device), gather_outputs=gather_outputs)
    hit = clock.lap("cache", slot.get(ctx.comm))
    if hit is None:
        captured = clock.lap("capture", capture(model, inputs, device=ctx.device))
        plan = plan_graph(captured.graph, ctx.tp_size, model=_model_label(model), inputs=captured.input_names,
                          gather_outputs=gather_outputs)
    else:
        plan = hit.plan
    if expected is not None and placements(plan) != placements(expected):
        ours, stored = placements(plan), placements(expected)
        differ = sorted(n for n in ours.keys() | stored.keys() if ours.get(n) != stored.get(n))
        raise AutotpError(f"the stored plan differs from this autotp's plan for {differ[:3]}: convert the model again")
    check_same_plan(plan, ctx)
    clock.lap("plan")
    if hit is None:
        gm = clock.lap("rewrite", rewrite(captured.graph_module, plan, ctx.rank, comm=ctx.comm))
        slot.put(gm, plan, captured.guards)
    else:
        gm = hit.graph_module
    agree(ctx, lambda: load_into(gm, plan, ctx.rank, source, then=kernel_pass(ctx.kernels)))
    clock.lap("load")
    tp_model = TensorParallelModule(gm, plan, ctx, model, structure_key(inputs), cache=cache,
                                    gather_outputs=gather_outputs)
    tp_model.timings = clock.laps
    tp_model.cache_status = slot.status
    return tp_model


def _hand_over(model: nn.Module, tp_model: TensorParallelModule, names: list[str]) -> None:
    """The model object keeps no full copy of what this rank holds a piece of: its tensors
    become this rank's (so ``model.device`` and ``model.generate`` still work), and its calls
    route to ``tp_model``, so using the original object computes correctly too. So do the calls
    of every submodule that holds a piece (``model.get_input_embeddings()(ids)``, the encoder an
    encoder-decoder's ``generate()`` calls): a piece is never used as if it were whole."""
    ModuleSource(model).release(names, named_tensors(tp_model.graph_module))
    _route(model, lambda *args, **kwargs: tp_model(*args, **kwargs))
    for path in _holding_pieces(model, tp_model.plan):
        _route(model.get_submodule(path), functools.partial(tp_model.call_submodule, path))
    tp_model.remember_model_state()  # as handed over: a later change of it is refused (autotp.call_checks)


def _route(module: nn.Module, call: Any) -> None:
    module.__dict__["forward"] = _Routing(module, call)


class _Routing:
    """A handed-over module's ``forward``: its calls go to the tensor-parallel graphs. A deep
    copy of the module is refused: the copy would hold this rank's pieces and route its calls
    to the original's graphs, so that a change made to it was ignored (found by an adversarial
    review: 1.5 off). autotp's own copies for capture take the routings off first."""

    _autotp_routing = True  # how autotp.capture.is_routed tells it (copies for capture leave it out)

    def __init__(self, module: nn.Module, call: Any) -> None:
        self.call, self.name = call, type(module).__name__
        # generate() inspects forward's parameters (to pass position_ids, ...): show the module's own
        self.__signature__ = forward_signature(module)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.call(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> "_Routing":
        raise AutotpError(f"a model handed over to autotp.parallelize cannot be copied (its {self.name} holds this "
                          "rank's pieces, and its calls run the tensor-parallel graphs): copy it before parallelize")


def _refuse_handed_over(model: nn.Module) -> None:
    """A model that :func:`parallelize` already took over holds this rank's pieces: planned
    again, they would be split again (0.51 off, found by an adversarial review)."""
    if any(is_routed(m) for m in model.modules()):
        raise InputError(f"{type(model).__name__} was already handed over to autotp.parallelize (it holds this "
                         "rank's pieces, and its calls run the tensor-parallel graphs): build or load the model "
                         "again to parallelize it anew")


def _holding_pieces(model: nn.Module, plan: Plan) -> list[str]:
    """Paths of the submodules (with a forward of their own) that hold a sharded tensor."""
    tensors = named_tensors(model)
    sharded = {id(tensors[s.name]) for s in plan.sharded_params() if s.name in tensors}
    paths = set()
    for name, t in tensors.items():
        if id(t) in sharded:
            parts = name.split(".")[:-1]
            paths.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return sorted(p for p in paths if type(model.get_submodule(p)).forward is not nn.Module.forward)


def parallelize(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    tp_size: Optional[int] = None,
    device: Optional[torch.device | str] = None,
    checkpoint: Optional[str | os.PathLike] = None,
    gather_outputs: bool = True,
    cache: bool = True,
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
        cache: look up and store this rank's rewritten graph in the graph cache
            (:mod:`autotp.cache`: ``~/.cache/autotp``, or ``$AUTOTP_CACHE_DIR``, ``off`` turns it
            off), so that the next run of the same model skips the capture.
            ``tp_model.cache_status`` says what happened.

    Returns:
        A :class:`TensorParallelModule`; ``out = tp_model(input_ids)`` returns what the model
        returns (``out.logits`` for a causal LM), the same on every rank.

    Raises:
        ValueError: ``tp_size`` does not divide the world size, or inputs cannot be synthesised.
        autotp.errors.AutotpError: the model cannot be captured, or the checkpoint does not
            match it.

    Example:
        >>> # torchrun --nproc-per-node 2 script.py
        >>> model = AutoModelForCausalLM.from_config(config).eval()   # doctest: +SKIP
        >>> tp_model = autotp.parallelize(model)                      # doctest: +SKIP
        >>> logits = tp_model(input_ids).logits                       # doctest: +SKIP
    """
    _refuse_handed_over(model)
    clock = _Stopwatch()
    device = torch.device(device) if device is not None else _default_device(model)
    ctx = clock.lap("init", init_tp(tp_size, device))
    moved = device != model_device(model)
    in_memory = ModuleSource(model, device if moved else None)
    source: Any = in_memory
    if checkpoint is not None:
        source = FirstOf(checkpoint_source(checkpoint, model, mapped=True), in_memory)
        hf.adopt_generation_config(model, checkpoint, built_from_it=False)
    tp_model = _build(model, example_inputs, ctx, source, clock, gather_outputs=gather_outputs, cache=cache)
    _warn_training_draws(model, tp_model.graph_module)
    _hand_over(model, tp_model, list(named_tensors(model)) if moved or checkpoint is not None
               else [s.name for s in tp_model.plan.sharded_params()])
    return tp_model


def _warn_training_draws(model: nn.Module, gm: Any) -> None:
    """Warn where a model in training mode draws random numbers in its graph (dropout): exact
    (each call draws what the unsharded model would, :func:`autotp.group.share_rng`), but
    rarely meant for inference, and ``from_config`` builds models in training mode."""
    if model.training and draws_random_numbers(gm):
        warnings.warn(f"autotp: {type(model).__name__} is in training mode and its graph draws random numbers "
                      "(dropout): every call draws anew; call model.eval() before parallelize() for inference "
                      "(from_config builds models in training mode)", stacklevel=3)


def load(directory: str | os.PathLike, *, device: Optional[torch.device | str] = None, checksum: bool = True,
         cache: bool = True) -> TensorParallelModule:
    """This rank's model from a directory written by :func:`autotp.convert`.

    Call it on every rank under ``torchrun --nproc-per-node N`` with N the converted tp size.
    The model is built with its parameters on ``meta`` and filled from this rank's file only.

    Args:
        directory: the output of ``autotp convert``.
        device: where this rank's shards live and run (default: CPU, or this rank's GPU when
            CUDA is available).
        checksum: verify this rank's file against the sha256 in ``autotp.json``.
        cache: use the graph cache, as for :func:`parallelize`.

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
    device = torch.device(device) if device is not None else _rank_device()
    ctx = clock.lap("init", init_tp(None, device))
    if ctx.tp_size != manifest["tp_size"]:
        raise AutotpError(f"{directory} was converted for tp={manifest['tp_size']}, but the world size is "
                          f"{ctx.tp_size}: start it with torchrun --nproc-per-node {manifest['tp_size']}")
    path = agree(ctx, lambda: verify_rank_file(directory, manifest, ctx.rank, checksum=checksum))
    model, _ = resolve_model(str(directory), converted=True).build("empty")
    source = FirstOf(ShardFileSource(path), ModuleSource(model, device))
    tp_model = _build(model, None, ctx, source, clock, expected=Plan.from_dict(manifest["plan"]), cache=cache)
    _hand_over(model, tp_model, list(named_tensors(model)))
    return tp_model


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
