"""Extraction: run the frozen backbone over the images a feature table lacks, then read the split.

:func:`extract` computes each sample's content digest, picks the table of the extraction setting (or
one made the same way with more layers), runs the backbone only on the digests the table lacks and
appends them in shards of whole batches, then reads the split's rows in its own order. One forward
pass serves every layer of the table, and stops after the deepest one. Memory stays bounded by one
shard (``shard_mb``), never the whole dataset. Relabelling or redrawing a split runs no forward pass.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from .._config import to_json
from .._disk import disk_errors
from .._util import FeatcacheError, resolve_device
from ..backbones.registry import Backbone
from ..cache.housekeeping import dataset_name
from ..cache.identity import TableRecord
from ..cache.splits import CachedFeatures, ExtractionInfo
from ..cache.store import FeatureCache, cache_key
from ..cache.table import TABLE_FILE, FeatureTable, new_run
from ..cache.writer import FIX, FREE_UP, write_segment
from ..data.datasets import DatasetSplits
from ..data.digests import DIGEST_MEMO, DigestMemo, SampleChangedError
from ..data.preprocess import AUGMENT_VERSION, PixelBatch, PreprocessedView, make_augment, normalize_pixels
from ..data.samples import TOO_LARGE, BadImageError, SampleSet
from ..layout import LAYOUT_RULES
from .config import DEFAULT_LAYER, ExtractConfig, View, Views, parse_layers
from .distributed import Ranks
from .extractor import Extractor, decode_workers, shard_rows, use_amp
from .nodes import defining_method

log = logging.getLogger(__name__)
T = TypeVar("T")


def cache_record(
    backbone: Backbone, layers: Sequence[str], config: ExtractConfig, view: View | None = None
) -> TableRecord:
    """The typed record whose hash is a feature table's key: everything that decides a row's values,
    and nothing else (no labels, splits, dataset names, paths or row order).

    How the layers are read is part of it where that decides values: the method whose values the
    arrays are (torch.fx only for graph nodes; elsewhere FX is checked against the hooks) and the
    version of the rules that infer each layer's layout (the layout decides pooling and channel
    statistics; it is a function of the architecture, the input size and these rules).

    Example:
        >>> record = cache_record(bb, ["layer3"], ExtractConfig())  # doctest: +SKIP
        >>> record.key() == cache_key(record)  # doctest: +SKIP
        True
    """
    device = resolve_device(config.device)
    return TableRecord(
        backbone=backbone.cfg.spec,
        weights_id=backbone.cfg.weights_id,
        preprocessing=TableRecord.from_json_preprocessing(
            backbone.at_input_size(config.input_size).cfg.preprocessing.key_record()
        ),
        layers=tuple(sorted(layers)),
        pool=config.pool,
        dtype=config.dtype,
        amp_bf16=use_amp(config, device),
        view=view.index if view else 0,
        method=defining_method(backbone.model, layers, config.method),
        layout_rules=LAYOUT_RULES,
        augment=view.augment if view else None,
        augment_version=AUGMENT_VERSION if view else None,
    )


def extract(
    backbone: Backbone,
    samples: SampleSet,
    layers: str | Sequence[str] = (DEFAULT_LAYER,),
    config: ExtractConfig | None = None,
    *,
    cache_dir: str | None = None,
    split: str = "train",
    progress: bool = True,
    ranks: Ranks | None = None,
    view: View | None = None,
) -> CachedFeatures:
    """Extract ``layers`` for the samples the cache lacks, and return every sample's rows.

    Args:
        backbone: a frozen backbone from :func:`~featcache.backbones.load_backbone`.
        samples: the images (one split).
        layers: layer names (``featcache layers MODEL`` lists them), ``penultimate`` or ``logits``; a
            comma list works too. One forward pass serves them all.
        config: how to extract; defaults to pooled features in float32.
        cache_dir: cache root (else ``$FEATCACHE_HOME`` or the XDG cache folder).
        split: the split's name (recorded, not part of any key).
        progress: show progress bars (hashing, extraction).
        ranks: extract as one of several ``torchrun`` processes, each taking a share of the missing
            rows (:func:`featcache.extraction.distributed.ranks_from_env`); every rank must call this alike.
        view: None for the images as they are, else one augmented view (:class:`View`).

    Returns:
        The split's rows in its order, read from the table; ``.extracted`` of them went through the
        backbone in this call, ``.from_cache`` did not.

    Raises:
        BadImageError: with ``on_bad_image="error"``, naming every unreadable image of the split in one
            message, after the readable ones are committed (a re-run extracts none of them again).

    Example:
        >>> from featcache import load_backbone, load_dataset
        >>> bb = load_backbone("efficientnet-lite0")
        >>> data = load_dataset("mnist-5k")
        >>> cfg = ExtractConfig(input_size=(64, 64))
        >>> feats = extract(bb, data.train, ["penultimate"], cfg)  # doctest: +SKIP
        >>> feats.tensor("penultimate").shape  # doctest: +SKIP
        torch.Size([3500, 1280])
    """
    config = config or ExtractConfig()
    backbone = backbone.at_input_size(config.input_size)  # itself when loaded for that size
    names = parse_layers(layers, backbone)
    cache, record = FeatureCache.shared(cache_dir, config.verify), cache_record(backbone, names, config, view)
    out = _extract(backbone, samples, names, config, cache, record, split, progress, ranks, view)
    if config.on_bad_image == "error":
        _raise_bad({split: (samples, out)})
    return out


def _extract(
    backbone: Backbone,
    samples: SampleSet,
    names: Sequence[str],
    config: ExtractConfig,
    cache: FeatureCache,
    record: TableRecord,
    split: str,
    progress: bool,
    ranks: Ranks | None,
    view: View | None,
) -> CachedFeatures:
    """:func:`extract` up to the bad-image error: an unreadable image is recorded in its shard's segment
    and left out of the split's rows under either policy. ``backbone`` is at the config's input size,
    ``names`` are parsed, ``record`` is the table's."""
    if len(samples) == 0:
        msg = (
            "nothing to extract (a --limit below the number of classes, or split fractions leaving it empty?)"
        )
        raise FeatcacheError(f"the {split} split of {samples.name!r} holds no samples: {msg}")
    if ranks is not None:
        ranks.agree(cache_key(record)[:16], "cache key")  # else they would append to different tables
    memo = DigestMemo(cache.root / DIGEST_MEMO)
    main = ranks is None or ranks.is_main
    t0 = time.perf_counter()
    for attempt in range(2):
        digests: list[str] = _decided(ranks, lambda: samples.digests(memo, progress and main))
        key: str = _decided(ranks, lambda d=digests: cache.choose(record, d))  # type: ignore[misc]
        job = _Job(backbone, samples, digests, config, cache, key, record, split, progress, view)
        try:
            # its folders, lock and table files: a full, read-only or foreign cache is one named error
            with disk_errors(cache.root, None, "the feature cache", FIX, FREE_UP):
                done = _append(job, ranks)
            break
        except SampleChangedError:
            if attempt or ranks is not None:
                raise
            _forget_unserved(job, memo)  # a memoised digest the bytes disagree with: hashed once more
    info = ExtractionInfo(
        dataset=dataset_name(samples.source),  # recorded beside the table (`cache ls`), not in its key
        images_extracted=len(done.digests),
        extract_seconds=round(time.perf_counter() - t0, 3),
        extract_config=_jsonable(config, names, view),
        backbone_cfg=backbone.cfg.to_dict(),
        processes=1 if ranks is None else ranks.world,
        rows_by_process=done.by_process,
        method=done.method or _table_method(cache.open(key)),
    )
    # the split's result is built once, filled: the rows extracted in this call counted as they are read
    return cache.open_split(
        key, names, digests, samples.ids, samples.labels, samples.classes, info, samples.task,
        split=split, new=done.digests,
    )  # fmt: skip


