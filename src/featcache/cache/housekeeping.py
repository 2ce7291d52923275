"""Choosing cache entries to list, remove or collect, what ``cache ls/info`` show of an entry (damaged
and old-format ones too), ``cache gc``, and remembering which datasets read each table.

The filters (:class:`Selection`) and limits (:class:`GcLimits`) are the ``cache ls/rm/gc`` flags
(:mod:`featcache.cli.flags` builds them from these fields); nothing here imports numpy or torch, so
``featcache cache --help`` starts at once.

Dataset names are views over rows, never part of a table's key: reading a split from a table records
its dataset in ``<table>/uses/<hash of the name>.json`` (its mtime is that dataset's last use), so
``cache ls`` can show which datasets a table serves and ``cache rm --dataset`` can find them.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._disk import cache_root  # noqa: F401  (where the cache lives: shared with data/)
from .._errors import FeatcacheError, flag
from .._util import inside, is_inside, links_under, no_follow_open
from .identity import CACHE_VERSION, TABLE_FILE, table_key

if TYPE_CHECKING:  # tables are passed in, never opened here: this module imports no numpy
    from .store import FeatureCache
    from .table import FeatureTable, TableIndex

#: the folder of a table that records the datasets read from it
USES = "uses"
#: a table folder's name: the SHA-256 key of its record (anything else under the root is not an entry)
KEY_NAME = re.compile(r"^[0-9a-f]{64}$")
_SIZE = re.compile(r"^([0-9]*\.?[0-9]+)([KMGT]?)(I?B)?$")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """A size such as ``10G``, ``500M``, ``1.5T`` or ``2048`` (bytes) as bytes; K, M, G, T are powers of
    1024, as ``du -h`` prints them (``10GB`` and ``10GiB`` mean the same).

    Example:
        >>> parse_size("500M"), parse_size("1.5k")
        (524288000, 1536)
    """
    m = _SIZE.match(text.strip().upper())
    if not m:
        raise FeatcacheError(
            f"{text!r} is not a size (--max-size, max_size=): write a number with K, M, G or T, e.g. 10G "
            "or 500M"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _days(value: float | None, name: str) -> None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise FeatcacheError(f"{flag(name, value)} must be a number of days >= 0, e.g. 30")


@dataclass(frozen=True)
class Selection:
    """Which cache entries ``cache ls`` and ``cache rm`` act on: every filter given must hold.

    Attributes:
        model: the model spec, or a glob over it (``torchvision:resnet18``, ``'*resnet*'``); a name
            without its source matches too (``resnet18``).
        dataset: a dataset read from the entry, or a glob over those names (``digits``,
            ``'*photos*'``); a folder or manifest path matches by its absolute path. Entries made
            before featcache recorded datasets match no dataset.
        older_than: only entries no split was read from for at least this many days.

    Example:
        >>> Selection(model="resnet18").matches({"model": "torchvision:resnet18"}, now=0.0)
        True
    """

    model: str | None = None
    dataset: str | None = None
    older_than: float | None = None

    def __post_init__(self) -> None:
        _days(self.older_than, "older_than")
        for name in ("model", "dataset"):
            if getattr(self, name) == "":
                raise FeatcacheError(f"{name}='' selects nothing; leave it out to select every entry")

    @property
    def empty(self) -> bool:
        """Whether no filter is given (everything is selected)."""
        return self.model is None and self.dataset is None and self.older_than is None

    def matches(self, entry: dict[str, Any], now: float | None = None) -> bool:
        """Whether an entry (:meth:`FeatureCache.info`) passes every filter given."""
        if self.model is not None:
            model = entry.get("model") or ""
            if not (fnmatch.fnmatchcase(model, self.model) or model.split(":", 1)[-1] == self.model):
                return False
        if self.dataset is not None:
            wanted = {self.dataset, os.path.abspath(self.dataset)} if os.path.exists(self.dataset) else set()
            names = entry.get("datasets") or []
            if not any(n in wanted or fnmatch.fnmatchcase(n, self.dataset) for n in names):
                return False
        if self.older_than is not None:
            idle = (time.time() if now is None else now) - float(entry.get("last_used_unix", 0.0))
            if idle < self.older_than * 86400:
                return False
        return True


@dataclass(frozen=True)
class GcLimits:
    """What ``cache gc`` removes besides leftovers (files of interrupted appends, old formats).

    Attributes:
        unused_days: also remove whole tables no split was read from for this many days.
        max_size: then remove the least recently used tables until the cache fits in this size
            (10G, 500M; K/M/G/T are powers of 1024).

    Example:
        >>> GcLimits(max_size="500M").max_bytes
        524288000
    """

    unused_days: float | None = None
    max_size: str | None = None

    def __post_init__(self) -> None:
        _days(self.unused_days, "unused_days")
        if self.max_size is not None:
            parse_size(self.max_size)

    @property
    def max_bytes(self) -> int | None:
        return None if self.max_size is None else parse_size(self.max_size)

    @property
    def unused_s(self) -> float | None:
        return None if self.unused_days is None else self.unused_days * 86400


@dataclass(frozen=True)
class CacheScan:
    """Everything under a cache root: the entries (:meth:`FeatureCache.info` each, most recently used
    first), the folders that are not entries (``lost+found``), and the bytes of the entries."""

    root: Path
    entries: list[dict[str, Any]]
    not_entries: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        damaged = f", damaged={len(self.damaged)}" if self.damaged else ""
        return (
            f"CacheScan({str(self.root)!r}, entries={len(self.entries)}{damaged}, bytes={self.bytes:,}, "
            f"not_entries={self.not_entries[:3]}{'...' if len(self.not_entries) > 3 else ''})"
        )

    @property
    def bytes(self) -> int:
        return sum(int(e["bytes"]) for e in self.entries)

    @property
    def damaged(self) -> list[dict[str, Any]]:
        return [e for e in self.entries if e["status"] == "damaged"]


def dataset_name(name: str) -> str:
    """The name a dataset is recorded under: a path that exists as its absolute path, else as given.

    Example:
        >>> dataset_name("digits")
        'digits'
    """
    return os.path.abspath(name) if os.path.exists(name) else name


def record_use(table: Path, dataset: str) -> None:
    """Record that a split of ``dataset`` was read from ``table`` now; a read-only cache stays as it is.

    No symbolic link is followed: a ``uses`` folder that leads outside the table is left alone (``cache
    verify`` names it), and a link planted at the record's name is replaced by the record, never
    written or touched through.
    """
    folder = table / USES
    # The file name is a hash of the dataset's name: no name becomes a path.
    f = folder / f"{hashlib.sha256(dataset.encode()).hexdigest()[:24]}.json"
    with contextlib.suppress(OSError):
        if folder.is_symlink() or not is_inside(table, folder):
            return
        if f.is_file() and not f.is_symlink():
            os.utime(f, follow_symlinks=False)
        else:
            folder.mkdir(exist_ok=True)
            tmp = f.with_name(f"{f.name}.tmp-{os.getpid()}")
            with no_follow_open(tmp, "w") as out:
                out.write(json.dumps({"dataset": dataset}) + "\n")
            os.replace(tmp, f)  # a rename replaces a link at ``f``; it never writes through it


#: the folder under the cache root remembering the split membership each dataset's last run used: a
#: view over rows (like ``uses/``), never part of a key; a dot folder, so ``cache ls`` passes it by
SPLIT_LOG = ".splits"


def swap_split_log(root: Path, dataset: str, record: dict[str, Any]) -> dict[str, Any] | None:
    """Remember ``record`` (``{"seed", "fractions", "splits": {digest: split}}``) as the split membership
    of ``dataset``'s latest run in the cache at ``root``; return the one it replaces (None when there is
    none or it is unreadable). A read-only cache keeps what it has.

    Example:
        >>> swap_split_log(Path("/tmp/fc"), "digits", {"seed": 0, "splits": {}})  # doctest: +SKIP
    """
    f = root / SPLIT_LOG / f"{hashlib.sha256(dataset.encode()).hexdigest()[:24]}.json"
    previous = None
    with contextlib.suppress(OSError, ValueError):
        old = json.loads(f.read_text())
        if isinstance(old, dict) and old.get("dataset") == dataset and isinstance(old.get("splits"), dict):
            previous = old
    with contextlib.suppress(OSError):
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"dataset": dataset, **record}, separators=(",", ":")) + "\n")
        os.replace(tmp, f)
    return previous


def datasets_used(table: Path) -> dict[str, float]:
    """``{dataset: last use (Unix time)}`` of the datasets read from ``table``, most recent first;
    unreadable records are left out (they name no dataset)."""
    out: dict[str, float] = {}
    folder = table / USES
    if folder.is_symlink() or not folder.is_dir():
        return out  # a linked folder leads outside the table: nothing is read through it
    for f in folder.glob("*.json"):
        if f.is_symlink():
            continue
        with contextlib.suppress(OSError, ValueError, AttributeError):
            name = json.loads(f.read_text()).get("dataset")
            if isinstance(name, str):
                out[name] = max(out.get(name, 0.0), f.stat().st_mtime)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# Entries on disk: what `cache ls/info` show of one, and what `cache gc/rm` remove. Plain file system
# work on folders and JSON: nothing here reads a row (tables are passed in, opened by the store).


def old_format(path: Path) -> bool:
    """Whether ``path`` is an entry of an older cache format: a table file of another version (never
    read: ``cache gc`` removes it), or no table file and no segments (formats before tables); a table
    of this format that lost its table file is damaged instead (``cache rm`` removes it)."""
    try:
        doc = json.loads(Path(inside(path, TABLE_FILE)).read_text())  # never read through a link out
        return bool(doc.get("cache_version") != CACHE_VERSION)
    except FileNotFoundError:
        return not (path / "segments").is_dir()  # segments without table.json: a damaged table
    except (OSError, ValueError, AttributeError):
        return False  # a damaged table file: for `cache verify` / `cache rm`, not for gc


def linked_entry(path: Path) -> FeatcacheError:
    """The error for a cache entry that is a symbolic link: never read or written through."""
    target = os.readlink(path) if path.is_symlink() else "?"
    return FeatcacheError(
        f"cache entry {str(path)!r} is a symbolic link (to {target!r}): featcache reads and writes only "
        f"inside the cache root, never through a link; `featcache cache rm {path.name[:12]}` removes the "
        "link (never what it points to)"
    )


def remove(paths: Sequence[Path]) -> None:
    """Delete files and folders (already gone is fine); a symbolic link is removed itself, never what it
    points to (``shutil.rmtree`` removes the links inside a folder, not their targets)."""
    for p in paths:
        if p.is_symlink():
            p.unlink(missing_ok=True)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def last_used(path: Path) -> float:
    """When a split was last read from the table at ``path`` (Unix time): its ``last_used`` file, else its
    creation; readable for a damaged table too. No link is followed (a link's own time is read)."""
    for name in ("last_used", TABLE_FILE):
        with contextlib.suppress(OSError):
            return (path / name).lstat().st_mtime
    return path.lstat().st_mtime


def folder_bytes(path: Path) -> int:
    """Bytes of every file under ``path``; what a symbolic link points to is not counted (nor is a
    ``path`` that is a link: removing it frees nothing)."""
    if path.is_symlink():
        return 0
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(d, f)).st_size
    return total


