"""The feature store: stored numbers, table keys, rows by content, integrity, housekeeping, concurrency."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, direct_features, random_image, run_python, write_tree
from featcache._util import FeatcacheError
from featcache.backbones.registry import Backbone, load_backbone
from featcache.cache.identity import TableRecord
from featcache.cache.rows import RowView
from featcache.cache.store import FeatureCache, cache_key, cache_root
from featcache.cache.table import CheckedShard
from featcache.cache.writer import CACHE_VERSION, write_segment
from featcache.data.datasets import load_dataset
from featcache.data.samples import ArraySamples
from featcache.extraction.build import cache_record, extract
from featcache.extraction.config import ExtractConfig

SIZE = (32, 32)
LAYERS = ("layer3", "penultimate")


def _samples(n: int = 20, seed: int = 0) -> ArraySamples:
    rng = np.random.default_rng(seed)
    images = np.stack([np.asarray(random_image(rng, (40, 36))) for _ in range(n)])
    return ArraySamples(images, np.arange(n) % 3, ["a", "b", "c"], name=f"random-{seed}")


def _config(**kw: object) -> ExtractConfig:
    base = {"input_size": SIZE, "device": "cpu", "batch_size": 8}
    return ExtractConfig(**{**base, **kw})  # type: ignore[arg-type]


def _extract(bb: Backbone, samples, cache_dir: Path, layers=LAYERS, **kw: object):
    return extract(bb, samples, layers, _config(**kw), cache_dir=str(cache_dir), progress=False)


def _images(samples) -> list:
    return [samples.load(i) for i in range(len(samples))]


def _rows_by_digest(cache: FeatureCache, key: str) -> dict[str, dict[str, np.ndarray]]:
    """Every row of a table as ``{digest: {layer: row}}`` (channel statistics as ``layer.mean``/``.var``)."""
    table = cache.open(key)
    index = table.index()
    digests = table.digests(index)
    feats, stats = table.view(index, digests, table.layers)
    arrays = {k: np.asarray(v) for k, v in feats.items()}
    arrays |= {f"{k}.{s}": np.asarray(v) for k, d in stats.items() for s, v in d.items()}
    return {d: {k: a[i] for k, a in arrays.items()} for i, d in enumerate(digests)}


# --------------------------------------------------------------------------- stored numbers


def test_cached_features_equal_a_direct_forward(resnet18: Backbone, cache_dir: Path) -> None:
    samples = _samples(20)
    layers = ("layer2", "layer3", "penultimate", "logits")
    cached = _extract(resnet18, samples, cache_dir, layers=layers, shard_rows=6)
    ref = direct_features(resnet18, _images(samples), SIZE, layers)
    assert len(cached) == 20 and cached.ids == samples.ids and cached.classes == ["a", "b", "c"]
    assert np.array_equal(cached.labels, samples.labels) and cached.digests == samples.digests()
    assert cached.manifest["rows"] == 20 and (cached.rows, cached.from_cache, cached.extracted) == (20, 0, 20)
    # shard_rows 6 at batch 8: shards are whole batches, 8 + 8 + 4 rows, each committed by a segment
    segments = FeatureCache(cache_dir).open(cached.key).index().segments
    assert [s.rows for s in segments] == [8, 8, 4]
    for layer in layers:
        arr = cached.features[layer]
        assert arr.dtype == np.float32 and arr.shape == ref[layer].shape, layer
        assert np.abs(arr - ref[layer]).max() <= 1e-5, layer
        assert torch.equal(cached.tensor(layer), torch.from_numpy(np.array(arr)))
        # Rows come back in any order asked, and slices gather the same numbers.
        order = np.array([19, 0, 7, 7, 12])
        assert np.array_equal(arr[order], np.asarray(arr)[order])
        assert np.array_equal(arr[3:17], np.asarray(arr)[3:17]) and np.array_equal(arr[-1], arr[19])


@pytest.mark.parametrize("pool", ["max", "flatten", "none"])
def test_pooling_modes(resnet18: Backbone, cache_dir: Path, pool: str) -> None:
    samples = _samples(6)
    cached = _extract(resnet18, samples, cache_dir, layers=("layer3", "penultimate"), pool=pool)
    ref = direct_features(resnet18, _images(samples), SIZE, ("layer3", "penultimate"), pool=pool)
    expected_shape = {"max": (6, 256), "flatten": (6, 256 * 2 * 2), "none": (6, 256, 2, 2)}[pool]
    assert cached.features["layer3"].shape == expected_shape
    assert cached.features["penultimate"].shape == (6, 512)
    for layer in ("layer3", "penultimate"):
        assert np.abs(cached.features[layer] - ref[layer]).max() <= 1e-5


def test_float16_storage(resnet18: Backbone, cache_dir: Path) -> None:
    samples = _samples(10)
    cached = _extract(resnet18, samples, cache_dir, dtype="float16")
    ref = direct_features(resnet18, _images(samples), SIZE, ("layer3", "penultimate"))
    for layer in ("layer3", "penultimate"):
        assert cached.features[layer].dtype == np.float16
        np.testing.assert_allclose(
            cached.features[layer].astype(np.float32), ref[layer], rtol=1e-3, atol=1e-6
        )
        assert cached.tensor(layer).dtype == torch.float16
        assert cached.tensor(layer, dtype=torch.float32).dtype == torch.float32


def test_bfloat16_storage_loads_back_as_bfloat16(resnet18: Backbone, cache_dir: Path) -> None:
    samples = _samples(10)
    cached = _extract(resnet18, samples, cache_dir, dtype="bfloat16")
    ref = direct_features(resnet18, _images(samples), SIZE, ("layer3", "penultimate"))
    assert cached.dtype == "bfloat16"
    for layer in ("layer3", "penultimate"):
        t = cached.tensor(layer)
        assert t.dtype == torch.bfloat16 and tuple(t.shape) == ref[layer].shape
        # bfloat16 keeps 8 significant bits: relative rounding error <= 2**-8
        np.testing.assert_allclose(t.float().numpy(), ref[layer], rtol=2**-8 + 1e-5, atol=1e-6)
        assert cached.tensor(layer, dtype=torch.float32).dtype == torch.float32
    reopened = _extract(resnet18, samples, cache_dir, dtype="bfloat16")
    assert reopened.hit and torch.equal(reopened.tensor("layer3"), cached.tensor("layer3"))


def test_tensor_is_an_independent_writable_copy(resnet18: Backbone, cache_dir: Path) -> None:
    cached = _extract(resnet18, _samples(6), cache_dir)
    t = cached.tensor("layer3")
    assert not any(np.shares_memory(t.numpy(), part) for part in cached.features["layer3"].parts)
    before = np.array(cached.features["layer3"])
    t.mul_(2)  # must neither crash on the read-only map nor change the cache
    assert np.array_equal(_extract(resnet18, _samples(6), cache_dir).features["layer3"], before)
    with pytest.raises(FeatcacheError, match="layer3"):
        cached.tensor("layer4")


def test_table_holds_no_pickles(resnet18: Backbone, cache_dir: Path) -> None:
    cached = _extract(resnet18, _samples(6), cache_dir, pool="none", shard_rows=8)
    files = sorted(p.relative_to(cached.path).as_posix() for p in cached.path.rglob("*") if p.is_file())
    (segment,) = FeatureCache(cache_dir).open(cached.key).index().segments
    s = segment.name
    use = hashlib.sha256(b"random-0").hexdigest()[:24]  # the dataset read from it, for `cache ls`
    assert files == sorted(
        [
            "last_used",
            f"segments/{s}.json",
            f"shards/{s}.digests.npy",  # the rows' digests, raw 32-byte records
            f"shards/{s}.0.mean.npy",  # layer3, a map: its channel statistics beside it
            f"shards/{s}.0.npy",
            f"shards/{s}.0.var.npy",
            f"shards/{s}.1.npy",  # penultimate
            "table.json",
            f"uses/{use}.json",
        ]
    )
    for f in cached.path.rglob("*.npy"):
        np.load(f, allow_pickle=False)
    doc = json.loads((cached.path / "table.json").read_text())
    assert doc["cache_version"] == CACHE_VERSION and cache_key(doc["record"]) == cached.key
    assert doc["record"]["layers"] == ["layer3", "penultimate"]
    seg = json.loads((cached.path / "segments" / f"{s}.json").read_text())
    digests = np.load(cached.path / "shards" / f"{s}.digests.npy", allow_pickle=False)
    assert digests.dtype == np.uint8 and digests.shape == (6, 32) and seg["rows"] == 6
    assert [bytes(r).hex() for r in digests] == _samples(6).digests()  # the records, in row order
    assert (
        seg["digests"]["sha256"]
        == hashlib.sha256((cached.path / "shards" / f"{s}.digests.npy").read_bytes()).hexdigest()
    )  # the index file's checksum is in the segment, whose own checksum covers it


# --------------------------------------------------------------------------- keys


KEY_SCRIPT = """
import hashlib, sys
from featcache import ExtractConfig, load_backbone, load_dataset
from featcache.cache.store import cache_key
from featcache.extraction.build import cache_record
bb = load_backbone("torchvision:resnet18", weights="none")
train = load_dataset(sys.argv[1], val_fraction=0.0).train
cfg = ExtractConfig(input_size=(32, 32), device="cpu", batch_size=8)
print(cache_key(cache_record(bb, ["layer3", "penultimate"], cfg)), *train.digests())
"""


def test_same_key_and_digests_in_another_process(resnet18: Backbone, tmp_path: Path) -> None:
    write_tree(tmp_path / "tree" / "train", per_class=4)
    train = load_dataset(str(tmp_path / "tree"), val_fraction=0.0).train
    key = cache_key(cache_record(resnet18, LAYERS, _config()))
    assert len(key) == 64
    other = run_python(KEY_SCRIPT, str(tmp_path / "tree")).stdout.split()
    assert other == [key, *train.digests()]


def test_key_changes_with_everything_that_changes_the_numbers_and_nothing_else(
    resnet18: Backbone, tmp_path: Path
) -> None:
    def key(bb: Backbone = resnet18, layers=LAYERS, **kw: object) -> str:
        return cache_key(cache_record(bb, layers, _config(**kw)))

    base = key()
    assert key() == base
    # what does not change the stored numbers does not change the key
    assert key(batch_size=3, workers=2, shard_rows=5, method="fx", shard_mb=1) == base
    assert key(layers=("penultimate", "layer3")) == base  # order of layers

    state = {k: v.clone() for k, v in resnet18.model.state_dict().items()}
    state["layer1.0.conv1.weight"][0, 0, 0, 0] += 1e-3
    torch.save(state, tmp_path / "tweaked.pt")
    tweaked = load_backbone("torchvision:resnet18", weights=str(tmp_path / "tweaked.pt"))
    assert tweaked.cfg.spec == resnet18.cfg.spec
    half_mean = replace(resnet18.cfg.preprocessing, mean=(0.5, 0.5, 0.5))
    changed = {
        "weights": key(bb=tweaked),
        "layer": key(layers=("layer2", "penultimate")),
        "input_size": key(input_size=(48, 48)),
        "mean": key(bb=Backbone(resnet18.model, replace(resnet18.cfg, preprocessing=half_mean))),
        "dtype": key(dtype="float16"),
        "pool": key(pool="max"),
        "amp": key(amp=True),
    }
    for what, k in changed.items():
        assert k != base, what
    assert len(set(changed.values())) == len(changed)
    # The data is not part of the key: its rows are keyed by content, splits and labels are views.
    record = cache_record(resnet18, LAYERS, _config())
    assert not {"dataset", "dataset_fingerprint", "split", "labels", "ids"} & set(record.to_json())


def test_the_key_holds_the_method_whose_values_the_arrays_are(resnet18: Backbone) -> None:
    """Module names give their forward hooks' values whichever path runs (FX is checked against them);
    a graph node only torch.fx gives is another kind of value: its entry is not served to hooks."""

    def record(layers: tuple[str, ...], method: str) -> TableRecord:
        return cache_record(resnet18, layers, _config(method=method))

    assert record(("layer3",), "fx").method == record(("layer3",), "hooks").method == "hooks"
    assert record(("flatten", "layer3"), "auto").method == "fx"
    assert cache_key(record(("layer3",), "fx")) == cache_key(record(("layer3",), "auto"))
    assert "layout_rules" in record(("layer3",), "auto").to_json() and CACHE_VERSION >= 2


def test_cache_key_includes_the_version_and_refuses_unhashable_records() -> None:
    record = {"a": 1, "b": [1, 2]}
    assert cache_key(record) == cache_key({"b": [1, 2], "a": 1})
    assert cache_key(record) != cache_key({"a": 1, "b": [1, 2], "c": None})
    with pytest.raises(FeatcacheError, match="cannot hash"):
        cache_key({"a": float("nan")})
    with pytest.raises(FeatcacheError, match="cannot hash"):
        cache_key({"a": object()})


# --------------------------------------------------------------------------- hits


def test_second_extract_is_a_hit_without_forward_passes(resnet18: Backbone, cache_dir: Path) -> None:
    samples = _samples(12)
    first = _extract(resnet18, samples, cache_dir)
    assert first.manifest["rows_extracted_this_run"] == 12 and not first.hit
    calls = []
    handle = resnet18.model.register_forward_pre_hook(lambda _m, inp: calls.append(len(inp[0])))
    try:
        second = _extract(resnet18, samples, cache_dir, batch_size=5)  # batch size is not in the key
    finally:
        handle.remove()
    assert calls == [] and second.hit
    assert (second.rows, second.from_cache, second.extracted) == (12, 12, 0)
    assert second.key == first.key and second.split_key == first.split_key
    for layer, arr in second.features.items():
        assert isinstance(arr, RowView), layer  # memory maps, each checked on its first read
        assert all(isinstance(p, CheckedShard) and isinstance(p.arr, np.memmap) for p in arr.parts), layer
        assert np.array_equal(arr, first.features[layer])
    assert second.ids == first.ids and np.array_equal(second.labels, first.labels)


def test_a_relabelled_reordered_subset_is_a_view_of_the_same_rows(
    resnet18: Backbone, cache_dir: Path
) -> None:
    samples = _samples(12)
    full = _extract(resnet18, samples, cache_dir)
    relabelled = ArraySamples(samples.images[::-1][:7], np.arange(7) % 2, ["x", "y"], name="another set")
    calls = []
    handle = resnet18.model.register_forward_pre_hook(lambda *_: calls.append(1))
    view = _extract(resnet18, relabelled, cache_dir)
    handle.remove()
    assert calls == [] and view.key == full.key and view.split_key != full.split_key
    assert view.classes == ["x", "y"] and view.labels.tolist() == (np.arange(7) % 2).tolist()
    for layer in LAYERS:
        np.testing.assert_array_equal(view.features[layer], np.asarray(full.features[layer])[::-1][:7])


def test_cache_root_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home"
    assert cache_root(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("FEATCACHE_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "featcache"


# --------------------------------------------------------------------------- integrity


def test_verify_and_open_detect_damage(resnet18: Backbone, cache_dir: Path) -> None:
    samples = _samples(12)
    cached = _extract(resnet18, samples, cache_dir, shard_rows=4, batch_size=4)
    cache = FeatureCache(cache_dir)
    assert cache.verify(cached.key) == []
    segments = cache.open(cached.key).index().segments
    assert len(segments) == 3
    name = f"shards/{segments[2].name}.0.npy"
    layer_file = cached.path / name
    original = layer_file.read_bytes()

    # flip one bit in the last row (shard 2 of 3)
    data = bytearray(original)
    data[-3] ^= 0x10
    layer_file.write_bytes(bytes(data))
    assert cache.verify(cached.key) == [f"{name}: checksum mismatch"]

    # truncate the file: verify names it, reading the split names it
    layer_file.write_bytes(original[: len(original) - 100])
    problems = cache.verify(cached.key)
    assert len(problems) == 1 and problems[0].startswith(name)
    with pytest.raises(FeatcacheError, match=f"{segments[2].name}.0.npy"):
        _extract(resnet18, samples, cache_dir)

    layer_file.write_bytes(original)
    assert cache.verify(cached.key) == []


def test_an_unreadable_segment_is_named_and_loses_no_other_row(resnet18: Backbone, cache_dir: Path) -> None:
    samples = _samples(12)
    cached = _extract(resnet18, samples, cache_dir, shard_rows=4, batch_size=4)
    cache = FeatureCache(cache_dir)
    segments = cache.open(cached.key).segment_files()
    before = _rows_by_digest(cache, cached.key)
    original = segments[1].read_bytes()
    segments[1].write_bytes(original[:40])  # a torn or damaged index segment
    with pytest.raises(
        FeatcacheError, match=rf"index segment .*{segments[1].name}.* is unreadable.*delete it"
    ):
        _extract(resnet18, samples, cache_dir)
    problems = FeatureCache(cache_dir).verify(cached.key)
    assert len(problems) == 1 and problems[0].startswith(f"segments/{segments[1].name}: unreadable")
    # Deleting it, as the message says, costs exactly its rows; every other row is intact.
    segments[1].unlink()
    calls = []
    handle = resnet18.model.register_forward_pre_hook(lambda _m, inp: calls.append(len(inp[0])))
    again = _extract(resnet18, samples, cache_dir, shard_rows=4, batch_size=4)
    handle.remove()
    assert again.extracted == 4 and sum(calls) == 4  # its 4 rows, no other
    after = _rows_by_digest(FeatureCache(cache_dir), cached.key)
    assert before.keys() == after.keys()
    for d, rows in before.items():
        for layer, row in rows.items():
            assert np.array_equal(after[d][layer], row), (d, layer)


def test_a_shard_without_its_segment_is_not_read(resnet18: Backbone, cache_dir: Path) -> None:
    """What a process killed between writing a shard and committing its segment leaves: ignored, then
    removed by gc; the rows are extracted again."""
    samples = _samples(8)
    record = cache_record(resnet18, LAYERS, _config())
    cache = FeatureCache(cache_dir)
    table = cache.create(record)
    write_segment(
        table.path,
        table.layers,
        {"layer3": np.zeros((4, 256), np.float32), "penultimate": np.zeros((4, 512), np.float32)},
        samples.digests()[:4],
        {},
        "float32",
        {},
    )
    seg = table.segment_files()[0]
    seg.unlink()  # the commit never happened
    assert table.index().segments == [] and len(table.leftovers(table.index())) == 3  # 2 layers, digests
    assert cache.info(table.key)["status"] == "empty"
    cached = _extract(resnet18, samples, cache_dir)
    assert cached.extracted == 8 and cached.key == table.key
    ref = direct_features(resnet18, _images(samples), SIZE, LAYERS)
    assert np.abs(cached.features["layer3"] - ref["layer3"]).max() <= 1e-5  # not the zeros
    removed = FeatureCache(cache_dir).gc()
    assert len(removed["leftovers"]) == 3 and FeatureCache(cache_dir).verify(table.key) == []


def test_ls_info_rm_gc_compact(resnet18: Backbone, cache_dir: Path) -> None:
    cache = FeatureCache(cache_dir)
    assert cache.ls() == []
    a = _extract(resnet18, _samples(6, seed=0), cache_dir)
    b = _extract(resnet18, _samples(5, seed=1), cache_dir, dtype="float16")
    b2 = _extract(resnet18, _samples(7, seed=2), cache_dir, dtype="float16", shard_rows=2, batch_size=2)
    assert b2.key == b.key  # one table: the setting is the same, the images are new rows
    listed = {e["key"]: e for e in cache.ls()}
    assert set(listed) == {a.key, b.key}
    info = listed[b.key]
    assert info["status"] == "ok" and info["rows"] == 12 and info["dtype"] == "float16"
    assert info["model"] == "torchvision:resnet18" and info["pool"] == "avg" and info["segments"] == 5
    assert info["layers"] == {"layer3": [256], "penultimate": [512]} and info["last_used"]
    assert info["bytes"] == sum(f.stat().st_size for f in b.path.rglob("*") if f.is_file())
    assert cache.resolve(a.key[:12]) == a.key
    with pytest.raises(FeatcacheError, match="no cache entry"):
        cache.resolve("0" * 64)
    # a shared prefix is ambiguous
    for suffix in ("1", "2"):
        cache.path("abc" + suffix * 61).mkdir()
    with pytest.raises(FeatcacheError, match="ambiguous"):
        cache.resolve("abc")
    for suffix in ("1", "2"):
        cache.rm("abc" + suffix)
    # names that are not keys never reach the file system
    (cache_dir.parent / "precious").mkdir()
    for bad in ("", ".", "..", "*", "../precious", a.key.upper()):
        with pytest.raises(FeatcacheError, match="not a cache key"):
            cache.rm(bad)
    assert (cache_dir.parent / "precious").is_dir() and set(cache.entries()) == {a.key, b.key}

    # compact: one segment, every digest's bytes unchanged, the same split read back
    before = _rows_by_digest(cache, b.key)
    assert cache.compact(b.key[:10]) == (5, 1)
    after = _rows_by_digest(FeatureCache(cache_dir), b.key)
    assert list(after) == list(before) and all(
        np.array_equal(after[d][k], v) for d, rows in before.items() for k, v in rows.items()
    )
    assert cache.verify(b.key) == [] and len(list((b.path / "shards").iterdir())) == 3  # 2 layers, digests
    again = _extract(resnet18, _samples(7, seed=2), cache_dir, dtype="float16")
    assert again.hit and np.array_equal(again.features["layer3"], b2.features["layer3"])

    # gc: leftovers go, tables in use stay, old-format entries go, unused tables go when asked
    (a.path / "shards" / "x.npy.tmp-999").write_bytes(b"junk")
    old = cache.path("f" * 64)  # a cache-version-1 entry
    (old / "shards").mkdir(parents=True)
    (old / "record.json").write_text("{}")
    removed = cache.gc()
    assert removed == {
        "old_format": [str(old)],
        "leftovers": [str(a.path / "shards" / "x.npy.tmp-999")],
        "unused": [],
        "over_size": [],
        "not_removed": [],
    }
    assert cache.verify(a.key) == [] and set(cache.entries()) == {a.key, b.key}
    t = time.time() - 10 * 86400
    os.utime(a.path / "last_used", (t, t))
    assert cache.gc(unused_for_s=5 * 86400)["unused"] == [str(a.path)]
    assert cache.entries() == [b.key]

    cache.rm(b.key[:12])
    assert cache.entries() == []
    with pytest.raises(FeatcacheError):
        cache.open(b.key)
    # the removed table is rebuilt on demand
    rebuilt = _extract(resnet18, _samples(5, seed=1), cache_dir, dtype="float16")
    assert rebuilt.key == b.key and rebuilt.manifest["rows_extracted_this_run"] == 5


def test_old_format_entries_are_not_read(resnet18: Backbone, cache_dir: Path) -> None:
    record = cache_record(resnet18, LAYERS, _config())
    key = cache_key(record)
    (cache_dir / key).mkdir()
    (cache_dir / key / "table.json").write_text(json.dumps({"record": record.to_json(), "cache_version": 1}))
    cache = FeatureCache(cache_dir)
    assert cache.info(key)["status"] == "old format"
    with pytest.raises(FeatcacheError, match="cache version 1"):
        cache.open(key)
    forged = cache_dir / ("e" * 64)
    forged.mkdir()
    (forged / "table.json").write_text(
        json.dumps({"record": record.to_json(), "cache_version": CACHE_VERSION})
    )
    with pytest.raises(FeatcacheError, match="does not hash to its name"):
        cache.open(forged.name)
    assert set(cache.gc()["old_format"]) == {str(cache_dir / key)}  # a forged table stays for `rm`


# --------------------------------------------------------------------------- concurrency


CONCURRENT_SCRIPT = """
import sys, time
from featcache import ExtractConfig, extract, load_backbone, load_dataset
bb = load_backbone("torchvision:resnet18", weights="none")
calls = []
def slow(module, inputs):
    calls.append(len(inputs[0]))
    time.sleep(0.15)
