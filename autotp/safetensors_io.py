"""Streaming safetensors I/O: read only the bytes asked for, write tensor by tensor.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
byte offsets) and the raw bytes. Reading here uses plain ``seek`` + ``readinto`` straight
into the destination tensor instead of a memory map: a rank that reads a column slice of a
weight touches only those bytes, and no file page stays resident (with ``mmap``, every page
a slice touched counts in the process's memory until the file is closed). Loading asks for
``mapped=True``: a slice that is one contiguous run (a row slice, a whole tensor) is then a
view of a private memory map of the file, copying nothing. Those bytes are the model's
weights and stay resident anyway; the pages are read on first touch and shared with every
other process mapping the file.

:class:`SafetensorsReader` reads a slice ``(dim, [(start, stop), ...])`` of a tensor with one
read per contiguous run, or, for runs a few KiB apart (a column slice of a row-major weight
is one run per row), one ``preadv`` per group of runs with the gaps read into a scratch
buffer; :class:`SafetensorsWriter` writes the header first (known from the
plan), then each tensor's bytes in the declared order.

A copy of 2 MiB or more is read into memory backed by transparent huge pages where the kernel
allows them (:func:`empty_huge`): filling fresh memory page by page costs a page fault per
4 KiB, and here that, not the copy, was most of loading's time.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO, Optional

import torch

from autotp.errors import AutotpError

__all__ = ["SafetensorsReader", "SafetensorsWriter", "SafetensorsFormatError", "DTYPES", "empty_huge"]

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20
# Runs at most this far apart are read by one call, the bytes between them into a scratch
# buffer: a read call costs ~10 us here, the time to copy ~50 KiB from the page cache.
_COALESCE_GAP = 64 << 10
_COALESCE_RUN = 1 << 20  # longer runs are read on their own: the call is cheap next to the copy
_RUNS_PER_CALL = 512  # a preadv takes at most IOV_MAX (1024) buffers: runs and gaps
_HUGE_PAGE = 2 << 20


class SafetensorsFormatError(AutotpError):
    """A file that is not a complete safetensors file (truncated, corrupt, or another format)."""


class SafetensorsReader:
    """One safetensors file, read slice by slice without memory-mapping it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._scratch: Optional[bytearray] = None  # where coalesced reads put the bytes between runs
        self._mapped: Optional[torch.UntypedStorage] = None
        try:
            self._file: Optional[BinaryIO] = open(self.path, "rb")
            size = self.path.stat().st_size
            (length,) = struct.unpack("<Q", self._file.read(8))
            if not 0 < length <= min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {length} does not fit a file of {size} bytes")
            header = json.loads(self._file.read(length))
        except (OSError, ValueError, struct.error) as exc:
            raise SafetensorsFormatError(f"{self.path}: not a readable safetensors file ({exc})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data = 8 + length
        self.entries: dict[str, tuple[torch.dtype, list[int], int]] = {}
        for name, info in header.items():
            dtype = DTYPES.get(info.get("dtype"))
            start, stop = info.get("data_offsets", (0, -1))
            shape = list(info.get("shape", []))
            if dtype is None or stop - start != math.prod(shape) * _itemsize(dtype) or self._data + stop > size:
                raise SafetensorsFormatError(f"{self.path}: entry {name!r} is corrupt or the file is truncated")
            self.entries[name] = (dtype, shape, self._data + start)

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> list[int]:
        return list(self.entries[name][1])

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name][0]

    def read(self, name: str, dim: int = 0, ranges: Optional[list[tuple[int, int]]] = None, *,
             mapped: bool = False) -> torch.Tensor:
        """The tensor, or the concatenation of ``ranges`` of it along ``dim``.

        ``mapped``: when the slice is one contiguous run, return a view of a private (copy on
        write) memory map of the file instead of a copy.
        """
        dtype, shape, offset = self.entries[name]
        if not shape:
            ranges, dim = None, 0
        ranges = ranges or [(0, shape[0] if shape else 1)]
        out_shape = list(shape)
        if shape:
            out_shape[dim] = sum(b - a for a, b in ranges)
        item = _itemsize(dtype)
        outer = math.prod(shape[:dim]) if shape else 1
        inner = math.prod(shape[dim + 1:]) * item if shape else item
        size = shape[dim] if shape else 1
        runs = [r for r in ((offset + (o * size + a) * inner, (b - a) * inner) for o in range(outer) for a, b in ranges)
                if r[1]]
        if mapped and len(runs) == 1 and runs[0][0] % item == 0:
            return torch.empty(0, dtype=dtype).set_(self._mapping(), runs[0][0] // item, out_shape)
        out = empty_huge(out_shape, dtype)
        self._read_runs(runs, out.reshape(-1).view(torch.uint8).numpy() if out.numel() else None)
        return out

    def _mapping(self) -> torch.UntypedStorage:
        """The whole file as a private memory map (pages are read when first touched)."""
        if self._mapped is None:
            self._mapped = torch.UntypedStorage.from_file(str(self.path), shared=False, nbytes=self.path.stat().st_size)
        return self._mapped

    def _read_runs(self, runs: list[tuple[int, int]], dest: Any) -> None:
        """Read each ``(position, nbytes)`` run into ``dest``, back to back."""
        written, i = 0, 0
        while i < len(runs):
            j = i + 1
            while (j < len(runs) and j - i < _RUNS_PER_CALL and hasattr(os, "preadv")
                   and runs[j - 1][1] <= _COALESCE_RUN and runs[j][1] <= _COALESCE_RUN
                   and 0 <= runs[j][0] - sum(runs[j - 1]) <= _COALESCE_GAP):
                j += 1
            if j - i == 1:
                position, nbytes = runs[i]
                self._read_into(position, dest[written:written + nbytes])
                written += nbytes
            else:
                written = self._read_group(runs[i:j], dest, written)
            i = j

    def _read_group(self, runs: list[tuple[int, int]], dest: Any, written: int) -> int:
        """One ``preadv`` for runs a few KiB apart; the gaps land in a scratch buffer."""
        assert self._file is not None, "reader is closed"
        if self._scratch is None:
            self._scratch = bytearray(_COALESCE_GAP)
        scratch = memoryview(self._scratch)
        buffers, end = [], runs[0][0]
        for position, nbytes in runs:
            if position > end:
                buffers.append(scratch[:position - end])
            buffers.append(dest[written:written + nbytes])
            written += nbytes
            end = position + nbytes
        if os.preadv(self._file.fileno(), buffers, runs[0][0]) != end - runs[0][0]:
            raise SafetensorsFormatError(f"{self.path}: file ends early (truncated)")
        return written

    def _read_into(self, position: int, view: Any) -> None:
        assert self._file is not None, "reader is closed"
        self._file.seek(position)
        got = self._file.readinto(memoryview(view))
        if got != len(view):
            raise SafetensorsFormatError(f"{self.path}: file ends early (truncated)")

    def close(self) -> None:
        """Close the file; mapped tensors already read stay valid (they hold the mapping)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._mapped = None


def empty_huge(shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)``, in its own anonymous memory map advised to use
    transparent huge pages when it is 2 MiB or more (Linux; elsewhere, or below 2 MiB, plain).

    Why: filling fresh memory costs a page fault per 4 KiB page, ~1.4 us each here. Reading
    Llama 191M's 80 MiB of column slices per rank (tp 2) took 52 ms into plain memory and
    25-28 ms into huge pages; a 350 MiB copy, 130 vs 30 ms. When the kernel has to compact
    memory to find huge pages, such a read takes longer (225 and 256 ms, twice here, each the
    first load after other runs had used much memory). The map rounds the size up to 2 MiB,
    which recent kernels align to 2 MiB; the tensor covers only its own bytes and keeps the
    map alive."""
    numel = math.prod(shape)
    nbytes = numel * _itemsize(dtype)
    if nbytes < _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    memory = mmap.mmap(-1, -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        memory.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # huge pages turned off in this kernel: plain pages, still correct
        pass
    return torch.frombuffer(memory, dtype=dtype, count=numel).view(shape)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor: the header (names, dtypes, shapes, offsets)
    is written first from the declared entries, then each tensor's bytes in declared order."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, list[int]]], metadata: dict[str, str]) -> None:
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        self._expected = []
        for name, dtype, shape in entries:
            size = math.prod(shape) * _itemsize(dtype)
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._expected.append((name, dtype, list(shape)))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data section to 8 bytes
        self._file: BinaryIO = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._expected[self._next]
        got = (name, tensor.dtype, list(tensor.shape))
        if got != expected:
            raise SafetensorsFormatError(f"writer expected {expected}, got {got}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if data.numel():
            self._file.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._expected):
            raise SafetensorsFormatError(f"writer closed after {self._next} of {len(self._expected)} tensors")
        self._file.close()
