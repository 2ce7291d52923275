"""A feature table: the rows of one extraction setting, keyed by the content digest of each image.

:mod:`featcache.cache.writer` documents the layout and appends rows; this module reads a table's
index segments, serves rows by digest through memory maps, verifies checksums and compacts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._util import FeatcacheError, stable_hash, write_json
from ..layout import channels, has_positions, legacy_layout
from .rows import RowView
from .writer import CACHE_VERSION, CHANNEL_STATS, SEGMENT_NAME, sha256_file, shard_file, write_segment

TABLE_FILE = "table.json"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def cache_key(record: dict[str, Any]) -> str:
    """The key of a table record: SHA-256 of its sorted JSON including ``CACHE_VERSION``."""
    return stable_hash({**record, "cache_version": CACHE_VERSION})


@dataclass(frozen=True)
class Segment:
    """One committed shard: the digest of each of its rows, and its files' shapes and checksums."""

    name: str
    rows: int
    digests: list[str]
    skipped: dict[str, str]
    layers: dict[str, dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)


def old_format(path: Path) -> bool:
    """Whether ``path`` is an entry of an older cache format (no table file, or another version)."""
    try:
        return bool(json.loads((path / TABLE_FILE).read_text()).get("cache_version") != CACHE_VERSION)
    except FileNotFoundError:
        return True
    except (OSError, ValueError, AttributeError):
        return False  # a damaged table file: for `cache verify` / `cache rm`, not for gc


def _unreadable(file: Path, why: object) -> FeatcacheError:
    table = file.parent.parent.name
    return FeatcacheError(
        f"index segment {str(file)!r} is unreadable ({why}). No other row is affected: restore the file, "
        f"or delete it (its rows are extracted again on the next run); `featcache cache verify "
        f"{table[:12]}` checks every file of the table"
    )


