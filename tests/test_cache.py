"""The content-addressed cache: stored numbers, keys, hits, integrity, housekeeping and concurrency."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, direct_features, random_image, run_python, write_tree
from featcache._util import FeatcacheError
from featcache.backbones.registry import Backbone, load_backbone
from featcache.cache.store import FeatureCache, cache_key, cache_root
from featcache.cache.writer import CACHE_VERSION
from featcache.data.datasets import load_dataset
from featcache.data.samples import ArraySamples
from featcache.extract.build import cache_record, extract
from featcache.extract.config import ExtractConfig

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


# --------------------------------------------------------------------------- stored numbers


def test_cached_features_equal_a_direct_forward(resnet18: Backbone, cache_dir: Path) -> None:
    samples = _samples(20)
    layers = ("layer2", "layer3", "penultimate", "logits")
    cached = _extract(resnet18, samples, cache_dir, layers=layers, shard_rows=6)
    ref = direct_features(resnet18, _images(samples), SIZE, layers)
    assert len(cached) == 20 and cached.ids == samples.ids and cached.classes == ["a", "b", "c"]
    assert np.array_equal(cached.labels, samples.labels)
    assert cached.manifest["rows"] == 20 and cached.manifest["block_rows"] == [6, 6, 6, 2]
    for layer in layers:
        arr = cached.features[layer]
        assert arr.dtype == np.float32 and arr.shape == ref[layer].shape, layer
        assert np.abs(arr - ref[layer]).max() <= 1e-5, layer
        assert torch.equal(cached.tensor(layer), torch.from_numpy(np.array(arr)))


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
    reopened = FeatureCache(cache_dir).open(cached.key)
    assert torch.equal(reopened.tensor("layer3"), cached.tensor("layer3"))


def test_tensor_is_an_independent_writable_copy(resnet18: Backbone, cache_dir: Path) -> None:
    cached = _extract(resnet18, _samples(6), cache_dir)
    t = cached.tensor("layer3")
    assert not np.shares_memory(t.numpy(), cached.features["layer3"])
    before = np.array(cached.features["layer3"])
    t.mul_(2)  # must neither crash on the read-only map nor change the cache
    assert np.array_equal(FeatureCache(cache_dir).open(cached.key).features["layer3"], before)
    with pytest.raises(FeatcacheError, match="layer3"):
        cached.tensor("layer4")


def test_entry_holds_no_pickles(resnet18: Backbone, cache_dir: Path) -> None:
    cached = _extract(resnet18, _samples(6), cache_dir)
    files = sorted(p.relative_to(cached.path).as_posix() for p in cached.path.rglob("*") if p.is_file())
    assert files == [
        "features/layer3.npy",
        "features/penultimate.npy",
        "ids.json",
        "labels.npy",
        "manifest.json",
        "record.json",
    ]
    for f in cached.path.rglob("*.npy"):
        np.load(f, allow_pickle=False)
    manifest = json.loads((cached.path / "manifest.json").read_text())
    assert manifest["cache_version"] == CACHE_VERSION and manifest["key"] == cached.key
    assert manifest["record"]["layers"] == ["layer3", "penultimate"]


# --------------------------------------------------------------------------- keys


KEY_SCRIPT = """
import sys
from featcache import ExtractConfig, load_backbone, load_dataset
from featcache.cache.store import cache_key
from featcache.extract.build import cache_record
bb = load_backbone("torchvision:resnet18", weights="none")
train = load_dataset(sys.argv[1], val_fraction=0.0).train
cfg = ExtractConfig(input_size=(32, 32), device="cpu", batch_size=8)
print(cache_key(cache_record(bb, train, ["layer3", "penultimate"], cfg, "train")))
"""


def test_same_key_in_another_process(resnet18: Backbone, tmp_path: Path) -> None:
    write_tree(tmp_path / "tree" / "train", per_class=4)
    train = load_dataset(str(tmp_path / "tree"), val_fraction=0.0).train
    key = cache_key(cache_record(resnet18, train, LAYERS, _config(), "train"))
    assert len(key) == 64
    other = run_python(KEY_SCRIPT, str(tmp_path / "tree")).stdout.strip()
    assert other == key


def test_key_changes_with_everything_that_changes_the_numbers(resnet18: Backbone, tmp_path: Path) -> None:
    files = write_tree(tmp_path / "tree" / "train", per_class=4)
    train = load_dataset(str(tmp_path / "tree"), val_fraction=0.0).train

    def key(bb: Backbone = resnet18, samples=train, split: str = "train", layers=LAYERS, **kw: object) -> str:
        return cache_key(cache_record(bb, samples, layers, _config(**kw), split))

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
        "split": key(split="val"),
        "amp": key(amp=True),
    }
    random_image(np.random.default_rng(7), (40, 48)).save(files[2])  # modify one image file
    changed["data"] = key(samples=load_dataset(str(tmp_path / "tree"), val_fraction=0.0).train)
    for what, k in changed.items():
        assert k != base, what
    assert len(set(changed.values())) == len(changed)


def test_the_key_holds_the_method_whose_values_the_arrays_are(resnet18: Backbone) -> None:
    """Module names give their forward hooks' values whichever path runs (FX is checked against them);
    a graph node only torch.fx gives is another kind of value: its entry is not served to hooks."""
    samples = _samples(2)

    def record(layers: tuple[str, ...], method: str) -> dict:
        return cache_record(resnet18, samples, layers, _config(method=method), "train")

    assert record(("layer3",), "fx")["method"] == record(("layer3",), "hooks")["method"] == "hooks"
    assert record(("flatten", "layer3"), "auto")["method"] == "fx"
    assert cache_key(record(("layer3",), "fx")) == cache_key(record(("layer3",), "auto"))
    assert "layout_rules" in record(("layer3",), "auto") and CACHE_VERSION >= 2


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
    assert first.manifest["rows_extracted_this_run"] == 12
    calls = []
    handle = resnet18.model.register_forward_pre_hook(lambda _m, inp: calls.append(len(inp[0])))
    try:
        second = _extract(resnet18, samples, cache_dir, batch_size=5)  # batch size is not in the key
    finally:
        handle.remove()
    assert calls == []
    assert second.key == first.key
    for layer, arr in second.features.items():
        assert isinstance(arr, np.memmap), layer
        assert np.array_equal(arr, first.features[layer])
    assert second.ids == first.ids and np.array_equal(second.labels, first.labels)


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
    cached = _extract(resnet18, samples, cache_dir, shard_rows=4)
    cache = FeatureCache(cache_dir)
    assert cache.verify(cached.key) == []
    assert cache.open(cached.key, verify=True).key == cached.key
    layer_file = cached.path / "features" / "layer3.npy"
    original = layer_file.read_bytes()

    # flip one bit in the last row (block 2 of 3)
    data = bytearray(original)
    data[-3] ^= 0x10
    layer_file.write_bytes(bytes(data))
    problems = cache.verify(cached.key)
    assert problems == ["features/layer3.npy: block 2 checksum mismatch"]
    with pytest.raises(FeatcacheError, match="damaged"):
        cache.open(cached.key, verify=True)

    # truncate the file
    layer_file.write_bytes(original[: len(original) - 100])
    problems = cache.verify(cached.key)
    assert len(problems) == 1 and problems[0].startswith("features/layer3.npy")
    with pytest.raises(FeatcacheError, match="layer3"):
        cache.open(cached.key)

    layer_file.write_bytes(original)
    assert cache.verify(cached.key) == []


def test_a_partial_entry_does_not_open(resnet18: Backbone, cache_dir: Path) -> None:
    samples = _samples(8)
    record = cache_record(resnet18, samples, LAYERS, _config(), "train")
    key = cache_key(record)
    cache = FeatureCache(cache_dir)
    writer = cache.writer(key, {**record, "shard_rows": 4})
    writer.write_shard(0, {"layer3": np.zeros((4, 256), np.float32)}, [0, 1, 2, 3], [])
    with pytest.raises(FeatcacheError, match="partial"):
        cache.open(key)
    assert cache.verify(key) == ["partial entry: 1 finished shards, no manifest"]
    info = cache.info(key[:10])
    assert (
        info["status"] == "partial" and info["shards_done"] == 1 and info["model"] == "torchvision:resnet18"
    )


def test_ls_info_rm_gc(resnet18: Backbone, cache_dir: Path) -> None:
    cache = FeatureCache(cache_dir)
    assert cache.ls() == []
    a = _extract(resnet18, _samples(6, seed=0), cache_dir)
    b = _extract(resnet18, _samples(5, seed=1), cache_dir, dtype="float16")
    listed = {e["key"]: e for e in cache.ls()}
    assert set(listed) == {a.key, b.key}
    info = listed[b.key]
    assert info["status"] == "complete" and info["rows"] == 5 and info["dtype"] == "float16"
    assert info["model"] == "torchvision:resnet18" and info["dataset"] == "random-1" and info["pool"] == "avg"
    assert info["layers"] == {"layer3": [256], "penultimate": [512]}
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

    # gc: leftovers of crashes go, complete entries stay, young partial entries stay
    (a.path / "features" / "layer3.npy.tmp-999").write_bytes(b"junk")
    (a.path / "shards").mkdir()
    partial = cache.path("f" * 64)
    (partial / "shards").mkdir(parents=True)
    removed = cache.gc(partial_older_than_s=3600)
    assert sorted(removed) == sorted(
        [str(a.path / "features" / "layer3.npy.tmp-999"), str(a.path / "shards")]
    )
    assert cache.verify(a.key) == [] and partial.exists()
    old = cache.gc(partial_older_than_s=-1)
    assert old == [str(partial)] and not partial.exists()
    assert set(cache.entries()) == {a.key, b.key}

    cache.rm(b.key[:12])
    assert cache.entries() == [a.key]
    with pytest.raises(FeatcacheError):
        cache.open(b.key)
    # the removed entry is rebuilt on demand
    again = _extract(resnet18, _samples(5, seed=1), cache_dir, dtype="float16")
    assert again.key == b.key and again.manifest["rows_extracted_this_run"] == 5


# --------------------------------------------------------------------------- concurrency


CONCURRENT_SCRIPT = """
import sys, time
from featcache import ExtractConfig, extract, load_backbone, load_dataset
bb = load_backbone("torchvision:resnet18", weights="none")
calls = []
def slow(module, inputs):
    calls.append(1)
    time.sleep(0.15)