def _forget_unserved(job: _Job, memo: DigestMemo) -> None:
    """Drop the memo's entries of the files whose rows the table lacks (those the loader read, one of
    which did not hash to its memoised digest), so that they are hashed again."""
    try:
        index = job.cache.open(job.key).index()
        absent = np.flatnonzero(~index.where.held(job.digests)).tolist()
        lacking = [i for i in absent if job.digests[i] not in index.bad]
    except FeatcacheError:
        lacking = list(range(len(job.digests)))
    memo.forget([p for p in map(job.samples.file_path, lacking) if p is not None])
    job.samples.forget_digests()


@dataclass
class _Job:
    """One split to serve from a table: what to extract, from what, and where."""

    backbone: Backbone
    samples: SampleSet
    digests: list[str]
    config: ExtractConfig
    cache: FeatureCache
    key: str
    record: TableRecord
    split: str
    progress: bool
    view: View | None = None


@dataclass
class _Appended:
    """What one call appended: the digests extracted, images dealt to each process, the method used."""

    digests: list[str] = field(default_factory=list)
    by_process: dict[str, int] = field(default_factory=dict)
    method: str | None = None


def _decided(ranks: Ranks | None, fn: Callable[[], T]) -> T:
    """``fn()`` on the main process, its value on every rank; an error there is raised on every rank
    (every decision that changes which collectives run is rank 0's, so no rank waits forever)."""
    if ranks is None:
        return fn()
    value: Any = None
    error: str | None = None
    if ranks.is_main:
        try:
            value = fn()
        except (FeatcacheError, OSError) as exc:
            if ranks.world == 1:
                raise
            error = f"{type(exc).__name__}: {exc}"
    value, error = ranks.from_main((None if error else value, error))
    if error is not None:
        raise FeatcacheError(f"rank 0 failed: {error}")
    return value  # type: ignore[no-any-return]


