"""The store: a cache root holding feature tables by key. It chooses the table that serves an
extraction, opens a split's rows from it (:class:`~featcache.cache.splits.CachedFeatures`), and takes
a file lock per table, which serialises appends (reads take no lock).

A table is written by :func:`~featcache.cache.writer.write_segment` (its module documents the layout)
and read by :class:`~featcache.cache.table.FeatureTable`; listing, verifying, compacting and removing
entries are :mod:`~featcache.cache.housekeeping`'s, reached through this object's methods.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._util import FeatcacheError, check_name, label_array, no_follow_open
from .housekeeping import (
    KEY_NAME,
    CacheScan,
    Selection,
    cache_root,
    collect,
    damage_reason,
    describe,
    entry_base,
    link_info,
    old_format,
    record_use,
    remove,
)
from .identity import TABLE_FILE, TableRecord
from .splits import CachedFeatures, ChannelStats, ExtractionInfo, LayerMeta, SplitResult, split_key
from .table import DIGEST_MEMO, FeatureTable, cache_key, read_segment

__all__ = ["DIGEST_MEMO", "FeatureCache", "cache_key", "cache_root"]


def _same_setting(table: FeatureTable, record: TableRecord) -> bool:
    """Whether a table was made as ``record`` says, at most with other layers (typed records)."""
    mine = table.identity
    return mine is not None and mine.same_setting(record)


#: one FeatureCache per (root, verify) in this process: :meth:`FeatureCache.shared`
_SHARED: dict[tuple[str, bool], FeatureCache] = {}


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
        extraction: ExtractionInfo | None = None,
        task: str = "classify",
        *,
        split: str | None = None,
        dataset: str | None = None,
        new: Collection[str] = (),
    ) -> CachedFeatures:
        """A split's rows from table ``key``, in the split's order; images recorded as undecodable are
        left out (listed in ``result.skipped``). ``extraction`` is what the extraction that served it
        did, ``new`` the digests it extracted (the rows counted as extracted); ``dataset`` (or the
        extraction's) is recorded beside the table.

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
            keep = np.flatnonzero(at[:, 0] >= 0).tolist() if absent else None  # None: every image
            kept = list(digests) if keep is None else [digests[i] for i in keep]
            try:
                feats, stats = table.view(index, kept, layers, at if keep is None else at[keep])
                break
            except FileNotFoundError as exc:  # a compaction replaced a shard between index and mapping
                if attempt:
                    raise FeatcacheError(
                        f"a shard of table {key[:12]} is missing ({exc}); `featcache cache verify "
                        f"{key[:12]}` lists what else is, `featcache cache rm {key[:12]}` removes the table"
                    ) from exc
        table.touch()
        dataset = dataset or (extraction.dataset if extraction else None)
        if dataset:
            record_use(table.path, dataset)
        y = label_array(labels, task)
        y = y.copy() if keep is None else y[keep]  # the split's own array, as the indexed copy was
        fresh = set(new)
        result = SplitResult(
            table=key,
            split=split,
            split_key=split_key(key, kept, y, classes),
            rows=len(kept),
            extracted=sum(d in fresh for d in kept) if fresh else 0,
            skipped=tuple((ids[i], index.bad[digests[i]]) for i in absent),
            record=table.identity,
            stored_record=table.record,
            layers={layer: LayerMeta(tuple(v.shape), index.layout(layer)) for layer, v in feats.items()},
            layer_layouts=index.layer_layouts(),
            dataset=dataset,
            extraction=extraction,
        )
        channel = {k: ChannelStats(v["mean"], v["var"]) for k, v in stats.items()}
        ids_kept = list(ids) if keep is None else [ids[i] for i in keep]
        return CachedFeatures(
            key,
            table.path,
            feats,
            y,
            ids_kept,
            list(classes),
            result,
            hit=not fresh,
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
            return link_info(path)
        base = entry_base(path)
        try:
            table = self.open(key)
            return {**base, **describe(table, table.counts())}
        except (FeatcacheError, OSError, KeyError, TypeError, ValueError) as exc:  # damage on disk
            if old_format(path):
                return {**base, "status": "old format", "problem": str(exc)}
            reason = damage_reason(path, exc, read_segment)
            return {**base, "status": "damaged", "reason": reason, "problem": str(exc)}

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
        return collect(self, unused_for_s, empty_older_than_s, max_bytes)

    def forget(self, key: str) -> None:
        """Drop this object's open table ``key`` (removed from disk: the next ``open`` reads again)."""
        self._tables.pop(key, None)
