"""Hugging Face checkpoint directories, read one rank's slice at a time.

Two formats, the same interface (:class:`Checkpoint`): ``keys()``, ``in``, ``nbytes()``,
``shape(name)``, ``read_ranges(name, dim, ranges)`` (index ranges along one dim) and
``read(name, placement, rank, world_size)``, which returns this rank's part of a tensor laid out
as ``placement`` (the whole tensor for ``Replicate``; :class:`Sliced` derives it from the two
before):

- :class:`SafetensorsCheckpoint`: ``*.safetensors``, single or sharded with
  ``model.safetensors.index.json``. Without an index, ``model.safetensors`` alone where it
  exists (as transformers reads it), else every file, none holding a tensor another holds.
  Each slice is read with one contiguous read per run (:mod:`autotp.safetensors_io`), so a
  rank reads its own bytes and nothing else.
- :class:`TorchCheckpoint`: ``pytorch_model*.bin``, what transformers wrote before
  safetensors (``torch.save``'s zip format), single or sharded with
  ``pytorch_model.bin.index.json``. Each file is opened with ``torch.load(mmap=True,
  weights_only=True)``: tensors are pages of a private memory map, read when sliced, and the
  unpickler refuses anything but tensors and containers (a checkpoint cannot run code).

:func:`open_checkpoint` picks the format a directory holds, safetensors first (transformers
prefers them too when a directory has both).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Protocol, Union

import torch

from autotp.errors import AutotpError
from autotp.placement import Placement, Shard, padded_length, rank_ranges, zero_padded
from autotp.safetensors_io import SafetensorsReader

__all__ = ["LoadError", "Checkpoint", "Sliced", "joined", "ranges_of", "SafetensorsCheckpoint", "TorchCheckpoint", "open_checkpoint", "has_weights"]

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_SINGLE = "model.safetensors"  # what transformers reads from a directory without an index
TORCH_SINGLE = "pytorch_model.bin"


class LoadError(AutotpError):
    """A tensor the graph needs is missing from the source, or has the wrong shape."""


class Checkpoint(Protocol):
    directory: Path

    def keys(self) -> list[str]: ...

    def __contains__(self, name: str) -> bool: ...

    def nbytes(self) -> int: ...

    def shape(self, name: str) -> list[int]: ...

    def read_ranges(self, name: str, dim: Optional[int], ranges: Optional[list[tuple[int, int]]]) -> torch.Tensor: ...

    def read(self, name: str, placement: Placement, rank: int, world_size: int) -> torch.Tensor: ...

    def close(self) -> None: ...


def _weight_map(directory: Path, index_name: str) -> Optional[dict[str, Path]]:
    """Tensor name -> file, from the directory's index (None when it has none); every file the
    index lists must exist."""
    index = directory / index_name
    if not index.exists():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise LoadError(f"{index}: not a checkpoint index ({exc})") from None
    found = {k: directory / v for k, v in weight_map.items()}
    for path in sorted(set(found.values())):
        if not path.exists():
            raise LoadError(f"{index} lists {path.name}, which is missing")
    return found


def _unindexed_files(directory: Path, single: str, pattern: str) -> list[Path]:
    """The files of a checkpoint without an index: the single file transformers reads
    (``model.safetensors``) where there is one, so that another file beside it (an EMA copy, a
    second variant) is not read; else every file matching ``pattern``."""
    if (directory / single).exists():
        return [directory / single]
    files = sorted(directory.glob(pattern))
    if not files:
        raise LoadError(f"no {pattern} files in {directory}")
    return files


def _one_file_per_key(keys_by_file: dict[Path, Any]) -> dict[str, Path]:
    """Tensor name -> file; a name two files hold is ambiguous (which copy the model is?)."""
    weight_map: dict[str, Path] = {}
    for path, keys in keys_by_file.items():
        for key in keys:
            if key in weight_map:
                raise LoadError(f"{weight_map[key]} and {path} both hold {key!r} and {path.parent} has no index "
                                "saying which to read: remove one, or add an index")
            weight_map[key] = path
    return weight_map


class Sliced:
    """``read`` for a checkpoint that can give a tensor's shape and ``read_ranges(name, dim,
    ranges)``: the concatenation of index ``ranges`` of it along ``dim`` (``dim`` None: the
    whole tensor). A rank's part of a layout is the ranges :func:`rank_ranges` gives, with zeros
    after the end of a padded one."""

    def shape(self, name: str) -> list[int]:
        raise NotImplementedError

    def read_ranges(self, name: str, dim: Optional[int], ranges: Optional[list[tuple[int, int]]]) -> torch.Tensor:
        raise NotImplementedError

    def read(self, name: str, placement: Placement, rank: int, world_size: int) -> torch.Tensor:
        if not isinstance(placement, Shard):
            return self.read_ranges(name, None, None)
        size = self.shape(name)[placement.dim]
        piece = self.read_ranges(name, placement.dim, rank_ranges(placement, size, rank, world_size))
        if placement.padded:  # the real rows read, zeros after the end
            return zero_padded(piece, placement.dim, padded_length(size, world_size))
        return piece


class _Files(Sliced):
    """What both formats share: a directory and the file each tensor lives in."""

    directory: Path
    weight_map: dict[str, Path]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.weight_map.values()))


class SafetensorsCheckpoint(_Files):
    """The ``*.safetensors`` files of a directory: sharded with ``model.safetensors.index.json``,
    or single. Tensors are read slice by slice (see :mod:`autotp.safetensors_io`); ``mapped``:
    contiguous slices are views of the mapped file (for loading weights that stay resident;
    converting copies, so that its memory does not grow with every page it touched)."""

    def __init__(self, directory: Union[str, Path], *, mapped: bool = False) -> None:
        self.directory = Path(directory)
        self.mapped = mapped
        self._readers: dict[Path, SafetensorsReader] = {}
        weight_map = _weight_map(self.directory, SAFETENSORS_INDEX)
        if weight_map is None:
            files = _unindexed_files(self.directory, SAFETENSORS_SINGLE, "*.safetensors")
            weight_map = _one_file_per_key({f: self._reader(f).keys() for f in files})
        self.weight_map = weight_map

    def _reader(self, path: Path) -> SafetensorsReader:
        if path not in self._readers:
            self._readers[path] = SafetensorsReader(path)
        return self._readers[path]

    def _holding(self, name: str) -> SafetensorsReader:
        reader = self._reader(self.weight_map[name])
        if name not in reader:
            raise LoadError(f"{self.weight_map[name]} has no tensor {name!r}, which its index lists there")
        return reader

    def shape(self, name: str) -> list[int]:
        return self._holding(name).shape(name)

    def read_ranges(self, name: str, dim: Optional[int], ranges: Optional[list[tuple[int, int]]]) -> torch.Tensor:
        return self._holding(name).read(name, dim or 0, ranges, mapped=self.mapped)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


class TorchCheckpoint(_Files):
    """The ``pytorch_model*.bin`` files of a directory: sharded with
    ``pytorch_model.bin.index.json``, or single. ``mapped``: a slice that is one contiguous run
    stays a view of the file's private memory map (else every slice is a copy of its own)."""

    def __init__(self, directory: Union[str, Path], *, mapped: bool = False) -> None:
        self.directory = Path(directory)
        self.mapped = mapped
        self._states: dict[Path, dict[str, Any]] = {}
        weight_map = _weight_map(self.directory, TORCH_INDEX)
        if weight_map is None:
            files = _unindexed_files(self.directory, TORCH_SINGLE, "pytorch_model*.bin")
            weight_map = _one_file_per_key({f: list(self._state(f)) for f in files})
        self.weight_map = weight_map

    def _state(self, path: Path) -> dict[str, Any]:
        if path not in self._states:
            try:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except Exception as exc:  # noqa: BLE001  torch raises many types for a bad or unsafe file
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise LoadError(f"{path}: not a torch checkpoint autotp can read safely ({first})") from None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise LoadError(f"{path}: not a state dict (a mapping of names to tensors)")
            self._states[path] = state
        return self._states[path]

    def _stored(self, name: str) -> torch.Tensor:
        path = self.weight_map[name]
        try:
            return self._state(path)[name]
        except KeyError:
            raise LoadError(f"{path} has no tensor {name!r}, which its index lists there") from None

    def shape(self, name: str) -> list[int]:
        return list(self._stored(name).shape)

    def read_ranges(self, name: str, dim: Optional[int], ranges: Optional[list[tuple[int, int]]]) -> torch.Tensor:
        stored = self._stored(name)
        tensor = stored if dim is None else ranges_of(stored, dim, ranges)
        in_map = tensor.untyped_storage().data_ptr() == stored.untyped_storage().data_ptr()
        if not in_map or (self.mapped and tensor.is_contiguous()):  # a contiguous run of the map stays a view
            return tensor
        return tensor.clone(memory_format=torch.contiguous_format)

    def close(self) -> None:
        self._states.clear()