def _table_method(table: FeatureTable) -> str | None:
    """The extraction method recorded in the table's first segment (None in an empty table)."""
    segments = table.index().segments
    return segments[0].info.get("method") if segments else None


def _append(job: _Job, ranks: Ranks | None) -> _Appended:
    """Extract the digests the table lacks and append them; the main process holds the table's lock."""
    cache, main = job.cache, ranks is None or ranks.is_main

    def table() -> FeatureTable:
        own = job.key == cache_key(job.record)
        if own and not (cache.path(job.key) / TABLE_FILE).is_file():
            # A layer that is unknown, or cannot be pooled as asked, is refused before its table exists
            # (not left behind as an empty entry); the extractor's checks are memoised for _build.
            Extractor(job.backbone, job.record.layers, job.config)
            return cache.create(job.record)
        return cache.open(job.key)  # no lock and no write: a read-only cache serves its hits

    if not _decided(ranks, lambda: _missing(job, table())):
        return _Appended()  # a hit: no lock taken
    with cache.lock(job.key) if main else contextlib.nullcontext():
        # Again under the lock: another process may have appended these rows while we waited.
        missing = _decided(ranks, lambda: _missing(job, table()))
        if not missing:
            return _Appended()
        done = _build(job, table() if main else cache.open(job.key), missing, ranks)
        if main:  # under the lock: small incremental segments merged before they pile up
            cache.open(job.key).merge_small()
        return done


def _missing(job: _Job, table: FeatureTable) -> list[str]:
    """The digests to extract: those the table lacks, and those it recorded as refused by the pixel limit
    that the limit of this run takes (``--max-image-pixels`` raised), so they become rows."""
    index = table.index()
    missing = index.missing(job.digests)
    refused = {d for d, why in index.bad.items() if TOO_LARGE in why and d not in index.where}
    if refused:
        first = {d: i for i, d in reversed(list(enumerate(job.digests)))}
        wanted = [d for d in dict.fromkeys(job.digests) if d in refused]
        found = job.samples.problems([first[d] for d in wanted])
        missing += [d for d in wanted if first[d] not in found]
    return missing


