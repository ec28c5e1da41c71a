"""Convert a Hugging Face checkpoint into per-rank shard files.

Consumes a model directory (``config.json`` + ``*.safetensors``, single or indexed) and a tp
size; produces a directory that :func:`autotp.load` reads on N ranks::

    OUT/autotp.json                          manifest: format version, plan, tp size, source
                                             config, per-file sizes and sha256
    OUT/rank-00000-of-00002.safetensors      rank 0's tensors: its slices and the replicated ones
    OUT/rank-00001-of-00002.safetensors
    OUT/config.json, generation_config.json, tokenizer files   copied alongside

Invariants:

- Memory stays near the largest single tensor: tensors are read one at a time, one rank's
  slice at a time (``get_slice``), and appended to each rank's file by a streaming writer
  whose header is known up front (names, dtypes and local shapes come from the plan).
- Nothing half-written ever loads: everything is written into a hidden temporary directory
  next to OUT and renamed to OUT when complete. An interrupted conversion leaves OUT absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from autotp._version import __version__ as _version
from autotp.errors import AutotpError
from autotp.loading import CheckpointSource, checkpoint_source
from autotp.plan import Plan
from autotp.runtime import plan_model
from autotp.safetensors_io import SafetensorsWriter
from autotp.source import CONVERTED_MANIFEST, resolve_model

__all__ = ["convert", "ConvertError", "MANIFEST", "rank_file", "read_manifest", "verify_rank_file"]

MANIFEST = CONVERTED_MANIFEST
FORMAT_VERSION = 1
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
           "chat_template.jinja")
class ConvertError(AutotpError):
    """The conversion cannot start (bad input) or the output directory is unusable."""


def rank_file(rank: int, tp_size: int) -> str:
    return f"rank-{rank:05d}-of-{tp_size:05d}.safetensors"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _stored_tensors(plan: Plan, source: CheckpointSource) -> list[str]:
    """The plan's tensors the checkpoint holds (non-persistent buffers are rebuilt at load)."""
    return [name for name in plan.params if source.has(name)]


def _not_over_the_source(out: Path, source: Path) -> None:
    """Refuse an output that is the checkpoint's directory or holds it: replacing it would delete
    the weights being read."""
    out, source = out.resolve(), source.resolve()
    if out == source or out in source.parents:
        raise ConvertError(f"the output {out} is (or holds) the model directory {source}: pick another output "
                           "directory, replacing it would delete the weights")


