"""The cache root's housekeeping (cache/store.py, cache/housekeeping.py): listing with datasets, input
sizes and last use, damaged entries and foreign folders, removal by filter, size-bounded gc, reprs."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from featcache._errors import FeatcacheError
from featcache.backbones.registry import Backbone
from featcache.cache.housekeeping import GcLimits, Selection, parse_size
from featcache.cache.store import FeatureCache
from featcache.cache.table import cache_key
from featcache.cache.writer import write_segment
from featcache.data.config import DataConfig
from featcache.extraction.build import extract_splits
from featcache.extraction.config import ExtractConfig

DAY = 86400.0


def make_table(
    cache: FeatureCache,
    model: str,
    dataset: str,
    rows: int = 6,
    age_days: float = 0.0,
    size: tuple[int, int] = (32, 32),
    width: int = 8,
    layers: tuple[str, ...] = ("penultimate",),
) -> str:
    """A table written as extraction writes one (no backbone), read once as ``dataset``'s split, last
    used ``age_days`` ago; its key."""
    record = {
        "backbone": model,
        "weights_id": "w",
        "preprocessing": {"input_size": list(size)},
        "layers": list(layers),
        "pool": "avg",
        "dtype": "float32",
        "view": 0,
    }
    table = cache.create(record)
    digests = [hashlib.sha256(f"{model}{dataset}{i}".encode()).hexdigest() for i in range(rows)]
    values = np.random.default_rng(rows).random((rows, width), dtype=np.float32)
    write_segment(table.path, table.layers, {k: values for k in layers}, digests, {}, "float32", {},
                  layouts={k: "NC" for k in layers})  # fmt: skip
    ids = [f"{i}.png" for i in range(rows)]
    cache.open_split(table.key, list(layers), digests, ids, np.zeros(rows), ["a"], dataset=dataset)
    when = time.time() - age_days * DAY
    for f in [table.path / "last_used", *(table.path / "uses").iterdir()]:
        os.utime(f, (when, when))
    return table.key


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_ls_lists_model_dataset_input_size_rows_size_and_last_use_most_recent_first(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    old = make_table(cache, "torchvision:resnet18", "digits", rows=5, age_days=3)
    new = make_table(cache, "timm:vit_tiny", "/data/photos", rows=7, size=(64, 48))
    entries = cache.ls()
    assert [e["key"] for e in entries] == [new, old]
    e = entries[1]
    assert e["model"] == "torchvision:resnet18" and e["datasets"] == ["digits"]
    assert e["input_size"] == [32, 32] and e["rows"] == 5 and e["status"] == "ok"
    assert e["bytes"] == disk_bytes(cache.path(old))
    assert abs(time.time() - 3 * DAY - e["last_used_unix"]) < 60
    assert entries[0]["input_size"] == [64, 48] and entries[0]["datasets"] == ["/data/photos"]
    # A second dataset over the same table: listed beside the first, the key unchanged.
    record = cache.open(old).record
    digests = cache.open(old).digests()
    cache.open_split(old, ["penultimate"], digests, list("abcde"), np.zeros(5), ["a"], dataset="mine")
    assert cache_key(record) == old and cache.info(old)["datasets"] == ["mine", "digits"]


def test_ls_skips_foreign_folders_and_shows_damaged_entries_without_hiding_others(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    good = make_table(cache, "torchvision:resnet18", "digits")
    damaged = {
        "truncated": make_table(cache, "m:truncated", "d"),
        "no table file": make_table(cache, "m:no-table", "d"),
        "segment without digests": make_table(cache, "m:digests", "d"),
        "layer without shape": make_table(cache, "m:shape", "d"),
        "record not its key": make_table(cache, "m:planted", "d"),
    }
    (tmp_path / "lost+found").mkdir()
    (tmp_path / "notes").mkdir()
    table_file = cache.path(damaged["truncated"]) / "table.json"
    table_file.write_text(table_file.read_text()[:25])
    (cache.path(damaged["no table file"]) / "table.json").unlink()
    for name, edit in (("segment without digests", "digests"), ("layer without shape", "shape")):
        seg = next((cache.path(damaged[name]) / "segments").glob("*.json"))
        doc = json.loads(seg.read_text())
        doc.pop("digests") if edit == "digests" else doc["layers"]["penultimate"].pop("shape")
        seg.write_text(json.dumps(doc))
    doc = json.loads((cache.path(damaged["record not its key"]) / "table.json").read_text())
    doc["record"]["pool"] = "max"
    (cache.path(damaged["record not its key"]) / "table.json").write_text(json.dumps(doc))

    scan = FeatureCache(tmp_path).scan()
    assert scan.not_entries == ["lost+found", "notes"]
    assert repr(scan) == (
        f"CacheScan({str(tmp_path)!r}, entries=6, damaged=5, bytes={scan.bytes:,}, "
        "not_entries=['lost+found', 'notes'])"
    )
    by_key = {e["key"]: e for e in scan.entries}
    assert set(by_key) == {good, *damaged.values()}
    assert by_key[good]["status"] == "ok" and by_key[good]["rows"] == 6
    reasons = {name: by_key[key].get("reason", by_key[key]["status"]) for name, key in damaged.items()}
    assert {k: by_key[v]["status"] for k, v in damaged.items()} == dict.fromkeys(damaged, "damaged"), reasons
    assert "truncated" in reasons["truncated"] and "missing" in reasons["no table file"]
    assert "'digests'" in reasons["segment without digests"] and "'shape'" in reasons["layer without shape"]
    assert "does not hash" in reasons["record not its key"]
    # gc keeps foreign folders and damaged tables (cache rm removes those); rm never takes a foreign name
    FeatureCache(tmp_path).gc()
    assert (tmp_path / "lost+found").is_dir() and set(FeatureCache(tmp_path).entries()) == set(by_key)
    with pytest.raises(FeatcacheError, match="not a cache key"):
        cache.rm("lost+found")


def test_select_by_keys_model_dataset_and_age(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = FeatureCache(tmp_path)
    a = make_table(cache, "torchvision:resnet18", "digits", age_days=10)
    b = make_table(cache, "torchvision:resnet18", str(tmp_path / "photos"), age_days=1, size=(64, 64))
    c = make_table(cache, "timm:vit_tiny", "digits")
    (tmp_path / "photos").mkdir()

    def keys(*k: str, **f: object) -> set[str]:
        return {e["key"] for e in cache.select(k, Selection(**f))}  # type: ignore[arg-type]

    assert keys(model="resnet18") == keys(model="torchvision:resnet18") == keys(model="*resnet*") == {a, b}
    assert keys(dataset="digits") == {a, c} and keys(dataset="dig*") == {a, c}
    monkeypatch.chdir(tmp_path)  # a relative folder path matches by its absolute path
    assert keys(dataset="photos") == {b}
    assert keys(older_than=5) == {a} and keys(older_than=0.5) == {a, b}
    assert keys(model="resnet18", dataset="digits") == {a}
    assert keys(a[:8], c[:8]) == {a, c} and keys(a[:8], c[:8], model="*vit*") == {c}
    with pytest.raises(FeatcacheError, match="name the entries"):
        cache.select()
    with pytest.raises(FeatcacheError, match="older_than"):
        Selection(older_than=-1)


def test_gc_max_size_removes_least_recently_used_tables_until_the_cache_fits(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    ages = {make_table(cache, f"m:{i}", "d", rows=200, width=64, age_days=age): age for i, age in
            enumerate([5, 1, 9, 3])}  # fmt: skip
    sizes = {k: disk_bytes(cache.path(k)) for k in ages}
    by_age = sorted(ages, key=ages.__getitem__)  # most recent first
    limit = sizes[by_age[0]] + sizes[by_age[1]] + 10  # room for the two most recent
    removed = cache.gc(max_bytes=limit)
    assert sorted(removed["over_size"]) == sorted(str(cache.path(k)) for k in by_age[2:])
    assert set(cache.entries()) == set(by_age[:2])
    assert sum(disk_bytes(cache.path(k)) for k in cache.entries()) <= limit
    assert cache.gc(max_bytes=limit)["over_size"] == []  # already fits


def test_sizes_and_limits_are_checked() -> None:
    assert parse_size("10G") == 10 * 2**30 and parse_size("500M") == 500 * 2**20
    assert parse_size("1.5k") == 1536 and parse_size("2048") == 2048 and parse_size("3GiB") == 3 * 2**30
    for bad in ("", "10X", "G", "-1G", "ten"):
        with pytest.raises(FeatcacheError, match="not a size"):
            parse_size(bad)
    with pytest.raises(FeatcacheError, match="not a size"):
        GcLimits(max_size="lots")
    with pytest.raises(FeatcacheError, match="unused_days"):
        GcLimits(unused_days=float("nan"))
    assert GcLimits(unused_days=2).unused_s == 2 * DAY


def test_extraction_records_the_dataset_not_the_split_and_reprs_are_short(
    resnet18: Backbone, tmp_path: Path
) -> None:
    splits = DataConfig("digits", limit=40).load()
    feats = extract_splits(
        resnet18, splits, ["layer3"], ExtractConfig(input_size=(32, 32), device="cpu", batch_size=16),
        cache_dir=str(tmp_path), progress=False,
    )  # fmt: skip
    (entry,) = FeatureCache(tmp_path).ls()
    assert entry["datasets"] == ["digits"] and entry["input_size"] == [32, 32]
    assert entry["rows"] == sum(len(f) for f in feats.values())
    train = feats["train"]
    text = repr(train)
    assert len(text) < 200 and "rows=" + str(len(train)) in text and "classes=10" in text, text
    assert "'layer3': (256,)" in text and "split='train'" in text and train.key[:12] in text
    split_text = repr(splits.train)
    assert len(split_text) < 200 and f"{len(splits.train)} images" in split_text, split_text
    assert "10 classes" in split_text and "'digits'" in split_text
    for shown in (text, split_text):
        assert not any(bad in shown for bad in ("array(", "0x", "'0', '1'", ".png"))