bb.model.register_forward_pre_hook(slow)
train = load_dataset(sys.argv[1], val_fraction=0.0).train
if sys.argv[3] == "odd":
    train = train.subset(list(range(1, len(train), 2)), "odd")
cfg = ExtractConfig(input_size=(32, 32), device="cpu", batch_size=4, shard_rows=8)
out = extract(bb, train, ["layer3", "penultimate"], cfg, cache_dir=sys.argv[2], progress=False)
print(out.key, sum(calls), len(out), out.extracted)
"""


@pytest.mark.slow
@pytest.mark.parametrize("second", ["all", "odd"])
def test_two_processes_appending_to_one_table(
    resnet18: Backbone, tmp_path: Path, cache_dir: Path, second: str
) -> None:
    """Two processes on one table (the same images, or the second a subset): every row once, none lost."""
    files = write_tree(tmp_path / "tree" / "train", per_class=8)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_SCRIPT, str(tmp_path / "tree"), str(cache_dir), which],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for which in ("all", second)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outs.append(out.split())
    keys = {o[0] for o in outs}
    assert len(keys) == 1
    key = keys.pop()
    # Together the two ran each image through the backbone once (shard_rows fixed: no shape probe).
    assert sum(int(o[1]) for o in outs) == sum(int(o[3]) for o in outs) == len(files), outs
    assert [int(o[2]) for o in outs] == [len(files), len(files) if second == "all" else len(files) // 2]
    cache = FeatureCache(cache_dir)
    assert cache.entries() == [key]
    assert cache.verify(key) == []
    index = cache.open(key).index()
    assert sum(s.rows for s in index.segments) == len(index.where) == len(files)  # no duplicate row
    train = load_dataset(str(tmp_path / "tree"), val_fraction=0.0).train
    ref = direct_features(resnet18, _images(train), SIZE, ("layer3", "penultimate"))
    rows = _rows_by_digest(cache, key)
    for i, d in enumerate(train.digests()):
        for layer in ("layer3", "penultimate"):
            assert np.abs(rows[d][layer] - ref[layer][i]).max() <= 1e-5


def test_gc_spares_a_table_being_appended_to(resnet18: Backbone, tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    table = cache.create(cache_record(resnet18, LAYERS, _config()))
    (table.path / "shards").mkdir()
    (table.path / "shards" / "00000000000000000001-abcdef12.0.npy").write_bytes(b"half a shard")
    old = time.time() - 10 * 24 * 3600
    os.utime(table.path / "table.json", (old, old))
    with cache.lock(table.key):  # an extraction holds the lock
        assert cache.gc(unused_for_s=3600) == {
            "old_format": [],
            "leftovers": [],
            "unused": [],
            "over_size": [],
            "not_removed": [],
        }
        assert (table.path / "shards").exists()
    removed = cache.gc(empty_older_than_s=3600)
    assert removed["unused"] == [str(table.path)] and not table.path.exists()


# --------------------------------------------------------------------------- channel statistics


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_spatial_maps_carry_their_channel_statistics(resnet18: Backbone, cache_dir: Path, dtype: str) -> None:
    samples = _samples(14)
    cached = _extract(resnet18, samples, cache_dir, pool="none", dtype=dtype, shard_rows=5)
    assert set(cached.channel_stats) == {"layer3"}  # the pooled penultimate vectors have none
    stats = cached.channel_stats["layer3"]
    # The reference: pooling and variance of the stored (rounded) maps.
    maps = cached.tensor("layer3", dtype=torch.float32)
    pooled = torch.nn.AdaptiveAvgPool2d(1)(maps).flatten(1)
    var = maps.flatten(2).double().var(2, unbiased=False).float()
    for got, want in ((stats.mean, pooled), (stats.var, var)):
        assert got.dtype == np.float32 and got.shape == (14, 256)
        torch.testing.assert_close(torch.from_numpy(np.array(got)), want, rtol=1e-5, atol=1e-6)
    cache = FeatureCache(cache_dir)
    assert cache.info(cached.key)["channel_stats"] == ["layer3"]
    # A view of other rows in another order carries their statistics along.
    sub = _extract(resnet18, samples.subset([13, 2, 2, 5], "s"), cache_dir, pool="none", dtype=dtype)
    assert sub.hit
    np.testing.assert_array_equal(sub.channel_stats["layer3"].mean, np.asarray(stats.mean)[[13, 2, 2, 5]])
    np.testing.assert_array_equal(sub.channel_stats["layer3"].var, np.asarray(stats.var)[[13, 2, 2, 5]])
    assert not list(cached.path.rglob("*.tmp-*"))


def test_channel_statistics_follow_the_stored_layout(tmp_path: Path) -> None:
    """The writer takes statistics over the positions the layout names; vectors and unknown layouts
    get none; the entry opens with each layer's layout."""
    from featcache.cache.writer import write_segment

    rng = np.random.default_rng(0)
    arrays = {
        "hwc": rng.standard_normal((5, 3, 4, 6)).astype(np.float32),
        "tokens": rng.standard_normal((5, 7, 6)).astype(np.float32),
        "vec": rng.standard_normal((5, 6)).astype(np.float32),
        "odd": rng.standard_normal((5, 2, 3, 4, 5)).astype(np.float32),
    }
    layouts = {"hwc": "NHWC", "tokens": "NLD", "vec": "NC", "odd": None}
    cache = FeatureCache(tmp_path)
    table = cache.create({"layers": sorted(arrays), "dtype": "float32", "backbone": "test"})
    digests = [f"{i:064x}" for i in range(5)]
    write_segment(table.path, table.layers, arrays, digests, {}, "float32", {}, layouts=layouts)
    entry = cache.open_split(
        table.key, sorted(arrays), digests, [str(i) for i in range(5)], np.zeros(5), ["a"]
    )
    assert entry.layouts == layouts and set(entry.channel_stats) == {"hwc", "tokens"}
    for name, axes in (("hwc", (1, 2)), ("tokens", (1,))):
        np.testing.assert_allclose(entry.channel_stats[name].mean, arrays[name].mean(axes), atol=1e-6)
        np.testing.assert_allclose(entry.channel_stats[name].var, arrays[name].var(axes), atol=1e-5)
    assert cache.verify(table.key) == []