def _build(job: _Job, table: FeatureTable, missing: list[str], ranks: Ranks | None) -> _Appended:
    """Deal the missing digests' shards (round-robin over ranks) and extract this process's share."""
    first: dict[str, int] = {}
    for i, d in enumerate(job.digests):
        first.setdefault(d, i)  # a duplicated image is read from its first file
    ex = Extractor(job.backbone, table.layers, job.config)
    rows_per: int = _decided(ranks, lambda: _shard_rows(ex, len(missing), ranks))
    run: str = _decided(ranks, new_run)  # every rank's segments are one run (the merge policy's unit)
    shards = [missing[i : i + rows_per] for i in range(0, len(missing), rows_per)]
    world = 1 if ranks is None else ranks.world
    mine = [d for j, s in enumerate(shards) if ranks is None or ranks.owns(j) for d in s]
    if (ranks is None or ranks.is_main) and len(missing) < len(set(job.digests)):
        log.info("table %s: %d of %d images to extract", table.key[:12], len(missing), len(set(job.digests)))
    if mine:
        _run(ex, job, table, mine, [first[d] for d in mine], rows_per, run, ranks)
    if ranks is not None:
        ranks.barrier()  # every rank's segments are committed
    by_process = {str(r): sum(len(s) for s in shards[r::world]) for r in range(world)}
    return _Appended(missing, by_process, ex.net.method)


def _shard_rows(ex: Extractor, n: int, ranks: Ranks | None) -> int:
    """Rows per shard: whole batches, so a resumed append forms the batches an uninterrupted one would."""
    rows = shard_rows(ex, n)
    if ranks is not None and not ex.config.shard_rows:  # >= 4 shards per rank: similar shares
        rows = min(rows, max(1, math.ceil(n / (4 * ranks.world))))
    bs = ex.config.batch_size
    return max(1, math.ceil(rows / bs)) * bs


def _jsonable(config: ExtractConfig, layers: Sequence[str], view: View | None) -> dict[str, Any]:
    """What the manifest records: the augmentation only where it shaped the numbers."""
    return {"layers": list(layers), **to_json(config), "augment": view.augment if view else None}


#: rows a shard keeps on the device before they move into its host array (one transfer per ~64 MB)
_DEVICE_BYTES = 64 << 20


class _ShardBuffer:
    """A shard's rows on their way to disk. Batches wait on the device until ~64 MB of them are there,
    then move in one transfer into the shard's host array (allocated once, at the shard's size: pages
    are touched only as rows arrive), so a 1 GB shard costs 1 GB of host RAM and 64 MB of device memory,
    not twice the shard on each (a concatenation on the device, then its copy)."""

    def __init__(self, ex: Extractor, layers: Sequence[str], capacity: int) -> None:
        self.ex, self.layers, self.capacity = ex, list(layers), capacity
        self.waiting: dict[str, list[torch.Tensor]] = {k: [] for k in self.layers}
        self.host: dict[str, np.ndarray] = {}
        self.waiting_bytes = self.filled = 0

    def add(self, feats: dict[str, torch.Tensor]) -> None:
        """One batch's rows of every layer (the same rows in each)."""
        for layer, t in feats.items():
            self.waiting[layer].append(t)
            self.waiting_bytes += t.numel() * t.element_size()
        if self.waiting_bytes >= _DEVICE_BYTES:
            self._to_host()

    def _to_host(self) -> None:
        moved = 0
        for layer, parts in self.waiting.items():
            if not parts:
                continue
            rows = self.ex.to_numpy(torch.cat(parts))
            if layer not in self.host:
                self.host[layer] = np.empty((self.capacity, *rows.shape[1:]), rows.dtype)
            self.host[layer][self.filled : self.filled + len(rows)] = rows
            moved = len(rows)
        self.filled += moved
        self.waiting, self.waiting_bytes = {k: [] for k in self.layers}, 0

    def take(self) -> dict[str, np.ndarray]:
        """Every layer's rows added since the last take, in order; the buffer starts the next shard."""
        self._to_host()
        out = {k: v[: self.filled] for k, v in self.host.items()}
        self.host, self.filled = {}, 0
        return out


