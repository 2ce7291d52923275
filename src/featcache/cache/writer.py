"""Appending rows to a feature table: one shard of whole batches at a time, each committed by its index
segment.

Layout of one table, ``<root>/<key>/`` (no pickle anywhere)::

    table.json                 the record the key hashes (written once, when the table is created)
    shards/<seg>.<i>.npy       the rows of layer ``i`` (its position in the record's sorted layers)
    shards/<seg>.<i>.mean.npy  per-row channel mean and variance of a spatial map layer, (n, C) float32:
    shards/<seg>.<i>.var.npy   pooled heads and standardisation read them, not the map
    shards/<seg>.digests.npy   the content digest of each row: raw 32-byte SHA-256s, (n, 32) uint8 (the
                               binary part of the index: no per-row JSON to parse)
    segments/<seg>.json        the index segment: the row count, the images that could not be decoded,
                               SHA-256 and size of each shard file and of the digests file, and the
                               SHA-256 of the segment itself (``checksum``). Written last: its presence
                               commits the shard's rows. Counts (``cache ls``) read these files only
    last_used                  touched whenever a split is read from the table (``cache gc``)

Every file is written to a temporary name in the same folder, fsynced and renamed. A process killed
at any instant loses at most the shard it was writing (its files, unreferenced by any segment, are
removed by ``cache gc``); the next run extracts only the rows no segment holds.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .._disk import disk_errors, ensure_space
from .._util import FeatcacheError, is_inside, no_follow_open, stable_hash, write_json
from ..data.digests import raw_digests
from ..layout import channel_stats as layout_channel_stats
from ..layout import channels, has_positions
from .identity import CACHE_VERSION
from .rows import to_torch

__all__ = ["CACHE_VERSION", "write_segment"]  # CACHE_VERSION lives with the table record (identity.py)
CHANNEL_STATS = ("mean", "var")
#: segment names: commit time (ns) and a random tag, so sorting them sorts by commit time
SEGMENT_NAME = re.compile(r"^[0-9]{20}-[0-9a-f]{8}$")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def segment_checksum(segment: dict[str, Any]) -> str:
    """SHA-256 of an index segment's JSON without its ``checksum`` field (which holds this value)."""
    return stable_hash({k: v for k, v in segment.items() if k != "checksum"})


def save_npy(path: Path, array: np.ndarray) -> dict[str, Any]:
    """Write ``array`` via a temporary name + fsync + rename; return the file's SHA-256 and size."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:  # plain writes, never a memory map: a full disk is an OSError here, not a SIGBUS later
        with no_follow_open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a half-written file would hold the space a retry needs
        raise
    meta = {"sha256": sha256_file(tmp), "bytes": tmp.stat().st_size}
    os.replace(tmp, path)
    return meta


def channel_stats(maps: np.ndarray, dtype: str = "float32", layout: str = "NCHW") -> dict[str, np.ndarray]:
    """Per row and channel of a map or token layer in the storage ``dtype``: the mean and (population)
    variance over its positions (:func:`featcache.layout.channel_stats`) of the stored (rounded)
    values, float32, ~64 MB at a time.

    Example:
        >>> s = channel_stats(np.ones((2, 3, 4, 4), np.float32))
        >>> s["mean"].shape, float(s["var"].max())
        ((2, 3), 0.0)
    """
    c = channels(layout, tuple(maps.shape[1:]))
    out = {k: np.empty((len(maps), c), np.float32) for k in CHANNEL_STATS}
    step = max(1, (64 << 20) // max(1, maps[:1].nbytes))
    for s in range(0, len(maps), step):
        t = to_torch(np.asarray(maps[s : s + step]), dtype)
        mean, var = layout_channel_stats(t, layout)
        out["mean"][s : s + len(t)] = mean.numpy()
        out["var"][s : s + len(t)] = var.numpy()
    return out


#: a shard holds about this many bytes of rows at most (``shard_mb``'s default): an ImageNet-scale map
#: table (1.28M rows of 256 x 14 x 14 float16, 128 GB) is ~128 shards, not thousands of files
SHARD_MB = 1024
#: ... and a split is cut into at least this many shards where its batches allow: an interruption loses
#: at most about this fraction of the split's extraction
MIN_SHARDS = 8


def shard_plan(row_bytes: int, rows: int, batch_size: int, shard_mb: int = SHARD_MB) -> int:
    """Rows per shard for appending ``rows`` rows of ``row_bytes`` bytes each (every layer): about
    ``shard_mb`` MB, at least :data:`MIN_SHARDS` shards where the batches allow, always whole batches
    (a multiple of ``batch_size``), so a resumed append, which starts at the first uncommitted shard,
    forms the same batches as an uninterrupted one and stores the same bytes. Nothing is written.

    Example:
        >>> shard_plan(256 * 14 * 14 * 2, 1_281_167, 256)  # an ImageNet-scale map table: 1 GB shards
        10752
    """
    per = max(1, (shard_mb << 20) // max(row_bytes, 1))
    per = min(per, max(1, -(-rows // MIN_SHARDS)))
    return max(1, -(-per // batch_size)) * batch_size


def shard_file(segment: str, layer_pos: int, kind: str = "rows") -> str:
    """A shard file's path inside the table (made from validated names, never read from disk)."""
    return (
        f"shards/{segment}.{layer_pos}.npy" if kind == "rows" else f"shards/{segment}.{layer_pos}.{kind}.npy"
    )


