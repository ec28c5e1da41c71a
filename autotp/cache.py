"""Graph cache: a rank's rewritten graph and its plan, kept on disk between runs.

Capture is most of the time to a ready model: torch.export traces the model symbolically
(1.9 s of 3.6 s for the 191M-parameter Llama of the benchmarks), and every run of the same
model on the same ranks traces the same graph. An entry holds what :func:`autotp.rewrite.rewrite`
produced for one rank, before any weight is loaded: the graph (nodes as JSON), the plan, the
input guards export made, the constants the model created while it was traced, and whatever
the caller keeps with it. A hit rebuilds the graph module in milliseconds; loading then goes
on as after a capture.

The key (:mod:`autotp.cache_key`) is a sha256 over everything that shapes that graph, so that no
stale entry is used; an entry is stored as JSON and tensors (:mod:`autotp.graph_json`).

Where: ``$AUTOTP_CACHE_DIR`` (``off`` turns the cache off), else ``$XDG_CACHE_HOME/autotp``,
else ``~/.cache/autotp``. An entry is written under a temporary name and renamed, so a reader
sees a whole entry or none; an entry that cannot be read is reported, ignored and rewritten.

Size: every change of autotp, torch, transformers or the model's code makes new keys, so old
entries would pile up. After each write, while the entries take more than
``$AUTOTP_CACHE_MAX_MB`` (1024 MiB by default; an entry is 60-160 KB for an 8-layer Llama), the least
recently used are deleted (see :func:`prune`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from autotp.cache_key import FORMAT, Uncacheable, graph_key
from autotp.capture import share_mode
from autotp.collectives import Communicator
from autotp.errors import AutotpError
from autotp.graph_json import decode_graph, decode_guards, encode_graph, encode_guards
from autotp.plan import Plan

__all__ = ["GraphCache", "CachedGraph", "CacheSlot", "Uncacheable", "cache_dir", "cache_off", "user_cache_dir",
           "graph_key", "slot", "prune", "max_bytes", "encode_graph", "decode_graph", "encode_guards",
           "decode_guards"]

_ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.pt")


def cache_dir() -> Optional[Path]:
    """Where entries live, or ``None`` when ``AUTOTP_CACHE_DIR=off`` (or no folder is known)."""
    configured = os.environ.get("AUTOTP_CACHE_DIR")
    if configured is not None:
        return None if cache_off() else Path(configured)
    return user_cache_dir()


def cache_off() -> bool:
    """Whether ``AUTOTP_CACHE_DIR`` says autotp keeps nothing on disk (``off``, ``0``, ``false``
    or empty; unset means the default folder)."""
    configured = os.environ.get("AUTOTP_CACHE_DIR")
    return configured is not None and configured.strip().lower() in ("off", "0", "false", "")


def user_cache_dir() -> Optional[Path]:
    """autotp's folder in the user's cache: ``$XDG_CACHE_HOME/autotp``, else ``~/.cache/autotp``
    (``None`` with no home directory, as in some containers)."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except (RuntimeError, KeyError):
            return None
    return Path(base) / "autotp"


@dataclass
class CachedGraph:
    """One rank's rewritten graph module (not yet loaded, its code not yet generated: see
    :func:`decode_graph`) and its plan."""

    graph_module: fx.GraphModule
    plan: Plan
    extra: dict[str, Any] = field(default_factory=dict)


def max_bytes() -> int:
    """The cache's size bound: ``$AUTOTP_CACHE_MAX_MB`` MiB, 1024 by default.

    Raises:
        AutotpError: the setting is not a finite number of MiB, 0 or more.
    """
    configured = os.environ.get("AUTOTP_CACHE_MAX_MB", "1024")
    try:
        megabytes = float(configured)
    except ValueError:
        megabytes = -1.0
    if not (megabytes >= 0 and math.isfinite(megabytes)):  # NaN fails both
        raise AutotpError(f"AUTOTP_CACHE_MAX_MB={configured!r}: expected a number of MiB, 0 or more")
    return int(megabytes * 2**20)