def _prepare_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and not overwrite:
        raise ConvertError(f"{out} already exists (pass --overwrite to replace it)")
    if not out.parent.exists():
        raise ConvertError(f"{out.parent} does not exist")
    tmp = out.parent / f".{out.name}.autotp-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``tmp`` with renames only."""
    if out.exists():
        old = out.parent / f".{out.name}.autotp-old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def convert(
    model: str | Path,
    tp_size: int,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: Optional[bool] = None,
) -> Path:
    """Write per-rank shard files for ``tp_size`` ranks from a Hugging Face checkpoint.

    Args:
        model: a Hugging Face model directory with ``config.json`` and ``*.safetensors``.
        tp_size: number of tensor-parallel ranks the output is for.
        out: the output directory; it must not exist unless ``overwrite``.
        overwrite: replace an existing ``out`` (only once the new one is complete).
        progress: show a progress bar (default: when stderr is a terminal).

    Returns:
        The output directory.

    Raises:
        ConvertError, autotp.source.ModelError, autotp.loading.LoadError: bad input; nothing
            is written to ``out``.

    Example:
        >>> autotp.convert("llama-dir", tp_size=2, out="llama-tp2")      # doctest: +SKIP
    """
    source_model = resolve_model(str(model))
    if not source_model.has_checkpoint:
        raise ConvertError(f"{model} has no weights to convert (*.safetensors or pytorch_model*.bin)")
    skeleton, _ = source_model.build("meta")
    plan = plan_model(skeleton, tp_size)
    if tp_size > 1 and not plan.sharded_params():
        raise ConvertError(f"tp={tp_size} divides no shardable dimension of {model}: nothing would be sharded")
    reader = checkpoint_source(source_model.directory, skeleton)
    names = _stored_tensors(plan, reader)
    out = Path(out)
    _not_over_the_source(out, Path(source_model.directory))
    tmp = _prepare_out(out, overwrite)
    try:
        files = _write_ranks(tmp, plan, names, reader, progress)
        _write_manifest(tmp, plan, source_model, type(skeleton).__name__, files)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_ranks(tmp: Path, plan: Plan, names: list[str], reader: CheckpointSource, progress: Optional[bool]) -> dict:
    from tqdm.auto import tqdm

    tp = plan.tp_size
    entries = [(n, getattr(torch, plan.params[n].dtype), plan.params[n].local_shape(tp)) for n in names]
    meta = {"format": "pt", "producer": f"autotp {_version}", "tp_size": str(tp)}
    writers = [SafetensorsWriter(tmp / rank_file(r, tp), entries, {**meta, "rank": str(r)}) for r in range(tp)]
    total = sum(plan.params[n].local_nbytes(tp) for n in names) * tp
    with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=None if progress is None else not progress) as bar:
        for name, dtype, _ in entries:
            placement = plan.params[name].placement
            for rank, writer in enumerate(writers):
                piece = reader.read(name, placement, rank, tp).to(dtype)
                writer.write(name, piece)
                bar.update(piece.numel() * piece.element_size())
    for writer in writers:
        writer.close()
    return {rank_file(r, tp): {"bytes": (tmp / rank_file(r, tp)).stat().st_size, "sha256": _sha256(tmp / rank_file(r, tp))}
            for r in range(tp)}


def _write_manifest(tmp: Path, plan: Plan, source_model: Any, model_class: str, files: dict) -> None:
    directory = source_model.directory
    for name in _COPIED:
        if (directory / name).is_file():
            shutil.copy2(directory / name, tmp / name)
    manifest = {
        "format_version": FORMAT_VERSION,
        "producer": f"autotp {_version}",
        "tp_size": plan.tp_size,
        "model_class": model_class,
        "source": str(directory.resolve()),
        "config": json.loads((directory / "config.json").read_text()),
        "files": files,
        "plan": plan.to_dict(),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))


def read_manifest(directory: str | Path) -> dict:
    """The manifest of a converted directory.

    Raises:
        ConvertError: the directory or its manifest is missing, unreadable or of another version.
    """
    path = Path(directory)
    if not path.is_dir():
        raise ConvertError(f"{directory} does not exist or is not a directory (convert a model with autotp convert)")
    manifest_file = path / MANIFEST
    try:
        manifest = json.loads(manifest_file.read_text())
    except FileNotFoundError:
        raise ConvertError(f"{directory} has no {MANIFEST}: not an autotp converted directory") from None
    except (OSError, ValueError) as exc:
        raise ConvertError(f"{manifest_file}: unreadable ({exc})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ConvertError(f"{manifest_file}: format version {manifest.get('format_version')!r} is not supported "
                           f"(expected {FORMAT_VERSION})")
    return manifest


def verify_rank_file(directory: str | Path, manifest: dict, rank: int, *, checksum: bool = True) -> Path:
    """Check that this rank's file exists with the recorded size (and sha256)."""
    name = rank_file(rank, manifest["tp_size"])
    path = Path(directory) / name
    record = manifest["files"].get(name)
    if record is None:
        raise ConvertError(f"{MANIFEST} does not list {name}")
    if not path.is_file():
        raise ConvertError(f"{path} is missing")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise ConvertError(f"{path} is {size} bytes, expected {record['bytes']} (truncated or replaced)")
    if checksum and _sha256(path) != record["sha256"]:
        raise ConvertError(f"{path}: sha256 differs from {MANIFEST} (corrupt or replaced)")
    return path