def entry_base(path: Path) -> dict[str, Any]:
    """The fields ``cache ls/info`` show of any entry, readable or not: key, bytes, datasets, last use."""
    used = last_used(path)
    return {
        "key": path.name,
        "bytes": folder_bytes(path),
        "path": str(path),
        "datasets": list(datasets_used(path)),
        "last_used": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(used)),
        "last_used_unix": used,
    }


def link_info(path: Path) -> dict[str, Any]:
    """``info`` of an entry that is a symbolic link: nothing behind it is read or counted."""
    used = path.lstat().st_mtime
    target = os.readlink(path)
    return {
        "key": path.name,
        "bytes": 0,
        "path": str(path),
        "datasets": [],
        "last_used": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(used)),
        "last_used_unix": used,
        "status": "damaged",
        "reason": f"a symbolic link to {target!r} (never read; `cache rm` removes the link, not its target)",
        "problem": str(linked_entry(path)),
    }


def describe(table: FeatureTable, index: TableIndex) -> dict[str, Any]:
    """The fields of a readable table that ``cache ls/info`` show (its segments read for counts only).

    Example:
        >>> describe(table, table.counts())["rows"]  # doctest: +SKIP
        4000
    """
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


def damage_reason(path: Path, exc: BaseException, read_segment: Callable[..., object]) -> str:
    """A few words on why the entry at ``path`` cannot be read (``cache ls`` shows ``damaged: ...``):
    its table file, its record, then the first segment ``read_segment(file, layers, digests=False)``
    refuses (:func:`featcache.cache.table.read_segment`, passed in: this module reads no rows).

    Example:
        >>> damage_reason(cache.root / key, exc, read_segment)  # doctest: +SKIP
        'segments/0179...json is unreadable (missing field ...)'
    """
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
        trusted = table_key(record) == path.name
    except FeatcacheError:
        trusted = False
    if not trusted:
        return "its record does not hash to its key"
    folder = path / "segments"
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else ():
        try:
            read_segment(f, list(record.get("layers") or []), digests=False)
        except FeatcacheError as bad:
            why = getattr(bad, "why", None) or _short(bad.__cause__ or bad)
            return f"segments/{f.name} is unreadable ({why})"
    return _short(exc)