@dataclass
class GraphCache:
    """Entries under ``root``, one file per key (``<key>.pt``), kept under ``limit`` bytes
    (:func:`prune`; ``$AUTOTP_CACHE_MAX_MB``, read when the cache is made)."""

    root: Path
    limit: int = field(default_factory=max_bytes)

    @classmethod
    def from_env(cls) -> Optional["GraphCache"]:
        """The cache the environment configures, or None when it is off.

        Raises:
            AutotpError: ``$AUTOTP_CACHE_MAX_MB`` is not a size (named now, not met as a failed
                write later).
        """
        root = cache_dir()
        return cls(root) if root is not None else None

    def path(self, key: str) -> Path:
        return self.root / f"{key}.pt"

    def get(self, key: str, comm: Communicator) -> Optional[CachedGraph]:
        path = self.path(key)
        try:
            if not path.is_file():
                return None
        except OSError as exc:  # a folder another user made (permission denied): run without it
            warnings.warn(f"autotp: cannot read the graph cache {self.root}: {exc}", stacklevel=2)
            return None
        try:
            entry = torch.load(path, weights_only=True)
            if entry.get("format") != FORMAT:
                return None
            meta = json.loads(entry["meta"])
            gm = decode_graph(meta["graph"], entry["constants"], comm)
            found = CachedGraph(gm, Plan.from_dict(meta["plan"]), meta["extra"])
        except Exception as exc:  # a damaged or foreign entry is not fatal: capture again
            warnings.warn(f"autotp: ignoring graph cache entry {path}: {type(exc).__name__}: {exc}", stacklevel=2)
            return None
        with contextlib.suppress(OSError):  # its time of use, for pruning (a read-only cache keeps the old one)
            os.utime(path)
        return found

    def put(self, key: str, gm: fx.GraphModule, plan: Plan, guards: Any, extra: Optional[dict[str, Any]] = None) -> None:
        """Write the entry.

        Raises:
            Uncacheable: the graph cannot be described (nothing is written).
        """
        graph, constants = encode_graph(gm, guards)
        meta = json.dumps({"graph": graph, "plan": plan.to_dict(), "extra": extra or {}})
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            torch.save({"format": FORMAT, "meta": meta, "constants": constants}, temporary)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        prune(self.root, self.limit)


def prune(root: Path, limit: int, *, keep_recent_s: float = 600.0) -> list[Path]:
    """Delete the least recently used entries of ``root`` while its entries take more than
    ``limit`` bytes, down to three quarters of it (so that not every write prunes). An entry's
    time of use is its modification time, which a hit refreshes. Entries used in the last
    ``keep_recent_s`` seconds stay, however large the cache: a run on another rank or in
    another process may be about to read them. Only files named as entries are counted or
    deleted (``<sha256>.pt``). Returns the deleted paths."""
    entries = []
    with contextlib.suppress(OSError):
        for item in os.scandir(root):
            if _ENTRY_NAME.fullmatch(item.name):  # only autotp's own: the folder may be a shared one
                with contextlib.suppress(OSError):
                    stat = item.stat()
                    entries.append((stat.st_mtime, stat.st_size, Path(item.path)))
    total = sum(size for _, size, _ in entries)
    if total <= limit:
        return []
    deleted, now = [], time.time()
    for used, size, path in sorted(entries):
        if total <= limit * 3 // 4 or now - used < keep_recent_s:
            break
        with contextlib.suppress(FileNotFoundError):  # another process pruned it first
            path.unlink()
            deleted.append(path)
        total -= size
    return deleted


@dataclass
class CacheSlot:
    """Where one graph is looked up and stored. ``status``: ``off``, ``uncacheable: <why>``,
    ``miss``, ``hit``, ``stored`` or ``not stored: <why>``."""

    store: Optional[GraphCache]
    key: Optional[str]
    status: str

    def get(self, comm: Communicator) -> Optional[CachedGraph]:
        if self.store is None or self.key is None:
            return None
        found = self.store.get(self.key, comm)
        self.status = "hit" if found is not None else "miss"
        return found

    def put(self, gm: fx.GraphModule, plan: Plan, guards: Any, extra: Optional[dict[str, Any]] = None) -> None:
        if self.store is None or self.key is None:
            return
        try:
            self.store.put(self.key, gm, plan, guards, extra)
            self.status = "stored"
        except Uncacheable as exc:
            self.status = f"uncacheable: {exc}"
        except Exception as exc:  # a read-only or full disk costs the next run time, not this one
            self.status = f"not stored: {type(exc).__name__}: {exc}"
            warnings.warn(f"autotp: could not write the graph cache entry {self.store.path(self.key)}: {exc}",
                          stacklevel=2)


def slot(enabled: bool, model: nn.Module, inputs: Mapping[str, Any], **settings: Any) -> CacheSlot:
    """The cache slot for ``model`` called with ``inputs`` under ``settings`` (see
    :func:`graph_key`); status ``off`` when ``enabled`` is False or the cache is turned off."""
    store = GraphCache.from_env() if enabled else None
    if store is None:
        return CacheSlot(None, None, "off")
    try:
        # the sharing mode decides which layers a capture copies: a graph copied under one must not
        # serve a process that asked for every layer traced
        key = graph_key(model, inputs, share_layers=share_mode(), **settings)
    except Uncacheable as exc:
        return CacheSlot(None, None, f"uncacheable: {exc}")
    except Exception as exc:  # an attribute the key cannot even read (a config that is not JSON, ...)
        return CacheSlot(None, None, f"uncacheable: {type(exc).__name__}: {exc}")
    return CacheSlot(store, key, "miss")
