"""Where the head trainer reads features: a tensor in RAM or on the GPU, or a memory map streamed in chunks.

Batches are slices of a per-epoch permuted copy of the features (one gather per epoch, no per-sample
``__getitem__`` or collate). Features larger than the RAM budget are streamed from the memory-mapped
cache in chunks, shuffled by chunk and within each chunk. A head that starts by average-pooling a
spatial map reads the cache's per-row channel means instead of the map (:meth:`FeatureSource.mapped`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .._util import FeatcacheError, resolve_device
from ..cache.rows import Rows, release_pages, to_torch
from .heads import Standardize


class BatchSource(Protocol):
    """What :func:`~featcache.train.fit.fit` and :func:`~featcache.train.fit.evaluate` ask of the rows.

    Every member is required: a source that cannot do something says so through the member (``mapped``
    returns None, ``prepare`` and ``set_epoch`` do nothing), so the trainer never probes for attributes.
    :class:`FeatureSource`, :class:`ViewCycle` and fine-tuning's live ``ImageSource`` implement it;
    which fast paths the trainer takes over a source is decided in :mod:`featcache.train.fast_path`.

    Example:
        Rows in a tensor that decline every fast path (the trainer then runs the whole head on them)::

            class Rows:
                def __init__(self, x, y):
                    self.x, self.y, self.device, self.streamed = x, y, x.device, False
                def __len__(self): return len(self.y)
                def batches(self, batch_size, gen):
                    order = torch.randperm(len(self), generator=gen) if gen else torch.arange(len(self))
                    for i in range(0, len(self), batch_size):
                        yield self.x[order[i : i + batch_size]], self.y[order[i : i + batch_size]]
                def prepare(self, front, epochs): pass
                def set_epoch(self, epoch): pass
                def reads_channel_means(self, front): return False
                def mapped(self, front, progress=False): return None
    """

    @property
    def device(self) -> torch.device:
        """Where batches live; the trainer moves the head there."""
        ...

    @property
    def y(self) -> torch.Tensor | None:
        """All labels, checked against the head's classes before any step; None when not known up front."""
        ...

    @property
    def streamed(self) -> bool:
        """Whether an epoch is slow to read (streamed from disk, decoded live): it gets a progress bar."""
        ...

    def __len__(self) -> int: ...

    def batches(
        self, batch_size: int, gen: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every row once: shuffled by ``gen`` (the same batches for the same generator state), or in order
        when ``gen`` is None."""
        ...

    def prepare(self, front: nn.Module | None, epochs: Iterable[int]) -> None:
        """Read what ``epochs`` will read into memory now, before the trainer's clock starts; ``front`` is the
        head's frozen front, which the trainer may run over the source once (None: it will not)."""
        ...

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch (as with ``DistributedSampler``); a source whose rows do not change
        with the epoch does nothing."""
        ...

    def reads_channel_means(self, front: nn.Module | None) -> bool:
        """Whether :meth:`mapped` runs ``front`` on cached channel means instead of the rows (a cheap map)."""
        ...

    def mapped(self, front: nn.Module, progress: bool = False) -> FeatureSource | None:
        """The rows passed once through ``front`` (parameter-free and row-wise), in the same batches as
        the source would give; None when the source cannot (or should not) hold them."""
        ...


class FeatureSource:
    """Features + labels for the trainer: a tensor (RAM/GPU) or a memory map streamed in chunks.

    A :class:`BatchSource`; the one that runs a head's frozen front once (:meth:`mapped`).

    Shuffled batches of in-memory features are slices of one buffer that later batches overwrite: use a
    batch before asking for the next (clone it to keep it). Features given as an array are loaded on
    first use, so a source whose head only needs ``channel_mean`` never reads the maps.

    Args:
        x: (N, ...) features: a tensor, or an array (memory-mapped, or a cache table's
            :class:`~featcache.cache.rows.RowView`) in the storage ``dtype``.
        y: (N,) class labels, or (N, K) float label sets / targets.
        dtype: storage dtype of an array ``x`` (``bfloat16`` arrays hold raw uint16).
        device: where batches live.
        ram_budget_gb: arrays larger than this are streamed in chunks instead of loaded.
        channel_mean: (N, C) per-row channel means of (N, C, H, W) maps, as the cache stores them.
    """

    #: bytes of the chunks a streamed source reads, shuffles within, and yields batches from
    CHUNK_BYTES = 256 << 20
    #: bytes of the shuffled rows of an in-memory source gathered at a time (the batches' buffer)
    SHUFFLE_BYTES = 64 << 20

    def __init__(
        self,
        x: Rows | torch.Tensor,
        y: np.ndarray | torch.Tensor,
        dtype: str = "float32",
        device: torch.device | None = None,
        ram_budget_gb: float = 8.0,
        channel_mean: Rows | torch.Tensor | None = None,
    ) -> None:
        self.device = device or torch.device("cpu")
        self.ram_budget_gb = ram_budget_gb
        y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
        # class indices as int64; label sets and targets (N, K) as float32 (featcache.data.tasks)
        self.y = y.to(self.device, torch.float32 if y.dim() == 2 else torch.long)
        n_bytes = int(np.prod(x.shape)) * 4
        self.streamed = not isinstance(x, torch.Tensor) and n_bytes > ram_budget_gb * 2**30
        self.raw, self.dtype = x, dtype
        self._shuffled: tuple[torch.Tensor, torch.Tensor] | None = None
        #: set on a source mapped from a streamed one: shuffle by chunks of rows this many bytes wide
        self.chunk_row_bytes: int | None = None
        #: set on a source mapped from the channel means instead of the maps
        self.from_channel_means = False
        self._x = x.to(self.device, torch.float32) if isinstance(x, torch.Tensor) else None
        if len(self.y) != len(x):
            raise FeatcacheError(f"{len(x)} feature rows but {len(self.y)} labels")
        if channel_mean is not None and tuple(channel_mean.shape) != tuple(x.shape[:2]):
            raise FeatcacheError(
                f"channel means of shape {tuple(channel_mean.shape)} do not match features {tuple(x.shape)}"
            )
        self.channel_mean = channel_mean if len(x.shape) == 4 else None

    def __len__(self) -> int:
        return len(self.y)

    @property
    def row_shape(self) -> tuple[int, ...]:
        return tuple(self.raw.shape[1:])

    @property
    def x(self) -> torch.Tensor | None:
        """All features in RAM or on the device as float32 (loaded on first use); None when streamed."""
        if self._x is None and not self.streamed:
            self._x = self._load()
        return self._x

    def _load(self) -> torch.Tensor:
        """Every row as float32 on the device, converted ~64 MB at a time into one buffer: the stored
        rows are never held whole beside it (a float16 split gathered whole, then converted, would
        peak at 1.5x its float32 size, plus the pages of its memory map)."""
        raw = self.raw
        if isinstance(raw, np.ndarray) and not isinstance(raw, np.memmap) and raw.flags.writeable:
            return to_torch(raw, self.dtype).to(self.device, torch.float32)  # no copy when float32 already
        x = torch.empty((len(raw), *self.row_shape), dtype=torch.float32, device=self.device)
        step = max(1, (64 << 20) // self._row_bytes())
        for s in range(0, len(raw), step):
            x[s : s + step] = to_torch(np.asarray(raw[s : s + step]), self.dtype).to(self.device)
            release_pages(raw, s, s + step)
        return x

    @property
    def loaded(self) -> bool:
        """Whether the features are held in memory now (reading :attr:`x` loads them)."""
        return self._x is not None

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        if self._x is not None:
            return self._x[start:stop]
        rows = to_torch(np.asarray(self.raw[start:stop]), self.dtype).to(self.device, torch.float32)
        release_pages(self.raw, start, stop)
        return rows

    def reads_channel_means(self, fn: nn.Module | None) -> bool:
        """Whether :meth:`mapped` runs ``fn`` on the channel means instead of the maps."""
        return fn is not None and self.channel_mean is not None and _pools_first(fn)

    def prepare(self, front: nn.Module | None = None, epochs: Iterable[int] = ()) -> None:
        """Load the features now (say, before a clock starts), unless ``front`` will read the channel
        means instead, the source is streamed, or ``front`` is given and the rows are not loaded yet: the
        trainer then runs ``front`` once over them (:meth:`mapped`), which reads the stored rows by chunks,
        so the split is never held both as read and as mapped. ``epochs`` (the ones about to run) matters
        to :class:`ViewCycle` only."""
        if front is None or (self.loaded and not self.reads_channel_means(front)):
            _ = self.x

    def set_epoch(self, epoch: int) -> None:
        """Nothing to do: every epoch reads the same rows."""

    def mapped(self, fn: nn.Module, progress: bool = False) -> FeatureSource | None:
        """The rows passed once through ``fn`` (parameter-free and row-wise: a head's frozen front).

        The result is held in RAM or on the device, computed chunk by chunk; None when it and its
        shuffle buffer would not fit ``ram_budget_gb`` beside the in-memory original, if any. A mapped
        streamed source keeps the streamed shuffling (by chunk of the original rows), so training on it
        draws the same batches as training on the original. When ``fn`` starts with a global average
        pool (after per-channel standardisation only) and the source has ``channel_mean``, ``fn`` runs on
        the means as 1x1 maps: the same result (both are linear), without reading the maps.

        Example:
            >>> pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            >>> pooled = FeatureSource(maps, y).mapped(pool)  # doctest: +SKIP
        """
        n = len(self)
        if n == 0:
            return None
        means = self.channel_mean if self.reads_channel_means(fn) else None
        from_means = means is not None

        def rows(start: int, stop: int) -> torch.Tensor:
            if means is None:
                return self._rows(start, stop)
            # The channel means as 1x1 maps: pooling them gives what pooling the maps gives.
            part = means[start:stop]
            t = part if isinstance(part, torch.Tensor) else to_torch(np.asarray(part), "float32")
            return t.to(self.device, torch.float32)[:, :, None, None]

        in_row = 4 * self.row_shape[0] if from_means else self._row_bytes()
        held = self._row_bytes() * n if self.loaded else 0  # rows not loaded are read by chunks
        with torch.no_grad():
            first = fn(rows(0, 1)).float()
            out_row = first.numel() * 4
            if 2 * out_row * n + held > self.ram_budget_gb * 2**30:
                return None
            x = torch.empty((n, *first.shape[1:]), dtype=torch.float32, device=self.device)
            chunk = max(1, (64 << 20) // in_row)
            starts = tqdm(
                range(0, n, chunk), desc="head front", leave=False, disable=not (progress and self.streamed)
            )
            for s in starts:
                x[s : s + chunk] = fn(rows(s, s + chunk))
        out = FeatureSource(x, self.y, device=self.device, ram_budget_gb=self.ram_budget_gb)
        out.chunk_row_bytes = self._row_bytes() if self.streamed else None
        out.from_channel_means = from_means
        return out

    def _row_bytes(self) -> int:
        return max(1, int(np.prod(self.row_shape)) * 4)

    def batches(
        self, batch_size: int, gen: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled (when ``gen`` is given) or ordered batches covering every row once."""
        n = len(self)
        if self.x is not None and self.chunk_row_bytes is None:
            if gen is None:
                for i in range(0, n, batch_size):
                    yield self.x[i : i + batch_size], self.y[i : i + batch_size]
                return
            perm = torch.randperm(n, generator=gen).to(self.device)
            # The permuted rows are gathered ~SHUFFLE_BYTES at a time (whole batches) into one buffer
            # reused every epoch: the batches of a whole permuted copy, without holding that copy.
            step = max(1, self.SHUFFLE_BYTES // (self._row_bytes() * batch_size)) * batch_size
            if self._shuffled is None or len(self._shuffled[0]) < min(n, step):
                rows = min(n, step)
                self._shuffled = (
                    self.x.new_empty((rows, *self.x.shape[1:])),
                    self.y.new_empty((rows, *self.y.shape[1:])),  # targets may be (N, K): multilabel
                )
            bx, by = self._shuffled
            for s in range(0, n, step):
                part = perm[s : s + step]
                xs = torch.index_select(self.x, 0, part, out=bx[: len(part)])
                ys = torch.index_select(self.y, 0, part, out=by[: len(part)])
                for i in range(0, len(part), batch_size):
                    yield xs[i : i + batch_size], ys[i : i + batch_size]
            return
        # Streamed (or mapped from a streamed source): shuffle the chunk order, then within each chunk.
        row_bytes = self.chunk_row_bytes or self._row_bytes()
        chunk = max(batch_size, (self.CHUNK_BYTES // row_bytes) // batch_size * batch_size)
        starts = list(range(0, n, chunk))
        order = torch.randperm(len(starts), generator=gen).tolist() if gen is not None else range(len(starts))
        for c in order:
            s = starts[c]
            xs, ys = self._rows(s, s + chunk), self.y[s : s + chunk]
            if gen is not None:
                perm = torch.randperm(len(ys), generator=gen).to(self.device)
                xs, ys = xs.index_select(0, perm), ys.index_select(0, perm)
            for i in range(0, len(ys), batch_size):
                yield xs[i : i + batch_size], ys[i : i + batch_size]


def _pools_first(fn: nn.Module) -> bool:
    """Whether ``fn`` is per-channel standardisation (any number, or none) then a global average pool,
    then anything: ``fn(maps)`` is then ``fn(channel means as 1x1 maps)``."""
    for m in fn if isinstance(fn, nn.Sequential) else [fn]:
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return m.output_size in (1, (1, 1))
        per_channel = isinstance(m, Standardize) and all(
            t.dim() >= 3 and tuple(t.shape[-2:]) == (1, 1) for t in (m.mean, m.std)
        )
        if not (per_channel or isinstance(m, nn.Identity)):
            return False
    return False


class ViewCycle:
    """Cached augmented views of one split, one per epoch: epoch ``e`` reads view ``e mod K``.

    A :class:`BatchSource`. ``fit`` calls :meth:`set_epoch` before each epoch (as with
    ``DistributedSampler``), so a resumed run reads the views in the order an uninterrupted one would.

    Example:
        >>> views = extract_views(bb, data.train, cfg)  # doctest: +SKIP
        >>> train = ViewCycle([source_for(v, "penultimate") for v in views])  # doctest: +SKIP
    """

    def __init__(self, views: list[FeatureSource]) -> None:
        if not views:
            raise FeatcacheError("a view cycle needs at least one view")
        first = views[0]
        for k, v in enumerate(views[1:], 2):
            if len(v) != len(first) or not torch.equal(v.y, first.y) or v.row_shape != first.row_shape:
                raise FeatcacheError(
                    f"view {k} does not match view 1 ({len(v)} vs {len(first)} rows, shapes {v.row_shape} vs "
                    f"{first.row_shape}, or other labels): the views must come from the same samples with "
                    "the same extraction settings"
                )
        self.views, self.device, self.y, self.epoch = views, first.device, first.y, 0

    @property
    def streamed(self) -> bool:
        return any(v.streamed for v in self.views)

    def __len__(self) -> int:
        return len(self.views[0])

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.views[0].row_shape

    def prepare(self, front: nn.Module | None = None, epochs: Iterable[int] = ()) -> None:
        """Load now the views that ``epochs`` will read (views never run a head's front once)."""
        for k in sorted({e % len(self.views) for e in epochs}):
            self.views[k].prepare()

    def set_epoch(self, epoch: int) -> None:
        """Read view ``epoch mod K`` next; it takes over the previous view's shuffle buffer (one buffer
        in all, not one per view)."""
        prev, new = self.views[self.epoch % len(self.views)], self.views[epoch % len(self.views)]
        if new is not prev and new._shuffled is None:
            new._shuffled, prev._shuffled = prev._shuffled, None
        self.epoch = epoch

    def reads_channel_means(self, front: nn.Module | None) -> bool:
        """False: views are never mapped (see :meth:`mapped`)."""
        return False

    def mapped(self, front: nn.Module, progress: bool = False) -> FeatureSource | None:
        """None: each epoch reads another view, so running the front once would mean once per view, each
        held in memory; the trainer trains the whole head on the views instead."""
        return None

    def batches(
        self, batch_size: int, gen: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.views[self.epoch % len(self.views)].batches(batch_size, gen)


def source_for(
    cached: Any, layer: str, device: str | torch.device = "auto", ram_budget_gb: float = 8.0
) -> FeatureSource:
    """A :class:`FeatureSource` over one layer of a :class:`~featcache.cache.CachedFeatures` entry."""
    dev = resolve_device(device) if isinstance(device, str) else device
    if layer not in cached.features:
        raise FeatcacheError(
            f"layer {layer!r} is not in cache {cached.key[:12]}; it holds {list(cached.features)}"
        )
    stats = cached.channel_stats.get(layer)
    # The fast path reads the means as (N, C, 1, 1) maps: channels-first maps only (NHWC maps and tokens
    # have their statistics too, but their heads start by permuting, which it does not know).
    means = stats.mean if stats is not None and cached.layout(layer) == "NCHW" else None
    return FeatureSource(cached.features[layer], cached.labels, cached.dtype, dev, ram_budget_gb, means)
