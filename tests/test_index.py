"""The binary index (cache version 4): digests as raw 32-byte records beside each segment, counts read in
O(segments), tables of older versions never read and removed by ``cache gc``."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import featcache.cache.table as table_module
from featcache import ExtractConfig, extract
from featcache.backbones.registry import Backbone
from featcache.cache.store import FeatureCache
from featcache.cache.writer import CACHE_VERSION
from featcache.data.samples import ArraySamples


def _samples(n: int) -> ArraySamples:
    rng = np.random.default_rng(0)
    return ArraySamples(rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8), np.arange(n) % 3)


def _extract(bb: Backbone, n: int, cache: Path, **kw: object) -> object:
    cfg = ExtractConfig(input_size=(32, 32), device="cpu", batch_size=4, shard_rows=4, **kw)  # type: ignore[arg-type]
    return extract(bb, _samples(n), ["penultimate"], cfg, cache_dir=str(cache), progress=False)


def test_ls_and_info_read_counts_without_reading_a_digests_file(
    resnet18: Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    feats = _extract(resnet18, 10, tmp_path / "c")
    key = feats.key  # type: ignore[attr-defined]

    def refuse(*a: object) -> None:
        raise AssertionError("a digests file was read for the counts")

    monkeypatch.setattr(table_module, "_read_digests", refuse)
    info = FeatureCache(tmp_path / "c").info(key)
    assert (info["status"], info["rows"], info["segments"]) == ("ok", 10, 3)
    assert [e["rows"] for e in FeatureCache(tmp_path / "c").ls()] == [10]


def test_a_table_of_the_previous_version_is_never_read_and_gc_removes_it(
    resnet18: Backbone, tmp_path: Path
) -> None:
    feats = _extract(resnet18, 6, tmp_path / "c")
    entry = Path(feats.path)  # type: ignore[attr-defined]
    old = entry.parent / ("f" * 64)  # as a version-3 table (JSON digests) sits in a cache: its own key
    shutil.copytree(entry, old)
    doc = json.loads((old / "table.json").read_text())
    doc["cache_version"] = CACHE_VERSION - 1
    (old / "table.json").write_text(json.dumps(doc))
    cache = FeatureCache(tmp_path / "c")
    assert cache.info(old.name)["status"] == "old format"
    with pytest.raises(ValueError, match=f"cache version {CACHE_VERSION - 1}.*cache gc"):
        cache.open(old.name)
    assert cache.gc()["old_format"] == [str(old)] and not old.exists() and entry.exists()


def test_a_segment_of_another_version_inside_a_table_is_refused(resnet18: Backbone, tmp_path: Path) -> None:
    from featcache.cache.writer import segment_checksum

    feats = _extract(resnet18, 6, tmp_path / "c")
    seg = sorted((Path(feats.path) / "segments").glob("*.json"))[0]  # type: ignore[attr-defined]
    meta = json.loads(seg.read_text())
    meta["cache_version"] = 3
    meta["checksum"] = segment_checksum(meta)
    seg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"unreadable \(cache version 3, this featcache reads"):
        _extract(resnet18, 6, tmp_path / "c")


def test_the_table_record_is_typed_round_trips_and_compares_by_setting(resnet18: Backbone) -> None:
    from featcache.cache.identity import TableRecord, table_key
    from featcache.extraction.build import cache_record

    cfg = ExtractConfig(input_size=(32, 32), device="cpu")
    one, two = cache_record(resnet18, ["layer3"], cfg), cache_record(resnet18, ["layer3", "layer4"], cfg)
    assert isinstance(one, TableRecord) and one.layers == ("layer3",)
    back = TableRecord.from_json(json.loads(json.dumps(one.to_json())))  # as table.json holds it
    assert back == one and back.key() == one.key() == table_key(one.to_json())
    assert one.same_setting(two) and one.key() != two.key()
    assert not one.same_setting(
        cache_record(resnet18, ["layer3"], ExtractConfig(input_size=(32, 32), pool="none"))
    )
    with pytest.raises(TypeError, match="'view'"):
        TableRecord.from_json({**one.to_json(), "view": "0"})
    with pytest.raises(ValueError, match="unknown fields"):
        TableRecord.from_json({**one.to_json(), "dataset": "digits"})


def test_a_table_fed_a_few_images_at_a_time_merges_its_small_segments(
    resnet18: Backbone, tmp_path: Path
) -> None:
    from featcache.cache.table import MERGE_COUNT, run_of

    runs = MERGE_COUNT**2 + 1
    cache_dir, images = tmp_path / "c", _samples(2 * runs)
    cfg = ExtractConfig(input_size=(32, 32), device="cpu", batch_size=2, shard_rows=2)
    counts, before = [], {}
    for run in range(runs):  # each run adds two new images: one small segment, one run
        part = images.subset(range(2 * run + 2), "daily")
        feats = extract(resnet18, part, ["penultimate"], cfg, cache_dir=str(cache_dir), progress=False)
        table = FeatureCache(cache_dir).open(feats.key)
        index = table.index()
        counts.append(len(index.segments))
        assert len({run_of(s) for s in index.segments}) == len(index.segments)  # a merge is one segment
        if run == MERGE_COUNT - 2:
            before = table.row_bytes()  # every row before the first merge
    # a merge came each time a tier filled: the table never held more than MERGE_COUNT - 1 runs of a tier
    tiers = 1 + math.ceil(math.log(runs, MERGE_COUNT))
    assert (
        counts[MERGE_COUNT - 1] == 1
        and max(counts) <= (MERGE_COUNT - 1) * tiers
        and counts[-1] < 2 * MERGE_COUNT
    )
    after = FeatureCache(cache_dir).open(feats.key)
    rows = after.row_bytes()
    assert all(rows[d] == b for d, b in before.items())  # copied, not recomputed
    assert len(rows) == len(images) and after.verify() == []
