"""Hugging Face glue: recognise a transformers model, synthesise example inputs from its
config, and the settings under which it is captured. transformers is optional: nothing here
imports it unless the model is one of its models."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.nn as nn

from autotp.errors import InputError

__all__ = ["is_hf_model", "example_inputs", "capture_settings", "text_config", "check_packing_as_model",
           "adopt_generation_config"]

EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8  # not 0 or 1: export would specialise those sizes


def is_hf_model(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "model_type") and hasattr(config, "to_dict")


def text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def example_inputs(model: nn.Module, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids of shape (2, 8) within the vocabulary (and decoder ids for encoder-decoders)."""
    config = model.config
    vocab = getattr(text_config(config), "vocab_size", None)
    if not vocab:
        raise InputError(
            f"cannot synthesise example inputs for {type(model).__name__}: its config has no "
            "vocab_size (not a language model?); pass example_inputs=..."
        )
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(vocab), (EXAMPLE_BATCH, EXAMPLE_SEQ), generator=gen)
    inputs = {"input_ids": ids}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids.clone()
    return inputs


def check_packing_as_model(model: nn.Module, inputs: dict[str, Any]) -> None:
    """Refuse a plain call whose ``position_ids`` hold several sequences per row (packed) where
    the model, left to its config's ``use_cache``, would attend otherwise than the graph.

    transformers reads packed ``position_ids`` (a row that restarts its positions) as separate
    sequences, attending within each, only with no attention mask and no cache
    (``masking_utils.find_packed_sequence_indices``). A plain call's graph is captured with
    ``use_cache=False`` (:func:`capture_settings`), so it does that; the model itself, with
    ``use_cache`` unset and true in its config, makes a cache first and attends across the
    sequences: Llama's logits 0.61 apart on ``[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]``. Consecutive
    positions (any start) mean the same to both."""
    positions = inputs.get("position_ids")
    if (not isinstance(positions, torch.Tensor) or positions.dim() < 1 or positions.shape[-1] < 2
            or inputs.get("attention_mask") is not None or inputs.get("use_cache") is not None):
        return
    if not getattr(model.config, "use_cache", False) or not bool((positions.diff(dim=-1) != 1).any()):
        return
    raise InputError(
        f"position_ids restart within a row (packed sequences): {type(model).__name__} with use_cache=True (its "
        "config's) attends across them, while the graph attends within each (as the model does with use_cache=False); "
        "pass use_cache=False for packed attention, or an attention_mask")


@contextlib.contextmanager
def capture_settings(model: nn.Module, inputs: Mapping[str, Any]) -> Iterator[None]:
    """Capture without a KV cache: the cache object is not a tensor export can take or return.
    And, for a call with ``inputs`` that records hidden states or attentions, with
    transformers' output-recording hooks installed (:func:`_install_output_hooks`).

    Submodules may hold their own config copy (an encoder-decoder's decoder stack does), so
    every config in the module tree is switched off and restored afterwards."""
    _install_output_hooks(model, inputs)
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None and hasattr(c, "use_cache")}
    saved = {key: c.use_cache for key, c in configs.items()}
    for c in configs.values():
        c.use_cache = False
    try:
        yield
    finally:
        for key, c in configs.items():
            c.use_cache = saved[key]


def _install_output_hooks(model: nn.Module, inputs: Mapping[str, Any]) -> None:
    """Install transformers' output-recording hooks on ``model`` (the capture's own copy) where
    its forward would install them on this call: a model that records outputs (hidden states,
    attentions, router logits) does so on the first call that asks for one, and marks itself
    (``_output_capturing_hooks_installed``).

    That mark is state the forward reads and changes, which capture refuses
    (:mod:`autotp.kept_state`): ``output_hidden_states=True`` was refused on a model never
    called with it. Every call after the first runs with the hooks installed, and they record
    nothing unless a call asks, so the capture sees the model as those calls do. Only where
    the call asks: hooks inside a decoder layer keep its trace from being copied to the others
    (:mod:`autotp.repeats`), which made Llama's capture 1.8 s instead of 1.1. A request this
    misses is still refused; transformers without the hooks: nothing to do. A model not of
    transformers: nothing, and transformers is not imported (2.2 s for a plain module)."""
    if not is_hf_model(model):
        return
    try:
        from transformers.modeling_utils import PreTrainedModel
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, maybe_install_capturing_hooks
    except ImportError:
        return
    for module in model.modules():  # the outermost first: a model installs its submodels' hooks too
        recorded = _CAN_RECORD_REGISTRY.get(module) if isinstance(module, PreTrainedModel) else None
        if recorded and any(_asked(module, inputs, key) for key in recorded):
            maybe_install_capturing_hooks(module)


