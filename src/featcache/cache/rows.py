"""The rows as stored: ``RowView`` (one layer's rows of a split, in the split's order, read through a
table's shard memory maps), the storage dtypes and :func:`to_torch` (a stored array as a tensor)."""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import numpy as np

if TYPE_CHECKING:  # torch is imported where rows become tensors: `cache ls` starts without it
    import torch

#: the numpy dtype each storage dtype is stored as (bfloat16 as raw uint16: numpy has no bfloat16)
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


class Shard(Protocol):
    """What a :class:`RowView` reads rows from: an array, a memory map, or a map that checks its file
    on the first read (:class:`~featcache.cache.table.CheckedShard`)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: Any) -> Any: ...


class RowView:
    """An (N, ...) array-like over rows stored in several shards: nothing is read until indexed.

    Indexing with an int, a slice or an index array gathers those rows into a new in-memory array,
    reading each shard's rows in sorted order (one slice per shard when they are consecutive);
    ``np.asarray(view)`` gathers every row once. The trainer loads a split this way when it fits its
    RAM budget, and streams slices of it otherwise.

    Args:
        parts: the shards' (n_i, ...) arrays (memory maps), all of one dtype and row shape.
        part: (N,) which part holds each row.
        row: (N,) the row within that part.
        row_shape: the shape of one row (for a view with no rows).
        dtype: the stored dtype.

    Example:
        >>> a, b = np.arange(6).reshape(3, 2), np.arange(6, 10).reshape(2, 2)
        >>> v = RowView([a, b], np.array([1, 0, 0]), np.array([1, 2, 0]), (2,), a.dtype)
        >>> np.asarray(v).tolist()
        [[8, 9], [4, 5], [0, 1]]
    """

    def __init__(
        self,
        parts: Sequence[Shard],
        part: np.ndarray,
        row: np.ndarray,
        row_shape: tuple[int, ...],
        dtype: np.dtype[Any] | type,
    ) -> None:
        self.parts = list(parts)
        self.part = np.asarray(part, dtype=np.int64)
        self.row = np.asarray(row, dtype=np.int64)
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.part), *self.row_shape)

    @property
    def ndim(self) -> int:
        return 1 + len(self.row_shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.part)

    def __repr__(self) -> str:
        return f"RowView(shape={self.shape}, dtype={self.dtype}, shards={len(self.parts)})"

    def take(self, positions: np.ndarray) -> np.ndarray:
        """The rows at ``positions`` (into this view), gathered into a new array."""
        pos = np.asarray(positions, dtype=np.int64)
        out = np.empty((len(pos), *self.row_shape), self.dtype)
        if not len(pos):
            return out
        part, row = self.part[pos], self.row[pos]
        order = np.lexsort((row, part))  # by shard, then by row within it: sequential reads
        for group in np.split(order, np.flatnonzero(np.diff(part[order])) + 1):
            src, rows = self.parts[int(part[group[0]])], row[group]
            block = src[rows[0] : rows[-1] + 1] if rows[-1] - rows[0] + 1 == len(rows) else src[rows]
            if group[-1] - group[0] + 1 == len(group) and bool(np.all(np.diff(group) == 1)):
                out[group[0] : group[-1] + 1] = block
            else:
                out[group] = block
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):  # rows first, then the rest within them
            return self[key[0]][(slice(None), *key[1:])]
        if isinstance(key, (int, np.integer)):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"row {key} out of range for {len(self)} rows")
            return self.take(np.array([i]))[0]
        if isinstance(key, slice):
            return self.take(np.arange(*key.indices(len(self))))
        idx = np.asarray(key)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return self.take(np.where(idx < 0, idx + len(self), idx))

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self.take(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype, copy=False)

    def astype(self, dtype: Any) -> np.ndarray:
        """Every row, gathered, as ``dtype``."""
        return np.asarray(self).astype(dtype, copy=False)

    def select(self, positions: Sequence[int] | np.ndarray) -> RowView:
        """A view of some of these rows, in the given order (nothing is read)."""
        pos = np.asarray(positions, dtype=np.int64)
        return RowView(self.parts, self.part[pos], self.row[pos], self.row_shape, self.dtype)

    @staticmethod
    def concat(views: Sequence[RowView]) -> RowView:
        """The rows of several views, one after the other (nothing is read).

        Example:
            >>> a = np.arange(4).reshape(2, 2)
            >>> v = RowView([a], np.array([0, 1]) * 0, np.array([1, 0]), (2,), a.dtype)
            >>> np.asarray(RowView.concat([v, v.select([0])])).tolist()
            [[2, 3], [0, 1], [2, 3]]
        """
        parts: list[Shard] = []
        part, row = [], []
        for v in views:
            part.append(v.part + len(parts))
            row.append(v.row)
            parts += v.parts
        first = views[0]
        return RowView(parts, np.concatenate(part), np.concatenate(row), first.row_shape, first.dtype)


#: what a split's layer (or channel statistic) may be: an array, or rows read from a table on demand
Rows: TypeAlias = "np.ndarray | RowView"


def release_pages(rows: Any, start: int, stop: int) -> None:
    """Unmap from this process the memory-map pages rows ``start:stop`` of ``rows`` were read from (an
    ``np.memmap``, or a :class:`RowView` over shards' maps), once they are copied.

    The kernel's page cache keeps the pages (reading them again costs no disk I/O); what this drops is
    their count in the process's resident set, which otherwise grows by the whole split as a stream or a
    chunked load passes over it (a 1.28M x 2048 float16 split: 5.2 GB of RSS for rows already
    converted). Read-only and shared writable maps only: a copy-on-write map's pages are its own.

    Example:
        >>> release_pages(np.load("x.npy", mmap_mode="r"), 0, 1000)  # doctest: +SKIP
    """
    if isinstance(rows, RowView):
        shards = [rows.parts[int(i)] for i in np.unique(rows.part[start:stop])]
    else:
        shards = [rows]
    for shard in shards:
        arr = getattr(shard, "arr", shard)  # a CheckedShard's map
        mm = getattr(arr, "_mmap", None)
        if isinstance(arr, np.memmap) and arr.mode in ("r", "r+") and mm is not None:
            with contextlib.suppress(OSError, ValueError):  # madvise is advice: a refusal changes no row
                mm.madvise(mmap.MADV_DONTNEED)


def to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    """A tensor over a stored array (bfloat16 is stored as raw uint16 and viewed back)."""
    import torch

    a = np.ascontiguousarray(array)
    t = torch.from_numpy(a if a.flags.writeable else a.copy())
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t