def _short(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"field {exc.args[0]!r} is missing"
    return str(exc)[:100]


def links_kept(path: Path, key: str) -> list[str]:
    """``gc``'s note for each symbolic link inside a table: never followed, never deleted."""
    return [
        f"{path / name} -> {target}: a symbolic link in table {key[:12]}; gc never follows or deletes links "
        f"(remove it, or the table with `featcache cache rm {key[:12]}`)"
        for name, target in links_under(path)
    ]


def collect(
    cache: FeatureCache, unused_for_s: float | None, empty_older_than_s: float, max_bytes: int | None
) -> dict[str, list[str]]:
    """``cache gc`` (:meth:`FeatureCache.gc <featcache.cache.store.FeatureCache.gc>` documents it): what
    was removed, by kind, and the links left alone (``not_removed``).

    Example:
        >>> collect(FeatureCache(), None, 86400.0, None)["leftovers"]  # doctest: +SKIP
        []
    """
    removed: dict[str, list[str]] = {
        "old_format": [],
        "leftovers": [],
        "unused": [],
        "over_size": [],
        "not_removed": [],  # "path: why": links gc neither follows nor deletes
    }
    now = time.time()
    for key in cache.entries():
        path = cache.path(key)
        if path.is_symlink():
            removed["not_removed"].append(
                f"{path} -> {os.readlink(path)}: an entry that is a symbolic link; gc never follows or "
                f"removes links (`featcache cache rm {key[:12]}` removes the link, not its target)"
            )
            continue
        with cache.lock(key, blocking=False) as taken:
            if not taken:  # an extraction is appending to this table right now
                continue
            try:
                table = cache.open(key)
                index = table.index()
            except FeatcacheError:
                if old_format(path):
                    remove([path])
                    removed["old_format"].append(str(path))
                else:  # a damaged table stays for `cache verify` / `cache rm`; its links are named
                    removed["not_removed"] += links_kept(path, key)
                continue
            junk = table.leftovers(index)
            remove(junk)
            removed["leftovers"] += [str(p) for p in junk]
            idle = now - table.last_used()
            if (not index.segments and idle > empty_older_than_s) or (
                unused_for_s is not None and idle > unused_for_s
            ):
                remove([path])  # the links inside go as links: their targets stay
                cache.forget(key)
                removed["unused"].append(str(path))
                continue
            removed["not_removed"] += links_kept(path, key)
    if max_bytes is not None:
        removed["over_size"] = _fit(cache, max_bytes)
    return removed


def _fit(cache: FeatureCache, max_bytes: int) -> list[str]:
    """Remove the least recently used entries until the entries' bytes are at most ``max_bytes``."""
    entries = cache.scan().entries  # most recently used first
    total, out = sum(int(e["bytes"]) for e in entries), []
    for e in reversed(entries):
        if total <= max_bytes:
            break
        if Path(e["path"]).is_symlink():  # frees nothing; gc never removes links
            continue
        with cache.lock(e["key"], blocking=False) as taken:
            if not taken:  # being appended to: its size is about to change anyway
                continue
            remove([Path(e["path"])])
        cache.forget(e["key"])
        total -= int(e["bytes"])
        out.append(e["path"])
    return out