def digests_file(segment: str) -> str:
    """The digests file of a segment, inside the table (made from a validated name)."""
    return f"shards/{segment}.digests.npy"


def write_segment(
    table: Path,
    layers: Sequence[str],
    arrays: dict[str, np.ndarray],
    digests: Sequence[str],
    skipped: dict[str, str],
    dtype: str,
    info: dict[str, Any],
    stats: dict[str, dict[str, np.ndarray]] | None = None,
    layouts: dict[str, str | None] | None = None,
) -> str:
    """Write one shard (a file per layer, channel statistics of maps), then commit its index segment.

    Args:
        table: the table's folder.
        layers: the table's layers (the record's sorted list): file ``i`` holds layer ``layers[i]``.
        arrays: ``{layer: (n, ...) array}`` in the storage dtype, row ``j`` the image ``digests[j]``.
        digests: the content digest of each row.
        skipped: ``{digest: why}`` of the images in this shard's batches that could not be decoded.
        dtype: the storage dtype (``bfloat16`` arrays hold raw uint16).
        info: recorded in the segment (which process wrote it, the extraction method).
        stats: channel statistics of map layers to store as they are (a compaction copies them);
            computed from the maps when absent.
        layouts: each stored array's layout (:mod:`featcache.layout`; None: unknown, no statistics),
            recorded per layer; map and token layers get channel statistics over their positions.
            Without it, 4-D arrays are taken as NCHW maps (as before layouts were recorded).

    Returns:
        The segment's name.

    Example:
        >>> write_segment(table, ["layer3"], {"layer3": rows}, digests, {}, "float32", {})  # doctest: +SKIP
    """
    for layer in layers if digests else ():
        if len(arrays[layer]) != len(digests):
            raise FeatcacheError(f"{len(arrays[layer])} rows of {layer} for {len(digests)} digests")
    name = f"{time.time_ns():020d}-{secrets.token_hex(4)}"
    needed = segment_bytes(arrays, digests)
    ensure_space(table, needed, "a cache shard", FIX, FREE_UP)
    try:
        with disk_errors(table, needed, "a cache shard", FIX, FREE_UP):
            return _write_segment(table, name, layers, arrays, digests, skipped, dtype, info, stats, layouts)
    except BaseException:
        # this shard's files: no segment refers to them, and they would hold the space a retry needs
        shards = table / "shards"
        committed = (table / "segments" / f"{name}.json").exists()  # never those of a committed segment
        if not committed and not shards.is_symlink():  # nor anything a linked folder leads to
            for f in shards.glob(f"{name}.*"):
                f.unlink(missing_ok=True)
        raise


#: how to get room for the cache, in messages
FIX = "choose another cache root (--cache-dir, $FEATCACHE_HOME)"
FREE_UP = "`featcache cache gc --unused-days N` removes tables not read for N days"


def segment_bytes(arrays: dict[str, np.ndarray], digests: Sequence[str]) -> int:
    """An upper bound of the bytes one shard and its segment take on disk: the rows, the channel
    statistics of map and token layers (two float32 per row and channel, at most), the segment's JSON.

    Example:
        >>> segment_bytes({"a": np.zeros((10, 4), np.float32)}, ["d"] * 10)
        66016
    """
    if not digests:
        return 65536
    rows = sum(int(a.nbytes) + (8 * len(a) * max(a.shape[1:]) if a.ndim >= 3 else 0) for a in arrays.values())
    return rows + 32 * len(digests) + 65536


def _write_segment(
    table: Path,
    name: str,
    layers: Sequence[str],
    arrays: dict[str, np.ndarray],
    digests: Sequence[str],
    skipped: dict[str, str],
    dtype: str,
    info: dict[str, Any],
    stats: dict[str, dict[str, np.ndarray]] | None,
    layouts: dict[str, str | None] | None,
) -> str:
    for sub in ("shards", "segments"):
        folder = table / sub
        if folder.is_symlink() or not is_inside(table, folder):  # never write through a planted link
            target = os.readlink(folder) if folder.is_symlink() else os.path.realpath(folder)
            raise FeatcacheError(
                f"{str(folder)!r} leads outside its table (to {target!r}; a symbolic link?): "
                "featcache writes only inside the cache; remove the table with `featcache cache rm "
                f"{table.name[:12]}` (its rows are extracted again)"
            )
        folder.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {}
    for pos, layer in enumerate(layers if digests else ()):
        arr = arrays[layer]
        files = {"rows": save_npy(table / shard_file(name, pos), arr)}
        layout = (layouts or {}).get(layer, "NCHW" if arr.ndim == 4 and layouts is None else None)
        if layout is not None and has_positions(layout):
            given = (stats or {}).get(layer)
            computed = given if given is not None else channel_stats(arr, dtype, layout)
            for kind, values in computed.items():
                files[kind] = save_npy(table / shard_file(name, pos, kind), values)
        meta[layer] = {
            "shape": list(arr.shape[1:]),
            "dtype": str(arr.dtype),
            "files": files,
            "layout": layout,
        }
    segment = {
        "cache_version": CACHE_VERSION,
        "rows": len(digests),
        "digests": save_npy(table / digests_file(name), raw_digests(digests)),
        "skipped": dict(skipped),
        "layers": meta,
        **info,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    segment["checksum"] = segment_checksum(segment)  # any damage to the index is caught on open
    write_json(table / "segments" / f"{name}.json", segment)  # the commit
    return name
