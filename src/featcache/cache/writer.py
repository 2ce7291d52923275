"""Writing one cache entry: shards, then a commit that consolidates them, checksums and manifest.

Layout of one entry, ``<root>/<key>/`` (no pickle anywhere)::

    record.json            what the key hashes (written first; a partial entry has only this + shards)
    shards/00000.json      a finished shard: rows, skipped ids, SHA-256 of each layer file
    shards/00000.<layer>.npy
    features/<layer>.npy   consolidated, memory-mappable arrays (written at commit)
    features/channel_stats/<layer>.{mean,var}.npy
                           per-row channel mean and variance of each map or token layer (N, C),
                           float32, over the positions its layout names (manifest ``layers.<l>.layout``),
                           written at commit: pooled heads and standardisation read them, not the map
    labels.npy, ids.json
    manifest.json          committed last: its presence means the entry is complete

Every file is written to a temporary name in the same folder and renamed. A run killed at any
instant leaves a complete entry or a partial one that the next identical extraction resumes
without redoing finished shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .._util import FeatcacheError, write_json
from ..layout import NC, NCHW, channel_stats, channels, legacy_layout

# 2: pooling and channel statistics follow each layer's layout (NHWC maps, tokens); the manifest
# records it; ``penultimate`` of a 1x1-conv classifier is (C,); the record holds the method.
CACHE_VERSION = 2
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _save_npy(path: Path, array: np.ndarray) -> str:
    """Write ``array`` via a temporary name + fsync + rename; return the file's SHA-256."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        np.save(f, np.ascontiguousarray(array))
        f.flush()
        os.fsync(f.fileno())
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


def _fsync_rename(tmp: Path, final: Path) -> None:
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def block_digests(array: np.ndarray, rows: list[int]) -> list[str]:
    out, start = [], 0
    for n in rows:
        out.append(hashlib.sha256(np.ascontiguousarray(array[start : start + n]).tobytes()).hexdigest())
        start += n
    return out


CHANNEL_STATS = ("mean", "var")


