"""Extraction: configs, pooling, resume after a crash, bad-image policies, splits and workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, direct_features, write_tree
from featcache._util import FeatcacheError
from featcache.backbones.registry import Backbone
from featcache.cache.store import FeatureCache
from featcache.data.datasets import load_dataset
from featcache.data.samples import ArraySamples, BadImageError
from featcache.extract.build import extract, extract_splits
from featcache.extract.config import ExtractConfig, View, Views, parse_layers
from featcache.extract.pooling import pool_features

SIZE = (32, 32)
LAYERS = ("layer3", "penultimate")


def _config(**kw: object) -> ExtractConfig:
    base = {"input_size": SIZE, "device": "cpu", "batch_size": 4}
    return ExtractConfig(**{**base, **kw})  # type: ignore[arg-type]


class RowCounter:
    """Counts the images that go through the model's forward (a pre-hook on the root module)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.rows = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, _m: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self.rows += len(inputs[0])

    def __enter__(self) -> RowCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def _assert_same_entry(a, b) -> None:
    assert a.ids == b.ids
    assert np.array_equal(a.labels, b.labels)
    assert set(a.features) == set(b.features)
    for layer in a.features:
        assert a.features[layer].dtype == b.features[layer].dtype
        assert np.array_equal(a.features[layer], b.features[layer]), layer


# --------------------------------------------------------------------------- config and pooling


def test_extract_config_validation() -> None:
    assert parse_layers("layer2,layer3") == ("layer2", "layer3")
    with pytest.raises(ValueError) as info:
        ExtractConfig(pool="mean")
    assert "'mean'" in str(info.value) and "avg" in str(info.value)
    with pytest.raises(ValueError) as info:
        ExtractConfig(dtype="fp16")
    assert "'fp16'" in str(info.value) and "'float16'" in str(info.value)
    with pytest.raises(ValueError, match="'skip'"):
        ExtractConfig(on_bad_image="skp")
    with pytest.raises(ValueError, match="batch size"):
        ExtractConfig(batch_size=0)


def test_pool_features_against_torch() -> None:
    x = torch.randn(3, 5, 4, 6)
    assert torch.allclose(pool_features(x, "avg"), torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))
    assert torch.equal(pool_features(x, "max"), torch.nn.functional.adaptive_max_pool2d(x, 1).flatten(1))
    assert torch.equal(pool_features(x, "flatten"), x.reshape(3, -1))
    assert torch.equal(pool_features(x, "none"), x)
    tokens = torch.randn(3, 7, 8)  # (N, L, D) from a transformer
    assert torch.allclose(pool_features(tokens, "avg"), tokens.mean(1))
    assert torch.equal(pool_features(tokens, "max"), tokens.max(1).values)
    flat = torch.randn(3, 8)
    assert all(torch.equal(pool_features(flat, p), flat) for p in ("avg", "max", "flatten", "none"))


# --------------------------------------------------------------------------- extraction paths


def test_fx_hooks_and_workers_store_the_same_numbers(resnet18: Backbone, tmp_path: Path) -> None:
    write_tree(tmp_path / "tree" / "train", per_class=5)
    train = load_dataset(str(tmp_path / "tree"), val_fraction=0.0).train
    ref = direct_features(resnet18, [train.load(i) for i in range(len(train))], SIZE, ("layer2", "layer3"))
    runs = {}
    for name, kw in {"hooks": {"method": "hooks"}, "fx": {"method": "fx"}, "workers": {"workers": 2}}.items():
        runs[name] = extract(
            resnet18,
            train,
            ("layer2", "layer3"),
            _config(**kw),
            cache_dir=str(tmp_path / name),
            progress=False,
        )
        assert runs[name].manifest["method"] == ("fx" if name == "fx" else "hooks")
        for layer in ("layer2", "layer3"):
            assert np.abs(runs[name].features[layer] - ref[layer]).max() <= 1e-5, (name, layer)
    assert len({r.key for r in runs.values()}) == 1  # the method and workers are not part of the key


