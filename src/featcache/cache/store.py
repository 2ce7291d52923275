"""The persistent, content-addressed, crash-safe feature cache: keys, opening, checking, housekeeping.

An entry is written by :class:`~featcache.cache.writer.CacheWriter` (its module documents the layout);
this module finds, opens (memory-mapped), verifies, lists and removes entries. A file lock keeps two
processes from building one entry at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .._util import FeatcacheError, stable_hash, write_json
from ..layout import NC, NCHW, channels, legacy_layout
from .writer import (
    CACHE_VERSION,
    CHANNEL_STATS,
    CacheWriter,
    ChannelStatsFiles,
    block_digests,
    sha256_file,
    to_torch,
)


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$FEATCACHE_HOME``, else ``$XDG_CACHE_HOME/featcache`` (``~/.cache/...``)."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("FEATCACHE_HOME"):
        return Path(os.environ["FEATCACHE_HOME"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "featcache"


def cache_key(record: dict[str, Any]) -> str:
    """The key of a cache record: SHA-256 of its sorted JSON including ``CACHE_VERSION``."""
    return stable_hash({**record, "cache_version": CACHE_VERSION})


@dataclass(frozen=True)
class ChannelStats:
    """Per-row channel statistics of a cached spatial map, each (N, C) float32, memory-mapped.

    Attributes:
        mean: the mean of each channel over its H x W positions (= global average pooling).
        var: the population variance of each channel over its H x W positions.

    Example:
        >>> stats = cached.channel_stats["layer3"]  # doctest: +SKIP
        >>> pooled = np.array(stats.mean)  # (N, C): what AdaptiveAvgPool2d(1) gives  # doctest: +SKIP
    """

    mean: np.ndarray
    var: np.ndarray


@dataclass
class CachedFeatures:
    """A complete cache entry, opened memory-mapped.

    Attributes:
        key: the content key.
        path: the entry's folder.
        features: ``{layer: np.ndarray}`` memory-mapped (bfloat16 is raw uint16: use :meth:`tensor`).
        labels: int64 labels, one per row.
        ids: stable sample ids, one per row.
        classes: class names.
        manifest: the parsed ``manifest.json``.
        channel_stats: :class:`ChannelStats` of each map or token layer (absent in entries written before
            featcache stored them).

    :meth:`layout` gives each stored array's layout (:mod:`featcache.layout`), as the manifest records it.
    """

    key: str
    path: Path
    features: dict[str, np.ndarray]
    labels: np.ndarray
    ids: list[str]
    classes: list[str]
    manifest: dict[str, Any]
    hit: bool = False  # set by extract(): True when no forward pass ran in this call
    channel_stats: dict[str, ChannelStats] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

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


def _stats_layout(meta: dict[str, Any]) -> str | None:
    """The layout a layer's channel statistics are taken over: a map or token layout, else None (entries
    from before layouts were recorded: NCHW maps)."""
    if "layout" not in meta:
        return NCHW if len(meta["shape"]) == 3 else None
    return meta["layout"] if meta["layout"] not in (None, NC) else None


class FeatureCache:
    """A cache root: open, lock, list, verify and remove entries.

    Example:
        >>> cache = FeatureCache()            # $FEATCACHE_HOME or ~/.cache/featcache
        >>> [e["key"][:12] for e in cache.ls()]  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = cache_root(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def resolve(self, key: str) -> str:
        """Expand a unique key prefix (as ``cache ls`` prints it) to the full key."""
        # Keys are hex digests: anything else ('', '..', '*', a path) would name folders outside the entry.
        if not key or any(c not in "0123456789abcdef" for c in key):
            raise FeatcacheError(
                f"{key!r} is not a cache key or key prefix (lower-case hex); "
                "run `featcache cache ls` to list them"
            )
        if (self.root / key).is_dir():
            return key
        found = [p.name for p in self.root.glob(f"{key}*") if p.is_dir()] if self.root.is_dir() else []
        if len(found) == 1:
            return found[0]
        if not found:
            raise FeatcacheError(
                f"no cache entry {key!r} under {self.root}; run `featcache cache ls` to list them"
            )
        raise FeatcacheError(f"cache key prefix {key!r} is ambiguous: {sorted(found)[:5]}")

    @contextlib.contextmanager
    def lock(self, key: str, blocking: bool = True) -> Iterator[bool]:
        """An exclusive file lock on one entry (released if the process dies); yields whether it was taken.

        With ``blocking=False`` it yields False at once when another process holds the lock. Lock files
        live in ``<root>/.locks/`` and outlive the entry, so ``rm`` never pulls a lock from under a waiter.
        """
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{key}.lock", "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def is_complete(self, key: str) -> bool:
        return (self.path(key) / "manifest.json").is_file()

    def writer(self, key: str, record: dict[str, Any]) -> CacheWriter:
        return CacheWriter(self.path(key), record)

    def open(self, key: str, verify: bool = False) -> CachedFeatures:
        """Open a complete entry memory-mapped; a partial or damaged entry raises with the fix."""
        key = self.resolve(key)
        path = self.path(key)
        if not self.is_complete(key):
            raise FeatcacheError(
                f"cache {key[:12]} at {path} is partial (an interrupted extraction); run the same extract "
                "again to resume it, or `featcache cache rm` it"
            )
        if verify:
            problems = self.verify(key)
            if problems:
                raise FeatcacheError(
                    f"cache {key[:12]} is damaged: {problems[0]}; `featcache cache rm {key[:12]}`"
                )
        manifest = json.loads((path / "manifest.json").read_text())
        features, stats = {}, {}
        for layer, meta in manifest["layers"].items():
            try:
                arr = np.load(path / meta["file"], mmap_mode="r")
            except (ValueError, OSError) as exc:
                raise FeatcacheError(
                    f"cache {key[:12]} layer {layer} is damaged ({exc}); remove it with `featcache cache rm "
                    f"{key[:12]}` and extract again"
                ) from exc
            if arr.shape != (manifest["rows"], *meta["shape"]):
                raise FeatcacheError(
                    f"cache {key[:12]} layer {layer} has shape {arr.shape}, manifest says otherwise"
                )
            features[layer] = arr
            if "channel_stats" in meta:
                shape = (manifest["rows"], channels(str(_stats_layout(meta)), tuple(meta["shape"])))
                stats[layer] = ChannelStats(
                    *(self._open_stat(key, layer, meta, k, shape) for k in CHANNEL_STATS)
                )
        labels = np.load(path / "labels.npy")
        ids = json.loads((path / "ids.json").read_text())
        if len(labels) != manifest["rows"] or len(ids) != manifest["rows"]:
            raise FeatcacheError(f"cache {key[:12]} labels/ids do not match its {manifest['rows']} rows")
        classes = list(manifest["classes"])
        return CachedFeatures(key, path, features, labels, ids, classes, manifest, channel_stats=stats)

    def _open_stat(
        self, key: str, layer: str, meta: dict[str, Any], stat: str, shape: tuple[int, ...]
    ) -> np.ndarray:
        def damaged(why: object) -> FeatcacheError:
            return FeatcacheError(
                f"cache {key[:12]} channel {stat} of layer {layer} is damaged ({why}); remove the entry "
                f"with `featcache cache rm {key[:12]}` and extract again"
            )

        try:
            arr = np.load(self.path(key) / meta["channel_stats"][stat]["file"], mmap_mode="r")
        except (ValueError, OSError, KeyError) as exc:
            raise damaged(exc) from exc
        if arr.shape != shape:
            raise damaged(f"shape {arr.shape}, expected {shape}")
        return arr

    def add_channel_stats(self, key: str, progress: bool = False) -> list[str]:
        """Give the maps of an entry written before featcache stored channel statistics their statistics
        (each map read once, under the entry's lock); returns the layers that got them.

        Example:
            >>> FeatureCache().add_channel_stats("3fa2c1")  # doctest: +SKIP
            ['layer3']
        """
        key = self.resolve(key)
        path = self.path(key)

        def todo() -> tuple[dict[str, Any], list[str]]:
            m = json.loads((path / "manifest.json").read_text())
            return m, [k for k, v in m["layers"].items() if _stats_layout(v) and "channel_stats" not in v]

        if not self.is_complete(key) or not todo()[1]:
            return []
        with self.lock(key):
            manifest, layers = todo()  # again: another process may have added them meanwhile
            for layer in layers:
                meta = manifest["layers"][layer]
                maps = np.load(path / meta["file"], mmap_mode="r")
                layout = str(_stats_layout(meta))
                c = channels(layout, maps.shape[1:])
                files = ChannelStatsFiles(path, layer, len(maps), c, manifest["record"]["dtype"], layout)
                step = max(1, (256 << 20) // max(1, maps[:1].nbytes))
                desc = f"channel statistics of {layer}"
                for s in tqdm(range(0, len(maps), step), desc=desc, delay=2, disable=not progress):
                    files.add(s, maps[s : s + step])
                manifest["layers"][layer]["channel_stats"] = files.finish()
            write_json(path / "manifest.json", manifest)
        return layers

    def verify(self, key: str) -> list[str]:
        """Check every block checksum and file size; return the problems found (empty when sound)."""
        key = self.resolve(key)
        path = self.path(key)
        if not self.is_complete(key):
            return [
                f"partial entry: {len(list((path / 'shards').glob('*.json')))} finished shards, no manifest"
            ]
        manifest = json.loads((path / "manifest.json").read_text())
        problems = []
        for meta in manifest["layers"].values():
            f = path / meta["file"]
            try:
                arr = np.load(f, mmap_mode="r")
            except (ValueError, OSError) as exc:
                problems.append(f"{meta['file']}: unreadable ({exc})")
                continue
            if arr.shape[0] != manifest["rows"]:
                problems.append(f"{meta['file']}: {arr.shape[0]} rows, expected {manifest['rows']}")
                continue
            for i, (got, want) in enumerate(
                zip(block_digests(arr, manifest["block_rows"]), meta["block_sha256"])
            ):
                if got != want:
                    problems.append(f"{meta['file']}: block {i} checksum mismatch")
            for extra in meta.get("channel_stats", {}).values():
                f = path / extra["file"]
                if not f.is_file():
                    problems.append(f"{extra['file']}: missing")
                elif sha256_file(f) != extra["sha256"]:
                    problems.append(f"{extra['file']}: checksum mismatch")
        for name in ("labels.npy", "ids.json"):
            want = manifest.get(f"{name.split('.')[0]}_sha256")
            f = path / name
            if not f.is_file():
                problems.append(f"{name}: missing")
            elif want is not None and sha256_file(f) != want:
                problems.append(f"{name}: checksum mismatch")
        return problems

    def find(self, record: dict[str, Any]) -> str | None:
        """The key of a complete entry that serves ``record`` (a :func:`~featcache.extract.cache_record`):
        its own, else one made the same way with more layers (a layer extracted with others is not
        extracted again); None when there is none.

        Example:
            >>> record = cache_record(bb, train, ["layer3"], ExtractConfig(), "train")  # doctest: +SKIP
            >>> FeatureCache().find(record)  # an entry of layer2, layer3 and layer4  # doctest: +SKIP
            '9c1d...'
        """
        own = cache_key(record)
        if self.is_complete(own):
            return own
        want = json.loads(json.dumps(record))  # tuples as lists, as record.json holds them
        layers = set(want.pop("layers"))
        for key in self.entries():
            try:
                rec = json.loads((self.path(key) / "record.json").read_text())
            except (OSError, json.JSONDecodeError):
                continue
            same = all(rec.get(k) == v for k, v in want.items())
            if same and layers <= set(rec.get("layers", ())) and self.is_complete(key):
                return key
        return None

    def entries(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def info(self, key: str) -> dict[str, Any]:
        """What an entry holds: model, layers and shapes, dataset, rows, size, created, status."""
        key = self.resolve(key)
        path = self.path(key)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if self.is_complete(key):
            m = json.loads((path / "manifest.json").read_text())
            rec = m["record"]
            return {
                "key": key,
                "status": "complete",
                "model": rec["backbone"],
                "layers": {k: v["shape"] for k, v in m["layers"].items()},
                "channel_stats": [k for k, v in m["layers"].items() if "channel_stats" in v],
                "dtype": rec["dtype"],
                "pool": rec["pool"],
                "dataset": rec["dataset"],
                "split": rec["split"] + (f"@view{rec['view']}" if rec.get("view") else ""),
                "rows": m["rows"],
                "skipped": len(m["skipped"]),
                "bytes": size,
                "extract_seconds": m.get("extract_seconds"),
                "rows_by_process": m.get("rows_by_process"),
                "created": m["created"],
                "path": str(path),
            }
        rec_file = path / "record.json"
        rec = json.loads(rec_file.read_text()) if rec_file.exists() else {}
        return {
            "key": key,
            "status": "partial",
            "model": rec.get("backbone"),
            "layers": rec.get("layers"),
            "dataset": rec.get("dataset"),
            "split": (rec.get("split") or "") + (f"@view{rec['view']}" if rec.get("view") else ""),
            "bytes": size,
            "path": str(path),
            "shards_done": len(list((path / "shards").glob("*.json"))),
        }

    def ls(self) -> list[dict[str, Any]]:
        """Info of every entry under the root."""
        return [self.info(k) for k in self.entries()]

    def rm(self, key: str) -> None:
        """Remove one entry (waits for a running extraction of it to finish)."""
        key = self.resolve(key)
        with self.lock(key):
            shutil.rmtree(self.path(key))

    def gc(self, partial_older_than_s: float = 24 * 3600) -> list[str]:
        """Remove leftovers: temporary files, shards of committed entries, old partial entries."""
        removed: list[str] = []
        now = time.time()
        for key in self.entries():
            path = self.path(key)
            with self.lock(key, blocking=False) as taken:
                if not taken:  # an extraction is writing this entry right now
                    continue
                for tmp in path.rglob("*.tmp-*"):
                    tmp.unlink(missing_ok=True)
                    removed.append(str(tmp))
                if self.is_complete(key) and (path / "shards").exists():
                    shutil.rmtree(path / "shards")
                    removed.append(str(path / "shards"))
                elif not self.is_complete(key):
                    # Age = the newest write under the entry (shards land in shards/), not the folder's own.
                    paths = list(path.rglob("*"))
                    newest = max((p.stat().st_mtime for p in paths), default=path.stat().st_mtime)
                    if now - newest > partial_older_than_s:
                        shutil.rmtree(path)
                        removed.append(str(path))
        return removed