bb.model.register_forward_pre_hook(slow)
train = load_dataset(sys.argv[1], val_fraction=0.0).train
cfg = ExtractConfig(input_size=(32, 32), device="cpu", batch_size=4, shard_rows=8)
out = extract(bb, train, ["layer3", "penultimate"], cfg, cache_dir=sys.argv[2], progress=False)
print(out.key, len(calls), len(out))
"""


@pytest.mark.slow
def test_two_processes_extracting_the_same_key(resnet18: Backbone, tmp_path: Path, cache_dir: Path) -> None:
    files = write_tree(tmp_path / "tree" / "train", per_class=8)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_SCRIPT, str(tmp_path / "tree"), str(cache_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for _ in range(2)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        outs.append(out.split())
    keys = {o[0] for o in outs}
    assert len(keys) == 1
    key = keys.pop()
    assert sorted(int(o[1]) > 0 for o in outs) == [False, True]  # one built it, the other waited and hit
    assert all(int(o[2]) == len(files) for o in outs)
    cache = FeatureCache(cache_dir)
    assert cache.entries() == [key]
    assert cache.verify(key) == []
    cached = cache.open(key)
    ref = direct_features(
        resnet18,
        [load_dataset(str(tmp_path / "tree"), val_fraction=0.0).train.load(i) for i in range(len(files))],
        SIZE,
        ("layer3", "penultimate"),
    )
    for layer in ("layer3", "penultimate"):
        assert np.abs(cached.features[layer] - ref[layer]).max() <= 1e-5


def test_verify_catches_flipped_labels_and_ids(tmp_path: Path) -> None:
    from featcache.data.samples import ArraySamples
    from featcache.extract.build import extract
    from featcache.extract.config import ExtractConfig

    bb = load_backbone("torchvision:resnet18", weights="none")
    samples = ArraySamples(
        np.random.default_rng(0).integers(0, 255, (12, 16, 16), dtype=np.uint8), np.arange(12) % 3
    )
    feats = extract(
        bb, samples, ["layer1"], ExtractConfig(input_size=(32, 32)), cache_dir=str(tmp_path), progress=False
    )
    cache = FeatureCache(tmp_path)
    assert cache.verify(feats.key) == []
    labels = np.load(feats.path / "labels.npy")
    labels[-1] = (labels[-1] + 1) % 3
    np.save(feats.path / "labels.npy", labels)
    (feats.path / "ids.json").write_text((feats.path / "ids.json").read_text().replace("000011", "000099"))
    problems = cache.verify(feats.key)
    assert any("labels.npy" in p for p in problems) and any("ids.json" in p for p in problems)


def test_gc_spares_an_entry_being_written(tmp_path: Path) -> None:
    import os
    import time

    cache = FeatureCache(tmp_path)
    key = "ab" * 32
    (cache.path(key) / "shards").mkdir(parents=True)
    old = time.time() - 10 * 24 * 3600
    (cache.path(key) / "record.json").write_text("{}")
    os.utime(cache.path(key) / "record.json", (old, old))
    with cache.lock(key):  # an extraction holds the lock
        assert cache.gc(partial_older_than_s=3600) == []
        assert cache.path(key).exists()
    (cache.path(key) / "shards" / "00000.json").write_text("{}")  # a shard finished just now
    assert cache.gc(partial_older_than_s=3600) == [] and cache.path(key).exists()
    for p in (cache.path(key) / "shards" / "00000.json", cache.path(key) / "shards", cache.path(key)):
        os.utime(p, (old, old))
    assert cache.gc(partial_older_than_s=3600) == [str(cache.path(key))]


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
    reopened = cache.open(cached.key).channel_stats["layer3"]
    assert np.array_equal(reopened.mean, stats.mean) and np.array_equal(reopened.var, stats.var)
    assert not list((cached.path / "features").glob("*.tmp-*"))


def test_channel_statistics_follow_the_stored_layout(tmp_path: Path) -> None:
    """The writer takes statistics over the positions the layout names; vectors and unknown layouts
    get none; the entry opens with each layer's layout."""
    from featcache.cache.writer import CacheWriter

    rng = np.random.default_rng(0)
    arrays = {
        "hwc": rng.standard_normal((5, 3, 4, 6)).astype(np.float32),
        "tokens": rng.standard_normal((5, 7, 6)).astype(np.float32),
        "vec": rng.standard_normal((5, 6)).astype(np.float32),
        "odd": rng.standard_normal((5, 2, 3, 4, 5)).astype(np.float32),
    }
    layouts = {"hwc": "NHWC", "tokens": "NLD", "vec": "NC", "odd": None}
    writer = CacheWriter(tmp_path / "abc", {"layers": list(arrays), "dtype": "float32", "shard_rows": 5})
    writer.write_shard(0, arrays, list(range(5)), [])
    writer.commit(
        1, [str(i) for i in range(5)], np.zeros(5, dtype=np.int64), {"classes": ["a"]}, layouts=layouts
    )
    entry = FeatureCache(tmp_path).open("abc")
    assert entry.layouts == layouts and set(entry.channel_stats) == {"hwc", "tokens"}
    for name, axes in (("hwc", (1, 2)), ("tokens", (1,))):
        np.testing.assert_allclose(entry.channel_stats[name].mean, arrays[name].mean(axes), atol=1e-6)
        np.testing.assert_allclose(entry.channel_stats[name].var, arrays[name].var(axes), atol=1e-5)
    assert FeatureCache(tmp_path).verify("abc") == []