def joined(pieces: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``pieces`` concatenated along ``dim``; the piece itself where there is one (no copy)."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def ranges_of(tensor: torch.Tensor, dim: int, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """The concatenation of index ``ranges`` of ``tensor`` along ``dim`` (a view for one range)."""
    return joined([tensor.narrow(dim, start, end - start) for start, end in ranges], dim)


def _has_safetensors(directory: Path) -> bool:
    return any(directory.glob("*.safetensors")) or (directory / SAFETENSORS_INDEX).exists()


def _has_torch_bin(directory: Path) -> bool:
    return any(directory.glob("pytorch_model*.bin")) or (directory / TORCH_INDEX).exists()


def has_weights(directory: Union[str, Path]) -> bool:
    """Whether a directory holds checkpoint files of a format :func:`open_checkpoint` reads."""
    return _has_safetensors(Path(directory)) or _has_torch_bin(Path(directory))


def open_checkpoint(directory: Union[str, Path], *, mapped: bool = False) -> Checkpoint:
    """The checkpoint a directory holds: safetensors where it has them, else ``pytorch_model*.bin``.

    Raises:
        LoadError: the directory holds neither, or an index lists a missing file, or a file
            cannot be read.
    """
    directory = Path(directory)
    if _has_safetensors(directory):
        return SafetensorsCheckpoint(directory, mapped=mapped)
    if _has_torch_bin(directory):
        return TorchCheckpoint(directory, mapped=mapped)
    raise LoadError(f"no checkpoint in {directory}: neither *.safetensors nor pytorch_model*.bin files")
