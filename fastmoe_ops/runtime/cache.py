"""Two-level cache of compiled artefacts: an in-process dict in front of a disk cache.

The disk cache is safe when many processes (MPI ranks) compile the same kernel at once:
the first takes an exclusive `flock` on `<key>.lock` and builds; the others block on the
lock and then read the finished file. The build writes to a temporary file in the same
directory and `os.replace`s it into place, so a reader never sees a torn file even on a
file system where locks are advisory only.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable

from .. import env


def make_key(parts: dict) -> str:
    """Stable SHA-256 of a JSON-serialisable description of everything that changes code."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class DiskCache:
    """Artefacts addressed by key under `<root>/<kind>/<key[:2]>/<key><suffix>`."""

    def __init__(self, root: Path | None = None):
        self._root = root
        self._memory: dict[tuple[str, str, str], Path] = {}
        self._key_locks: dict[tuple[str, str, str], threading.Lock] = {}
        self._lock = threading.Lock()  # guards _key_locks only

    @property
    def root(self) -> Path:
        return (self._root or env.cache_dir()).expanduser()

    def path_for(self, kind: str, key: str, suffix: str) -> Path:
        return self.root / kind / key[:2] / f"{key}{suffix}"

    def get_or_build(self, kind: str, key: str, suffix: str, build: Callable[[Path], None]) -> Path:
        """Return the path of the artefact, building it with `build(tmp_path)` if absent.

        `build` writes the artefact to the path it is given (a private temporary file);
        this function moves it into place atomically."""
        mem_key = (str(self.root), kind, key)
        hit = self._memory.get(mem_key)
        if hit is not None:
            return hit
        # One lock per artefact, not one for the cache: a build may itself ask the cache for
        # another artefact (a module build needs its precompiled header), and threads
        # building different artefacts should not wait for each other.
        with self._lock:
            key_lock = self._key_locks.setdefault(mem_key, threading.Lock())
        with key_lock:
            hit = self._memory.get(mem_key)
            if hit is not None:
                return hit
            final = self.path_for(kind, key, suffix)
            if not final.exists():
                final.parent.mkdir(parents=True, exist_ok=True)
                lock_path = final.with_name(final.name + ".lock")
                with open(lock_path, "a+b") as lock_file:
                    fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
                    try:
                        if not final.exists():
                            self._build_into(final, build)
                    finally:
                        fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)
            self._memory[mem_key] = final
            return final

    @staticmethod
    def _build_into(final: Path, build: Callable[[Path], None]) -> None:
        with tempfile.TemporaryDirectory(dir=final.parent, prefix=".build-") as tmpdir:
            tmp = Path(tmpdir) / final.name
            build(tmp)
            if not tmp.exists() or tmp.stat().st_size == 0:
                raise RuntimeError(f"cache build for {final.name} produced no output")
            # Sidecars (`<name>.log` ...) land first: the artefact's presence implies theirs.
            for side in sorted(Path(tmpdir).glob(final.name + ".*")):
                _atomic_write(final.with_name(side.name), side.read_bytes())
            _atomic_write(final, tmp.read_bytes())

    def clear_memory(self) -> None:
        with self._lock:
            self._memory.clear()


_default: DiskCache | None = None


def default_cache() -> DiskCache:
    global _default
    if _default is None:
        _default = DiskCache()
    return _default