def test_verify_and_open_detect_damaged_channel_statistics(resnet18: Backbone, cache_dir: Path) -> None:
    cached = _extract(resnet18, _samples(6), cache_dir, pool="none")
    cache = FeatureCache(cache_dir)
    name = "features/channel_stats/layer3.var.npy"
    f = cached.path / name
    original = f.read_bytes()
    data = bytearray(original)
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))
    assert cache.verify(cached.key) == [f"{name}: checksum mismatch"]
    f.write_bytes(original[:-8])
    with pytest.raises(FeatcacheError, match=r"channel var of layer layer3 is damaged.*cache rm"):
        cache.open(cached.key)
    f.unlink()
    assert cache.verify(cached.key) == [f"{name}: missing"]
    f.write_bytes(original)
    assert cache.verify(cached.key) == []


def test_commit_removes_what_a_crashed_commit_left(tmp_path: Path) -> None:
    from featcache.cache.writer import CacheWriter

    key = "ab" * 32
    writer = CacheWriter(tmp_path / key, {"layers": ["m"], "shard_rows": 4, "dtype": "float32"})
    maps = np.arange(3 * 2 * 2 * 2, dtype=np.float32).reshape(3, 2, 2, 2)
    writer.write_shard(0, {"m": maps}, [0, 1, 2], [])
    stale = [
        tmp_path / key / "features/m.npy.tmp-1",
        tmp_path / key / "features/channel_stats/m.mean.npy.tmp-1",
    ]
    for f in stale:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"half-written")
    writer.commit(1, ["a", "b", "c"], np.zeros(3, dtype=np.int64), {"classes": ["x"]})
    assert not any(f.exists() for f in stale)
    cache = FeatureCache(tmp_path)
    assert cache.verify(key) == []
    np.testing.assert_allclose(cache.open(key).channel_stats["m"].mean, maps.mean((2, 3)))