def _run(
    ex: Extractor,
    job: _Job,
    table: FeatureTable,
    pending: Sequence[str],
    indices: Sequence[int],
    rows_per: int,
    run: str,
    ranks: Ranks | None = None,
) -> None:
    """The batch loop: forward each batch, keep its rows on the device, commit a segment per shard."""
    cfg, config, view = job.backbone.cfg, job.config, job.view
    augment = make_augment(view.augment, cfg.input_size) if view else None
    pre = cfg.preprocessing
    # Each new file is read once (hashed, checked and decoded from the same bytes); its pixels are resized
    # per batch of one size and normalised on the device (uint8 moves there, a quarter of the bytes).
    loader = torch.utils.data.DataLoader(
        PreprocessedView(job.samples, pre, indices, augment, view.index if view else None, pending, True),
        batch_size=config.batch_size,
        num_workers=decode_workers(config.workers, ex.device),
        collate_fn=PixelBatch(pre),
        pin_memory=ex.device.type == "cuda",
        persistent_workers=False,
    )
    # the layers' own layouts (what pooling averaged over) travel with every segment
    info = {
        "process": ranks.rank if ranks else 0,
        "method": ex.net.method,
        "layer_layouts": ex.layouts,
        "run": run,
    }
    stored = ex.stored_layouts()
    buf = _ShardBuffer(ex, table.layers, rows_per)
    rows: list[str] = []
    skipped: dict[str, str] = {}
    done, t0 = 0, time.perf_counter()
    desc = f"extract {job.split}" + (f" (rank 0 of {ranks.world})" if ranks else "")
    shown = job.progress and (ranks is None or ranks.is_main)
    with tqdm(total=len(pending), unit="img", desc=desc, disable=not shown, dynamic_ncols=True) as bar:
        for pixels, idx, errors in loader:
            x = normalize_pixels(pixels.to(ex.device, non_blocking=True), pre)
            feats = {k: ex.cast(v) for k, v in ex(x).items()}
            batch = pending[done : done + len(idx)]
            # An unreadable image is recorded with its shard, under either policy (what its bytes are does
            # not depend on it): --on-bad-image error names them all once the readable ones are committed.
            bad = [j for j, e in enumerate(errors) if e]
            skipped.update((batch[j], errors[j]) for j in bad)
            good = [j for j in range(len(idx)) if not errors[j]]
            keep = torch.tensor(good, dtype=torch.long, device=ex.device) if len(good) < len(idx) else None
            buf.add({layer: t if keep is None else t.index_select(0, keep) for layer, t in feats.items()})
            rows.extend(batch[j] for j in good)
            done += len(idx)
            bar.update(len(idx))
            if done % rows_per == 0 or done == len(pending):  # shards are whole batches
                arrays = buf.take()
                if not rows:  # every image of the shard was unreadable: no rows to store
                    arrays = {}
                seconds = round(time.perf_counter() - t0, 4)
                write_segment(
                    table.path,
                    table.layers,
                    arrays,
                    rows,
                    skipped,
                    config.dtype,
                    info | {"seconds": seconds},
                    layouts=stored,
                )
                rows, skipped, t0 = [], {}, time.perf_counter()


def extract_splits(
    backbone: Backbone,
    splits: DatasetSplits,
    layers: str | Sequence[str] = (DEFAULT_LAYER,),
    config: ExtractConfig | None = None,
    *,
    cache_dir: str | None = None,
    progress: bool = True,
    ranks: Ranks | None = None,
) -> dict[str, CachedFeatures]:
    """:func:`extract` for every split that exists (``train``, ``val``, ``test``).

    Example:
        >>> splits = load_dataset("digits")
        >>> feats = extract_splits(bb, splits, ["layer3"], ExtractConfig())  # doctest: +SKIP
    """
    config = config or ExtractConfig()
    backbone = backbone.at_input_size(config.input_size)  # itself when loaded for that size
    names = parse_layers(layers, backbone)
    cache, record = FeatureCache.shared(cache_dir, config.verify), cache_record(backbone, names, config)
    return extract_table(backbone, splits, names, config, record, cache, progress=progress, ranks=ranks)


