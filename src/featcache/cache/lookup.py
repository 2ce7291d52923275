"""The digest -> row lookup of a table: its rows' raw 32-byte digests sorted once, searched as arrays.

Every run looks a split's digests up in its table: at a million rows a Python dict of hex strings costs
about 300 bytes and a hash per row to build, and a Python step per lookup. Here the rows' digests stay
the raw records the binary index stores (``<seg>.digests.npy``) and are sorted once by their first 8
bytes read as a big-endian integer (SHA-256 output is uniform: distinct digests share them with odds of
about ``rows**2 / 2**65``); a batch of digests is found with one sort and one :func:`numpy.searchsorted`,
every match confirmed on all 32 bytes. Digests that do share their first 8 bytes (planted, or one digest
held by two segments after a cut-short compaction) switch the table to a search on all 32 bytes, so the
answer is exact either way.

Example:
    >>> rows = DigestIndex(raw_digests(["ab" * 32, "cd" * 32]))
    >>> rows.find(raw_digests(["cd" * 32, "ef" * 32])).tolist()
    [1, -1]
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from ..data.digests import hex_digests, raw_digests


def _prefix(raw: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each digest as a native uint64 (big-endian: the same order as the bytes)."""
    raw = np.ascontiguousarray(raw, np.uint8).reshape(-1, 32)
    return np.ndarray((len(raw),), ">u8", raw, 0, (32,)).astype(np.uint64)


def _full(raw: np.ndarray) -> np.ndarray:
    """Each digest as one 32-byte string (fixed width: equal exactly when all 32 bytes are)."""
    return np.ascontiguousarray(raw, np.uint8).reshape(-1, 32).view("S32").reshape(-1)


def distinct_count(raw: np.ndarray) -> int:
    """How many distinct digests ``raw`` ((n, 32) uint8) holds: sorted by their first 8 bytes, all 32
    compared only where those agree.

    Example:
        >>> distinct_count(raw_digests(["ab" * 32, "ab" * 32, "cd" * 32]))
        2
    """
    if len(raw) < 2:
        return len(raw)
    if (np.diff(np.sort(_prefix(raw))) != 0).all():
        return len(raw)
    return len(np.unique(_full(raw)))


class DigestIndex:
    """Where each of a table's digests first occurs: built from the rows' digests in commit order.

    Args:
        raw: (N, 32) uint8, the digest of every row in commit order; a digest held twice is found at
            its first row.
    """

    def __init__(self, raw: np.ndarray) -> None:
        self.raw = np.ascontiguousarray(raw, np.uint8).reshape(-1, 32)
        full = _full(self.raw)
        keys: np.ndarray = _prefix(self.raw)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        same = sorted_keys[1:] == sorted_keys[:-1]
        #: whether the search runs on all 32 bytes (digests sharing their first 8 bytes)
        self.exact = False
        if same.any():
            by_full = full[order]
            if not (by_full[1:][same] == by_full[:-1][same]).all():
                self.exact = True
                order = np.argsort(full, kind="stable")
                sorted_keys = full[order]
                same = sorted_keys[1:] == sorted_keys[:-1]
            first = np.concatenate([[True], ~same])  # stable: the first of equal digests in commit order
            order, sorted_keys = order[first], sorted_keys[first]
        self._order = order
        self._keys = sorted_keys
        self._full = full[order]
        #: no digest held twice: each row's commit position is its own (what a run of rows can use)
        self._distinct = len(order) == len(self.raw)

    def __len__(self) -> int:
        return len(self._order)

    def find(self, raw: np.ndarray) -> np.ndarray:
        """The commit position of each digest of ``raw`` ((n, 32) uint8), -1 for those not held.

        Example:
            >>> DigestIndex(raw_digests(["ab" * 32])).find(raw_digests(["ab" * 32])).tolist()
            [0]
        """
        full = _full(raw)
        out = np.full(len(full), -1, np.int64)
        if not len(self._order) or not len(full):
            return out
        run = self._run(raw)
        if run is not None:
            return run
        keys = full if self.exact else _prefix(raw)
        order = np.argsort(keys, kind="stable")  # sorted queries: searchsorted walks the table once
        at = np.minimum(np.searchsorted(self._keys, keys[order]), len(self._keys) - 1)
        out[order] = np.where(self._full[at] == full[order], self._order[at], -1)
        return out

    def _run(self, raw: np.ndarray) -> np.ndarray | None:
        """The positions of ``raw`` when it is a run of the table's rows in commit order (a split
        extracted in one go and read back: the usual hit), found by one comparison instead of a sort and
        a search; None otherwise. Only in a table holding no digest twice, where a row's commit position
        is the answer."""
        n = len(raw)
        if not self._distinct or n < 2 or n > len(self.raw):
            return None
        start = int(self.find(raw[:1])[0])  # one digest: the search (n < 2 takes no run)
        if start < 0 or start + n > len(self.raw) or not np.array_equal(self.raw[start : start + n], raw):
            return None
        return np.arange(start, start + n, dtype=np.int64)

    def first_positions(self) -> np.ndarray:
        """The commit positions of the distinct digests, in commit order."""
        return np.sort(self._order)


