"""A split's rows read from a feature table: :class:`CachedFeatures` (its layers as
:class:`~featcache.cache.rows.RowView` over the shards' memory maps, labels, ids and digests), each map
layer's :class:`ChannelStats`, and the split's identity (:func:`split_key`). A split is a view: joining
splits (:func:`join_splits`) or taking a subset reads nothing.

The store (:class:`~featcache.cache.store.FeatureCache`) opens a split from a table; extraction returns
one filled.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._util import FeatcacheError
from .identity import TableRecord
from .rows import Rows, RowView, to_torch
from .table import CheckedShard

if TYPE_CHECKING:  # imported by tensor() alone: listing and housekeeping start without torch
    import torch

    from .dataset import FeatureDataset

__all__ = [
    "CachedFeatures",
    "ChannelStats",
    "ExtractionInfo",
    "LayerMeta",
    "SplitResult",
    "join_splits",
    "split_key",
]


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


@dataclass(frozen=True)
class LayerMeta:
    """One stored layer of a split: its rows' shape (rows first) and stored layout (None: unknown).

    Example:
        >>> LayerMeta((10, 256, 14, 14), "NCHW").to_json()
        {'shape': [10, 256, 14, 14], 'layout': 'NCHW'}
    """

    shape: tuple[int, ...]
    layout: str | None

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "layout": self.layout}


@dataclass(frozen=True)
class ExtractionInfo:
    """What the extraction that served a split did, in the call that returned it.

    Attributes:
        dataset: the dataset read (a folder's absolute path, a built-in name), recorded beside the table.
        images_extracted: distinct images that went through the backbone (every split of the table).
        extract_seconds: wall seconds of the call, hashing and extraction included.
        extract_config: the :class:`~featcache.extraction.config.ExtractConfig` as JSON, with the layers
            and the augmentation.
        backbone_cfg: the backbone's resolved configuration as JSON.
        processes: processes that extracted (``torchrun`` ranks).
        rows_by_process: rows dealt to each rank.
        method: how the layers were read (``hooks``, ``fx``).
    """

    dataset: str | None
    images_extracted: int
    extract_seconds: float
    extract_config: dict[str, Any]
    backbone_cfg: dict[str, Any]
    processes: int = 1
    rows_by_process: dict[str, int] = field(default_factory=dict)
    method: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "images_extracted": self.images_extracted,
            "extract_seconds": self.extract_seconds,
            "extract_config": self.extract_config,
            "backbone_cfg": self.backbone_cfg,
            "processes": self.processes,
            "rows_by_process": self.rows_by_process,
            "method": self.method,
        }


@dataclass(frozen=True)
class SplitResult:
    """What was read for one split and how, built once when the split is opened (typed: the manifest
    :attr:`CachedFeatures.manifest` prints is made from it).

    Attributes:
        table: the table's key.
        split: the split's name (None for a view opened without one).
        split_key: the view's identity (:func:`split_key`).
        rows: rows of the split (skipped images are not rows).
        extracted: rows whose image went through the backbone in the call that returned the split.
        skipped: ``(id, reason)`` of each image of the split that could not be decoded.
        record: the table's :class:`~featcache.cache.identity.TableRecord` (None for a record this
            featcache does not write: such a table is only ever chosen by its key).
        stored_record: the record as ``table.json`` stores it.
        layers: each layer's :class:`LayerMeta`.
        layer_layouts: the layers' own layouts before pooling, as extraction recorded them.
        dataset: the dataset the split was read as (recorded beside the table), if named.
        extraction: what the extraction did (None for a view read without one: a join, a subset).

    Example:
        >>> cached.result.extracted, cached.result.skipped  # doctest: +SKIP
        (0, (('b/x1.png', 'OSError: truncated'),))
    """

    table: str
    split: str | None
    split_key: str
    rows: int
    extracted: int
    skipped: tuple[tuple[str, str], ...]
    record: TableRecord | None
    stored_record: dict[str, Any]
    layers: dict[str, LayerMeta]
    layer_layouts: dict[str, str | None]
    dataset: str | None = None
    extraction: ExtractionInfo | None = None

    @property
    def dtype(self) -> str:
        """The rows' storage dtype."""
        return self.record.dtype if self.record is not None else str(self.stored_record["dtype"])

    def manifest(self) -> dict[str, Any]:
        """The result as the JSON manifest featcache prints and tests read (a fresh dict each call)."""
        out: dict[str, Any] = {
            "record": self.stored_record,
            "table": self.table,
            "rows": self.rows,
            "layers": {k: m.to_json() for k, m in self.layers.items()},
            "layer_layouts": dict(self.layer_layouts),
            "skipped": [{"id": i, "reason": why} for i, why in self.skipped],
            "split_key": self.split_key,
        }
        if self.split is not None:
            out["split"] = self.split
        if self.dataset is not None:
            out["dataset"] = self.dataset
        if self.extraction is not None:
            out |= self.extraction.to_json() | {"rows_extracted_this_run": self.extracted}
        return out | {"extracted": self.extracted}


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
        result: what was read and how (:class:`SplitResult`): the table's record, the split's name and
            key, the counts, the skipped images (id and reason), the extraction's timings.
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
    result: SplitResult
    hit: bool = False
    channel_stats: dict[str, ChannelStats] = field(default_factory=dict)
    digests: list[str] = field(default_factory=list)
    task: str = "classify"

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        # A notebook prints this: counts and shapes, never the rows, ids or class names.
        layers = {k: tuple(v.shape[1:]) for k, v in self.features.items()}
        split = self.result.split
        return (
            f"CachedFeatures(split={split!r}, rows={len(self)}, layers={layers}, dtype={self.dtype!r}, "
            f"classes={len(self.classes)}, key='{self.key[:12]}…')"
        )

    @property
    def dtype(self) -> str:
        return self.result.dtype

    @property
    def manifest(self) -> dict[str, Any]:
        """:attr:`result` as JSON: what ``featcache extract`` and run folders record (a fresh dict)."""
        return self.result.manifest()

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
        """The stored layout of ``layer`` (as the table's segments record it)."""
        return self.result.layers[layer].layout

    @property
    def rows(self) -> int:
        """Rows of the split (images that could not be decoded and were skipped are not rows)."""
        return len(self)

    @property
    def extracted(self) -> int:
        """Rows whose image went through the backbone in the call that returned this split."""
        return self.result.extracted

    @property
    def from_cache(self) -> int:
        """Rows read from the table without a forward pass."""
        return self.rows - self.extracted

    @property
    def split_key(self) -> str:
        """The view's identity: the table key, the rows' digests in order, labels and classes."""
        return self.result.split_key

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
    result = replace(
        first.result,
        split=split,
        split_key=split_key(first.key, digests, labels, first.classes),
        rows=len(sel),
        extracted=0,
        skipped=(),
        layers={k: replace(m, shape=(len(sel), *m.shape[1:])) for k, m in first.result.layers.items()},
        dataset=None,
        extraction=None,
    )
    return CachedFeatures(
        first.key, first.path, feats, labels, ids, first.classes, result, True, stats, digests, first.task
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
