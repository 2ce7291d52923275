"""Content digests of samples: what the feature cache keys a row by.

A file's digest is the SHA-256 of its bytes; an in-memory image's is the SHA-256 of its pixel bytes,
dtype and shape. Paths and stat data are never part of a digest: they only memoise it.
:class:`DigestMemo` keeps, in a small SQLite database under the cache root, one row per folder: the
names of its files seen so far, each file's stat data as git's index keys it (size, mtime, ctime,
inode, device) and its digest (32 raw bytes). A re-run over an unchanged folder costs one ``stat``
per file and one memo query, and reads no file's bytes.

A file is trusted to hold its memoised digest only when all five stat fields are unchanged: ``cp -p``,
``rsync -t``, ``touch -r`` or ``tar x`` put the old mtime back but cannot set the ctime, and a swap
of two files changes their inodes. A file modified within :data:`RACY_NS` of being hashed is hashed
again on the next run too (git's "racily clean" rule), as is one whose ctime lies within
:data:`CTIME_TICK_NS` of its hashing: a write in the same timestamp tick cannot hide behind an
unchanged stat.

The same database keeps which cache shard files had their SHA-256 checked, keyed by the same stat
fields (:meth:`DigestMemo.checked` / :meth:`DigestMemo.record_checks`): a shard is hashed once per
file version, across processes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import logging
import operator
import os
import sqlite3
import stat as stat_mod
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .._util import FeatcacheError

#: the per-file digest memo under the cache root; it also keeps which shard files of the cache were
#: checked, by their stat data: a shard is hashed once per file version
DIGEST_MEMO = ".digests.sqlite3"

log = logging.getLogger(__name__)

#: a memoised digest is trusted only for files last modified this long before they were hashed
RACY_NS = 2_000_000_000
#: ... and whose status last changed (ctime) this long before they were hashed: a timestamp tick
CTIME_TICK_NS = 20_000_000
#: the memo's schema (SQLite ``user_version``); a memo of another schema is rebuilt or refused
MEMO_SCHEMA = 2
#: one record of stat data per file: what git's index keys on, and when the file was hashed
STAT_DTYPE = np.dtype(
    [("size", "<i8"), ("mtime", "<i8"), ("ctime", "<i8"), ("ino", "<u8"), ("dev", "<u8"), ("hashed", "<i8")]
)
_TABLES = {
    "dirs": ["path", "names", "stats", "digests"],
    "shards": ["path", "size", "mtime", "ctime", "ino", "dev", "checked", "sha256"],
}
_CREATE = (
    "CREATE TABLE IF NOT EXISTS dirs (path TEXT PRIMARY KEY, names BLOB, stats BLOB, digests BLOB) "
    "WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS shards (path TEXT PRIMARY KEY, size INTEGER, mtime INTEGER, ctime INTEGER, "
    "ino TEXT, dev TEXT, checked INTEGER, sha256 TEXT) WITHOUT ROWID",
)

StatKey = tuple[int, int, int, int, int]
_NOT_UPDATED = "could not update the digest memo %s (%s); files will be hashed again"


class SampleChangedError(FeatcacheError):
    """A sample's content changed while featcache was using it; the message names the file."""


class MemoDamagedError(FeatcacheError):
    """The digest memo cannot be used as it is; the message names the file and the fix."""


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