def test_verify_and_open_detect_damaged_channel_statistics(resnet18: Backbone, cache_dir: Path) -> None:
    samples = _samples(6)
    cached = _extract(resnet18, samples, cache_dir, pool="none")
    cache = FeatureCache(cache_dir)
    (segment,) = cache.open(cached.key).index().segments
    name = f"shards/{segment.name}.0.var.npy"
    f = cached.path / name
    original = f.read_bytes()
    data = bytearray(original)
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))
    assert cache.verify(cached.key) == [f"{name}: checksum mismatch"]
    f.write_bytes(original[:-8])
    with pytest.raises(FeatcacheError, match=rf"{segment.name}.0.var.npy.*damaged.*cache verify"):
        _extract(resnet18, samples, cache_dir, pool="none")
    f.unlink()
    assert cache.verify(cached.key) == [f"{name}: missing"]
    f.write_bytes(original)
    assert cache.verify(cached.key) == []


def test_a_layer_extracted_with_others_is_not_extracted_again(resnet18: Backbone, cache_dir: Path) -> None:
    samples = _samples(8)
    both = _extract(resnet18, samples, cache_dir, layers=("layer3", "penultimate"))
    calls = []
    hook = resnet18.model.register_forward_pre_hook(lambda *_: calls.append(1))
    one = _extract(resnet18, samples, cache_dir, layers=("penultimate",))
    hook.remove()
    assert one.hit and calls == [] and one.key == both.key
    assert list(one.features) == ["penultimate"]
    np.testing.assert_array_equal(one.features["penultimate"], both.features["penultimate"])
    # Anything else that changes the numbers still needs its own entry.
    other = _extract(resnet18, samples, cache_dir, layers=("penultimate",), dtype="float16")
    assert not other.hit and other.key != both.key