def read_segment(file: Path, layers: Sequence[str]) -> Segment:
    """Parse and check one index segment; an unreadable or inconsistent one raises naming the file."""
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _unreadable(file, exc) from exc
    try:
        rows, digests, skipped = int(meta["rows"]), list(meta["digests"]), dict(meta["skipped"])
        per_layer = dict(meta["layers"])
        for d in (*digests, *skipped):
            if not isinstance(d, str) or not _DIGEST.match(d):
                raise ValueError(f"{d!r} is not a digest")
        if len(digests) != rows:
            raise ValueError(f"{len(digests)} digests for {rows} rows")
        if rows and sorted(per_layer) != sorted(layers):
            raise ValueError(f"layers {sorted(per_layer)}, the table has {sorted(layers)}")
        for m in per_layer.values():
            if has_positions(stored_layout(m)) and set(CHANNEL_STATS) - set(m["files"]):
                raise ValueError("a map's channel statistics are missing")
            np.dtype(m["dtype"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _unreadable(file, exc) from exc
    info = {k: v for k, v in meta.items() if k not in ("rows", "digests", "skipped", "layers")}
    return Segment(file.stem, rows, digests, {str(k): str(v) for k, v in skipped.items()}, per_layer, info)


@dataclass
class TableIndex:
    """Where each digest's row is: ``where[digest] = (segment position, row)``; ``bad`` holds the images
    that could not be decoded (``digest -> why``). A digest in two segments (a compaction cut short)
    is read from the first."""

    segments: list[Segment]
    where: dict[str, tuple[int, int]]
    bad: dict[str, str]

    def missing(self, digests: Sequence[str]) -> list[str]:
        """The distinct digests of ``digests`` the table holds no row (nor bad-image record) of, in order."""
        return [d for d in dict.fromkeys(digests) if d not in self.where and d not in self.bad]

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
    return meta["layout"] if "layout" in meta else legacy_layout(tuple(int(s) for s in meta["shape"]))


class FeatureTable:
    """The rows of one extraction setting: open, index, view by digests, verify, compact.

    Example:
        >>> table = FeatureCache().open("3fa2c1")  # doctest: +SKIP
        >>> index = table.index()  # doctest: +SKIP
        >>> feats, stats = table.view(index, table.digests(index), ["layer3"])  # doctest: +SKIP
    """

    def __init__(self, path: Path, record: dict[str, Any]) -> None:
        self.path, self.record = path, record
        self.key = path.name
        self.layers: list[str] = list(record["layers"])
        self._segments: dict[str, Segment] = {}  # parsed once per object
        self._index: tuple[list[str], TableIndex] | None = None  # the last index and its segment names

    @classmethod
    def open(cls, path: Path) -> FeatureTable:
        """Open a table, trusting its record only if it hashes to the folder's name."""
        try:
            doc = json.loads((path / TABLE_FILE).read_text())
            record = doc["record"]
            version = doc.get("cache_version")
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise FeatcacheError(
                f"{str(path)!r} is not a feature table of this featcache (cache version {CACHE_VERSION}): "
                f"{exc}; `featcache cache gc` removes entries of older formats"
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
        return cls(path, record)

    @classmethod
    def create(cls, path: Path, record: dict[str, Any]) -> FeatureTable:
        """The table of ``record`` at ``path``, created (atomically) if it does not exist."""
        if not (path / TABLE_FILE).is_file():
            path.mkdir(parents=True, exist_ok=True)
            doc = {
                "record": record,
                "cache_version": CACHE_VERSION,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            write_json(path / TABLE_FILE, doc)
        return cls.open(path)

    def segment_files(self) -> list[Path]:
        """The committed segments, in commit order (names that are not segment names are ignored)."""
        folder = self.path / "segments"
        names = sorted(p.name for p in folder.glob("*.json")) if folder.is_dir() else []
        return [folder / n for n in names if SEGMENT_NAME.match(n[: -len(".json")])]

    def index(self) -> TableIndex:
        """Read the committed segments (new ones only, on a table object read before)."""
        files = self.segment_files()
        names = [f.stem for f in files]
        if self._index is not None and self._index[0] == names:
            return self._index[1]  # no segment came or went since
        current = set(names)
        self._segments = {k: v for k, v in self._segments.items() if k in current}
        for f in files:
            if f.stem not in self._segments:
                self._segments[f.stem] = read_segment(f, self.layers)
        segments = [self._segments[f.stem] for f in files]
        where: dict[str, tuple[int, int]] = {}
        bad: dict[str, str] = {}
        for s, seg in enumerate(segments):
            for r, d in enumerate(seg.digests):
                where.setdefault(d, (s, r))
            for d, why in seg.skipped.items():
                bad.setdefault(d, why)
        self._index = (names, TableIndex(segments, where, bad))
        return self._index[1]

    def digests(self, index: TableIndex | None = None) -> list[str]:
        """Every digest the table holds a row of, in commit order."""
        return list((index or self.index()).where)

    def _map(self, seg: Segment, layer: str, kind: str, shape: tuple[int, ...]) -> np.ndarray:
        """One shard file, memory-mapped and checked against its segment."""
        f = self.path / shard_file(seg.name, self.layers.index(layer), kind)
        try:
            arr = np.load(f, mmap_mode="r")
        except (ValueError, OSError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise FeatcacheError(
                f"shard file {str(f)!r} of table {self.key[:12]} is damaged ({exc}); `featcache cache verify "
                f"{self.key[:12]}` lists every damaged file"
            ) from exc
        if arr.shape != (seg.rows, *shape):
            raise FeatcacheError(
                f"shard file {str(f)!r} has shape {arr.shape}, its segment says {(seg.rows, *shape)}; "
                f"`featcache cache verify {self.key[:12]}`"
            )
        return arr

    def view(
        self, index: TableIndex, digests: Sequence[str], layers: Sequence[str]
    ) -> tuple[dict[str, RowView], dict[str, dict[str, RowView]]]:
        """The rows of ``digests`` (all held by the table), in that order: ``{layer: RowView}`` and each
        map layer's ``{"mean": RowView, "var": RowView}`` of per-row channel statistics. Every shard the
        rows live in is memory-mapped now, so a compaction afterwards does not pull it away.
        """
        at = np.array([index.where[d] for d in digests], dtype=np.int64).reshape(-1, 2)
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
        """Check every segment and the size and SHA-256 of every shard file; the problems found."""
        problems = []
        for f in self.segment_files():
            try:
                seg = read_segment(f, self.layers)
            except FeatcacheError as exc:
                problems.append(f"segments/{f.name}: unreadable ({str(exc.__cause__ or exc)[:200]})")
                continue
            for layer, meta in seg.layers.items():
                for kind, want in meta["files"].items():
                    name = shard_file(seg.name, self.layers.index(layer), kind)
                    path = self.path / name
                    if not path.is_file():
                        problems.append(f"{name}: missing")
                    elif path.stat().st_size != want["bytes"]:
                        problems.append(f"{name}: {path.stat().st_size} bytes, expected {want['bytes']}")
                    elif sha256_file(path) != want["sha256"]:
                        problems.append(f"{name}: checksum mismatch")
        return problems

    def leftovers(self, index: TableIndex) -> list[Path]:
        """Files no committed segment references: shards of a killed append, temporary files."""
        live = {s.name for s in index.segments}
        out = [p for p in self.path.rglob("*.tmp-*")]
        if (self.path / "shards").is_dir():
            out += [
                p
                for p in (self.path / "shards").iterdir()
                if ".tmp-" not in p.name and p.name.split(".")[0] not in live
            ]
        return out

    def extract_seconds(self) -> float:
        """Seconds the backbone loop took for the rows the table holds, as its segments recorded them."""
        return float(sum(s.info.get("seconds", 0.0) for s in self.index().segments))

    def touch(self) -> None:
        """Record a use (``cache gc`` removes tables unused for long); a read-only cache stays as it is."""
        with contextlib.suppress(OSError):
            (self.path / "last_used").touch()

    def last_used(self) -> float:
        return last_used(self.path)

    def compact(self, chunk_bytes: int = 1 << 30) -> tuple[int, int]:
        """Rewrite the table's rows into as few segments as ``chunk_bytes`` allows (the caller holds its
        lock); returns (segments before, after). Rows are copied, not recomputed: every digest keeps its
        bytes. The new segments are committed before the old ones are removed, so a crash leaves a
        readable table (a digest in two segments is read from the first)."""
        index = self.index()
        before = index.segments
        if len(before) <= 1 and not self.leftovers(index):
            return len(before), len(before)  # nothing to gain
        digests = self.digests(index)
        meta = {layer: index.row_meta(layer) for layer in self.layers}
        row_bytes = sum(int(np.prod(m[0])) * np.dtype(m[1]).itemsize for m in meta.values() if m) or 1
        step = max(1, chunk_bytes // row_bytes)
        for i in range(0, max(len(digests), 1), step):
            part = digests[i : i + step]
            feats, stats = self.view(index, part, self.layers)
            write_segment(
                self.path,
                self.layers,
                {k: np.asarray(v) for k, v in feats.items()},
                part,
                index.bad if i == 0 else {},
                self.record["dtype"],
                {"compacted_from": len(before), "layer_layouts": index.layer_layouts()},
                stats={k: {s: np.asarray(v) for s, v in d.items()} for k, d in stats.items()},
                layouts={layer: index.layout(layer) for layer in self.layers},
            )
        for seg in before:  # the index first, then the shards it pointed to
            (self.path / "segments" / f"{seg.name}.json").unlink()
        remove(self.leftovers(self.index()))
        return len(before), len(self.segment_files())


def remove(paths: Sequence[Path]) -> None:
    """Delete files and folders (already gone is fine)."""
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def last_used(path: Path) -> float:
    """When a split was last read from the table at ``path`` (Unix time): its ``last_used`` file, else its
    creation; readable for a damaged table too."""
    for name in ("last_used", TABLE_FILE):
        with contextlib.suppress(OSError):
            return (path / name).stat().st_mtime
    return path.stat().st_mtime


def folder_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