def stat_key(st: os.stat_result) -> StatKey:
    """What the memo keys a file version on: size, mtime, ctime, inode, device (as git's index)."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def trusted(key: StatKey, memo: tuple[int, ...], hashed_ns: int) -> bool:
    """Whether a file with stat ``key`` still holds the digest memoised with stat ``memo`` at
    ``hashed_ns``: every field equal, and neither its mtime nor its ctime racily close to the hashing."""
    return key == memo[:5] and key[1] < hashed_ns - RACY_NS and key[2] < hashed_ns - CTIME_TICK_NS


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


def hash_file(path: str) -> tuple[str, os.stat_result, int]:
    """The SHA-256 of a file's bytes, its stat and the time of that stat, checked unchanged across the
    read."""
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
    seen = time.time_ns()
    if (before.st_size, before.st_mtime_ns, before.st_ctime_ns, before.st_ino) != (
        after.st_size,
        after.st_mtime_ns,
        after.st_ctime_ns,
        after.st_ino,
    ):
        raise SampleChangedError(
            f"image {path!r} changed while featcache was hashing it; run the command again once the "
            "file is no longer being written"
        )
    return h.hexdigest(), after, seen


class _DirRow:
    """One folder's memo row: file names, their stat records and digests (32 raw bytes each)."""

    def __init__(self, names: list[str] | None, stats: np.ndarray, digests: bytes, blob: bytes = b"") -> None:
        # ``names`` None: the names are ``blob`` (as stored, NUL-separated), split only when asked for;
        # a folder listed as the memo has it is recognised from the blob alone (no string per file)
        self._names, self._blob, self.stats, self.digests = names, blob, stats, digests
        self._pos: dict[str, int] | None = None

    @property
    def names(self) -> list[str]:
        """The file names, in the row's order."""
        if self._names is None:
            self._names = self._blob.decode("utf-8", "surrogateescape").split("\0") if self._blob else []
        return self._names

    @classmethod
    def decode(cls, names: bytes, stats: bytes, digests: bytes) -> _DirRow:
        if names is not None and not isinstance(names, bytes):
            raise TypeError(f"names stored as {type(names).__name__}, not bytes")
        count = names.count(b"\0") + 1 if names else 0
        arr = np.frombuffer(stats, STAT_DTYPE)
        if len(arr) != count or len(digests) != 32 * count:
            raise ValueError(f"a folder row of {count} names, {len(arr)} stats, {len(digests)} digest bytes")
        return cls(None, arr, digests, names or b"")

    def encode(self) -> tuple[bytes, bytes, bytes]:
        joined = None if self._names is None else "\0".join(self._names)
        blob = self._blob if joined is None else joined.encode("utf-8", "surrogateescape")
        return blob, self.stats.tobytes(), self.digests

    def positions(self, names: list[str]) -> np.ndarray:
        """Each name's position in the row (-1: not there); for an unchanged folder one comparison of the
        joined names with the stored ones."""
        if self._names is None and len(names) == len(self.stats):  # (no file's name holds a NUL)
            with contextlib.suppress(UnicodeEncodeError):  # a name no listing made: compared as strings
                if "\0".join(names).encode("utf-8", "surrogateescape") == self._blob:
                    return np.arange(len(names))
        known = self.names
        if names == known:
            return np.arange(len(names))
        if len(names) > len(known) and names[: len(known)] == known:  # files added after the known ones
            return np.concatenate([np.arange(len(known)), np.full(len(names) - len(known), -1)])
        if self._pos is None:
            self._pos = dict(zip(known, range(len(known))))
        return np.fromiter(map(self._pos.get, names, itertools.repeat(-1)), np.int64, len(names))

    def updated(self, changes: dict[str, tuple[tuple[int, ...], bytes]]) -> _DirRow:
        """The row with ``{name: (stat record, digest)}`` replaced or added."""
        if self._pos is None:
            self._pos = {n: i for i, n in enumerate(self.names)}
        stats, digests = self.stats.copy(), bytearray(self.digests)
        new = [n for n in changes if n not in self._pos]
        for n, (rec, d) in changes.items():
            i = self._pos.get(n)
            if i is not None:
                stats[i] = rec
                digests[32 * i : 32 * i + 32] = d
        added = np.array([changes[n][0] for n in new], STAT_DTYPE)
        return _DirRow(
            self.names + new,
            np.concatenate([stats, added]),
            bytes(digests) + b"".join(changes[n][1] for n in new),
        )


def _split(name: str) -> tuple[str, str]:
    """(folder, file name) of an absolute path."""
    folder, _, base = name.rpartition(os.sep)
    return folder or os.sep, base


#: the characters of a content digest as featcache writes it
_HEX = frozenset("0123456789abcdef")