def test_automatic_shard_size(resnet18: Backbone, tmp_path: Path) -> None:
    write_tree(tmp_path / "tree" / "train", per_class=3)
    train = load_dataset(str(tmp_path / "tree"), val_fraction=0.0).train
    cached = extract(resnet18, train, LAYERS, _config(), cache_dir=str(tmp_path / "c"), progress=False)
    # 64 MB would hold the whole set; shards are capped at an eighth of it but not below one batch (4).
    assert len(train) == 9 and cached.manifest["record"]["shard_rows"] == 4
    assert cached.manifest["block_rows"] == [4, 4, 1]
    assert cached.manifest["rows_extracted_this_run"] == len(train)
    many = ArraySamples(np.zeros((100, 20, 20, 3), np.uint8), np.arange(100) % 2, ["a", "b"], name="zeros")
    big = extract(resnet18, many, LAYERS, _config(), cache_dir=str(tmp_path / "c"), progress=False)
    assert big.manifest["record"]["shard_rows"] == 13 and len(big.manifest["block_rows"]) == 8


def test_extract_splits(resnet18: Backbone, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    write_tree(root / "train", per_class=4, seed=0)
    write_tree(root / "val", per_class=2, seed=1)
    write_tree(root / "test", per_class=2, seed=2)
    splits = load_dataset(str(root))
    out = extract_splits(resnet18, splits, LAYERS, _config(), cache_dir=str(tmp_path / "c"), progress=False)
    assert list(out) == ["train", "val", "test"]
    assert [len(out[s]) for s in out] == [12, 6, 6]
    assert len({c.key for c in out.values()}) == 3
    for name, samples in splits.items():
        assert out[name].ids == samples.ids and out[name].manifest["record"]["split"] == name
        ref = direct_features(resnet18, [samples.load(i) for i in range(len(samples))], SIZE, LAYERS)
        assert np.abs(out[name].features["penultimate"] - ref["penultimate"]).max() <= 1e-5


# --------------------------------------------------------------------------- crash safety


CRASH_SCRIPT = """
import sys, time
from featcache import ExtractConfig, extract, load_backbone, load_dataset
bb = load_backbone("torchvision:resnet18", weights="none")  # seeded: the same weights as the test's
bb.model.conv1.register_forward_pre_hook(lambda m, i: time.sleep(0.3))  # slow, weights unchanged
train = load_dataset(sys.argv[1], val_fraction=0.0).train
cfg = ExtractConfig(input_size=(32, 32), device="cpu", batch_size=4, shard_rows=8)
extract(bb, train, ["layer3", "penultimate"], cfg, cache_dir=sys.argv[2], progress=False)
print("finished")
"""


@pytest.mark.slow
def test_killed_extraction_resumes_without_redoing_finished_shards(
    resnet18: Backbone, tmp_path: Path
) -> None:
    write_tree(tmp_path / "tree" / "train", classes=("a", "b", "c", "d"), per_class=9)  # 36 rows: 5 shards
    train = load_dataset(str(tmp_path / "tree"), val_fraction=0.0).train
    n = len(train)
    cache_dir = tmp_path / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASH_SCRIPT, str(tmp_path / "tree"), str(cache_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(cache_dir.glob("*/shards/00000.json")):
            assert proc.poll() is None, (
                f"extraction ended before its first shard: {proc.stderr.read()[-2000:]}"
            )
            assert time.monotonic() < deadline, "no shard marker within 120 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    (entry,) = [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    key = entry.name
    cache = FeatureCache(cache_dir)
    with pytest.raises(ValueError, match="partial"):
        cache.open(key)
    assert cache.info(key)["status"] == "partial"
    done = len(list((entry / "shards").glob("*.json")))
    assert 1 <= done < 5, done

    with RowCounter(resnet18.model) as counter:
        resumed = extract(
            resnet18, train, LAYERS, _config(shard_rows=8), cache_dir=str(cache_dir), progress=False
        )
    assert resumed.key == key
    assert counter.rows == n - 8 * done
    assert resumed.manifest["rows_extracted_this_run"] == n - 8 * done
    assert resumed.manifest["block_rows"] == [8, 8, 8, 8, 4]
    assert cache.verify(key) == []
    assert not (entry / "shards").exists()

    fresh = extract(
        resnet18, train, LAYERS, _config(shard_rows=8), cache_dir=str(tmp_path / "fresh"), progress=False
    )
    assert fresh.key == key and fresh.manifest["rows_extracted_this_run"] == n
    _assert_same_entry(resumed, fresh)
    assert resumed.ids == train.ids


# --------------------------------------------------------------------------- bad images


def _tree_with_a_bad_image(root: Path, kind: str) -> Path:
    write_tree(root / "train", classes=("a", "b", "c", "d"), per_class=6)
    bad = root / "train" / "c" / "x.png"  # sorted after c/05: row 18 of 25
    if kind == "random":
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    else:
        bad = bad.with_suffix(".jpg")
        good = (root / "train" / "c" / "01.jpg").read_bytes()
        bad.write_bytes(good[: len(good) // 2])  # a truncated JPEG
    return bad


@pytest.mark.parametrize("kind", ["random", "truncated"])
def test_bad_image_error_names_the_file_and_keeps_finished_shards(
    resnet18: Backbone, tmp_path: Path, kind: str
) -> None:
    bad = _tree_with_a_bad_image(tmp_path / "tree", kind)
    train = load_dataset(str(tmp_path / "tree"), val_fraction=0.0).train
    bad_row = train.ids.index("c/" + bad.name)
    assert bad_row == 18
    cache_dir = tmp_path / "cache"
    with pytest.raises(BadImageError) as info:
        extract(resnet18, train, LAYERS, _config(shard_rows=4), cache_dir=str(cache_dir), progress=False)
    assert str(bad) in str(info.value) and "skip" in str(info.value)
    (entry,) = [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    markers = sorted(p.name for p in (entry / "shards").glob("*.json"))
    assert markers == [f"{i:05d}.json" for i in range(bad_row // 4)]  # shards 0-3 finished before row 18

    # the policy is not part of the key: skipping resumes the same entry
    with RowCounter(resnet18.model) as counter:
        skipped = extract(
            resnet18,
            train,
            LAYERS,
            _config(shard_rows=4, on_bad_image="skip"),
            cache_dir=str(cache_dir),
            progress=False,
        )
    assert skipped.path == entry
    assert counter.rows == len(train) - 16
    assert skipped.manifest["rows_extracted_this_run"] == len(train) - 16
    assert len(skipped) == len(train) - 1
    assert "c/" + bad.name not in skipped.ids
    assert skipped.ids == [i for i in train.ids if i != "c/" + bad.name]
    assert [s["id"] for s in skipped.manifest["skipped"]] == ["c/" + bad.name]
    assert skipped.manifest["skipped"][0]["reason"]
    good_rows = [i for i in range(len(train)) if i != bad_row]
    assert np.array_equal(skipped.labels, train.labels[good_rows])
    ref = direct_features(resnet18, [train.load(i) for i in good_rows], SIZE, LAYERS)
    for layer in LAYERS:
        assert np.abs(skipped.features[layer] - ref[layer]).max() <= 1e-5
    assert FeatureCache(cache_dir).verify(skipped.key) == []

    # an uninterrupted skipping run into another cache stores the same entry
    again = extract(
        resnet18,
        train,
        LAYERS,
        _config(shard_rows=4, on_bad_image="skip"),
        cache_dir=str(tmp_path / "c2"),
        progress=False,
    )
    _assert_same_entry(skipped, again)


def test_a_shard_of_only_bad_images(resnet18: Backbone, tmp_path: Path) -> None:
    write_tree(tmp_path / "tree" / "train", classes=("a", "b"), per_class=2)
    for name in ("x1.png", "x2.png"):
        (tmp_path / "tree" / "train" / "b" / name).write_bytes(b"not an image at all")
    train = load_dataset(
        str(tmp_path / "tree"), val_fraction=0.0
    ).train  # rows: a/00 a/01 b/00 b/01 b/x1 b/x2
    cached = extract(
        resnet18,
        train,
        LAYERS,
        _config(shard_rows=2, batch_size=2, on_bad_image="skip"),
        cache_dir=str(tmp_path / "c"),
        progress=False,
    )
    assert cached.ids == ["a/00.png", "a/01.jpg", "b/00.png", "b/01.jpg"]
    assert cached.manifest["block_rows"] == [2, 2, 0]
    assert [s["id"] for s in cached.manifest["skipped"]] == ["b/x1.png", "b/x2.png"]
    assert cached.features["layer3"].shape == (4, 256)
    assert FeatureCache(tmp_path / "c").verify(cached.key) == []


def test_decode_workers_default_to_none_on_cpu_and_share_the_cores_on_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from featcache.extract.extractor import decode_workers

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert decode_workers(None, cpu) == 0 and decode_workers(3, cpu) == 3 and decode_workers(0, cuda) == 0
    monkeypatch.setattr("os.cpu_count", lambda: 32)
    assert decode_workers(None, cuda) == 8  # half of 32, capped at 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four torchrun ranks on this node share the cores
    assert decode_workers(None, cuda) == 4
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert decode_workers(None, cuda) == 1


def test_augmented_views_are_deterministic_cached_entries(resnet18: Backbone, tmp_path: Path) -> None:
    from featcache.extract.build import cache_record, extract_views

    write_tree(tmp_path / "tree" / "train", classes=("a", "b"), per_class=6)
    train = load_dataset(str(tmp_path / "tree"), val_fraction=0.0).train
    cfg = _config()
    one, two = extract_views(
        resnet18, train, LAYERS, Views(2, "flip,crop"), cfg, cache_dir=str(tmp_path / "c"), progress=False
    )
    plain = extract(resnet18, train, LAYERS, cfg, cache_dir=str(tmp_path / "c"), progress=False)
    keys = {one.key, two.key, plain.key}
    assert (
        len(keys) == 3
        and one.manifest["record"]["view"] == 1
        and two.manifest["record"]["augment"] == "flip,crop"
    )
    a, b, p = (f.tensor("layer3") for f in (one, two, plain))
    assert not torch.allclose(a, b) and not torch.allclose(a, p)  # the views differ from each other
    assert FeatureCache(tmp_path / "c").info(two.key)["split"] == "train@view2"  # as `cache ls` shows it
    # A view is the same random draw per sample in any process: rebuilt with 2 decoding workers.
    again = extract(
        resnet18,
        train,
        LAYERS,
        _config(workers=2),
        cache_dir=str(tmp_path / "d"),
        progress=False,
        view=View(1, "flip,crop"),
    )
    assert again.key == one.key
    torch.testing.assert_close(again.tensor("layer3"), a)
    # View 0 (no augmentation) keeps the key it had before views existed: no "augment" in its record.
    assert "augment" not in cache_record(resnet18, train, LAYERS, cfg, "train")
    assert (
        plain.key
        == extract(resnet18, train, LAYERS, _config(), cache_dir=str(tmp_path / "c"), progress=False).key
    )
    assert (
        one.manifest["record"]["augment_version"] >= 1 and plain.manifest["extract_config"]["augment"] is None
    )
    with pytest.raises(ValueError, match="--augment"):
        Views(2, "")
    with pytest.raises(ValueError, match="unknown augmentation"):
        Views(1, "rotate")
    with pytest.raises(ValueError, match="names no augmentation"):
        Views(1, " , ")
    with pytest.raises(ValueError, match="0 or more, got -1"):
        Views.parse(-1, "flip")
    assert Views(1, " flip,,flip").augment == "flip"  # one spelling, one key


def test_an_empty_split_is_named_before_anything_is_written(resnet18: Backbone, tmp_path: Path) -> None:
    empty = ArraySamples(np.zeros((0, 8, 8, 3), np.uint8), np.zeros(0, np.int64), ["a"], name="none")
    with pytest.raises(FeatcacheError, match=r"the val split of .none. holds no samples.*--limit"):
        extract(
            resnet18, empty, LAYERS, _config(), cache_dir=str(tmp_path / "c"), split="val", progress=False
        )
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


# --------------------------------------------------------------------------- layouts


def _hooked(model: torch.nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Plain forward hooks: each module's first output."""
    out: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(lambda _m, _i, o, n=n: out.setdefault(n, o.clone()))
        for n in names
    ]
    with torch.inference_mode():
        model(x)
    for h in handles:
        h.remove()
    return out


def test_channels_last_maps_pool_and_store_statistics_over_their_positions(tmp_path: Path) -> None:
    """swin_t's ``features.*`` are (N, H, W, C): pooled to (C,), channel statistics per C (the issue:
    ``features.5 [4]``, the mean over W and C)."""
    from featcache.backbones.registry import load_backbone
    from featcache.data.preprocess import to_model_input

    swin = load_backbone("torchvision:swin_t", weights="none")
    rng = np.random.default_rng(0)
    samples = ArraySamples(rng.integers(0, 256, (5, 40, 40, 3), dtype=np.uint8), np.arange(5) % 2, ["a", "b"])
    x = torch.stack([to_model_input(samples.load(i), swin.cfg.with_input_size(64, 64)) for i in range(5)])
    ref = _hooked(swin.model, ["features.5", "features.7"], x)
    config = _config(input_size=(64, 64), shard_rows=2, batch_size=3)
    pooled = extract(swin, samples, ["features.5"], config, cache_dir=str(tmp_path), progress=False)
    assert pooled.features["features.5"].shape == (5, 384) and pooled.layouts == {"features.5": "NC"}
    assert pooled.manifest["layer_layouts"] == {"features.5": "NHWC"}
    np.testing.assert_allclose(pooled.features["features.5"], ref["features.5"].mean((1, 2)), atol=1e-5)
    maps = extract(
        swin,
        samples,
        ["features.5", "features.7"],
        replace(config, pool="none"),
        cache_dir=str(tmp_path),
        progress=False,
    )
    assert maps.layouts == {"features.5": "NHWC", "features.7": "NHWC"}
    for name in ("features.5", "features.7"):
        np.testing.assert_allclose(maps.features[name], ref[name], atol=1e-5)
        var, mean = torch.var_mean(ref[name], dim=(1, 2), correction=0)
        np.testing.assert_allclose(maps.channel_stats[name].mean, mean, atol=1e-5)
        np.testing.assert_allclose(maps.channel_stats[name].var, var, atol=1e-4)
    assert FeatureCache(tmp_path).verify(maps.key) == []


def test_layers_that_cannot_be_extracted_or_pooled_say_why(tmp_path: Path) -> None:
    from featcache.backbones.registry import load_backbone

    samples = ArraySamples(np.zeros((2, 32, 32, 3), dtype=np.uint8), np.arange(2), ["a", "b"])
    levit = load_backbone("timm:levit_128s", weights="none", input_size=(64, 64))
    cfg = _config(input_size=(64, 64))
    with pytest.raises(
        FeatcacheError, match=r"'stages.0.blocks.0.attn.qkv.bn' .* first axis is not the batch"
    ):
        extract(
            levit, samples, ["stages.0.blocks.0.attn.qkv.bn"], cfg, cache_dir=str(tmp_path), progress=False
        )
    vit = load_backbone("timm:vit_tiny_patch16_224", weights="none", input_size=(64, 64))
    with pytest.raises(FeatcacheError, match=r"cannot avg-pool layer 'patch_embed'.* --pool none"):
        extract(vit, samples, ["patch_embed"], cfg, cache_dir=str(tmp_path), progress=False)
    kept = extract(
        vit, samples, ["patch_embed"], replace(cfg, pool="none"), cache_dir=str(tmp_path), progress=False
    )
    assert kept.features["patch_embed"].shape == (2, 16, 192) and kept.layouts == {"patch_embed": None}
    assert kept.channel_stats == {}
    two_heads = extract(levit, samples, ["penultimate"], cfg, cache_dir=str(tmp_path), progress=False)
    assert two_heads.features["penultimate"].shape == (2, 384)
