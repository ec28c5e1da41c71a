"""What a ``MODEL`` argument names, and how to build it.

``MODEL`` is either a Hugging Face model directory (a ``config.json``, with or without
``*.safetensors`` weights) or ``package.module:factory``, a callable returning an
``nn.Module`` (or ``(module, example_inputs)`` for modules that are not Hugging Face models).

A model is built in one of three ways, chosen by the caller:

- ``"meta"``: every tensor on ``meta``; enough to capture and plan (no memory, no weights);
- ``"empty"``: parameters on ``meta``, buffers real; to be filled from a checkpoint;
- ``"random"``: a seeded random initialisation; the same weights on every rank.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from autotp import hf
from autotp.checkpoints import has_weights
from autotp.errors import AutotpError

__all__ = ["ModelSource", "resolve_model", "ModelError", "CONVERTED_MANIFEST"]

CONVERTED_MANIFEST = "autotp.json"  # what autotp.convert writes beside the rank files (autotp.convert.MANIFEST)


class ModelError(AutotpError):
    """The MODEL argument names nothing usable."""


@dataclass
class ModelSource:
    text: str
    directory: Optional[Path] = None
    config: Any = None
    factory: Optional[Callable[[], Any]] = None

    @property
    def has_checkpoint(self) -> bool:
        return self.directory is not None and has_weights(self.directory)

    @property
    def name(self) -> str:
        if self.config is not None:
            return f"{getattr(self.config, 'model_type', '?')} ({self.text})"
        return self.text

    def build(self, weights: str = "meta", *, seed: int = 0) -> tuple[nn.Module, Any]:
        """The model and its example inputs (``None`` for Hugging Face models)."""
        if weights not in ("meta", "empty", "random"):
            raise ValueError(f"weights must be meta, empty or random, got {weights!r}")
        torch.manual_seed(seed)
        if weights == "meta":
            with torch.device("meta"):
                return self._build()
        if weights == "empty":
            with hf.params_on_meta():
                return self._build()
        return self._build()

    def _build(self) -> tuple[nn.Module, Any]:
        if self.config is not None:
            model = hf.model_from_config(self.config)
            if self.directory is not None:
                hf.adopt_generation_config(model, self.directory, built_from_it=True)
            return model, None
        made = self.factory()
        module, example = made if isinstance(made, tuple) else (made, None)
        if not isinstance(module, nn.Module):
            raise ModelError(f"{self.text} returned {type(module).__name__}, not an nn.Module")
        return module.eval(), example


def _load_config(directory: Path) -> Any:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelError(f"{directory} has no config.json: not a Hugging Face model directory")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config_file}: unreadable ({exc})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    try:
        from transformers import AutoConfig, __version__
    except ImportError:
        raise ModelError("reading a Hugging Face directory needs transformers: pip install 'autotp[hf]'") from None
    try:
        return AutoConfig.from_pretrained(str(directory))
    except (ValueError, KeyError, OSError) as exc:
        if not model_type:
            raise ModelError(f"{config_file} has no model_type") from None
        raise ModelError(f"{config_file}: model_type {model_type!r} is not one transformers {__version__} knows "
                         f"({str(exc).splitlines()[0][:120]})") from None


def _load_factory(text: str) -> Callable[[], Any]:
    module_name, _, attr = text.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"MODEL {text!r}: cannot import {module_name} ({exc})") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"MODEL {text!r}: {module_name} has no callable {attr!r}")
    return factory


def resolve_model(text: str, *, converted: bool = False) -> ModelSource:
    """Parse a ``MODEL`` argument (a directory or ``package.module:factory``); ``converted``: the
    directory is one :func:`autotp.convert` wrote (refused otherwise: it is not a checkpoint).

    Raises:
        ModelError: the path does not exist, has no usable ``config.json``, or the factory
            cannot be imported.
    """
    path = Path(text)
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"MODEL {text} is a file; expected a model directory holding config.json")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ModelError(f"MODEL {text} is not readable")
        if not converted and (path / CONVERTED_MANIFEST).is_file():
            raise ModelError(f"MODEL {text} is a directory autotp convert wrote (it holds {CONVERTED_MANIFEST}); give the "
                             "Hugging Face checkpoint it came from, or run it: torchrun -m autotp run|generate")
        return ModelSource(text, directory=path, config=_load_config(path))
    if ":" in text and not text.startswith((".", "/")):
        return ModelSource(text, factory=_load_factory(text))
    raise ModelError(f"MODEL {text} does not exist (expected a model directory or package.module:factory)")