def raw_digests(digests: Sequence[str]) -> np.ndarray:
    """Hex digests as an (n, 32) uint8 array; a string that is not 64 lower-case hex digits is a
    ``ValueError`` naming it (a digest is never reinterpreted: ``bytes.fromhex`` alone accepts capitals
    and skips spaces).

    Example:
        >>> raw_digests(["00" * 31 + "ff"])[0, -1]
        np.uint8(255)
    """
    joined = "".join(digests)
    try:
        data = bytes.fromhex(joined)
    except ValueError:
        data = b""
    # every character a hex digit (no space skipped) and none a capital
    if len(data) * 2 != len(joined) or len(joined) != 64 * len(digests) or any(c in joined for c in "ABCDEF"):
        bad = next((d for d in digests if len(d) != 64 or not _HEX.issuperset(d)), joined[:64])
        raise ValueError(f"{bad!r} is not a content digest (64 lower-case hex digits)")
    return np.frombuffer(data, np.uint8).reshape(-1, 32)


def hex_digests(raw: np.ndarray) -> list[str]:
    """(n, 32) uint8 digests as hex strings (one string per row, no Python step per digest byte).

    Example:
        >>> hex_digests(np.zeros((1, 32), np.uint8)) == ["00" * 32]
        True
    """
    flat = np.ascontiguousarray(raw, np.uint8).tobytes()
    return flat.hex("\n", 32).split("\n") if flat else []  # a separator every 32 bytes


def _by_folder(paths: Sequence[str | os.PathLike[str]]) -> dict[str, tuple[list[int], list[str]]]:
    """The paths grouped by absolute folder: ``{folder: (indices, file names)}``."""
    groups: dict[str, tuple[list[int], list[str]]] = {}
    for i, p in enumerate(paths):
        name = p if type(p) is str else os.fspath(p)
        folder, _, base = (name if name[:1] == os.sep else os.path.abspath(name)).rpartition(os.sep)
        folder = folder or os.sep
        g = groups.get(folder)
        if g is None:
            g = groups[folder] = ([], [])
        g[0].append(i)
        g[1].append(base)
    return groups


#: the stat fields a memo record is compared on (STAT_DTYPE without the time of hashing)
_KEY_FIELDS = ("size", "mtime", "ctime", "ino", "dev")
_KEY_DTYPE = np.dtype([(f, STAT_DTYPE.fields[f][0]) for f in _KEY_FIELDS])  # type: ignore[index]


_KEY_OF = operator.attrgetter("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev")


def _stat_records(top: str, names: list[str]) -> np.ndarray:
    """One ``stat`` per file of folder ``top`` (the floor of a run over a known folder) as records of
    ``_KEY_DTYPE``, no Python frame per file; a missing file raises naming it."""
    try:
        # stat by name relative to the folder's descriptor: the kernel resolves one component per file,
        # not the whole path again (what os.scandir's own stat does)
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
        try:
            stat = functools.partial(os.stat, dir_fd=fd)
            return np.fromiter(map(_KEY_OF, map(stat, names)), _KEY_DTYPE, len(names))
        finally:
            os.close(fd)
    except FileNotFoundError:
        for n in names:
            _stat(top + n)  # raises naming the first missing file
        raise


def _vouched(fresh: np.ndarray, memo: np.ndarray) -> np.ndarray:
    """Which files' memoised digests still hold (bool per file): :func:`trusted` as one vector
    comparison of their fresh stat records against the memo's (all five fields equal, neither the mtime
    nor the ctime racily close to the hashing)."""
    ok = np.ones(len(fresh), bool)
    for f in _KEY_FIELDS:
        ok &= fresh[f] == memo[f]
    ok &= fresh["mtime"] < memo["hashed"] - RACY_NS
    ok &= fresh["ctime"] < memo["hashed"] - CTIME_TICK_NS
    return ok