def _asked(model: nn.Module, inputs: Mapping[str, Any], key: str) -> bool:
    """Whether a call with ``inputs`` asks ``model`` to record its ``key`` outputs, as its
    ``output_<key>`` argument or config field says (cross-attentions follow ``output_attentions``)."""
    flags = {f"output_{key}"} | ({"output_attentions"} if "attentions" in key else set())
    config = getattr(model, "config", None)
    return any(bool(inputs.get(flag, getattr(config, flag, False))) for flag in flags)


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Build modules with parameters on ``meta`` and buffers real.

    Parameters are moved to ``meta`` as they are registered, so their initialisation costs
    nothing; buffers computed in ``__init__`` (rotary frequencies) keep their values, which
    checkpoints do not hold.

    Each parameter is also marked as transformers marks the ones it loaded
    (``_is_hf_initialized``), so that its weight initialisation skips them: ``normal_`` on a
    meta tensor runs PyTorch's Python reference implementation, 15 of the 20 ms Llama 191M's
    ``from_config`` took. Buffers are still initialised.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        if module._parameters.get(name) is not None:
            module._parameters[name]._is_hf_initialized = True  # type: ignore[union-attr]

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def config_dtype(config: Any) -> Optional[torch.dtype]:
    # transformers 5 names it dtype (reading torch_dtype there prints a deprecation line); 4.x torch_dtype
    dtype = getattr(config, "dtype", None) if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


@contextlib.contextmanager
def default_dtype(dtype: Optional[torch.dtype]) -> Iterator[None]:
    saved = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def model_class(config: Any) -> Any:
    """The class a config names in ``architectures``, else the causal-LM auto class."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise InputError(f"model_type {getattr(config, 'model_type', '?')!r}: the config names no architectures "
                         "and transformers has no causal-LM class for it")
    return transformers.AutoModelForCausalLM


def model_from_config(config: Any, *, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """An initialised model of the config's class, in the config's dtype (or ``dtype``)."""
    cls = model_class(config)
    with default_dtype(dtype or config_dtype(config)):
        build = getattr(cls, "from_config", None) or cls._from_config
        return build(config).eval()


def adopt_generation_config(model: nn.Module, directory: str | os.PathLike, *, built_from_it: bool) -> None:
    """Give ``model`` the ``generation_config.json`` of the checkpoint in ``directory``, as
    ``from_pretrained`` does: a checkpoint keeps its stop tokens (Llama-3's two), sampling
    defaults and logits processors there, and a model built from ``config.json`` alone
    generated other tokens than the checkpoint's (a repetition penalty and banned words
    ignored; found by an adversarial review). ``built_from_it``: autotp built the model from
    the directory's config (``autotp.load``, the command line); else (``parallelize(...,
    checkpoint=DIR)``) a generation config the user set is kept, and only the one the model
    derived from its config is replaced, as ``from_pretrained`` would have.

    Raises:
        InputError: the file is there and transformers cannot read it.
    """
    path = Path(directory) / "generation_config.json"
    current = getattr(model, "generation_config", None)
    if not path.is_file() or not is_hf_model(model) or not callable(getattr(model, "can_generate", None)) \
            or not model.can_generate():
        return
    if not built_from_it and not getattr(current, "_from_model_config", False):
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: transformers cannot read it ({str(exc).splitlines()[0][:160]})") from None
