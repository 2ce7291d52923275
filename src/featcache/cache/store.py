"""The cache root: tables by key, the split views read from them, locks and housekeeping.

A table is written by :func:`~featcache.cache.writer.write_segment` (its module documents the layout)
and read by :class:`~featcache.cache.table.FeatureTable`; this module chooses the table that serves an
extraction, opens a split's rows from it as :class:`CachedFeatures`, and lists, verifies, compacts
and removes tables. A file lock per table serialises appends; reads take no lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._util import FeatcacheError, check_name, inside, label_array, links_under, no_follow_open
from ..layout import legacy_layout
from .housekeeping import KEY_NAME, CacheScan, Selection, cache_root, datasets_used, record_use
from .identity import TableRecord
from .rows import Rows, RowView
from .table import (
    DIGEST_MEMO,
    TABLE_FILE,
    CheckedShard,
    FeatureTable,
    SegmentError,
    TableIndex,
    cache_key,
    folder_bytes,
    last_used,
    linked_entry,
    old_format,
    read_segment,
    remove,
)
from .writer import to_torch

if TYPE_CHECKING:  # imported by tensor() alone: listing and housekeeping start without torch
    import torch

    from .dataset import FeatureDataset

__all__ = ["DIGEST_MEMO", "CachedFeatures", "ChannelStats", "FeatureCache", "cache_key", "cache_root"]


@dataclass(frozen=True)
class ChannelStats:
    """Per-row channel statistics of a cached spatial map, each (N, C) float32, read from the table.

    Attributes:
        mean: the mean of each channel over its H x W positions (= global average pooling).
        var: the population variance of each channel over its H x W positions.

    Example:
        >>> stats = cached.channel_stats["layer3"]  # doctest: +SKIP
        >>> pooled = np.asarray(stats.mean)  # (N, C): what AdaptiveAvgPool2d(1) gives  # doctest: +SKIP
    """

    mean: Rows
    var: Rows


@dataclass
class CachedFeatures:
    """One split's rows, read from a feature table in the split's order.

    Attributes:
        key: the table's key (``featcache cache info KEY``).
        path: the table's folder.
        features: ``{layer: RowView}``, rows in split order, read on demand (``np.asarray`` gathers
            them; bfloat16 is raw uint16: use :meth:`tensor`).
        labels: one per row: int64 classes, or float32 (N, K) label sets / targets (``task``).
        ids: sample ids, one per row.
        classes: class names (regress: the targets' names).
        manifest: what was read and how: the table ``record``, ``split``, ``split_key``, the counts,
            ``skipped`` images (id and reason), extraction timings.
        hit: True when no image went through the backbone in the call that returned it.
        channel_stats: :class:`ChannelStats` of each spatial-map layer.
        digests: the content digest of each row.
        task: ``classify``, ``multilabel`` or ``regress``: what ``labels`` hold (a view, never a key).

    :meth:`layout` gives each stored array's layout (:mod:`featcache.layout`).
    """

    key: str
    path: Path
    features: dict[str, RowView]
    labels: np.ndarray
    ids: list[str]
    classes: list[str]
    manifest: dict[str, Any]
    hit: bool = False
    channel_stats: dict[str, ChannelStats] = field(default_factory=dict)
    digests: list[str] = field(default_factory=list)
    task: str = "classify"

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        # A notebook prints this: counts and shapes, never the rows, ids or class names.
        layers = {k: tuple(v.shape[1:]) for k, v in self.features.items()}
        split = self.manifest.get("split")
        return (
            f"CachedFeatures(split={split!r}, rows={len(self)}, layers={layers}, dtype={self.dtype!r}, "
            f"classes={len(self.classes)}, key='{self.key[:12]}…')"
        )

    @property
    def dtype(self) -> str:
        return str(self.manifest["record"]["dtype"])

    @property
    def layouts(self) -> dict[str, str | None]:
        """Each layer's stored layout: ``NC`` vectors, ``NCHW``/``NHWC`` maps, ``NLD`` tokens, ``NCL``;
        None where it is unknown (stored as is, no pooling heads).

        Example:
            >>> cached.layouts  # doctest: +SKIP
            {'features.5': 'NHWC'}
        """
        return {k: self.layout(k) for k in self.features}

    def layout(self, layer: str) -> str | None:
        """The stored layout of ``layer`` (entries from before layouts were recorded: maps NCHW, (L, D)
        rows tokens)."""
        meta = self.manifest["layers"][layer]
        return meta["layout"] if "layout" in meta else legacy_layout(tuple(meta["shape"]))

    @property
    def rows(self) -> int:
        """Rows of the split (images that could not be decoded and were skipped are not rows)."""
        return len(self)

    @property
    def extracted(self) -> int:
        """Rows whose image went through the backbone in the call that returned this split."""
        return int(self.manifest.get("extracted", 0))

    @property
    def from_cache(self) -> int:
        """Rows read from the table without a forward pass."""
        return self.rows - self.extracted

    @property
    def split_key(self) -> str:
        """The view's identity: the table key, the rows' digests in order, labels and classes."""
        return str(self.manifest["split_key"])

    def tensor(
        self, layer: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Load one layer into memory (optionally onto a device and cast).

        Example:
            >>> x = cached.tensor("penultimate", device="cuda", dtype=torch.float32)  # doctest: +SKIP
        """
        if layer not in self.features:
            raise FeatcacheError(
                f"layer {layer!r} is not in cache {self.key[:12]}; it holds {list(self.features)}"
            )
        t = to_torch(np.asarray(self.features[layer]), self.dtype)
        return t.to(device=device, dtype=dtype or t.dtype)

    def to_dataset(self, layer: str | None = None, dtype: torch.dtype | None = None) -> FeatureDataset:
        """This split as a torch ``Dataset`` of ``(features, label)`` for any ``DataLoader``; rows are read
        from the memory maps as they are indexed (:class:`~featcache.cache.dataset.FeatureDataset`).

        Example:
            >>> loader = DataLoader(cached.to_dataset("penultimate"), batch_size=256)  # doctest: +SKIP
        """
        from .dataset import FeatureDataset

        return FeatureDataset(self, layer, dtype)

    def check(self) -> None:
        """Hash now every shard the split's rows live in (each file once per process, as a first read
        would): a damaged shard is the table's named error here rather than at a later read. Without
        ``verify`` (``--no-verify``) the shards are plain memory maps and nothing is hashed.

        Example:
            >>> cached.check()  # doctest: +SKIP
        """
        views: list[Any] = list(self.features.values())
        views += [v for s in self.channel_stats.values() for v in (s.mean, s.var)]
        while views:
            view = views.pop()
            for part in getattr(view, "parts", ()):
                if isinstance(part, CheckedShard):
                    if not part.checked:
                        part.check()
                else:
                    views.append(part)  # a view joined from several splits' views

    def subset(self, indices: Sequence[int] | np.ndarray, split: str) -> CachedFeatures:
        """Some of the rows, in the given order: a view of the same table (nothing is read or extracted).

        Example:
            >>> first_ten = cached.subset(range(10), "head")  # doctest: +SKIP
        """
        return join_splits([self], split, np.asarray(indices, dtype=np.int64))


def join_splits(
    parts: Sequence[CachedFeatures], split: str, indices: np.ndarray | None = None
) -> CachedFeatures:
    """The rows of several splits of one table, one after the other (``indices`` of them when given):
    a view, nothing is read. The counts say every row came from the cache.

    Example:
        >>> pool = join_splits([feats["train"], feats["val"]], "train+val")  # doctest: +SKIP
    """
    first = parts[0]
    if any(p.key != first.key or list(p.features) != list(first.features) for p in parts):
        raise FeatcacheError("only splits of one table, with the same layers, can be joined")
    sel = np.arange(sum(len(p) for p in parts)) if indices is None else indices

    def joined(get: Any) -> RowView:
        views = [get(p) for p in parts]
        if not all(isinstance(v, RowView) for v in views):
            raise FeatcacheError("only splits read from a table (RowView rows) can be joined")
        return RowView.concat(views).select(sel)

    feats = {k: joined(lambda p, k=k: p.features[k]) for k in first.features}
    stats = {
        k: ChannelStats(
            joined(lambda p, k=k: p.channel_stats[k].mean), joined(lambda p, k=k: p.channel_stats[k].var)
        )
        for k in first.channel_stats
    }
    labels = np.concatenate([p.labels for p in parts])[sel]
    ids = [i for p in parts for i in p.ids]
    digests = [d for p in parts for d in p.digests]
    ids, digests = [ids[i] for i in sel], [digests[i] for i in sel]
    manifest = {
        "record": first.manifest["record"],
        "table": first.key,
        "layers": first.manifest["layers"],
        "layer_layouts": first.manifest.get("layer_layouts", {}),
        "split": split,
        "rows": len(sel),
        "skipped": [],
        "extracted": 0,
        "split_key": split_key(first.key, digests, labels, first.classes),
    }
    return CachedFeatures(
        first.key, first.path, feats, labels, ids, first.classes, manifest, True, stats, digests, first.task
    )


def split_key(table: str, digests: Sequence[str], labels: np.ndarray, classes: Sequence[str]) -> str:
    """SHA-256 of a split view: its table, its rows' digests in order, their labels, the class names.

    Class indices hash as int64 (the keys of classifier runs are unchanged); label sets and targets hash
    with their dtype and shape, so a relabelled or re-tasked split is another view.
    """
    h = hashlib.sha256(f"{table}|{json.dumps(list(classes))}|".encode())
    h.update("\n".join(digests).encode())
    labels = np.asarray(labels)
    if labels.dtype.kind in "iub":
        h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    else:
        h.update(f"|{labels.dtype.str}{labels.shape[1:]}|".encode())
        h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()


def _same_setting(table: FeatureTable, record: TableRecord) -> bool:
    """Whether a table was made as ``record`` says, at most with other layers (typed records)."""
    mine = table.identity
    return mine is not None and mine.same_setting(record)


def _describe(table: FeatureTable, index: TableIndex) -> dict[str, Any]:
    """The fields of a readable table that ``cache ls/info`` show."""
    rec = table.record
    shapes = {layer: index.row_meta(layer) for layer in table.layers}
    size = (rec.get("preprocessing") or {}).get("input_size")
    created = None
    with contextlib.suppress(OSError, ValueError, AttributeError):
        created = json.loads((table.path / TABLE_FILE).read_text()).get("created")
    rows = sum(seg.rows for seg in index.segments)  # a digest in two segments (a cut-short compaction) twice
    return {
        "status": "ok" if rows or index.bad else "empty",
        "model": rec.get("backbone"),
        "input_size": [int(v) for v in size] if size else None,
        "layers": {k: list(v[0]) if v else None for k, v in shapes.items()},
        "channel_stats": [k for k, v in shapes.items() if v and len(v[0]) == 3],
        "dtype": rec.get("dtype"),
        "pool": rec.get("pool"),
        "view": rec.get("view", 0),
        "augment": rec.get("augment"),
        "rows": rows,
        "skipped": len(index.bad),
        "segments": len(index.segments),
        "created": created,
    }


def _reason(path: Path, exc: BaseException) -> str:
    """A few words on why the entry at ``path`` cannot be read (``cache ls`` shows ``damaged: ...``)."""
    try:
        doc = json.loads(Path(inside(path, TABLE_FILE)).read_text())  # never read through a link out
    except FileNotFoundError:
        return f"{TABLE_FILE} is missing"
    except FeatcacheError:
        return f"{TABLE_FILE} leads outside the table (a symbolic link?)"
    except (OSError, ValueError):
        return f"{TABLE_FILE} is truncated or unreadable"
    record = doc.get("record") if isinstance(doc, dict) else None
    if not isinstance(record, dict):
        return f"{TABLE_FILE} holds no record"
    try:
        trusted = cache_key(record) == path.name
    except FeatcacheError:
        trusted = False
    if not trusted:
        return "its record does not hash to its key"
    folder = path / "segments"
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            read_segment(f, list(record.get("layers") or []), digests=False)
        except FeatcacheError as bad:
            why = bad.why if isinstance(bad, SegmentError) else _short(bad.__cause__ or bad)
            return f"segments/{f.name} is unreadable ({why})"
    return _short(exc)


def _old_format(path: Path) -> bool:
    """An entry of an older format (``gc`` removes it); a table of this one that lost its table.json is
    damaged instead (``cache rm`` removes it)."""
    return old_format(path)


def _short(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"field {exc.args[0]!r} is missing"
    return str(exc)[:100]


#: one FeatureCache per (root, verify) in this process: :meth:`FeatureCache.shared`
_SHARED: dict[tuple[str, bool], FeatureCache] = {}


def _links_kept(path: Path, key: str) -> list[str]:
    """``gc``'s note for each symbolic link inside a table: never followed, never deleted."""
    return [
        f"{path / name} -> {target}: a symbolic link in table {key[:12]}; gc never follows or deletes links "
        f"(remove it, or the table with `featcache cache rm {key[:12]}`)"
        for name, target in links_under(path)
    ]


class FeatureCache:
    """A cache root: feature tables by key, split views over them, locks, listing and housekeeping.

    Example:
        >>> cache = FeatureCache()            # $FEATCACHE_HOME or ~/.cache/featcache
        >>> [e["key"][:12] for e in cache.ls()]  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, verify: bool = True) -> None:
        self.root = cache_root(root)
        self.verify_reads = verify  # each shard's SHA-256 checked on its first read in this process
        self._tables: dict[str, FeatureTable] = {}  # opened once: their segments are parsed once

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.root)!r})"

    @classmethod
    def shared(cls, root: str | os.PathLike[str] | None = None, verify: bool = True) -> FeatureCache:
        """This process's one object for a cache root: every table's index is parsed once per process
        (again only when a segment comes or goes), whichever split or step reads it.

        Example:
            >>> FeatureCache.shared("/tmp/c") is FeatureCache.shared("/tmp/c")
            True
        """
        where = (str(cache_root(root)), verify)
        if where not in _SHARED:
            _SHARED[where] = cls(root, verify)
        return _SHARED[where]

    def path(self, key: str) -> Path:
        return self.root / key

    def resolve(self, key: str) -> str:
        """Expand a unique key prefix (as ``cache ls`` prints it) to the full key."""
        # Keys are hex digests: anything else ('', '..', '*', a path) would name folders outside the cache.
        if not key or any(c not in "0123456789abcdef" for c in key):
            raise FeatcacheError(
                f"{key!r} is not a cache key or key prefix (lower-case hex); "
                "run `featcache cache ls` to list them"
            )
        if KEY_NAME.match(key) and ((self.root / key).is_dir() or (self.root / key).is_symlink()):
            return key
        found = [k for k in self.entries() if k.startswith(key)]
        if len(found) == 1:
            return found[0]
        if not found:
            raise FeatcacheError(
                f"no cache entry {key!r} under {self.root}; run `featcache cache ls` to list them"
            )
        raise FeatcacheError(f"cache key prefix {key!r} is ambiguous: {sorted(found)[:5]}")

    @contextlib.contextmanager
    def lock(self, key: str, blocking: bool = True) -> Iterator[bool]:
        """An exclusive file lock on one table (released if the process dies); yields whether it was taken.

        With ``blocking=False`` it yields False at once when another process holds the lock. Lock files
        live in ``<root>/.locks/`` and outlive the table, so ``rm`` never pulls a lock from under a waiter.
        """
        locks = self.root / ".locks"
        file = locks / f"{check_name(key, 'cache key')}.lock"
        try:
            if locks.is_symlink():  # a lock file is created: never through a link out of the cache root
                raise OSError(f"{str(locks)!r} is a symbolic link (to {os.readlink(locks)!r})")
            locks.mkdir(parents=True, exist_ok=True)
            f = no_follow_open(file, "a")
        except OSError as exc:
            if exc.errno not in (None, errno.ELOOP):
                raise
            raise FeatcacheError(
                f"cannot take the lock {str(file)!r}: it or its folder is a symbolic link "
                f"({exc.strerror or exc}); featcache creates its lock files only inside the cache root, "
                "never through a symbolic link: remove the link (featcache makes it again)"
            ) from exc
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def entries(self) -> list[str]:
        """The entries under the root: folders named by a key (tables, and entries of older formats)."""
        return [n for n in self._folders() if KEY_NAME.match(n)]

    def not_entries(self) -> list[str]:
        """The folders under the root that are not entries (``lost+found``): listed, never touched."""
        return [n for n in self._folders() if not KEY_NAME.match(n)]

    def _folders(self) -> list[str]:
        if not self.root.is_dir():
            return []
        # a symbolic link is listed too (never read through): `cache ls` shows it, `cache rm` removes it
        return sorted(
            p.name
            for p in self.root.iterdir()
            if (p.is_dir() or p.is_symlink()) and not p.name.startswith(".")
        )

    def open(self, key: str) -> FeatureTable:
        """The table ``key`` (a unique prefix will do); an old-format or foreign folder raises."""
        key = self.resolve(key)
        known = self._tables.get(key)
        if known is None or not (known.path / TABLE_FILE).is_file():  # removed by another object since
            self._tables[key] = FeatureTable.open(self.path(key), self.verify_reads)
        return self._tables[key]

    def create(self, record: TableRecord | dict[str, Any]) -> FeatureTable:
        """The table of ``record``, created if it does not exist (under its lock: ``gc`` keeps off)."""
        key = cache_key(record)
        known = self._tables.get(key)
        if known is None or not (known.path / TABLE_FILE).is_file():
            with self.lock(key):
                self._tables[key] = FeatureTable.create(self.path(key), record, self.verify_reads)
        return self._tables[key]

    def tables(self) -> list[FeatureTable]:
        """Every readable table of this cache version."""
        out = []
        for key in self.entries():
            with contextlib.suppress(FeatcacheError):
                out.append(self.open(key))
        return out

    def choose(self, record: TableRecord, digests: Sequence[str]) -> str:
        """The key of the table to serve ``record`` for these images: among its own table and those made
        the same way with more layers, the one holding most of ``digests`` (a layer extracted with
        others is not extracted again); its own key when none holds any.

        Example:
            >>> FeatureCache().choose(cache_record(bb, ["layer3"], cfg), train.digests())  # doctest: +SKIP
            '9c1d...'
        """
        own, layers = cache_key(record), set(record.layers)
        held: dict[str, int] = {}
        for t in self.tables():
            if t.key == own or (layers <= set(t.layers) and _same_setting(t, record)):
                try:
                    index = t.index()
                except FeatcacheError:
                    if t.key == own:
                        raise
                    continue  # a damaged table with more layers is not chosen; this one's rows are made
                held[t.key] = index.count_held(digests)
        if not held or max(held.values()) == 0:
            return own
        return max(held, key=lambda k: (held[k], k == own, -len(self.open(k).layers), k))

    def row_shape(self, record: TableRecord, layer: str) -> tuple[tuple[int, ...], str | None] | None:
        """``layer``'s stored row shape and layout in a table made as ``record`` is (any layers); None if
        none has rows."""
        for t in self.tables():
            if layer in t.layers and _same_setting(t, record):
                index = t.index()
                meta = index.row_meta(layer)
                if meta is not None:
                    return meta[0], index.layout(layer)
        return None

    def open_split(
        self,
        key: str,
        layers: Sequence[str],
        digests: Sequence[str],
        ids: Sequence[str],
        labels: np.ndarray,
        classes: Sequence[str],
        info: dict[str, Any] | None = None,
        task: str = "classify",
    ) -> CachedFeatures:
        """A split's rows from table ``key``, in the split's order; images recorded as undecodable are
        left out (listed in ``manifest["skipped"]``).

        Example:
            >>> t = train  # doctest: +SKIP
            >>> s = cache.open_split(key, ["l3"], t.digests(), t.ids, t.labels, t.classes)  # doctest: +SKIP
        """
        table = self.open(key)
        for attempt in range(2):
            index = table.index()
            at = index.where.locate(digests)
            absent = np.flatnonzero(at[:, 0] < 0).tolist()  # images with no row: bad ones, or lost
            lost = [i for i in absent if digests[i] not in index.bad]
            if lost:
                raise FeatcacheError(
                    f"table {key[:12]} holds no row for {len(lost)} of these {len(digests)} images (first: "
                    f"{ids[lost[0]]!r}); run the extraction to add them"
                )
            keep = np.flatnonzero(at[:, 0] >= 0).tolist()
            try:
                feats, stats = table.view(index, [digests[i] for i in keep], layers, at[keep])
                break
            except FileNotFoundError as exc:  # a compaction replaced a shard between index and mapping
                if attempt:
                    raise FeatcacheError(
                        f"a shard of table {key[:12]} is missing ({exc}); `featcache cache verify "
                        f"{key[:12]}` lists what else is, `featcache cache rm {key[:12]}` removes the table"
                    ) from exc
        table.touch()
        if (info or {}).get("dataset"):
            record_use(table.path, str((info or {})["dataset"]))
        kept, y = [digests[i] for i in keep], label_array(labels, task)[keep]
        skipped = [{"id": ids[i], "reason": index.bad[digests[i]]} for i in absent]
        manifest = {
            "record": table.record,
            "table": key,
            "rows": len(keep),
            "layers": {
                layer: {"shape": list(v.shape), "layout": index.layout(layer)} for layer, v in feats.items()
            },
            "layer_layouts": index.layer_layouts(),
            "skipped": skipped,
            "split_key": split_key(key, kept, y, classes),
            **(info or {}),
        }
        channel = {k: ChannelStats(v["mean"], v["var"]) for k, v in stats.items()}
        ids_kept = [ids[i] for i in keep]
        return CachedFeatures(
            key,
            table.path,
            feats,
            y,
            ids_kept,
            list(classes),
            manifest,
            channel_stats=channel,
            digests=kept,
            task=task,
        )

    def info(self, key: str) -> dict[str, Any]:
        """What an entry holds: model, the datasets read from it, input size, layers and shapes, rows,
        segments, size, last use. An entry that cannot be read has ``status`` ``damaged`` (``reason``: a
        few words, ``problem``: the whole message) or ``old format``; it never raises for that.

        Example:
            >>> FeatureCache().info("3fa2c1")["rows"]  # doctest: +SKIP
            4000
        """
        key = self.resolve(key)
        path = self.path(key)
        if path.is_symlink():  # never read through: its target is outside the cache, or may be
            return self._link_info(key)
        used = last_used(path)
        base = {
            "key": key,
            "bytes": folder_bytes(path),
            "path": str(path),
            "datasets": list(datasets_used(path)),
            "last_used": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(used)),
            "last_used_unix": used,
        }
        try:
            table = self.open(key)
            return {**base, **_describe(table, table.counts())}
        except (FeatcacheError, OSError, KeyError, TypeError, ValueError) as exc:  # damage on disk
            if _old_format(path):
                return {**base, "status": "old format", "problem": str(exc)}
            return {**base, "status": "damaged", "reason": _reason(path, exc), "problem": str(exc)}

    def _link_info(self, key: str) -> dict[str, Any]:
        """``info`` of an entry that is a symbolic link: nothing behind it is read or counted."""
        path = self.path(key)
        used = path.lstat().st_mtime
        target = os.readlink(path)
        return {
            "key": key,
            "bytes": 0,
            "path": str(path),
            "datasets": [],
            "last_used": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(used)),
            "last_used_unix": used,
            "status": "damaged",
            "reason": f"a symbolic link to {target!r} (never read; `cache rm` removes the link, not its "
            "target)",
            "problem": str(linked_entry(path)),
        }

    def scan(self, selection: Selection | None = None) -> CacheScan:
        """Every entry (those passing ``selection`` when given), most recently used first, and the folders
        under the root that are not entries.

        Example:
            >>> scan = FeatureCache().scan(Selection(model="*resnet*"))  # doctest: +SKIP
            >>> len(scan.entries), scan.bytes, scan.not_entries  # doctest: +SKIP
            (2, 18874368, ['lost+found'])
        """
        now, entries = time.time(), []
        for key in self.entries():
            with contextlib.suppress(FeatcacheError):  # removed while listing
                entries.append(self.info(key))
        if selection is not None:
            entries = [e for e in entries if selection.matches(e, now)]
        entries.sort(key=lambda e: -float(e["last_used_unix"]))
        return CacheScan(self.root, entries, self.not_entries())

    def ls(self, selection: Selection | None = None) -> list[dict[str, Any]]:
        """Info of every entry under the root (tables, old-format and damaged entries), most recent first."""
        return self.scan(selection).entries

    def select(self, keys: Sequence[str] = (), selection: Selection | None = None) -> list[dict[str, Any]]:
        """The entries named by ``keys`` (unique prefixes) that pass ``selection``, or every entry passing
        it when no key is given; with neither, an error (nothing is selected by accident).

        Example:
            >>> old = FeatureCache().select(selection=Selection(older_than=30))  # doctest: +SKIP
            >>> [e["key"][:6] for e in old]  # doctest: +SKIP
            ['9c1d2e']
        """
        selection = selection or Selection()
        if not keys and selection.empty:
            raise FeatcacheError(
                "name the entries: keys or key prefixes as `featcache cache ls` prints them, or filters "
                "--model, --dataset, --older-than DAYS (model=, dataset=, older_than= of Selection)"
            )
        if not keys:
            return self.scan(selection).entries
        now = time.time()
        infos = [self.info(k) for k in dict.fromkeys(self.resolve(k) for k in keys)]
        return [e for e in infos if selection.matches(e, now)]

    def verify(self, key: str) -> list[str]:
        """Check every index segment and the checksum of every shard file; the problems found."""
        return self.open(key).verify()

    def rm(self, key: str) -> None:
        """Remove one table (waits for an append to it to finish). An entry that is a symbolic link is
        removed as a link: what it points to is left as it is. Raises naming what is left when the
        entry could not be removed in full (nothing is reported as removed that was not).

        Example:
            >>> FeatureCache().rm("3fa2c1")  # doctest: +SKIP
        """
        key = self.resolve(key)
        path = self.path(key)
        with self.lock(key):
            remove([path])
        self._tables.pop(key, None)
        if os.path.lexists(path):
            left = sum(len(files) for _, _, files in os.walk(path))
            raise FeatcacheError(
                f"cache entry {str(path)!r} could not be removed in full ({left} files are left: no "
                "permission, or in use on this file system); remove it by hand"
            )

    def compact(self, key: str) -> tuple[int, int]:
        """Rewrite a fragmented table into few large segments (under its lock); (segments before, after).

        Example:
            >>> FeatureCache().compact("3fa2c1")  # doctest: +SKIP
            (57, 1)
        """
        table = self.open(key)
        with self.lock(table.key):
            return table.compact()

    def gc(
        self,
        unused_for_s: float | None = None,
        empty_older_than_s: float = 24 * 3600,
        max_bytes: int | None = None,
    ) -> dict[str, list[str]]:
        """Remove what no run needs: entries of older cache formats, files no segment references (a killed
        append's shard, temporary files), tables with no rows older than ``empty_older_than_s``, and,
        with ``unused_for_s``, whole tables no split was read from for that long; then, with
        ``max_bytes``, the least recently used entries until the entries fit in that many bytes. A table
        being appended to right now is left alone; a damaged table stays unless the size limit takes it.

        Example:
            >>> FeatureCache().gc(unused_for_s=30 * 86400, max_bytes=10 << 30)["unused"]  # doctest: +SKIP
            ['/home/me/.cache/featcache/9c1d...']
        """
        removed: dict[str, list[str]] = {
            "old_format": [],
            "leftovers": [],
            "unused": [],
            "over_size": [],
            "not_removed": [],  # "path: why": links gc neither follows nor deletes
        }
        now = time.time()
        for key in self.entries():
            path = self.path(key)
            if path.is_symlink():
                removed["not_removed"].append(
                    f"{path} -> {os.readlink(path)}: an entry that is a symbolic link; gc never follows or "
                    f"removes links (`featcache cache rm {key[:12]}` removes the link, not its target)"
                )
                continue
            with self.lock(key, blocking=False) as taken:
                if not taken:  # an extraction is appending to this table right now
                    continue
                try:
                    table = self.open(key)
                    index = table.index()
                except FeatcacheError:
                    if _old_format(path):
                        remove([path])
                        removed["old_format"].append(str(path))
                    else:  # a damaged table stays for `cache verify` / `cache rm`; its links are named
                        removed["not_removed"] += _links_kept(path, key)
                    continue
                junk = table.leftovers(index)
                remove(junk)
                removed["leftovers"] += [str(p) for p in junk]
                idle = now - table.last_used()
                if (not index.segments and idle > empty_older_than_s) or (
                    unused_for_s is not None and idle > unused_for_s
                ):
                    remove([path])  # the links inside go as links: their targets stay
                    self._tables.pop(key, None)
                    removed["unused"].append(str(path))
                    continue
                removed["not_removed"] += _links_kept(path, key)
        if max_bytes is not None:
            removed["over_size"] = self._fit(max_bytes)
        return removed

    def _fit(self, max_bytes: int) -> list[str]:
        """Remove the least recently used entries until the entries' bytes are at most ``max_bytes``."""
        entries = self.scan().entries  # most recently used first
        total, out = sum(int(e["bytes"]) for e in entries), []
        for e in reversed(entries):
            if total <= max_bytes:
                break
            if Path(e["path"]).is_symlink():  # frees nothing; gc never removes links
                continue
            with self.lock(e["key"], blocking=False) as taken:
                if not taken:  # being appended to: its size is about to change anyway
                    continue
                remove([Path(e["path"])])
            self._tables.pop(e["key"], None)
            total -= int(e["bytes"])
            out.append(e["path"])
        return out