def test_a_hit_on_an_older_entry_adds_its_channel_statistics(resnet18: Backbone, cache_dir: Path) -> None:
    import shutil

    samples = _samples(9)
    first = _extract(resnet18, samples, cache_dir, pool="none", shard_rows=4)
    want = first.channel_stats["layer3"]
    want_mean, want_var = np.array(want.mean), np.array(want.var)
    # Make it an entry from before featcache stored the statistics.
    manifest_file = first.path / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    del manifest["layers"]["layer3"]["channel_stats"]
    manifest_file.write_text(json.dumps(manifest))
    shutil.rmtree(first.path / "features" / "channel_stats")
    assert FeatureCache(cache_dir).open(first.key).channel_stats == {}

    calls = []
    hook = resnet18.model.register_forward_pre_hook(lambda *_: calls.append(1))
    again = _extract(resnet18, samples, cache_dir, pool="none", shard_rows=4)
    hook.remove()
    assert again.hit and calls == []  # no forward pass: the statistics come from the stored maps
    np.testing.assert_array_equal(np.array(again.channel_stats["layer3"].mean), want_mean)
    np.testing.assert_array_equal(np.array(again.channel_stats["layer3"].var), want_var)
    assert FeatureCache(cache_dir).verify(again.key) == []
    assert FeatureCache(cache_dir).add_channel_stats(again.key) == []  # nothing left to add


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
