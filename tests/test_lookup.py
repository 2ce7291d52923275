"""The digest -> row lookup (cache/lookup.py) against the dict it replaces: first occurrence in commit
order wins, digests sharing their first 8 bytes, duplicates, malformed digests."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from featcache.cache.lookup import DigestIndex, RowMap, distinct_count, raw_digests


def _digests(n: int, seed: int = 0) -> list[str]:
    return [hashlib.sha256(f"{seed}:{i}".encode()).hexdigest() for i in range(n)]


def _reference(table: list[str]) -> dict[str, int]:
    """The naive map: each digest's first position in commit order."""
    where: dict[str, int] = {}
    for i, d in enumerate(table):
        where.setdefault(d, i)
    return where


def _check(table: list[str], queries: list[str]) -> DigestIndex:
    index = DigestIndex(raw_digests(table))
    ref = _reference(table)
    assert index.find(raw_digests(queries)).tolist() == [ref.get(q, -1) for q in queries]
    assert len(index) == len(ref)
    assert index.first_positions().tolist() == sorted(ref.values())
    return index


def test_random_digests_match_a_dict() -> None:
    table = _digests(5000)
    rng = np.random.default_rng(0)
    queries = [table[i] for i in rng.integers(0, 5000, 3000)] + _digests(500, seed=1)
    queries = [queries[i] for i in rng.permutation(len(queries))]
    assert not _check(table, queries).exact


def test_shared_prefixes_search_all_32_bytes() -> None:
    """Distinct digests with equal first 8 bytes (planted): the search runs on all 32 bytes."""
    base = _digests(300)
    planted = [base[i][:16] + d[16:] for i, d in enumerate(_digests(300, seed=2))]  # same 8 bytes
    table = base + planted[:150]
    queries = base[::3] + planted + _digests(20, seed=3)
    assert _check(table, queries).exact


def test_a_digest_in_two_segments_is_found_at_its_first() -> None:
    """A cut-short compaction leaves rows in two segments: the first row in commit order is used."""
    table = _digests(400)
    table = table + table[100:200] + _digests(50, seed=4)
    index = _check(table, table + _digests(10, seed=5))
    assert not index.exact  # duplicates alone need no 32-byte search


def test_duplicates_and_shared_prefixes_together() -> None:
    base = _digests(200)
    planted = [base[i][:16] + d[16:] for i, d in enumerate(_digests(50, seed=6))]
    table = base + planted + base[:30] + planted[:10]
    _check(table, table + _digests(5, seed=7))


def test_empty_table_and_empty_queries() -> None:
    assert DigestIndex(raw_digests([])).find(raw_digests(_digests(3))).tolist() == [-1, -1, -1]
    assert DigestIndex(raw_digests(_digests(3))).find(raw_digests([])).tolist() == []


def test_row_map_behaves_as_the_dict_it_replaced() -> None:
    table = _digests(60)
    segment = np.repeat([0, 1, 2], 20)
    row = np.tile(np.arange(20), 3)
    where = RowMap(raw_digests(table + table[:5]), np.r_[segment, [3] * 5], np.r_[row, np.arange(5)])
    ref = {d: (int(segment[i]), int(row[i])) for i, d in enumerate(table)}
    assert dict(where) == ref and list(where) == table and len(where) == 60
    assert table[25] in where and where[table[25]] == (1, 5)
    other = _digests(1, seed=9)[0]
    assert other not in where and "nonsense" not in where and 7 not in where
    with pytest.raises(KeyError):
        where[other]
    assert where.locate([table[3], other]).tolist() == [[0, 3], [-1, -1]]


@pytest.mark.parametrize("bad", ["ab" * 31, "AB" * 32, "ab" * 31 + " a", "zz" * 32, "ab" * 33])
def test_a_malformed_digest_is_named(bad: str) -> None:
    with pytest.raises(ValueError, match="is not a content digest"):
        raw_digests([_digests(1)[0], bad])


def test_distinct_counts_as_a_set_does() -> None:
    table = _digests(100)
    planted = [table[0][:16] + d[16:] for d in _digests(3, seed=8)]
    for digests in (table, table + table[:7], table + planted, []):
        assert distinct_count(raw_digests(digests)) == len(set(digests))


def test_a_kept_answer_is_used_only_for_equal_digests() -> None:
    """The last batch's answer is kept for the next call with equal digests, never for other ones."""
    table = _digests(50)
    where = RowMap(raw_digests(table), np.zeros(50, np.int64), np.arange(50))
    asked = table[10:20] + _digests(3, seed=11)
    first = where.locate(asked)
    assert table[0] in where and where[table[49]] == (0, 49)  # single questions in between
    assert where.locate(list(asked)).tolist() == first.tolist()
    changed = list(asked)
    changed[0] = table[30]
    assert where.locate(changed)[0].tolist() == [0, 30]
    assert where.locate(tuple(asked)).tolist() == first.tolist()


def test_a_run_of_rows_in_commit_order_is_found_as_the_search_finds_it() -> None:
    """A split read back from the table it was extracted into is a run of the rows in commit order
    (answered without a search): whole, a middle run and a one-row run agree with the dict; a run with
    one digest swapped, one running past the end, one reversed, and any query in a table holding a
    digest twice take the search and still agree."""
    table = _digests(300)
    swapped = table[50:150]
    swapped[40] = _digests(1, seed=9)[0]
    for queries in (table, table[120:260], table[7:8], swapped, table[250:] + table[:10], table[::-1]):
        _check(table, queries)
    twice = table[:200] + table[100:150] + _digests(20, seed=8)
    for queries in (twice[200:250], twice[180:260], twice):
        _check(twice, queries)  # the second copies are found at their first rows
