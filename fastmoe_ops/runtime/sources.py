"""Where the shipped kernel sources are, and a fingerprint of all of them.

The kernel trees (`csrc/`, `ptx/`) ship inside the package as `fastmoe_ops/_kernels/`
(symlinks in a checkout, real copies in a wheel) and are found with importlib.resources.
Headers reached through `-I` are invisible to any compiler cache, so the fingerprint of
every shipped file goes into each kernel's cache key.
"""
from __future__ import annotations

import hashlib
import importlib.resources
import threading
from pathlib import Path
from typing import Callable

_SUFFIXES = {".cuh", ".h", ".hpp", ".cpp", ".cu", ".S"}
_lock = threading.Lock()
_fingerprints: dict[Path, str] = {}
_root_override: Path | None = None
_refresh_hooks: list[Callable[[], None]] = []


def kernel_root() -> Path:
    """The directory holding `csrc/` and `ptx/`."""
    if _root_override is not None:
        return _root_override
    return Path(str(importlib.resources.files("fastmoe_ops") / "_kernels")).resolve()


def include_dirs() -> list[Path]:
    """`-I` directories for every kernel compile: the tree root (so `#include "csrc/..."`
    and `#include "ptx/..."` work) and `csrc/` itself."""
    root = kernel_root()
    return [root, root / "csrc"]


def _iter_files(root: Path):
    for tree in ("csrc", "ptx"):
        base = root / tree
        for p in sorted(base.rglob("*")):
            if p.is_file() and p.suffix in _SUFFIXES:
                yield p.relative_to(root).as_posix(), p


def fingerprint(root: Path | None = None) -> str:
    """SHA-256 over the names and contents of every shipped kernel source file.

    Computed once per process per root (a few ms); `refresh()` forgets it."""
    root = (root or kernel_root()).resolve()
    with _lock:
        cached = _fingerprints.get(root)
        if cached is not None:
            return cached
        h = hashlib.sha256()
        for rel, p in _iter_files(root):
            h.update(rel.encode())
            h.update(b"\0")
            h.update(p.read_bytes())
            h.update(b"\0")
        value = h.hexdigest()
        _fingerprints[root] = value
        return value


def on_refresh(hook: Callable[[], None]) -> None:
    """Have `refresh()` call `hook()`: for in-process tables of loaded kernels (the
    launcher's), which must not outlive the sources they were built from. The tables stay
    plain dicts, so a warm launch is still one lookup."""
    _refresh_hooks.append(hook)


def refresh() -> None:
    """Forget the fingerprints (an edited kernel file is seen by the next compile) and every
    loaded kernel registered with `on_refresh` (so the next launch runs the new build)."""
    with _lock:
        _fingerprints.clear()
    for hook in _refresh_hooks:
        hook()


def set_kernel_root(root: Path | None) -> None:
    """Point the library at another copy of the kernel trees (tests, development)."""
    global _root_override
    _root_override = None if root is None else Path(root).resolve()
    refresh()
