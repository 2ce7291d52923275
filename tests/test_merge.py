"""The size-tiered merge of a table's runs (cache/table.py: merge_plan, merge_small) and the shard plan
of big-row tables (cache/writer.py: shard_plan): each row rewritten O(log) times over a table's life,
O(log) small runs, one small add never rewrites a bigger run, crash-safe merges, O(100) files for an
ImageNet-scale map table."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from featcache.backbones.registry import Backbone
from featcache.cache.store import FeatureCache
from featcache.cache.table import MERGE_COUNT, FeatureTable, merge_plan, new_run, run_of, tier
from featcache.cache.writer import shard_plan, write_segment
from featcache.extraction.config import ExtractConfig
from featcache.extraction.extractor import Extractor, shard_rows

WIDTH = 16  # float32 rows of 64 bytes


def _table(tmp_path: Path) -> tuple[FeatureCache, FeatureTable]:
    cache = FeatureCache(tmp_path / "cache")
    record = {
        "backbone": "m:x",
        "weights_id": "w",
        "preprocessing": {},
        "layers": ["penultimate"],
        "pool": "avg",
        "dtype": "float32",
        "view": 0,
    }
    return cache, cache.create(record)


def _add(table: FeatureTable, start: int, rows: int, shards: int = 1) -> dict[str, np.ndarray]:
    """Append rows ``start .. start+rows-1`` as one run of ``shards`` segments (as one extraction
    commits them); the values written, by digest."""
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(start, start + rows)]
    values = np.random.default_rng(start).random((rows, WIDTH), dtype=np.float32)
    info = {"run": new_run()}
    for part in np.array_split(np.arange(rows), shards):
        write_segment(
            table.path,
            ["penultimate"],
            {"penultimate": values[part]},
            [digests[i] for i in part],
            {},
            "float32",
            info,
            layouts={"penultimate": "NC"},
        )
    return dict(zip(digests, values))


def _home(table: FeatureTable) -> dict[str, str]:
    """The segment each digest's row is read from."""
    index = table.index()
    return {d: index.segments[s].name for d, (s, _) in index.where.items()}


def test_the_plan_merges_a_tier_once_it_holds_enough_runs() -> None:
    assert [tier(s, 4) for s in (1, 3, 4, 15, 16, 64)] == [0, 0, 1, 1, 2, 3]
    sizes = {"big": 1 << 30, **{f"s{i}": 100 + i for i in range(MERGE_COUNT - 1)}, "mid": 5000}
    assert merge_plan(sizes, MERGE_COUNT, 1 << 30) == []  # one run short
    sizes["last"] = 110
    assert merge_plan(sizes, MERGE_COUNT, 1 << 30) == [[*(f"s{i}" for i in range(MERGE_COUNT - 1)), "last"]]
    # a run at the final size is never merged, however many there are
    assert merge_plan({f"b{i}": 1 << 30 for i in range(9)}, MERGE_COUNT, 1 << 30) == []


@pytest.mark.parametrize("add", [1, 3])
def test_small_adds_rewrite_each_row_a_bounded_number_of_times(tmp_path: Path, add: int) -> None:
    cache, table = _table(tmp_path)
    written: dict[str, np.ndarray] = {}
    rewrites: dict[str, int] = {}
    home: dict[str, str] = {}
    adds = 150
    for step in range(adds):
        written |= _add(table, step * add, add, shards=min(add, 2))
        with cache.lock(table.key):
            table.merge_small()
        now = _home(table)
        for d, seg in now.items():
            if d in home and home[d] != seg:
                rewrites[d] = rewrites.get(d, 0) + 1
        home = now
        runs = {run_of(s) for s in table.index().segments}
        # O(log): fewer than MERGE_COUNT runs per tier, tiers up to log_K(rows)
        tiers = 1 + math.ceil(math.log(max(2, (step + 1) * add), MERGE_COUNT)) + 1
        assert len(runs) <= (MERGE_COUNT - 1) * tiers, (step, len(runs))
    # a merge lands a run a tier higher at least: log_K(table / one add) rewrites at most
    bound = math.ceil(math.log(adds, MERGE_COUNT))
    assert 1 <= max(rewrites.values()) <= bound
    assert len(table.index().segments) < len(written) // 10
    # rows copied byte for byte, against the values written
    rows = FeatureCache(cache.root).open(table.key).row_bytes()
    assert rows.keys() == written.keys()
    assert all(rows[d] == v.tobytes() for d, v in written.items())
    assert FeatureCache(cache.root).verify(table.key) == []


def test_one_small_add_never_rewrites_a_bigger_run(tmp_path: Path) -> None:
    _, table = _table(tmp_path)
    _add(table, 0, 4000, shards=8)  # a first extraction: eight shards, one run
    big = {s.name for s in table.index().segments}
    for step in range(MERGE_COUNT + 1):  # small adds of 1 % each, eight shards each
        _add(table, 4000 + 40 * step, 40, shards=8)
        assert table.merge_small()[1] <= 8 * (MERGE_COUNT + 1)
        assert big <= {s.name for s in table.index().segments}
    # the small runs merged among themselves: one segment for MERGE_COUNT of them
    assert len(table.index().segments) == 8 + 1 + 8


def test_a_merge_cut_short_leaves_the_rows_readable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache, table = _table(tmp_path)
    written: dict[str, np.ndarray] = {}
    for step in range(MERGE_COUNT - 1):
        written |= _add(table, 10 * step, 10)
    written |= _add(table, 1000, 10)

    def killed(self: Path, missing_ok: bool = False) -> None:
        raise KeyboardInterrupt("killed between the merged segment's commit and the old ones' removal")

    monkeypatch.setattr(Path, "unlink", killed)
    with pytest.raises(KeyboardInterrupt):
        table.merge_small()
    monkeypatch.undo()
    fresh = FeatureCache(cache.root).open(table.key)
    assert len(fresh.index().segments) == MERGE_COUNT + 1  # the merged one committed, the old ones kept
    rows = fresh.row_bytes()
    assert rows.keys() == written.keys() and all(rows[d] == v.tobytes() for d, v in written.items())
    fresh.merge_small()  # the next append's merge finishes the work
    assert len(fresh.index().segments) == 1 and fresh.row_bytes() == rows and fresh.verify() == []


def test_an_imagenet_scale_map_table_has_about_a_hundred_shards(resnet18: Backbone) -> None:
    rows, batch = 1_281_167, 256
    cfg = ExtractConfig(input_size=(224, 224), device="cpu", pool="none", dtype="float16", batch_size=batch)
    ex = Extractor(resnet18, ["layer3"], cfg)
    row_shape = next(iter(ex.row_shapes().values()))
    assert tuple(row_shape) == (256, 14, 14)
    per = shard_rows(ex, rows)  # the plan alone: nothing is extracted or written
    row_bytes = 256 * 14 * 14 * 2
    assert per == shard_plan(row_bytes, rows, batch) and per % batch == 0
    shards = math.ceil(rows / per)
    files = shards * 5  # rows, channel mean and variance, digests, the segment
    assert 64 <= shards <= 256 and files < 1500, (per, shards)
    assert (1 << 30) - batch * row_bytes <= per * row_bytes <= (1 << 30) + batch * row_bytes
    # a small split still gets eight shards of whole batches (an interruption loses an eighth)
    assert shard_plan(2048, 5000, 64) == 640 and math.ceil(5000 / 640) == 8
    assert shard_plan(2048, 10, 64) == 64