class RowMap(Mapping[str, tuple[int, int]]):
    """``digest -> (segment position, row)`` over a :class:`DigestIndex` (the table index's ``where``):
    a mapping for single questions, :meth:`locate` for a split's digests at once. Iterates the distinct
    digests in commit order.

    Args:
        raw: (N, 32) uint8, every row's digest in commit order.
        segment: (N,) the segment position of each row.
        row: (N,) each row's position in its segment.
    """

    def __init__(self, raw: np.ndarray, segment: np.ndarray, row: np.ndarray) -> None:
        self.index = DigestIndex(raw)
        self._segment = np.asarray(segment, np.int64)
        self._row = np.asarray(row, np.int64)
        # the last batch asked and its answer: a run asks for one split's digests several times (choose
        # the table, what is missing, the rows); kept as a list copy, compared element by element
        self._last: tuple[list[str], np.ndarray] | None = None

    @classmethod
    def empty(cls) -> RowMap:
        """A map holding nothing (the index read for its counts only)."""
        none = np.empty(0, np.int64)
        return cls(np.empty((0, 32), np.uint8), none, none)

    def positions(self, digests: Sequence[str]) -> np.ndarray:
        """Each digest's commit position (its first row over all segments in commit order), -1 for
        those not held (read-only: the answer is kept for the next call with equal digests)."""
        last = self._last
        if last is not None and type(digests) is list and last[0] == digests:
            return last[1]
        at = self.index.find(raw_digests(digests))
        at.flags.writeable = False
        self._last = (list(digests), at)
        return at

    def locate(self, digests: Sequence[str]) -> np.ndarray:
        """(n, 2) int64: each digest's (segment position, row), (-1, -1) for those not held.

        Example:
            >>> table.index().where.locate(train.digests())  # doctest: +SKIP
        """
        at = self.positions(digests)
        out = np.full((len(at), 2), -1, np.int64)
        held = at >= 0
        out[held, 0], out[held, 1] = self._segment[at[held]], self._row[at[held]]
        return out

    def held(self, digests: Sequence[str]) -> np.ndarray:
        """Whether each digest has a row (bool array)."""
        return self.positions(digests) >= 0

    def _one(self, digest: object) -> int:
        """One digest's commit position, -1 when not held or not a digest (a single question leaves the
        kept batch alone)."""
        if not isinstance(digest, str):
            return -1
        try:
            return int(self.index.find(raw_digests([digest]))[0])
        except ValueError:
            return -1

    def __getitem__(self, digest: str) -> tuple[int, int]:
        at = self._one(digest)
        if at < 0:
            raise KeyError(digest)
        return int(self._segment[at]), int(self._row[at])

    def __contains__(self, digest: object) -> bool:
        return self._one(digest) >= 0

    def __len__(self) -> int:
        return len(self.index)

    def __iter__(self) -> Iterator[str]:
        return iter(hex_digests(self.index.raw[self.index.first_positions()]))
