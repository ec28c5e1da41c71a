"""What each rank does for ``autotp verify`` (:func:`autotp.cli.cmd_verify` launches it on
local gloo ranks): the unsharded reference and the sharded model's outputs on the same inputs.

Imports stay inside the functions, as in :mod:`autotp.cli`: ``autotp --help`` imports no torch.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["verify_rank", "fits_in_memory"]


def verify_rank(rank: int, world: int, model_text: str, use_weights: bool, batch: int, seq: int) -> dict:
    """One rank of ``autotp verify``: reference and sharded outputs on the same inputs."""
    import torch

    import autotp
    from autotp.source import resolve_model

    source = resolve_model(model_text)
    if use_weights:  # the sharded model reads its slices of the checkpoint, as a user's does
        model, example = source.build("empty")
        reference_model = _reference(source)
        checkpoint = source.directory
    else:
        model, example = source.build("random", seed=0)
        reference_model, checkpoint = model, None
    inputs = _inputs(model, example, batch, seq)
    with torch.no_grad():
        reference = _flat_outputs(reference_model(**inputs))
        tp_model = autotp.parallelize(model, example, checkpoint=checkpoint)
        outputs = _flat_outputs(tp_model(**inputs))
    rows = []
    for name, ref in reference.items():
        out = outputs[name]
        diff = (out.float() - ref.float()).abs().max().item() if ref.numel() else 0.0
        scale = ref.float().abs().max().item() if ref.numel() else 0.0
        rows.append((name, tuple(ref.shape), diff, scale))
    return dict(rows=rows, sharded=len(tp_model.plan.sharded_params()), bytes=tp_model.local_bytes())


def _reference(source: Any) -> Any:
    """The unsharded model with its checkpoint's weights as transformers' ``from_pretrained``
    loads them, in the dtype autotp builds it in: independent of autotp's own checkpoint
    reading (key matching, expert merging, slicing), which the sharded model goes through."""
    import torch

    from autotp import hf

    cls = hf.model_class(source.config)
    dtype = hf.config_dtype(source.config) or torch.get_default_dtype()
    return cls.from_pretrained(str(source.directory), config=source.config, dtype=dtype).eval()


def _inputs(model: Any, example: Any, batch: int, seq: int) -> dict:
    import torch

    from autotp import hf
    from autotp.capture import normalise_example_inputs
    from autotp.errors import InputError

    if example is not None:
        return normalise_example_inputs(model, example)
    vocab = getattr(hf.text_config(model.config), "vocab_size", None)
    if not vocab:
        raise InputError(f"{type(model).__name__} has no vocab_size in its config (not a language model?): verify "
                         "feeds token ids")
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1234))
    inputs = {"input_ids": ids}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids.clone()
    return inputs


def _flat_outputs(out: Any) -> dict:
    import torch

    if isinstance(out, torch.Tensor):
        return {"output": out}
    if hasattr(out, "items"):
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, (tuple, list)):
        return {f"output[{i}]": v for i, v in enumerate(out) if isinstance(v, torch.Tensor)}
    return {}


def fits_in_memory(source: Any, copies: int) -> bool:
    """Whether ``copies`` ranks' pieces and the unsharded reference of ``source``'s checkpoint fit
    in the memory free now (with 30% to spare)."""
    from autotp.loading import open_checkpoint

    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return False
    return open_checkpoint(source.directory).nbytes() * (copies + 1) < 0.7 * available
