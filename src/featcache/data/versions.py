"""A memo of what was read from a whole file (a tar shard's member index, a dataset's digests), keyed by
the file's version: its path, size, mtime_ns, ctime_ns, inode and device (what git's index keys on).

A WebDataset shard or a dataset's Arrow file holds many images; hashing them again on every run would
cost a full read. The memo keeps, per file, the version it was read at and what was read (JSON, never
pickle) in one SQLite database under the cache root (:data:`VERSION_MEMO`), so a re-run over unchanged
files stats them and reads none of their bytes. A file whose version differs, or that was modified
within :data:`~featcache.data.digests.RACY_NS` of being read (git's "racily clean" rule), is read again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._util import FeatcacheError
from .digests import RACY_NS

log = logging.getLogger(__name__)

#: the memo's file under the cache root (beside the per-file digest memo)
VERSION_MEMO = ".file-versions.sqlite3"
#: bumped when what a reader stores changes meaning: older entries are read again, never misread
MEMO_FORMAT = 1


def file_version(path: str | os.PathLike[str]) -> list[int]:
    """``[size, mtime_ns, ctime_ns, inode, device]`` of a file: a memo entry holds only for this version.

    Example:
        >>> len(file_version(__file__))
        5
    """
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class VersionMemo:
    """``(kind, path) -> (version, what was read)``, shared by processes (SQLite, one file).

    Args:
        path: the database file (created on first use); None keeps nothing.

    Example:
        >>> memo = VersionMemo(None)
        >>> memo.get("tar", "a.tar", [1, 2, 3, 4, 5], 2) is None
        True
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None

    @classmethod
    def under(cls, root: str | os.PathLike[str] | None) -> VersionMemo:
        """The memo of a cache root (None: no memo)."""
        return cls(Path(root) / VERSION_MEMO if root is not None else None)

    def _connect(self) -> sqlite3.Connection:
        if self.path is None:
            raise FeatcacheError("this memo keeps nothing on disk")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=120)
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS files (kind TEXT, path TEXT, version TEXT, read_ns INTEGER, "
                "payload TEXT, PRIMARY KEY (kind, path)) WITHOUT ROWID"
            )
        except sqlite3.DatabaseError as exc:
            db.close()
            raise FeatcacheError(
                f"the memo {str(self.path)!r} is damaged ({exc}); delete it (it only saves re-reading "
                "unchanged files) and run the command again"
            ) from exc
        return db

    def get(self, kind: str, path: str, version: list[Any], modified_ns: int) -> Any | None:
        """What was stored for ``path`` at exactly ``version`` (None when unknown, stale, or racy: the
        file was last modified, at ``modified_ns``, too close to the read)."""
        if self.path is None or not self.path.exists():
            return None
        try:
            db = self._connect()
        except (sqlite3.OperationalError, OSError):
            return None
        try:
            row = db.execute(
                "SELECT version, read_ns, payload FROM files WHERE kind = ? AND path = ?", (kind, path)
            ).fetchone()
        finally:
            db.close()
        if row is None or json.loads(row[0]) != [MEMO_FORMAT, *version]:
            return None
        if modified_ns >= row[1] - RACY_NS:  # modified just before it was read: a same-tick write may hide
            return None
        return json.loads(row[2])

    def put(self, kind: str, path: str, version: list[Any], read_ns: int, payload: Any) -> None:
        """Store what was read from ``path`` at ``version`` (read started at ``read_ns``); a cache that
        cannot be written only costs the next run a read."""
        if self.path is None:
            return
        try:
            db = self._connect()
            try:
                with db:
                    db.execute(
                        "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)",
                        (kind, path, json.dumps([MEMO_FORMAT, *version]), read_ns, json.dumps(payload)),
                    )
            finally:
                db.close()
        except (sqlite3.OperationalError, OSError) as exc:
            log.warning("could not update the memo %s (%s); %s will be read again", self.path, exc, path)

    @contextlib.contextmanager
    def reading(self, kind: str, path: str) -> Iterator[int]:
        """Held while one process reads ``path`` (others wait, then find its entry: ``torchrun`` ranks
        read each file once between them); yields the time the read starts."""
        if self.path is None:
            yield time.time_ns()
            return
        locks = self.path.parent / ".locks"
        name = hashlib.sha256(f"{kind}\0{path}".encode()).hexdigest()[:32]
        try:
            locks.mkdir(parents=True, exist_ok=True)
            handle = open(locks / f"read-{name}.lock", "a")  # noqa: SIM115 (held across the yield)
        except OSError:  # a read-only cache: no memo and no lock, every process reads
            yield time.time_ns()
            return
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield time.time_ns()
