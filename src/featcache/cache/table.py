"""A feature table: the rows of one extraction setting, keyed by the content digest of each image.

:mod:`featcache.cache.writer` documents the layout and appends rows; this module reads a table's
index segments, serves rows by digest through memory maps, verifies checksums and compacts.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from hashlib import sha256 as _index_sha256
from pathlib import Path
from typing import Any

import numpy as np

from .._util import FeatcacheError, inside, links_under, write_json
from ..data.digests import DIGEST_MEMO, DigestMemo, StatKey, hex_digests
from ..layout import LAYOUTS, channels, has_positions, legacy_layout
from .housekeeping import last_used, linked_entry, remove
from .identity import TABLE_FILE, TableRecord, table_key
from .lookup import RowMap, distinct_count
from .rows import STORAGE_DTYPES, RowView, Shard
from .writer import (
    CACHE_VERSION,
    CHANNEL_STATS,
    SEGMENT_NAME,
    digests_file,
    segment_checksum,
    sha256_file,
    shard_file,
    write_segment,
)

log = logging.getLogger(__name__)
#: merged runs are cut into segments of about this many bytes of rows; a run this big is never merged
MERGE_BYTES = 1 << 30
#: size tiers: a run's tier is floor(log_MERGE_COUNT(its bytes)); this many runs of one tier merge
MERGE_COUNT = 4
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
#: the files of one layer in a segment: its rows, and a map's channel statistics
FILE_KINDS = ("rows", *CHANNEL_STATS)
_STORED = {np.dtype(t).name for t in STORAGE_DTYPES.values()}


def cache_key(record: dict[str, Any] | TableRecord) -> str:
    """The key of a table record (typed or as stored): :func:`featcache.cache.identity.table_key`."""
    return table_key(record)


@dataclass(frozen=True)
class Segment:
    """One committed shard: the digest of each of its rows, and its files' shapes and checksums."""

    name: str
    rows: int
    #: (rows, 32) uint8, each row's digest as the digests file stores it; no rows when read for the
    #: counts only (``read_segment(..., digests=False)``)
    raw: np.ndarray
    skipped: dict[str, str]
    layers: dict[str, dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def digests(self) -> list[str]:
        """Each row's digest as hex (made on demand: a table's index keeps the raw records)."""
        return hex_digests(self.raw)


class SegmentError(FeatcacheError):
    """An index segment that cannot be used; ``why`` says what is wrong with it."""

    def __init__(self, message: str, why: str) -> None:
        super().__init__(message)
        self.why = why


def _unreadable(file: Path, why: object) -> SegmentError:
    table = file.parent.parent.name
    return SegmentError(
        f"index segment {str(file)!r} is unreadable ({why}). No other row is affected: restore the file, "
        f"or delete it (its rows are extracted again on the next run), or remove the whole table with "
        f"`featcache cache rm {table[:12]}`; `featcache cache verify {table[:12]}` checks every file of it",
        str(why),
    )


def read_segment(file: Path, layers: Sequence[str], digests: bool = True) -> Segment:
    """Parse and check one index segment (its checksum, every field's type, the table's layers) and,
    with ``digests``, its digests file (size, SHA-256, distinct records); an unreadable, damaged or
    inconsistent one raises naming the file, never a ``KeyError``. Without ``digests`` it costs the
    segment's small JSON alone: the counts of ``cache ls``.

    Example:
        >>> seg = read_segment(table.path / "segments" / f"{name}.json", table.layers)  # doctest: +SKIP
    """
    try:
        inside(file.parent.parent, f"segments/{file.name}")
        meta = json.loads(file.read_text())
    except FeatcacheError as exc:
        raise _unreadable(file, "it leads outside the table: a symbolic link?") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _unreadable(file, exc) from exc
    try:
        _check_segment(meta, layers)
    except (KeyError, IndexError, TypeError, ValueError) as exc:  # FeatcacheError is a ValueError
        raise _unreadable(file, f"missing field {exc}" if isinstance(exc, KeyError) else exc) from exc
    info = {k: v for k, v in meta.items() if k not in ("rows", "digests", "skipped", "layers")}
    skipped = {str(k): str(v) for k, v in meta["skipped"].items()}
    rows = _read_digests(file, meta["rows"], meta["digests"]) if digests else np.empty((0, 32), np.uint8)
    return Segment(file.stem, meta["rows"], rows, skipped, meta["layers"], info)


def _read_digests(file: Path, rows: int, want: dict[str, Any]) -> np.ndarray:
    """The digests of a segment's rows ((rows, 32) uint8) from its digests file, checked against the
    segment's record of it (size, SHA-256) and for distinct records."""
    name = digests_file(file.stem)
    try:
        path = inside(file.parent.parent, name)
    except FeatcacheError as exc:
        raise _unreadable(file, f"its digests file {name} leads outside the table: a symbolic link?") from exc
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise _unreadable(file, f"its digests file {name}: {exc}") from exc
    # checked on every parse (32 bytes a row, unlike a shard's rows): the index is what names the rows
    if len(data) != want["bytes"] or _index_sha256(data).hexdigest() != want["sha256"]:
        raise _unreadable(file, f"its digests file {name} does not match its size and SHA-256")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # a damaged .npy header raises ValueError, SyntaxError...
        raise _unreadable(file, f"its digests file {name}: {type(exc).__name__}: {exc}") from exc
    if arr.dtype != np.uint8 or arr.shape != (rows, 32):
        raise _unreadable(
            file, f"its digests file {name} holds {arr.shape} {arr.dtype}, not ({rows}, 32) uint8"
        )
    out = np.ascontiguousarray(arr)
    distinct = distinct_count(out)
    if distinct != rows:
        raise _unreadable(file, f"{distinct} distinct digests for {rows} rows")
    return out


def _check_segment(meta: Any, layers: Sequence[str]) -> None:
    """Raise (KeyError, TypeError or ValueError) unless ``meta`` is an intact segment of ``layers``."""
    if not isinstance(meta, dict):
        raise TypeError(f"a JSON object was expected, not {type(meta).__name__}")
    rows, digests, skipped, per_layer = meta["rows"], meta["digests"], meta["skipped"], meta["layers"]
    if meta.get("cache_version") != CACHE_VERSION:
        raise ValueError(f"cache version {meta.get('cache_version')!r}, this featcache reads {CACHE_VERSION}")
    if type(rows) is not int or rows < 0:
        raise ValueError(f"rows {rows!r} is not a count")
    if not isinstance(digests, dict) or not isinstance(skipped, dict) or not isinstance(per_layer, dict):
        raise TypeError("digests, skipped and layers must be objects")
    _check_file_record(digests)
    for d in skipped:
        if not isinstance(d, str) or not _DIGEST.match(d):
            raise ValueError(f"{d!r} is not a digest")
    if not all(isinstance(v, str) for v in skipped.values()):
        raise TypeError("a skipped image's reason is not a string")
    if sorted(per_layer) != (sorted(layers) if rows else []):
        raise ValueError(f"layers {sorted(per_layer)}, the table has {sorted(layers)}")
    for m in per_layer.values():
        _check_layer(m)
    # last, so that a missing or mistyped field is named as such
    if meta.get("checksum") != segment_checksum(meta):
        raise ValueError("its content does not match its checksum (the file was damaged or edited)")


def _check_layer(m: Any) -> None:
    """Raise unless ``m`` is a segment's record of one layer: shape, dtype, layout and its files."""
    shape, files = m["shape"], m["files"]
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise ValueError(f"shape {shape!r} is not a row shape")
    if m["dtype"] not in _STORED:
        raise ValueError(f"dtype {m['dtype']!r} is not a storage dtype ({sorted(_STORED)})")
    layout = stored_layout(m)
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    if has_positions(layout):
        channels(str(layout), tuple(shape))  # the shape fits the layout
    if not isinstance(files, dict) or "rows" not in files or set(files) - set(FILE_KINDS):
        raise ValueError(f"files {sorted(files)!r}: expected 'rows' and at most {CHANNEL_STATS}")
    if has_positions(layout) and set(CHANNEL_STATS) - set(files):
        raise ValueError("a map's channel statistics are missing")
    for want in files.values():
        _check_file_record(want)


def _check_file_record(want: Any) -> None:
    """Raise unless ``want`` records a file's SHA-256 and size."""
    if not isinstance(want, dict):
        raise TypeError(f"file record {want!r} is not an object")
    if not _DIGEST.match(str(want["sha256"])) or type(want["bytes"]) is not int or want["bytes"] < 0:
        raise ValueError(f"file record {want!r} holds no SHA-256 and size")


@dataclass
class TableIndex:
    """Where each digest's row is: ``where[digest] = (segment position, row)``; ``bad`` holds the images
    that could not be decoded (``digest -> why``). A digest in two segments (a compaction cut short)
    is read from the first."""

    segments: list[Segment]
    where: RowMap
    bad: dict[str, str]

    def missing(self, digests: Sequence[str]) -> list[str]:
        """The distinct digests of ``digests`` the table holds no row (nor bad-image record) of, in order."""
        lacking = np.flatnonzero(~self.where.held(digests)).tolist()
        return [d for d in dict.fromkeys(digests[i] for i in lacking) if d not in self.bad]

    def count_held(self, digests: Sequence[str]) -> int:
        """How many distinct digests of ``digests`` the table holds a row or a bad-image record of."""
        at = self.where.positions(digests)
        rows = np.zeros(len(self.where.index.raw), bool)
        rows[at[at >= 0]] = True
        lacking = {digests[i] for i in np.flatnonzero(at < 0).tolist()}
        return int(rows.sum()) + sum(d in self.bad for d in lacking)

    def row_meta(self, layer: str) -> tuple[tuple[int, ...], str] | None:
        """(row shape, stored dtype) of ``layer``, from any segment with rows; None in an empty table."""
        for seg in self.segments:
            if seg.rows and layer in seg.layers:
                return tuple(seg.layers[layer]["shape"]), str(seg.layers[layer]["dtype"])
        return None

    def layout(self, layer: str) -> str | None:
        """The stored layout of ``layer`` (:mod:`featcache.layout`), from any segment with rows."""
        for seg in self.segments:
            if seg.rows and layer in seg.layers:
                return stored_layout(seg.layers[layer])
        return None

    def layer_layouts(self) -> dict[str, str | None]:
        """The layers' own layouts before pooling (what pooling averaged over), as extraction recorded."""
        for seg in self.segments:
            if seg.rows and "layer_layouts" in seg.info:
                return dict(seg.info["layer_layouts"])
        return {}


def stored_layout(meta: dict[str, Any]) -> str | None:
    """A segment's layout of one layer; segments from before layouts: maps NCHW, (L, D) rows tokens."""
    if "layout" in meta:
        return None if meta["layout"] is None else str(meta["layout"])
    return legacy_layout(tuple(int(s) for s in meta["shape"]))


def _disagreement(segments: Sequence[Segment]) -> str:
    """A description of the first layer whose shape, dtype or layout differs between two segments with
    rows ("" when they agree): one table holds rows of one kind."""
    first: dict[str, tuple[str, Any]] = {}
    for seg in segments:
        for layer, m in seg.layers.items() if seg.rows else ():
            kind = (m["shape"], m["dtype"], stored_layout(m))
            name, seen = first.setdefault(layer, (seg.name, kind))
            if seen != kind:
                return f"segments {name} and {seg.name} store layer {layer!r} as {seen} and {kind}"
    return ""


#: shards whose SHA-256 this process has checked: (real path, inode, size, mtime) -> the checked digest
_VERIFIED: dict[tuple[str, int, int, int], str] = {}


class CheckedShard:
    """A shard's memory map that checks the file's SHA-256 against its segment before the first row
    is read, once per process and file version (path, inode, size, mtime): reading a few rows of a
    shard costs hashing it once; a mismatch raises :meth:`FeatureTable.damaged`, no row is served.

    Example:
        >>> rows = CheckedShard(np.load(f, mmap_mode="r"), f, sha256, table)[:4]  # doctest: +SKIP
    """

    def __init__(self, arr: np.ndarray, path: str, sha256: str, table: FeatureTable) -> None:
        self.arr, self.path, self.sha256, self.table = arr, path, sha256, table
        st = self.stat = os.stat(path)
        self.stamp = (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
        self.checked = _VERIFIED.get(self.stamp) == sha256 or table.checked_before(path, st, sha256)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.arr.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.arr.dtype

    def __len__(self) -> int:
        return len(self.arr)

    def __getitem__(self, key: Any) -> np.ndarray:
        if not self.checked:
            self.check()
        return np.asarray(self.arr[key])

    def check(self) -> None:
        """Hash the mapped file (the bytes the rows are read from, even if the path was replaced since)."""
        mm = getattr(self.arr, "_mmap", None)  # np.memmap maps the whole file: header and rows
        if mm is not None and len(mm) == self.stamp[2]:
            got = hashlib.sha256(mm).hexdigest()
        else:
            got = sha256_file(Path(self.path))
        if got != self.sha256:
            raise self.table.damaged(self.path, "its SHA-256 differs from the one its segment recorded")
        _VERIFIED[self.stamp] = got
        self.checked = True
        self.table.record_check(self.path, self.stat, got)


class FeatureTable:
    """The rows of one extraction setting: open, index, view by digests, verify, compact.

    Example:
        >>> table = FeatureCache().open("3fa2c1")  # doctest: +SKIP
        >>> index = table.index()  # doctest: +SKIP
        >>> feats, stats = table.view(index, table.digests(index), ["layer3"])  # doctest: +SKIP
    """

    def __init__(self, path: Path, record: dict[str, Any], verify: bool = True) -> None:
        self.path, self.record, self.verify_reads = path, record, verify
        self.key = path.name
        self.layers: list[str] = list(record["layers"])
        self._segments: dict[str, Segment] = {}  # parsed once per object and segment file version
        self._index: tuple[list[str], TableIndex] | None = None  # the last index and its segments' stamps
        self._checks: dict[str, tuple[StatKey, str]] | None = None  # shards checked by any process

    def _memo(self) -> DigestMemo:
        return DigestMemo(self.path.parent / DIGEST_MEMO)

    def checked_before(self, path: str, st: os.stat_result, sha256: str) -> bool:
        """Whether a process checked this version of the shard file (same stat data as git's index
        keys on, not racily close to the check) against ``sha256``; the memo is read once per table."""
        if self._checks is None:
            try:
                self._checks = self._memo().checked(self.path)
            except (FeatcacheError, OSError) as exc:  # a damaged memo: hash, as if it held nothing
                log.warning("shard checks are not remembered: %s", exc)
                self._checks = {}
        from ..data.digests import stat_key

        return self._checks.get(str(path)) == (stat_key(st), sha256)

    def record_check(self, path: str, st: os.stat_result, sha256: str) -> None:
        """Remember that this version of a shard file hashed to ``sha256`` (for every later process)."""
        self._memo().record_checks([(str(path), st, time.time_ns(), sha256)])

    @classmethod
    def open(cls, path: Path, verify: bool = True) -> FeatureTable:
        """Open a table, trusting its record only if it hashes to the folder's name and reads as a
        table record; ``verify`` checks each shard's SHA-256 the first time this process reads it
        (:class:`CheckedShard`; segments are checked on every open either way).

        Example:
            >>> table = FeatureTable.open(cache.root / key)  # doctest: +SKIP
        """
        if path.is_symlink():
            raise linked_entry(path)
        try:
            doc = json.loads(Path(inside(path, TABLE_FILE)).read_text())
            if not isinstance(doc, dict):
                raise TypeError(f"{TABLE_FILE} holds a {type(doc).__name__}, not an object")
            record = doc["record"]
            version = doc.get("cache_version")
        except (
            OSError,
            ValueError,
            KeyError,
            TypeError,
            RecursionError,
        ) as exc:  # ValueError: bad JSON, UTF-8
            raise FeatcacheError(
                f"{str(path)!r} is not a feature table of this featcache (cache version {CACHE_VERSION}): "
                f"{exc}; `featcache cache gc` removes entries of older formats, `featcache cache rm "
                f"{path.name[:12]}` this one"
            ) from exc
        if version != CACHE_VERSION:
            raise FeatcacheError(
                f"{str(path)!r} holds a table of cache version {version}; this featcache reads version "
                f"{CACHE_VERSION} and nothing older: `featcache cache gc` removes it"
            )
        if not isinstance(record, dict) or cache_key(record) != path.name:
            raise FeatcacheError(
                f"{str(path)!r} holds a record that does not hash to its name: it is not trusted; "
                f"`featcache cache rm {path.name[:12]}` removes it"
            )
        layers = record.get("layers")
        if (
            not isinstance(layers, list)
            or not all(isinstance(x, str) and x for x in layers)
            or len(set(layers)) != len(layers)
            or record.get("dtype") not in STORAGE_DTYPES
        ):
            raise FeatcacheError(
                f"{str(path)!r} holds a record this featcache did not write (layers {layers!r}, dtype "
                f"{record.get('dtype')!r}): it is not used; `featcache cache rm {path.name[:12]}` removes it"
            )
        return cls(path, record, verify)

    @property
    def identity(self) -> TableRecord | None:
        """The table's record, typed; None for a record this featcache does not write (never chosen
        to serve an extraction by comparison, only by its key)."""
        try:
            return TableRecord.from_json(self.record)
        except (TypeError, KeyError, ValueError):
            return None

    @classmethod
    def create(cls, path: Path, record: dict[str, Any] | TableRecord, verify: bool = True) -> FeatureTable:
        """The table of ``record`` at ``path``, created (atomically) if it does not exist."""
        if path.is_symlink():
            raise linked_entry(path)
        if isinstance(record, TableRecord):
            record = record.to_json()
        if not (path / TABLE_FILE).is_file():
            path.mkdir(parents=True, exist_ok=True)
            doc = {
                "record": record,
                "cache_version": CACHE_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            write_json(path / TABLE_FILE, doc)
        return cls.open(path, verify)

    def segment_files(self) -> list[Path]:
        """The committed segments, in commit order (names that are not segment names are ignored)."""
        folder = self.path / "segments"
        names = sorted(p.name for p in folder.glob("*.json")) if folder.is_dir() else []
        return [folder / n for n in names if SEGMENT_NAME.match(n[: -len(".json")])]

    def index(self) -> TableIndex:
        """Read the committed segments (new or changed ones only, on a table object read before: a
        segment is known by its name and stat data, so a damaged or replaced one is read again)."""
        files = self.segment_files()
        names = [_stamp(f) for f in files]
        if self._index is not None and self._index[0] == names:
            return self._index[1]  # no segment came, went or changed since
        current = set(names)
        self._segments = {k: v for k, v in self._segments.items() if k in current}
        for f, stamp in zip(files, names):
            if stamp not in self._segments:
                self._segments[stamp] = read_segment(f, self.layers)
        segments = [self._segments[stamp] for stamp in names]
        disagree = _disagreement(segments)
        if disagree:
            raise FeatcacheError(
                f"cache table {self.key[:12]} is damaged: {disagree}; `featcache cache rm {self.key[:12]}` "
                "removes it"
            )
        bad: dict[str, str] = {}
        for seg in segments:
            for d, why in seg.skipped.items():
                bad.setdefault(d, why)
        where = RowMap(
            np.concatenate([seg.raw for seg in segments] or [np.empty((0, 32), np.uint8)]),
            np.repeat(np.arange(len(segments)), [seg.rows for seg in segments]),
            np.concatenate([np.arange(seg.rows) for seg in segments] or [np.empty(0, np.int64)]),
        )
        self._index = (names, TableIndex(segments, where, bad))
        return self._index[1]

    def counts(self) -> TableIndex:
        """The committed segments read for their counts, shapes and skipped images only (no digests
        file is read: O(segments), what ``cache ls`` and ``cache info`` need); ``where`` is empty.

        Example:
            >>> sum(s.rows for s in FeatureCache().open("3fa2c1").counts().segments)  # doctest: +SKIP
            4000
        """
        segments = [read_segment(f, self.layers, digests=False) for f in self.segment_files()]
        bad = {d: why for seg in segments for d, why in seg.skipped.items()}
        return TableIndex(segments, RowMap.empty(), bad)

    def digests(self, index: TableIndex | None = None) -> list[str]:
        """Every digest the table holds a row of, in commit order."""
        return list((index or self.index()).where)

    def row_bytes(self) -> dict[str, bytes]:
        """Each row's stored bytes (every layer, then every channel statistic) by content digest: what
        two tables are compared on when a resumed extraction must equal an uninterrupted one.

        Example:
            >>> table = FeatureCache().open("3fa2c1")  # doctest: +SKIP
            >>> len(table.row_bytes()) == len(table.digests())  # doctest: +SKIP
            True
        """
        index = self.index()
        digests = self.digests(index)
        feats, stats = self.view(index, digests, self.layers)
        arrays = [np.asarray(feats[k]) for k in sorted(feats)]
        arrays += [np.asarray(d[s]) for _, d in sorted(stats.items()) for s in sorted(d)]
        return {d: b"".join(a[i].tobytes() for a in arrays) for i, d in enumerate(digests)}

    def damaged(self, file: str, why: str) -> FeatcacheError:
        """The error for a damaged file of this table: never used, named, with the commands that help."""
        short = self.key[:12]
        return FeatcacheError(
            f"file {file!r} of cache table {short} is damaged ({why}); its rows are not used. Remove the "
            f"table with `featcache cache rm {short}` (the next run extracts it again); `featcache cache "
            f"verify {short}` lists every damaged file"
        )

    def _map(self, seg: Segment, layer: str, kind: str, shape: tuple[int, ...]) -> Shard:
        """One shard file, memory-mapped and checked against its segment (size, shape, dtype; with
        ``verify_reads`` its SHA-256 too, on the first read: :class:`CheckedShard`)."""
        name = shard_file(seg.name, self.layers.index(layer), kind)
        want = seg.layers[layer]["files"][kind]
        dtype = np.dtype(seg.layers[layer]["dtype"]) if kind == "rows" else np.dtype(np.float32)
        try:
            f = inside(self.path, name)
        except FeatcacheError as exc:
            raise self.damaged(str(self.path / name), "it leads outside the table: a symbolic link?") from exc
        try:
            size = os.stat(f).st_size
            arr = np.load(f, mmap_mode="r")
        except FileNotFoundError:
            raise  # a compaction replaced the shard between index and mapping: the caller retries
        except Exception as exc:  # a damaged .npy header raises ValueError, SyntaxError, TokenError...
            raise self.damaged(f, f"{type(exc).__name__}: {exc}") from exc
        if size != want["bytes"]:
            raise self.damaged(f, f"{size} bytes, its segment says {want['bytes']}")
        if arr.shape != (seg.rows, *shape) or arr.dtype != dtype:
            got, said = f"{arr.shape} {arr.dtype}", f"{(seg.rows, *shape)} {dtype}"
            raise self.damaged(f, f"shape and dtype {got}, its segment says {said}")
        return CheckedShard(arr, f, want["sha256"], self) if self.verify_reads else arr

    def view(
        self,
        index: TableIndex,
        digests: Sequence[str],
        layers: Sequence[str],
        located: np.ndarray | None = None,
    ) -> tuple[dict[str, RowView], dict[str, dict[str, RowView]]]:
        """The rows of ``digests`` (all held by the table), in that order: ``{layer: RowView}`` and each
        map layer's ``{"mean": RowView, "var": RowView}`` of per-row channel statistics. Every shard the
        rows live in is memory-mapped now, so a compaction afterwards does not pull it away; with
        ``verify_reads``, each shard's SHA-256 is checked when its first row is read. ``located``: the
        digests' ``index.where.locate(digests)`` when the caller has it.
        """
        at = index.where.locate(digests) if located is None else located
        if len(at) and at.min() < 0:
            raise KeyError(digests[int(np.flatnonzero(at[:, 0] < 0)[0])])
        used, part = np.unique(at[:, 0], return_inverse=True)
        segs = [index.segments[int(s)] for s in used]
        features: dict[str, RowView] = {}
        stats: dict[str, dict[str, RowView]] = {}
        for layer in layers:
            shape, dtype = index.row_meta(layer) or ((), "float32")
            parts = [self._map(seg, layer, "rows", shape) for seg in segs]
            features[layer] = RowView(parts, part, at[:, 1], shape, np.dtype(dtype))
            layout = index.layout(layer)
            if layout is not None and has_positions(layout):
                c = (channels(layout, shape),)
                stats[layer] = {
                    k: RowView([self._map(seg, layer, k, c) for seg in segs], part, at[:, 1], c, np.float32)
                    for k in CHANNEL_STATS
                }
        return features, stats

    def verify(self) -> list[str]:
        """Check every segment (checksum, fields), that the segments agree, and the size and SHA-256 of
        every shard file (always read in full: no memo); the problems found.

        Example:
            >>> FeatureCache().open("3fa2c1").verify()  # doctest: +SKIP
            ['shards/0179...-5bff81a7.0.npy: checksum mismatch']
        """
        problems, segments = [], []
        for f in self.segment_files():
            try:
                segments.append(read_segment(f, self.layers))
            except SegmentError as exc:
                problems.append(f"segments/{f.name}: unreadable ({exc.why[:200]})")
        disagree = _disagreement(segments)
        if disagree:
            problems.append(disagree)
        for seg in segments:
            for layer, meta in seg.layers.items():
                for kind, want in meta["files"].items():
                    name = shard_file(seg.name, self.layers.index(layer), kind)
                    try:
                        path = Path(inside(self.path, name))
                    except FeatcacheError:
                        problems.append(f"{name}: leads outside the table (a symbolic link?)")
                        continue
                    if not path.is_file():
                        problems.append(f"{name}: missing")
                    elif path.stat().st_size != want["bytes"]:
                        problems.append(f"{name}: {path.stat().st_size} bytes, expected {want['bytes']}")
                    elif sha256_file(path) != want["sha256"]:
                        problems.append(f"{name}: checksum mismatch")
        shards = {shard_file(seg.name, self.layers.index(k), kind) for seg in segments for k, m in
                  seg.layers.items() for kind in m["files"]}  # fmt: skip
        shards |= {f"segments/{f.name}" for f in self.segment_files()}  # read_segment named those
        problems += [  # the links no shard check above named: housekeeping leaves them, never follows them
            f"{name}: a symbolic link (to {target!r}); featcache never reads, writes or deletes through a "
            "link in a table: remove the link"
            for name, target in links_under(self.path)
            if name not in shards
        ]
        return problems

    def leftovers(self, index: TableIndex) -> list[Path]:
        """Files no committed segment references: shards of a killed append, temporary files. Only
        regular files inside the table: a symbolic link is never listed, nor anything a linked folder
        leads to (:meth:`links` names them; ``cache gc`` reports them as not removed)."""
        live = {s.name for s in index.segments}
        out = []
        for d, _, files in os.walk(self.path):  # os.walk does not descend into linked folders
            shards = os.path.relpath(d, self.path) == "shards"
            for name in files:
                p = Path(d) / name
                if p.is_symlink():
                    continue
                if ".tmp-" in name or (shards and name.split(".")[0] not in live):
                    out.append(p)
        return sorted(out)

    def links(self) -> list[str]:
        """Every symbolic link inside the table, as ``path -> target``: housekeeping never follows or
        deletes one (``cache rm`` of the whole table removes the links themselves, never their targets)."""
        return [f"{self.path / name} -> {target}" for name, target in links_under(self.path)]

    def extract_seconds(self) -> float:
        """Seconds the backbone loop took for the rows the table holds, as its segments recorded them."""
        return float(sum(s.info.get("seconds", 0.0) for s in self.index().segments))

    def touch(self) -> None:
        """Record a use (``cache gc`` removes tables unused for long); a read-only cache stays as it is.
        A symbolic link at ``last_used`` gets its own time set: no file outside the table is touched."""
        f = self.path / "last_used"
        with contextlib.suppress(OSError):
            try:
                os.utime(f, follow_symlinks=False)
            except FileNotFoundError:
                os.close(os.open(f, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o666))

    def last_used(self) -> float:
        return last_used(self.path)

    def compact(self, chunk_bytes: int = 1 << 30, only: Sequence[Segment] | None = None) -> tuple[int, int]:
        """Rewrite the table's rows (those of the segments ``only`` when given) into as few segments as
        ``chunk_bytes`` allows, one run (the caller holds its lock); returns (segments before, after).
        Rows are copied, not recomputed: every digest keeps its bytes. The new segments are committed
        before the old ones are removed, so a crash leaves a readable table (a digest in two segments is
        read from the first)."""
        index = self.index()
        before = index.segments if only is None else list(only)
        if only is None and len(before) <= 1 and not self.leftovers(index):
            return len(index.segments), len(index.segments)  # nothing to gain
        digests = list(dict.fromkeys(d for seg in before for d in seg.digests))
        bad = {d: why for seg in before for d, why in seg.skipped.items() if d not in index.where}
        meta = {layer: index.row_meta(layer) for layer in self.layers}
        row_bytes = sum(int(np.prod(m[0])) * np.dtype(m[1]).itemsize for m in meta.values() if m) or 1
        step = max(1, chunk_bytes // row_bytes)
        info = {"compacted_from": len(before), "layer_layouts": index.layer_layouts(), "run": new_run()}
        method = next((s.info["method"] for s in index.segments if s.rows and "method" in s.info), None)
        for i in range(0, max(len(digests), 1), step):
            part = digests[i : i + step]
            feats, stats = self.view(index, part, self.layers)
            write_segment(
                self.path,
                self.layers,
                {k: np.asarray(v) for k, v in feats.items()},
                part,
                bad if i == 0 else {},
                self.record["dtype"],
                info | ({"method": method} if method else {}),
                stats={k: {s: np.asarray(v) for s, v in d.items()} for k, d in stats.items()},
                layouts={layer: index.layout(layer) for layer in self.layers},
            )
        for seg in before:  # the index first, then the shards it pointed to
            (self.path / "segments" / f"{seg.name}.json").unlink()
        remove(self.leftovers(self.index()))
        return len(index.segments), len(self.segment_files())

    def merge_small(self, target_bytes: int = MERGE_BYTES, at_least: int = MERGE_COUNT) -> tuple[int, int]:
        """Merge the table's small runs by size tier (the caller holds the lock), as a size-tiered
        log-structured store does: once ``at_least`` runs of one tier (:func:`merge_plan`) have
        accumulated they become one run, in segments of about ``target_bytes``; runs of
        ``target_bytes`` or more are never rewritten. A merge at least multiplies a row's run size by
        ``at_least``, so each row is rewritten O(log(table / first run)) times over the table's life,
        the table holds O(log) small runs, and one small add never rewrites a bigger run. Each merge
        commits its new segments before it removes the old ones (:meth:`compact`). Returns (segments
        before, after).

        Example:
            >>> table.merge_small()  # doctest: +SKIP
            (11, 4)
        """
        first = len(self.index().segments)
        self._drop_shadowed()
        while True:
            index = self.index()
            runs: dict[str, list[Segment]] = {}
            for seg in index.segments:
                runs.setdefault(run_of(seg), []).append(seg)
            sizes = {run: sum(_segment_bytes(s) for s in segs) for run, segs in runs.items()}
            groups = merge_plan(sizes, at_least, target_bytes)
            if not groups:
                return first, len(index.segments)
            self.compact(target_bytes, [s for run in groups[0] for s in runs[run]])

    def _drop_shadowed(self) -> None:
        """Remove the segments none of whose rows is read (every digest served by an earlier segment, no
        unreadable-image record of their own): what a merge cut short between its commit and the old
        segments' removal leaves. The segment file goes first, then its unreferenced shards."""
        index = self.index()
        elsewhere = [
            seg
            for pos, seg in enumerate(index.segments)
            if seg.rows
            and all(index.where[d][0] != pos for d in seg.digests)
            and all(any(d in o.skipped for o in index.segments if o is not seg) for d in seg.skipped)
        ]
        for seg in elsewhere:
            (self.path / "segments" / f"{seg.name}.json").unlink()
        if elsewhere:
            remove(self.leftovers(self.index()))


def new_run() -> str:
    """A fresh run id: the segments one extraction (or one merge) commits share it."""
    return secrets.token_hex(8)


def run_of(seg: Segment) -> str:
    """The run a segment belongs to: the extraction or merge that committed it (segments from before
    runs were recorded are each a run of their own)."""
    run = seg.info.get("run")
    return run if isinstance(run, str) else seg.name


def tier(size: int, fanout: int) -> int:
    """A run's size tier: floor(log_fanout(size)), so merging ``fanout`` runs of one tier lands a tier
    higher at least.

    Example:
        >>> tier(4**5, 4), tier(4**5 - 1, 4)
        (5, 4)
    """
    t, size = 0, max(int(size), 1)
    while size >= fanout:
        size //= fanout
        t += 1
    return t


def merge_plan(sizes: dict[str, int], fanout: int, final_bytes: int) -> list[list[str]]:
    """Which runs to merge (``sizes``: each run's bytes of rows, in commit order): every tier holding at
    least ``fanout`` runs under ``final_bytes``, smallest tier first, each as one group (nothing is
    read or written: the plan alone).

    Example:
        >>> merge_plan({"a": 1 << 30, "b": 9, "c": 10, "d": 11, "e": 12, "f": 100}, 4, 1 << 30)
        [['b', 'c', 'd', 'e']]
    """
    tiers: dict[int, list[str]] = {}
    for run, size in sizes.items():
        if size < final_bytes:
            tiers.setdefault(tier(size, fanout), []).append(run)
    return [group for _, group in sorted(tiers.items()) if len(group) >= fanout]


def _segment_bytes(seg: Segment) -> int:
    """Bytes of a segment's rows files (every layer)."""
    return sum(int(m["files"]["rows"]["bytes"]) for m in seg.layers.values())


def _stamp(file: Path) -> str:
    """A segment file's name and stat data: what its parsed form is memoised by."""
    try:
        st = os.stat(file)
    except OSError:
        return file.name  # gone: reading it names the problem
    return f"{file.name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