def extract_table(
    backbone: Backbone,
    splits: DatasetSplits,
    names: Sequence[str],
    config: ExtractConfig,
    record: TableRecord,
    cache: FeatureCache,
    *,
    progress: bool = True,
    ranks: Ranks | None = None,
) -> dict[str, CachedFeatures]:
    """:func:`extract_splits` for a caller that has resolved its parts once (a run's
    :class:`~featcache.runs.job.Job`): ``backbone`` at the config's input size
    (:meth:`~featcache.backbones.Backbone.at_input_size`), ``names`` as :func:`parse_layers` gave them,
    ``record`` the table's :func:`cache_record` for them, ``cache`` the open cache. A record made for
    another backbone, layers or setting is refused: the rows would be filed under another table.

    Example:
        >>> names = parse_layers("layer3", bb)  # doctest: +SKIP
        >>> record, cache = cache_record(bb, names, cfg), FeatureCache.shared()  # doctest: +SKIP
        >>> feats = extract_table(bb, splits, names, cfg, record, cache)  # doctest: +SKIP
    """
    backbone = backbone.at_input_size(config.input_size)  # itself when resolved already
    _check_record(record, backbone, names, config)
    out = {
        name: _extract(backbone, s, names, config, cache, record, name, progress, ranks, None)
        for name, s in splits.items()
    }
    if config.on_bad_image == "error":  # every unreadable image of every split in one error
        _raise_bad({name: (s, out[name]) for name, s in splits.items()})
    return out


def _check_record(
    record: TableRecord, backbone: Backbone, names: Sequence[str], config: ExtractConfig
) -> None:
    """Refuse a table record that does not describe these layers of this backbone under ``config``."""
    expected = {
        "backbone": backbone.cfg.spec,
        "weights_id": backbone.cfg.weights_id,
        "preprocessing": TableRecord.from_json_preprocessing(backbone.cfg.preprocessing.key_record()),
        "layers": tuple(sorted(names)),
        "pool": config.pool,
        "dtype": config.dtype,
        "view": 0,
    }
    wrong = [
        f"{k} {getattr(record, k)!r} (expected {v!r})" for k, v in expected.items() if getattr(record, k) != v
    ]
    if wrong:
        raise ValueError(
            f"the table record does not describe this extraction: {'; '.join(wrong)}; build it with "
            "cache_record(backbone, layers, config) for the same backbone, layers and config"
        )


def _raise_bad(served: dict[str, tuple[SampleSet, CachedFeatures]]) -> None:
    """Raise :func:`bad_images_error` for the unreadable images of these splits (``{split: (samples, rows
    read)}``): those found in this run and those the table recorded when they were first read."""
    found: dict[str, tuple[SampleSet, dict[int, str]]] = {}
    for split, (samples, feats) in served.items():
        skipped = feats.result.skipped
        if skipped:
            where = {id_: i for i, id_ in enumerate(samples.ids)}
            found[split] = (samples, {where[id_]: why for id_, why in skipped})
    if found:
        raise bad_images_error(found)


def bad_images_error(found: dict[str, tuple[SampleSet, dict[int, str]]], shown: int = 10) -> BadImageError:
    """The error naming unreadable images (``{split: (samples, {index: why})}``): how many, the first
    ``shown`` with their reasons, and the fixes.

    Example:
        >>> raise bad_images_error({"train": (samples, {3: "OSError: truncated"})})  # doctest: +SKIP
    """
    lines = [
        f"{s.describe(i)} ({split}): {why}" for split, (s, bad) in found.items() for i, why in bad.items()
    ]
    more = f"\n  ... and {len(lines) - shown} more" if len(lines) > shown else ""
    listed = "\n  ".join(lines[:shown])
    return BadImageError(
        f"{len(lines)} image(s) cannot be read:\n  {listed}{more}\nFix or remove these files, or pass "
        "--on-bad-image skip (ExtractConfig(on_bad_image='skip')) to leave them out; skipped images are "
        "listed in the split's manifest and in a run folder's skipped.csv. The readable images are in the "
        "cache: the next run reads only the files that changed"
    )


def extract_views(
    backbone: Backbone,
    samples: SampleSet,
    layers: str | Sequence[str],
    views: Views,
    config: ExtractConfig | None = None,
    *,
    cache_dir: str | None = None,
    progress: bool = True,
) -> list[CachedFeatures]:
    """The ``views.count`` augmented views of the training split, each read from its own table.

    Example:
        >>> views = extract_views(bb, mnist.train, ["blocks.4"], Views(4, "flip,crop"))  # doctest: +SKIP
    """
    return [
        extract(backbone, samples, layers, config, cache_dir=cache_dir, progress=progress, view=v)
        for v in views.each()
    ]
