"""DeepSpeed's shared-memory all-reduce kernel, found and loaded for :mod:`autotp.collectives`.

DeepSpeed compiles the kernel (``csrc/cpu/comm``) with torch's extension builder on first use
and loads it through its op builder. Doing that on every start costs 0.25-0.35 s here: importing
DeepSpeed takes 0.14 s and its builder re-checks the build with ninja, while loading the library
itself takes 1 ms. So once DeepSpeed's builder has loaded the kernel, autotp writes down where
the library is and what it was built from (a *record*), and later processes load the library
directly while the record still holds:

- the same Python and torch (the record is per interpreter and names torch's version);
- the library and each of the kernel's source and header files unchanged, by size and
  modification time (what ninja itself compares). Upgrading or editing DeepSpeed, or another
  environment rebuilding the library, breaks the record: the builder runs again, rebuilding
  if it must, and the record is rewritten.

The record describes the machine's build of the kernel, not a model, so it lives in the user's
cache folder (``~/.cache/autotp/kernels``, or under ``$XDG_CACHE_HOME``) wherever
``AUTOTP_CACHE_DIR`` puts the graph cache: a model's first run, with no graph cache yet, still
finds the kernel as the earlier runs left it. With ``AUTOTP_CACHE_DIR=off`` autotp keeps
nothing on disk and the builder runs every time. The record is trusted as torch's extensions
folder is, where the library lives: both are the user's own, and whoever can write one can
write the other.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import sys
import types
from pathlib import Path
from typing import Optional

import torch

from autotp.errors import AutotpError

__all__ = ["KernelUnavailable", "load_kernel", "record_path"]

_NAME = "deepspeed_shm_comm"


class KernelUnavailable(AutotpError):
    """DeepSpeed is installed but its shared-memory kernel cannot be built or loaded here."""


def load_kernel() -> types.ModuleType:
    """The kernel's Python module (``initialize``, ``vector_kernel_level``); loading it also
    registers ``torch.ops.deepspeed.inference_all_reduce_``.

    Raises:
        ImportError: DeepSpeed is not installed.
        KernelUnavailable: DeepSpeed cannot build or load the kernel on this machine.
    """
    record = record_path()
    module = _load_recorded(record) if record is not None else None
    return module if module is not None else _load_with_builder(record)


def record_path() -> Optional[Path]:
    """Where this interpreter's record lives, or ``None`` (``AUTOTP_CACHE_DIR=off``, or no home)."""
    from autotp.cache import cache_off, user_cache_dir  # autotp.cache imports autotp.collectives, which imports this

    root = user_cache_dir()
    if root is None or cache_off():
        return None
    interpreter = hashlib.sha256(f"{sys.prefix}\0{sys.version}\0{torch.__file__}".encode()).hexdigest()[:16]
    return root / "kernels" / f"{_NAME}-{interpreter}.json"


def _stat(path: str) -> Optional[list[int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _load_recorded(record: Path) -> Optional[types.ModuleType]:
    """The library named by ``record``, if the record holds; else ``None``."""
    try:
        described = json.loads(record.read_text())
        library, name, files = described["library"], described["module"], described["files"]
        holds = (described["torch"] == torch.__version__ and _stat(library) == described["library_stat"]
                 and bool(files) and all(_stat(path) == stat for path, stat in files.items()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # none yet, or unreadable: the builder writes a new one
    if not holds:
        return None
    try:
        return _import_library(library, name)
    except (ImportError, OSError):  # the builder loads it its own way, or rebuilds it
        return None


def _import_library(library: str, name: str) -> types.ModuleType:
    """Load the extension module ``name`` from the file ``library``. The name must be the one it
    was built as (a JIT build's ``deepspeed_shm_comm``, an install-time build's
    ``deepspeed.ops.comm.deepspeed_shm_comm_op``): its init function is named after it."""
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise ImportError(f"{library} is not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_with_builder(record: Optional[Path]) -> types.ModuleType:
    """Load (compiling on first use, ~25 s here) through DeepSpeed's op builder, then record it."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # spares DeepSpeed's accelerator detection warning
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed reports its build on stdout
        from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

        builder = ShareMemCommBuilder()
        if not builder.is_compatible():
            why = builder.error_log or f"not supported on {sys.platform}"
            raise KernelUnavailable(f"DeepSpeed's shared-memory kernel does not build here: {why}")
        try:
            module = builder.load()
        except (RuntimeError, OSError) as exc:  # no compiler, no ninja, a failed build
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise KernelUnavailable(f"DeepSpeed could not build its shared-memory kernel: {first}") from None
    if record is not None:
        _write_record(record, builder, module)
    return module


def _kernel_files(builder: object) -> list[str]:
    """The kernel's sources, and every file under their folders and its include folders (the
    architecture-specific headers the sources include live in subfolders)."""
    sources = [builder.deepspeed_src_path(s) for s in builder.strip_empty_entries(builder.sources())]
    folders = {os.path.dirname(s) for s in sources}
    folders |= {builder.deepspeed_src_path(p) for p in builder.strip_empty_entries(builder.include_paths())}
    files = set(sources)
    for folder in folders:
        for parent, _, names in os.walk(folder):
            files.update(os.path.join(parent, name) for name in names)
    return sorted(files)


def _write_record(record: Path, builder: object, module: types.ModuleType) -> None:
    library = getattr(module, "__file__", None)
    if not library:
        return
    files = {path: _stat(path) for path in _kernel_files(builder)}
    if not files or any(stat is None for stat in files.values()):
        return
    described = {"torch": torch.__version__, "library": library, "module": module.__name__,
                 "library_stat": _stat(library), "files": files}
    temporary = record.with_name(f".{record.name}.{os.getpid()}.tmp")
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(described, indent=1))
        os.replace(temporary, record)
    except OSError:  # a read-only cache folder: the builder simply runs again next time
        pass
    finally:
        temporary.unlink(missing_ok=True)
