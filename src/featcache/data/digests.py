"""Content digests of samples: what the feature cache keys a row by.

A file's digest is the SHA-256 of its bytes; an in-memory image's is the SHA-256 of its pixel bytes,
dtype and shape. Paths and modification times are never part of a digest: they only memoise it.
:class:`DigestMemo` keeps ``(path, size, mtime_ns) -> digest`` in a small SQLite database under the
cache root, so a re-run over an unchanged folder stats its files and reads none of their bytes.

A file whose size or mtime changed is hashed again. A file modified within :data:`RACY_NS` of being
hashed is hashed again on the next run too (git's "racily clean" rule): a write in the same
timestamp tick as the hashing cannot hide behind an unchanged stat.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .._util import FeatcacheError

log = logging.getLogger(__name__)

#: a memoised digest is trusted only for files last modified this long before they were hashed
RACY_NS = 2_000_000_000


class SampleChangedError(FeatcacheError):
    """A sample's content changed while featcache was using it; the message names the file."""


def pixels_digest(pixels: np.ndarray) -> str:
    """The digest of an in-memory image: SHA-256 of its dtype, shape and pixel bytes.

    Example:
        >>> pixels_digest(np.zeros((2, 2), np.uint8)) == pixels_digest(np.zeros((2, 2), np.uint8))
        True
    """
    a = np.ascontiguousarray(pixels)
    h = hashlib.sha256(f"pixels|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def bytes_digest(data: bytes) -> str:
    """The digest of a file's content (SHA-256 of its bytes)."""
    return hashlib.sha256(data).hexdigest()


def _nearest(path: Path) -> Path:
    """``path``'s nearest existing parent."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"image {path!r} listed in the dataset is missing (removed or renamed after the dataset was "
            "listed?); run the command again to list the dataset anew"
        ) from exc


def hash_file(path: str) -> tuple[str, os.stat_result]:
    """The SHA-256 of a file's bytes and its stat, checked unchanged across the read."""
    before = _stat(path)
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except FileNotFoundError:
        _stat(path)  # raises the message naming the file
        raise
    after = _stat(path)
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        raise SampleChangedError(
            f"image {path!r} changed while featcache was hashing it; run the command again once the "
            "file is no longer being written"
        )
    return h.hexdigest(), after


class DigestMemo:
    """``(path, size, mtime_ns) -> digest`` of files, shared by processes (SQLite, one file).

    Args:
        path: the database file (created on first use); None keeps nothing between calls.

    Example:
        >>> memo = DigestMemo(None)
        >>> memo.file_digests([])
        []
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None

    def _connect(self) -> sqlite3.Connection:
        path = self.path
        if path is None:
            raise FeatcacheError("this digest memo keeps nothing on disk")
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=120)
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                "hashed_ns INTEGER, digest TEXT) WITHOUT ROWID"
            )
        except sqlite3.DatabaseError as exc:
            db.close()
            raise FeatcacheError(
                f"the digest memo {str(path)!r} is damaged ({exc}); delete it (it only saves "
                "re-reading unchanged files) and run the command again"
            ) from exc
        return db

    def _lookup(self, paths: Sequence[str]) -> dict[str, tuple[int, int, int, str]]:
        if self.path is None or not paths:
            return {}
        found: dict[str, tuple[int, int, int, str]] = {}
        if not self.path.exists() and not os.access(_nearest(self.path), os.W_OK):
            return found  # a cache that cannot be written (yet) has no memo: hash every file
        db = self._connect()
        try:
            for i in range(0, len(paths), 500):
                chunk = list(paths[i : i + 500])
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    f"SELECT path, size, mtime_ns, hashed_ns, digest FROM files WHERE path IN ({marks})",
                    chunk,
                )
                for p, size, mtime, hashed, digest in rows:
                    found[p] = (size, mtime, hashed, digest)
        finally:
            db.close()
        return found

    def _store(self, rows: list[tuple[str, int, int, int, str]]) -> None:
        if self.path is None or not rows:
            return
        try:
            db = self._connect()
            try:
                with db:
                    db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", rows)
            finally:
                db.close()
        except (sqlite3.OperationalError, OSError) as exc:  # a read-only or full cache folder: hashing works
            log.warning(
                "could not update the digest memo %s (%s); files will be hashed again", self.path, exc
            )

    def file_digests(
        self, paths: Sequence[str | os.PathLike[str]], progress: bool = False, threads: int | None = None
    ) -> list[str]:
        """The digest of each file, reading only files the memo does not know in their current state.

        Example:
            >>> DigestMemo("/tmp/memo.sqlite3").file_digests(["a.png", "b.png"])  # doctest: +SKIP
            ['9f86d0...', '60303a...']
        """
        names = [os.path.abspath(p) for p in paths]
        known = self._lookup(names)
        out: list[str | None] = [None] * len(names)
        todo = []
        for i, name in enumerate(names):
            st, memo = _stat(name), known.get(name)
            fresh = memo is not None and memo[:2] == (st.st_size, st.st_mtime_ns)
            if memo is not None and fresh and st.st_mtime_ns < memo[2] - RACY_NS:
                out[i] = memo[3]
            else:
                todo.append(i)
        if todo:
            self._hash(names, todo, out, progress, threads)
        return [d for d in out if d is not None]

    def _hash(
        self, names: list[str], todo: list[int], out: list[str | None], progress: bool, threads: int | None
    ) -> None:
        rows = []
        workers = threads or (min(8, os.cpu_count() or 1) if len(todo) > 64 else 1)
        bar = tqdm(total=len(todo), desc="hash files", unit="file", delay=1, disable=not progress)
        hashed_ns = time.time_ns()
        with bar, ThreadPoolExecutor(workers) as pool:
            for i, (digest, st) in zip(todo, pool.map(hash_file, (names[i] for i in todo))):
                out[i] = digest
                rows.append((names[i], st.st_size, st.st_mtime_ns, hashed_ns, digest))
                bar.update()
        self._store(rows)


def digests_of(count: int, digest: Callable[[int], str], progress: bool = False, what: str = "") -> list[str]:
    """``digest(i)`` for every ``i`` below ``count``, with a progress bar when it takes a while."""
    bar = tqdm(range(count), desc=f"hash {what}".strip(), unit="img", delay=1, disable=not progress)
    return [digest(i) for i in bar]