class DigestMemo:
    """The content digest of files by their stat data (as git's index), shared by processes (SQLite,
    one file under the cache root), and the shard files whose SHA-256 was checked.

    Args:
        path: the database file (created on first use); None keeps nothing between calls.

    Example:
        >>> memo = DigestMemo(None)
        >>> memo.file_digests([])
        []
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None

    def damaged(self, why: object) -> MemoDamagedError:
        """The one error for a memo that cannot be used: what is wrong, and the fix."""
        return MemoDamagedError(
            f"digest memo is damaged: {str(self.path)!r} {why} (remove {str(self.path)!r} to rebuild it, "
            "or choose another cache root with --cache-dir / $FEATCACHE_HOME); it only spares re-reading "
            "unchanged files, no feature row is lost"
        )

    def _check_file(self) -> None:
        """Refuse a memo (or its journal) that is not a regular file: a link would be written through."""
        path = self.path
        for f in (path, *(Path(f"{path}{s}") for s in ("-journal", "-wal", "-shm"))) if path else ():
            try:
                mode = os.lstat(f).st_mode
            except FileNotFoundError:
                continue
            if stat_mod.S_ISLNK(mode):
                raise self.damaged(f"{'' if f == path else f'(its file {f.name!r}) '}is a symbolic link")
            if not stat_mod.S_ISREG(mode):
                raise self.damaged(f"{'' if f == path else f'(its file {f.name!r}) '}is not a regular file")

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A connection to the memo, its schema checked (or created); every SQLite error is the named
        :meth:`damaged` error."""
        path = self.path
        if path is None:
            raise FeatcacheError("this digest memo keeps nothing on disk")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._check_file()
        try:
            db = sqlite3.connect(path, timeout=120)
        except sqlite3.Error as exc:
            raise self.damaged(f"cannot be opened ({exc})") from exc
        try:
            self._schema(db)
            yield db
        except sqlite3.Error as exc:
            raise self.damaged(f"cannot be read ({type(exc).__name__}: {exc})") from exc
        finally:
            db.close()

    def _schema(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:  # new, or the per-file memo of an older featcache: rebuilt (it only saves hashing)
            with db:
                db.execute("DROP TABLE IF EXISTS files")
                for sql in _CREATE:
                    db.execute(sql)
                db.execute(f"PRAGMA user_version = {MEMO_SCHEMA}")
        elif version != MEMO_SCHEMA:
            raise self.damaged(f"has schema {version}; this featcache writes schema {MEMO_SCHEMA}")
        for table, columns in _TABLES.items():
            got = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
            if got != columns:
                raise self.damaged(f"holds a table {table!r} with columns {got}, expected {columns}")

    def _usable(self) -> bool:
        """Whether there is a memo to read or create (a cache that cannot be written yet has none)."""
        if self.path is None:
            return False
        return os.path.lexists(self.path) or os.access(_nearest(self.path), os.W_OK)

    def _rows(self, folders: Sequence[str]) -> dict[str, _DirRow]:
        found: dict[str, _DirRow] = {}
        if not folders or not self._usable():
            return found
        with self._db() as db:
            for i in range(0, len(folders), 500):
                chunk = list(folders[i : i + 500])
                marks = ",".join("?" * len(chunk))
                sql = f"SELECT path, names, stats, digests FROM dirs WHERE path IN ({marks})"
                for folder, names, stats, digests in db.execute(sql, chunk):
                    try:
                        found[folder] = _DirRow.decode(names, stats, digests)
                    except (ValueError, TypeError, AttributeError, UnicodeError) as exc:
                        raise self.damaged(f"holds an unreadable row for {folder!r} ({exc})") from exc
        return found

    def _store(self, rows: dict[str, _DirRow]) -> None:
        if self.path is None or not rows:
            return
        try:
            with self._db() as db, db:
                db.executemany(
                    "INSERT OR REPLACE INTO dirs VALUES (?, ?, ?, ?)",
                    [(folder, *row.encode()) for folder, row in rows.items()],
                )
        except MemoDamagedError as exc:
            if isinstance(exc.__cause__, sqlite3.OperationalError) and "readonly" in str(exc.__cause__):
                log.warning(
                    "could not update the digest memo %s (%s); files will be hashed again", self.path, exc
                )
                return
            raise
        except OSError as exc:  # a read-only or full cache folder: hashing works
            log.warning(
                "could not update the digest memo %s (%s); files will be hashed again", self.path, exc
            )

    def forget(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        """Drop the memo's entries of these files (a digest found wrong while reading): they are hashed
        again on the next call.

        Example:
            >>> DigestMemo("/tmp/memo.sqlite3").forget(["/data/cat/1.png"])  # doctest: +SKIP
        """
        if self.path is None or not paths or not os.path.lexists(self.path):
            return
        by_folder: dict[str, set[str]] = {}
        for p in paths:
            folder, base = _split(os.path.abspath(p))
            by_folder.setdefault(folder, set()).add(base)
        rows = self._rows(list(by_folder))
        kept = {}
        for folder, row in rows.items():
            keep = [i for i, n in enumerate(row.names) if n not in by_folder[folder]]
            digests = b"".join(row.digests[32 * i : 32 * i + 32] for i in keep)
            kept[folder] = _DirRow([row.names[i] for i in keep], row.stats[keep], digests)
        self._store(kept)

    def file_digests(
        self, paths: Sequence[str | os.PathLike[str]], progress: bool = False, threads: int | None = None
    ) -> list[str]:
        """The digest of each file, reading only files the memo cannot vouch for in their current state
        (one memo query per 500 folders, one ``stat`` per file).

        Example:
            >>> DigestMemo("/tmp/memo.sqlite3").file_digests(["a.png", "b.png"])  # doctest: +SKIP
            ['9f86d0...', '60303a...']
        """
        return self._digests(_by_folder(paths), len(paths), progress, threads)

    def folder_digests(
        self, listing: Sequence[tuple[str, Sequence[str]]], progress: bool = False, threads: int | None = None
    ) -> list[str]:
        """:meth:`file_digests` of the files of a folder listing, in its order: ``(folder, file names)``
        pairs (a folder may come more than once), as a scan finds them, so no path is split again.

        Example:
            >>> memo = DigestMemo("/tmp/memo.sqlite3")
            >>> memo.folder_digests([("/data/cat", ["1.png", "2.png"])])  # doctest: +SKIP
            ['9f86d0...', '60303a...']
        """
        groups: dict[str, tuple[list[int], list[str]]] = {}
        o = 0
        for folder, names in listing:
            g = groups.setdefault(os.path.abspath(folder), ([], []))
            g[0].extend(range(o, o + len(names)))
            g[1].extend(names)
            o += len(names)
        return self._digests(groups, o, progress, threads)

    def _digests(
        self, groups: dict[str, tuple[list[int], list[str]]], count: int, progress: bool, threads: int | None
    ) -> list[str]:
        """The digests of ``count`` files grouped by folder (``{folder: (their indices, names)}``)."""
        known = self._rows(list(groups))
        out: list[str] = [""] * count
        todo: list[tuple[int, str, str]] = []  # (index, folder, name): to hash
        # The files of the folders the memo has a row for: (folder, their indices, names, positions in
        # the row, the row); their stat records are compared with the memo's as one vector.
        known_files: list[tuple[str, list[int], list[str], np.ndarray, _DirRow]] = []
        for folder, (group, names) in groups.items():
            row = known.get(folder)
            at = row.positions(names) if row is not None else np.full(len(names), -1)
            if row is None or (at < 0).any():
                todo += [(group[j], folder, names[j]) for j in np.flatnonzero(at < 0).tolist()]
                keep = np.flatnonzero(at >= 0).tolist()
                group, names, at = [group[j] for j in keep], [names[j] for j in keep], at[keep]
            if row is not None and names:
                known_files.append((folder, group, names, at, row))
        ok = self._vouched_files(known_files)
        o = 0
        for folder, group, names, at, row in known_files:
            mine, o = ok[o : o + len(names)], o + len(names)
            good = np.flatnonzero(mine)
            hexes = hex_digests(np.frombuffer(row.digests, np.uint8).reshape(-1, 32)[at[good]])
            served = group if len(good) == len(group) else [group[j] for j in good.tolist()]  # usual: all
            deque(map(out.__setitem__, served, hexes), maxlen=0)
            todo += [(group[j], folder, names[j]) for j in np.flatnonzero(~mine).tolist()]
        if todo:
            self._hash(sorted(todo), out, known, progress, threads)
        return out

    @staticmethod
    def _vouched_files(known: list[tuple[str, list[int], list[str], np.ndarray, _DirRow]]) -> np.ndarray:
        """Which of these files (folder by folder) the memo vouches for: one ``stat`` each, then
        :func:`_vouched` over all of them at once."""
        total = sum(len(names) for _, _, names, _, _ in known)
        fresh, memo = np.empty(total, _KEY_DTYPE), np.empty(total, STAT_DTYPE)
        o = 0
        for folder, _, names, at, row in known:
            top = folder.rstrip(os.sep) + os.sep
            fresh[o : o + len(names)] = _stat_records(top, names)
            memo[o : o + len(names)] = row.stats[at]
            o += len(names)
        return _vouched(fresh, memo)

    def _hash(
        self,
        todo: list[tuple[int, str, str]],
        out: list[str],
        known: dict[str, _DirRow],
        progress: bool,
        threads: int | None,
    ) -> None:
        changes: dict[str, dict[str, tuple[tuple[int, ...], bytes]]] = {}
        workers = threads or (min(8, os.cpu_count() or 1) if len(todo) > 64 else 1)
        bar = tqdm(total=len(todo), desc="hash files", unit="file", delay=1, disable=not progress)
        names = (os.path.join(folder, n) for _, folder, n in todo)
        with bar, ThreadPoolExecutor(workers) as pool:
            for (i, folder, n), (digest, st, seen) in zip(todo, pool.map(hash_file, names)):
                out[i] = digest
                changes.setdefault(folder, {})[n] = ((*stat_key(st), seen), bytes.fromhex(digest))
                bar.update()
        empty = _DirRow([], np.empty(0, STAT_DTYPE), b"")
        self._store({f: known.get(f, empty).updated(c) for f, c in changes.items()})

    def checked(self, folder: str | os.PathLike[str]) -> dict[str, tuple[StatKey, str]]:
        """The shard files under ``folder`` whose SHA-256 was checked: ``{path: (stat key, sha256)}``
        (empty when there is no memo to read).

        Example:
            >>> DigestMemo(cache.root / DIGEST_MEMO).checked(table.path)  # doctest: +SKIP
        """
        if self.path is None or not os.path.lexists(self.path):
            return {}
        prefix = os.path.join(os.fspath(folder), "")
        with self._db() as db:
            rows = db.execute(
                "SELECT path, size, mtime, ctime, ino, dev, checked, sha256 FROM shards "
                "WHERE path >= ? AND path < ?",
                (prefix, prefix[:-1] + chr(ord(os.sep) + 1)),
            ).fetchall()
        out = {}
        for path, size, mtime, ctime, ino, dev, when, sha in rows:
            key = (int(size), int(mtime), int(ctime), int(ino), int(dev))
            if trusted(key, key, int(when)):  # racily close to its check: hashed again
                out[str(path)] = (key, str(sha))
        return out

    def record_checks(self, checks: Sequence[tuple[str, os.stat_result, int, str]]) -> None:
        """Remember shard files whose SHA-256 matched: ``(path, stat, checked at ns, sha256)``; a memo
        that cannot be written only means they are hashed again.

        Example:
            >>> memo.record_checks([(path, os.stat(path), time.time_ns(), sha)])  # doctest: +SKIP
        """
        if not checks or not self._usable():
            return
        rows = [
            (p, st.st_size, st.st_mtime_ns, st.st_ctime_ns, str(st.st_ino), str(st.st_dev), when, sha)
            for p, st, when, sha in checks
        ]
        try:
            with self._db() as db, db:
                db.executemany("INSERT OR REPLACE INTO shards VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        except (MemoDamagedError, OSError) as exc:
            log.warning("could not record checked shards in %s (%s)", self.path, exc)


def digests_of(count: int, digest: Callable[[int], str], progress: bool = False, what: str = "") -> list[str]:
    """``digest(i)`` for every ``i`` below ``count``, with a progress bar when it takes a while."""
    bar = tqdm(range(count), desc=f"hash {what}".strip(), unit="img", delay=1, disable=not progress)
    return [digest(i) for i in bar]