class ChannelStatsFiles:
    """The channel statistics of one map layer of an entry, written as rows arrive (memory-mapped
    temporaries in ``features/channel_stats/``), then moved into place by :meth:`finish`.

    Per row and channel: the mean and (population) variance over the positions of the stored
    (rounded) values, the positions and channels being those of the layer's ``layout``
    (:func:`featcache.layout.channel_stats`) — what average pooling and standardisation of the map see.

    Example:
        >>> files = ChannelStatsFiles(entry_dir, "layer3", rows=1000, channels=256)  # doctest: +SKIP
        >>> files.add(0, maps)  # doctest: +SKIP
        >>> manifest["layers"]["layer3"]["channel_stats"] = files.finish()  # doctest: +SKIP
    """

    def __init__(
        self, entry: Path, layer: str, rows: int, channels: int, dtype: str = "float32", layout: str = NCHW
    ) -> None:
        self.entry, self.layer, self.dtype, self.layout = entry, layer, dtype, layout
        folder = entry / "features" / "channel_stats"
        folder.mkdir(parents=True, exist_ok=True)
        self.tmp = {k: folder / f"{layer}.{k}.npy.tmp-{os.getpid()}" for k in CHANNEL_STATS}
        self.out = {
            k: np.lib.format.open_memmap(f, "w+", np.float32, (rows, channels)) for k, f in self.tmp.items()
        }

    def add(self, start: int, maps: np.ndarray) -> None:
        """Statistics of rows ``start:start+len(maps)`` from their maps (in the layout), ~64 MB at a time."""
        step = max(1, (64 << 20) // max(1, maps[:1].nbytes))
        for s in range(0, len(maps), step):
            t = to_torch(np.asarray(maps[s : s + step]), self.dtype).float()
            mean, var = channel_stats(t, self.layout)
            self.out["mean"][start + s : start + s + len(t)] = mean.numpy()
            self.out["var"][start + s : start + s + len(t)] = var.numpy()

    def finish(self) -> dict[str, dict[str, str]]:
        """fsync and rename the files into place; return their manifest entries (file, SHA-256)."""
        for arr in self.out.values():
            arr.flush()
        self.out.clear()
        meta = {}
        for k, tmp in self.tmp.items():
            name = f"features/channel_stats/{self.layer}.{k}.npy"
            _fsync_rename(tmp, self.entry / name)
            meta[k] = {"file": name, "sha256": sha256_file(self.entry / name)}
        return meta


def to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    """A tensor over a stored array (bfloat16 is stored as raw uint16 and viewed back)."""
    a = np.ascontiguousarray(array)
    t = torch.from_numpy(a if a.flags.writeable else a.copy())
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


class CacheWriter:
    """Writes one entry shard by shard; ``commit`` consolidates and writes the manifest last."""

    def __init__(self, path: Path, record: dict[str, Any]) -> None:
        self.path, self.record = path, record
        (path / "shards").mkdir(parents=True, exist_ok=True)
        rec = path / "record.json"
        if rec.exists():
            self.record = json.loads(rec.read_text())
        else:
            write_json(rec, record)

    @property
    def shard_rows(self) -> int:
        return int(self.record["shard_rows"])

    def finished_shards(self) -> dict[int, dict[str, Any]]:
        """Shards whose marker and files are all present and of the recorded size."""
        done = {}
        for marker in sorted((self.path / "shards").glob("*.json")):
            try:
                meta = json.loads(marker.read_text())
            except (json.JSONDecodeError, OSError):
                continue
            files = [self.path / "shards" / f for f in meta["files"].values()]
            if all(f.exists() and f.stat().st_size == meta["sizes"][f.name] for f in files):
                done[int(marker.stem)] = meta
        return done

    def write_shard(
        self,
        index: int,
        arrays: dict[str, np.ndarray],
        rows: list[int],
        skipped: list[tuple[int, str]],
        process: int = 0,
    ) -> None:
        """Write the layer arrays of shard ``index`` (dataset ``rows``), then its marker.

        ``process`` is the rank that wrote it, when several extract one entry
        (:mod:`featcache.extract.distributed`).
        """
        files, digests, sizes = {}, {}, {}
        for layer, arr in arrays.items():
            name = f"{index:05d}.{layer}.npy"
            p = self.path / "shards" / name
            digests[name] = _save_npy(p, arr)
            files[layer], sizes[name] = name, p.stat().st_size
        meta = {
            "index": index,
            "rows": rows,
            "skipped": skipped,
            "files": files,
            "sha256": digests,
            "sizes": sizes,
            "process": process,
        }
        write_json(self.path / "shards" / f"{index:05d}.json", meta)

    def commit(
        self,
        n_shards: int,
        ids: list[str],
        labels: np.ndarray,
        info: dict[str, Any],
        progress: bool = False,
        layouts: dict[str, str | None] | None = None,
    ) -> None:
        """Consolidate shards into one memory-mappable array per layer and write the manifest (a
        progress bar appears when ``progress`` and it takes more than two seconds).

        ``layouts`` gives each stored array's layout (:mod:`featcache.layout`; None: unknown), recorded
        per layer; map and token layers get channel statistics over their positions. Without it, 4-D
        arrays are taken as NCHW maps.
        """
        shards = self.finished_shards()
        missing = [i for i in range(n_shards) if i not in shards]
        if missing:
            raise FeatcacheError(
                f"cannot commit cache {self.path.name}: shards {missing[:5]} are missing (with several "
                "processes on several machines, the cache folder must be one that every machine sees)"
            )
        ordered = [shards[i] for i in range(n_shards)]
        rows = [r for m in ordered for r in m["rows"]]
        block_rows = [len(m["rows"]) for m in ordered]
        feat_dir = self.path / "features"
        (feat_dir / "channel_stats").mkdir(parents=True, exist_ok=True)
        for stale in [*feat_dir.glob("*.tmp-*"), *(feat_dir / "channel_stats").glob("*.tmp-*")]:
            stale.unlink()  # left by a commit that crashed; the caller holds the entry's lock
        layers: dict[str, Any] = {}
        for layer in self.record["layers"]:
            parts = [np.load(self.path / "shards" / m["files"][layer], mmap_mode="r") for m in ordered]
            shape = (len(rows), *parts[0].shape[1:])
            tmp = feat_dir / f"{layer}.npy.tmp-{os.getpid()}"
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=parts[0].dtype, shape=shape)
            layout = layouts.get(layer) if layouts is not None else legacy_layout(shape[1:])
            if layout is not None and len(layout) != len(shape):
                raise FeatcacheError(f"layer {layer!r}: arrays of shape {shape} cannot have layout {layout}")
            # Without layouts (an older caller) only 4-D maps get statistics, as before.
            with_stats = layout not in (None, NC) and (layouts is not None or len(shape) == 4)
            stats = (
                ChannelStatsFiles(
                    self.path,
                    layer,
                    len(rows),
                    channels(str(layout), shape[1:]),
                    self.record["dtype"],
                    str(layout),
                )
                if with_stats
                else None
            )
            start = 0
            for part in tqdm(parts, desc=f"commit {layer}", unit="shard", delay=2, disable=not progress):
                out[start : start + len(part)] = part
                if stats is not None:
                    stats.add(start, part)
                start += len(part)
            out.flush()
            digests = block_digests(out, block_rows)
            del out
            _fsync_rename(tmp, feat_dir / f"{layer}.npy")
            layers[layer] = {
                "shape": list(shape[1:]),
                "layout": layout,
                "file": f"features/{layer}.npy",
                "block_sha256": digests,
            }
            if stats is not None:
                layers[layer]["channel_stats"] = stats.finish()
        labels_sha256 = _save_npy(self.path / "labels.npy", labels[rows])
        write_json(self.path / "ids.json", [ids[r] for r in rows])
        skipped = [{"id": ids[i], "reason": why} for m in ordered for i, why in m["skipped"]]
        by_process: dict[str, int] = {}
        for m in ordered:
            by_process[str(m.get("process", 0))] = by_process.get(str(m.get("process", 0)), 0) + len(
                m["rows"]
            )
        manifest = {
            **info,
            "key": self.path.name,
            "cache_version": CACHE_VERSION,
            "record": self.record,
            "rows": len(rows),
            "block_rows": block_rows,
            "layers": layers,
            "labels_sha256": labels_sha256,
            "ids_sha256": sha256_file(self.path / "ids.json"),
            "skipped": skipped,
            "rows_by_process": by_process,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(self.path / "manifest.json", manifest)
        shutil.rmtree(self.path / "shards", ignore_errors=True)
