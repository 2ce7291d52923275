"""Extraction on the feature store: configs, pooling, only the missing rows through the backbone (relabels,
resplits, added images, other datasets, duplicates), SIGKILLs at random moments, bad input, workers."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import direct_features, png_header, random_image, run_python, write_tree
from featcache._util import FeatcacheError
from featcache.backbones.registry import Backbone
from featcache.cache.splits import CachedFeatures
from featcache.cache.store import FeatureCache
from featcache.data.datasets import load_dataset
from featcache.data.digests import CTIME_TICK_NS, SampleChangedError
from featcache.data.samples import ArraySamples, BadImageError
from featcache.extraction import extractor as extractor_module
from featcache.extraction.build import extract, extract_splits
from featcache.extraction.config import ExtractConfig, View, Views, parse_layers
from featcache.extraction.extractor import Extractor
from featcache.layout import pool_features

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


def _segment_rows(cache_dir: Path, key: str) -> list[int]:
    return [s.rows for s in FeatureCache(cache_dir).open(key).index().segments]


def _rows_by_digest(cache_dir: Path, key: str) -> dict[str, dict[str, bytes]]:
    """``{digest: {layer (or layer.mean / layer.var): the row's bytes}}`` of every row of a table."""
    table = FeatureCache(cache_dir).open(key)
    index = table.index()
    digests = table.digests(index)
    feats, stats = table.view(index, digests, table.layers)
    arrays = {k: np.asarray(v) for k, v in feats.items()}
    arrays |= {f"{k}.{s}": np.asarray(v) for k, d in stats.items() for s, v in d.items()}
    return {d: {k: a[i].tobytes() for k, a in arrays.items()} for i, d in enumerate(digests)}


def _backdate(root: Path, seconds: float = 3600) -> None:
    """Files written ``seconds`` ago: a dataset folder that is not brand new (see digests.RACY_NS)."""
    t = time.time() - seconds
    for f in root.rglob("*"):
        os.utime(f, (t, t))
    # utime sets the ctime to now: a file whose status changed within a timestamp tick of its hashing
    # is hashed again next time (digests.CTIME_TICK_NS), so let a tick pass
    time.sleep(2 * CTIME_TICK_NS / 1e9)


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
    with pytest.raises(ValueError, match=r"--batch-size 0 \(batch_size=0\) must be a whole number >= 1"):
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
    assert len(train) == 9 and _segment_rows(tmp_path / "c", cached.key) == [4, 4, 1]
    assert cached.manifest["rows_extracted_this_run"] == len(train)
    rng = np.random.default_rng(0)
    many = ArraySamples(rng.integers(0, 255, (100, 20, 20, 3), np.uint8), np.arange(100) % 2, ["a", "b"])
    big = extract(resnet18, many, LAYERS, _config(), cache_dir=str(tmp_path / "c"), progress=False)
    # An eighth is 13 rows, rounded up to whole batches of 4: shards of 16.
    assert _segment_rows(tmp_path / "c", big.key) == [4, 4, 1] + [16] * 6 + [4]


def test_extract_splits(resnet18: Backbone, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    write_tree(root / "train", per_class=4, seed=0)
    write_tree(root / "val", per_class=2, seed=1)
    write_tree(root / "test", per_class=2, seed=2)
    splits = load_dataset(str(root))
    out = extract_splits(resnet18, splits, LAYERS, _config(), cache_dir=str(tmp_path / "c"), progress=False)
    assert list(out) == ["train", "val", "test"]
    assert [len(out[s]) for s in out] == [12, 6, 6]
    assert len({c.key for c in out.values()}) == 1  # one table: splits are views over its rows
    assert len({c.split_key for c in out.values()}) == 3
    for name, samples in splits.items():
        assert out[name].ids == samples.ids and out[name].manifest["split"] == name
        ref = direct_features(resnet18, [samples.load(i) for i in range(len(samples))], SIZE, LAYERS)
        assert np.abs(out[name].features["penultimate"] - ref["penultimate"]).max() <= 1e-5


# --------------------------------------------------------------------------- only the missing rows


def _tree_extract(root: Path, cache: Path, **kw: object):
    """Every split of the ImageFolder at ``root``, counting the images through the backbone."""
    from featcache.backbones.registry import load_backbone

    bb = load_backbone("torchvision:resnet18", weights="none")
    splits = load_dataset(str(root), **kw)  # type: ignore[arg-type]
    with RowCounter(bb.model) as counter:
        out = extract_splits(bb, splits, LAYERS, _config(), cache_dir=str(cache), progress=False)
    return out, counter.rows


def _row_bytes(*splits) -> dict[str, dict[str, bytes]]:
    """``{digest: {layer: row bytes}}`` over splits (of any datasets)."""
    out: dict[str, dict[str, bytes]] = {}
    for f in splits:
        arrays = {layer: np.asarray(f.features[layer]) for layer in LAYERS}
        for i, d in enumerate(f.digests):
            out[d] = {layer: a[i].tobytes() for layer, a in arrays.items()}
    return out


def _same_rows(split, reference: dict[str, dict[str, bytes]]) -> None:
    """Every row of ``split`` holds the bytes ``reference`` holds for its digest."""
    assert _row_bytes(split).items() <= reference.items()


def test_relabel_and_resplit_run_no_image_through_the_backbone(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    write_tree(root, classes=("a", "b", "c"), per_class=10)
    _backdate(root)
    first, n = _tree_extract(root, tmp_path / "c")
    assert n == 30 + 1  # every image once, plus a 1-image probe sizing the shards (memoised: once)
    counts = [(f.rows, f.from_cache, f.extracted) for f in first.values()]
    assert counts == [(len(s), 0, len(s)) for _, s in load_dataset(str(root)).items()]
    assert sum(c[0] for c in counts) == 30
    reference = _row_bytes(*first.values())
    # A label fix: one file moves to another class folder.
    os.rename(root / "a" / "00.png", root / "c" / "00.png")
    relabelled, n = _tree_extract(root, tmp_path / "c")
    assert n == 0 and all(f.extracted == 0 and f.from_cache == f.rows for f in relabelled.values())
    (split,) = [f for f in relabelled.values() if "c/00.png" in f.ids]
    assert split.labels[split.ids.index("c/00.png")] == 2
    # Another val fraction, another split seed: other splits, the same rows.
    for kw in ({"val_fraction": 0.2}, {"seed": 7}):
        resplit, n = _tree_extract(root, tmp_path / "c", **kw)
        assert n == 0 and all(f.hit for f in resplit.values()), kw
        assert resplit["train"].ids != relabelled["train"].ids
        for f in resplit.values():
            _same_rows(f, reference)


def test_added_images_are_the_only_ones_through_the_backbone(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    write_tree(root / "train", classes=("a", "b"), per_class=50)
    _backdate(root)
    first, n = _tree_extract(root, tmp_path / "c", val_fraction=0.0)
    assert n == 100 + 1
    rng = np.random.default_rng(99)
    random_image(rng).save(root / "train" / "a" / "new.png")
    random_image(rng).save(root / "train" / "b" / "new.png")
    again, n = _tree_extract(root, tmp_path / "c", val_fraction=0.0)
    train = again["train"]
    assert n == 2 + 1 and (train.rows, train.from_cache, train.extracted) == (102, 100, 2)
    new = [train.ids.index("a/new.png"), train.ids.index("b/new.png")]
    samples = load_dataset(str(root), val_fraction=0.0).train
    ref = direct_features(load_backbone_none(), [samples.load(i) for i in new], SIZE, LAYERS)
    for layer in LAYERS:
        assert np.abs(train.features[layer][new] - ref[layer]).max() <= 1e-5
    old = [i for i in range(102) if i not in new]
    assert _row_bytes(first["train"]) == {train.digests[i]: _row_bytes(train)[train.digests[i]] for i in old}


def load_backbone_none() -> Backbone:
    from featcache.backbones.registry import load_backbone

    return load_backbone("torchvision:resnet18", weights="none")


def test_another_dataset_over_the_same_images_runs_no_forward_pass(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    files = write_tree(root / "train", classes=("a", "b", "c"), per_class=6)
    _backdate(root)
    first, n = _tree_extract(root, tmp_path / "c", val_fraction=0.0)
    assert n == 18 + 1
    # A subset in another folder, relabelled into two classes (copies: other paths, other mtimes).
    copy = tmp_path / "copy"
    for i, f in enumerate(files[::2]):
        dest = copy / "train" / ("even" if i % 2 == 0 else "odd") / f"img{i}{f.suffix}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
    other, n = _tree_extract(copy, tmp_path / "c", val_fraction=0.0)
    train = other["train"]
    assert n == 0 and train.hit and train.rows == 9 and train.classes == ["even", "odd"]
    _same_rows(train, _row_bytes(first["train"]))
    # A CSV manifest naming the same files with other labels: a view again.
    (tmp_path / "labels.csv").write_text(
        "path,label\n" + "".join(f"{f.relative_to(tmp_path)},{'xy'[i % 2]}\n" for i, f in enumerate(files))
    )
    from featcache.backbones.registry import load_backbone

    bb = load_backbone("torchvision:resnet18", weights="none")
    csv = load_dataset(str(tmp_path / "labels.csv"), val_fraction=0.0, test_fraction=0.0).train
    with RowCounter(bb.model) as counter:
        view = extract(bb, csv, LAYERS, _config(), cache_dir=str(tmp_path / "c"), progress=False)
    assert counter.rows == 0 and view.rows == 18 and view.key == first["train"].key
    _same_rows(view, _row_bytes(first["train"]))


def test_duplicated_files_are_extracted_once_and_both_ids_kept(resnet18: Backbone, tmp_path: Path) -> None:
    root = tmp_path / "tree" / "train"
    files = write_tree(root, classes=("a", "b"), per_class=3)
    shutil.copyfile(files[0], root / "b" / "same-as-a00.png")  # the same bytes under another class
    train = load_dataset(str(tmp_path / "tree"), val_fraction=0.0).train
    with RowCounter(resnet18.model) as counter:
        cached = extract(resnet18, train, LAYERS, _config(), cache_dir=str(tmp_path / "c"), progress=False)
    assert counter.rows == 6 + 1  # 7 files, 6 distinct images, and the 1-image shard-size probe
    i, j = cached.ids.index("a/00.png"), cached.ids.index("b/same-as-a00.png")
    assert cached.rows == 7 and cached.labels[i] == 0 and cached.labels[j] == 1
    assert cached.digests[i] == cached.digests[j]
    for layer in LAYERS:
        assert np.array_equal(cached.features[layer][i], cached.features[layer][j])
    assert sum(s.rows for s in FeatureCache(tmp_path / "c").open(cached.key).index().segments) == 6


def test_an_unchanged_folder_is_served_without_reading_a_file(
    resnet18: Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import featcache.data.digests as digests_mod
    from featcache.data.samples import FileSamples

    write_tree(tmp_path / "tree" / "train", per_class=8)
    _backdate(tmp_path / "tree")

    def run() -> CachedFeatures:  # the folder listed anew, as a new process would
        train = load_dataset(str(tmp_path / "tree"), val_fraction=0.0).train
        return extract(resnet18, train, LAYERS, _config(), cache_dir=str(tmp_path / "c"), progress=False)

    first = run()
    reads: list[str] = []
    real_hash, real_load = digests_mod.hash_file, FileSamples.load_checked
    monkeypatch.setattr(digests_mod, "hash_file", lambda p: reads.append(p) or real_hash(p))
    monkeypatch.setattr(FileSamples, "load_checked", lambda s, i, d: reads.append(i) or real_load(s, i, d))
    monkeypatch.setattr(FileSamples, "load", lambda *a: reads.append(a) or None)
    again = run()
    assert reads == [] and again.hit and again.split_key == first.split_key


# --------------------------------------------------------------------------- crash safety


KILL_DRIVER = """
import json, os, random, signal, sys, time
import numpy as np, torch
torch.set_num_threads(1)  # no thread pool exists when the driver forks its children
from featcache import ExtractConfig, extract, load_backbone, load_dataset
from featcache.cache.store import FeatureCache
tree, cache_dir, want = sys.argv[1], sys.argv[2], int(sys.argv[3])
bb = load_backbone("torchvision:resnet18", weights="none")
bb.model.layer1.register_forward_pre_hook(lambda m, i: time.sleep(0.03))  # slow; weights unchanged
train = load_dataset(tree, val_fraction=0.0).train
cfg = ExtractConfig(input_size=(32, 32), device="cpu", batch_size=4, pool="none")
layers = ["layer3", "penultimate"]
ref = extract(bb, train, layers, cfg, cache_dir=f"{cache_dir}/ref", progress=False)  # uninterrupted
rng = random.Random(0)
kills, finals, rounds = [], [], 0
while sum(k["incomplete"] for k in kills) < want:
    folder = f"{cache_dir}/r{rounds}"
    while True:
        pid = os.fork()
        if pid == 0:  # the child: one extraction, killed at a random moment
            try:
                extract(bb, train, layers, cfg, cache_dir=folder, progress=False)
            finally:
                os._exit(0)
        delay = rng.uniform(0.0, 0.4)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        cache = FeatureCache(folder)
        keys = [t.key for t in cache.tables()]
        rows = sum(len(t.index().where) for t in cache.tables())
        problems = [p for k in keys for p in cache.verify(k)]
        done = rows == len(set(train.digests()))
        kills.append({"round": rounds, "delay": delay, "signalled": os.WIFSIGNALED(status), "rows": rows,
                      "incomplete": not done, "problems": problems, "keys": keys})
        if done or sum(k["incomplete"] for k in kills) >= want:
            break
    out = extract(bb, train, layers, cfg, cache_dir=folder, progress=False)  # the next run completes it
    finals.append({"folder": folder, "extracted": out.extracted, "rows": out.rows, "key": out.key})
    rounds += 1
print(json.dumps({"kills": kills, "finals": finals, "ref": ref.key, "n": len(train)}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="the driver forks the killed extractions")
def test_sigkill_at_random_moments_loses_no_committed_row(tmp_path: Path) -> None:
    write_tree(tmp_path / "tree" / "train", classes=("a", "b", "c", "d"), per_class=25)
    cache_dir = tmp_path / "cache"
    proc = run_python(KILL_DRIVER, str(tmp_path / "tree"), str(cache_dir), "20", timeout=540)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    kills, finals = result["kills"], result["finals"]
    assert sum(k["incomplete"] and k["signalled"] for k in kills) >= 20, kills
    for k in kills:
        assert k["problems"] == [], k  # after every kill, every committed file checks out
        assert len(k["keys"]) <= 1, k
    by_round: dict[int, list[int]] = {}
    for k in kills:
        by_round.setdefault(k["round"], []).append(k["rows"])
    assert all(rows == sorted(rows) for rows in by_round.values())  # committed rows are never lost
    reference = _rows_by_digest(cache_dir / "ref", result["ref"])
    assert len(reference) == result["n"]
    for final in finals:
        assert final["rows"] == result["n"] and final["key"] == result["ref"]
        got = _rows_by_digest(Path(final["folder"]), final["key"])
        assert got.keys() == reference.keys()
        for d, rows in reference.items():  # byte for byte, per digest, maps and channel statistics
            assert got[d] == rows, d
        assert FeatureCache(final["folder"]).verify(final["key"]) == []


# --------------------------------------------------------------------------- bad images


def _tree_with_a_bad_image(root: Path, kind: str) -> Path:
    write_tree(root / "train", classes=("a", "b", "c", "d"), per_class=6)
    bad = root / "train" / "c" / "x.png"  # sorted after c/05: row 18 of 25
    if kind == "random":
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        bad = bad.with_suffix(".jpg")
        good = (root / "train" / "c" / "01.jpg").read_bytes()
        bad.write_bytes(good[: len(good) // 2])  # a truncated JPEG
    else:  # a sound PNG header and checksums but no pixel data: only decoding finds it
        bad.write_bytes(png_header(48, 40))
    return bad


@pytest.mark.parametrize("kind", ["random", "truncated", "no-pixels"])
def test_bad_image_error_names_the_file_and_keeps_the_good_rows(
    resnet18: Backbone, tmp_path: Path, kind: str
) -> None:
    bad = _tree_with_a_bad_image(tmp_path / "tree", kind)
    train = load_dataset(str(tmp_path / "tree"), val_fraction=0.0).train
    bad_row = train.ids.index("c/" + bad.name)
    assert bad_row == 18
    cache_dir = tmp_path / "cache"
    with RowCounter(resnet18.model) as counter, pytest.raises(BadImageError) as info:
        extract(resnet18, train, LAYERS, _config(shard_rows=4), cache_dir=str(cache_dir), progress=False)
    assert str(bad) in str(info.value) and "skip" in str(info.value)
    assert str(info.value).startswith("1 image(s) cannot be read")
    (entry,) = [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    # Each file is read once, while extracting: the readable images are committed, shard by shard, and
    # the unreadable one is recorded with its shard (its row left out) before the error names it.
    assert counter.rows >= len(train)  # (and the layer checks' probe batches, if not memoised yet)
    assert sum(_segment_rows(cache_dir, entry.name)) == len(train) - 1

    # the policy is not part of the key: skipping serves the same entry, and reads no image again
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
    assert counter.rows == 0 and skipped.manifest["images_extracted"] == 0 and skipped.hit
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
    # The table remembers the image as undecodable: with the error policy it is named again, with no read.
    with RowCounter(resnet18.model) as counter, pytest.raises(BadImageError, match=str(bad)):
        extract(resnet18, train, LAYERS, _config(shard_rows=4), cache_dir=str(cache_dir), progress=False)
    assert counter.rows == 0

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
    assert _segment_rows(tmp_path / "c", cached.key) == [2, 2, 0]
    assert [s["id"] for s in cached.manifest["skipped"]] == ["b/x1.png", "b/x2.png"]
    assert cached.features["layer3"].shape == (4, 256)
    assert FeatureCache(tmp_path / "c").verify(cached.key) == []


def test_a_file_changed_or_vanished_during_the_run_is_named_and_committed_rows_stay(
    resnet18: Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_mod = importlib.import_module("featcache.extraction.build")
    files = write_tree(tmp_path / "tree" / "train", classes=("a", "b"), per_class=8)
    train = load_dataset(str(tmp_path / "tree"), val_fraction=0.0).train
    seeds = iter(range(5, 100))

    def then_change(real):  # type: ignore[no-untyped-def]
        def hashed(*args, **kw):  # type: ignore[no-untyped-def]
            out = real(*args, **kw)
            # right after each hashing, the last image is rewritten: the mismatch found when it is
            # decoded makes the run hash it once more (#22), and it changes again
            random_image(np.random.default_rng(next(seeds))).save(files[-1])
            return out

        return hashed

    for name in ("file_digests", "folder_digests"):  # a scan's listing first, the paths when hashed again
        monkeypatch.setattr(build_mod.DigestMemo, name, then_change(getattr(build_mod.DigestMemo, name)))
    cfg = _config(shard_rows=4, on_bad_image="skip")  # not a bad image: skipping does not hide it
    with pytest.raises(SampleChangedError, match=f"{files[-1]}.*changed during this run"):
        extract(resnet18, train, LAYERS, cfg, cache_dir=str(tmp_path / "c"), progress=False)
    (key,) = FeatureCache(tmp_path / "c").entries()
    assert _segment_rows(tmp_path / "c", key) == [4, 4, 4]  # what was committed stays
    assert FeatureCache(tmp_path / "c").verify(key) == []
    monkeypatch.undo()
    # A file that vanishes between listing and hashing, or between hashing and decoding: named.
    listed = load_dataset(str(tmp_path / "tree"), val_fraction=0.0).train
    files[0].rename(tmp_path / "away.png")
    with pytest.raises(FileNotFoundError, match=str(files[0])):
        extract(resnet18, listed, LAYERS, cfg, cache_dir=str(tmp_path / "c"), progress=False)
    (tmp_path / "away.png").rename(files[0])
    hashed = load_dataset(str(tmp_path / "tree"), val_fraction=0.0).train
    hashed.digests()
    files[-1].rename(tmp_path / "away.png")
    # the decode finds it gone; hashed once more (#22), it is named as missing from the listed dataset
    with pytest.raises(FileNotFoundError, match=f"{files[-1]}.*listed in the dataset is missing"):
        extract(resnet18, hashed, LAYERS, cfg, cache_dir=str(tmp_path / "c"), progress=False)
    (tmp_path / "away.png").rename(files[-1])
    # The next run lists the folder anew and extracts only what no segment holds.
    with RowCounter(resnet18.model) as counter:
        done = extract(
            resnet18,
            load_dataset(str(tmp_path / "tree"), val_fraction=0.0).train,
            LAYERS,
            cfg,
            cache_dir=str(tmp_path / "c"),
            progress=False,
        )
    assert (done.rows, done.extracted) == (16, 4) and counter.rows == 4


def test_decode_workers_default_to_none_on_cpu_and_share_the_cores_on_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from featcache.extraction.extractor import decode_workers

    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert decode_workers(None, cpu) == 0 and decode_workers(3, cpu) == 3 and decode_workers(0, cuda) == 0
    monkeypatch.setattr("os.cpu_count", lambda: 32)
    assert decode_workers(None, cuda) == 8  # half of 32, capped at 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four torchrun ranks on this node share the cores
    assert decode_workers(None, cuda) == 4
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert decode_workers(None, cuda) == 1


def test_augmented_views_are_deterministic_cached_entries(resnet18: Backbone, tmp_path: Path) -> None:
    from featcache.extraction.build import cache_record, extract_views

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
    assert one.split_key != plain.split_key and one.digests == plain.digests
    a, b, p = (f.tensor("layer3") for f in (one, two, plain))
    assert not torch.allclose(a, b) and not torch.allclose(a, p)  # the views differ from each other
    assert FeatureCache(tmp_path / "c").info(two.key)["view"] == 2  # as `cache ls` shows it
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
    # ... and for the same image in any dataset: its randomness comes from its content and the view.
    other = extract(
        resnet18,
        train.subset([5, 0], "s"),
        LAYERS,
        cfg,
        cache_dir=str(tmp_path / "c"),
        progress=False,
        view=View(1, "flip,crop"),
    )
    assert other.hit and torch.equal(other.tensor("layer3"), a[[5, 0]])
    # View 0 (no augmentation) keeps the key it had before views existed: no "augment" in its record.
    assert "augment" not in cache_record(resnet18, LAYERS, cfg).to_json()
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
    with pytest.raises(ValueError, match=r"--views -1 \(views=-1\) must be a whole number >= 0"):
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


def test_the_library_expands_layer_sets_as_the_command_line_does(resnet18: Backbone, tmp_path: Path) -> None:
    write_tree(tmp_path / "tree" / "train", per_class=2)
    train = load_dataset(str(tmp_path / "tree"), val_fraction=0.0).train
    cached = extract(resnet18, train, "@blocks", _config(), cache_dir=str(tmp_path / "c"), progress=False)
    assert list(cached.features) == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)] + ["penultimate"]


def test_extractors_of_one_model_share_their_checks_until_its_structure_changes(
    resnet18: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe forwards run once per model, layers and settings; new weights keep the checks, a
    replaced module (another structure) is checked anew and gives its own, right shapes."""
    calls: list[tuple[str, ...]] = []
    real = extractor_module.check_layers

    def counted(backbone: Backbone, net: object, size: tuple[int, int], pool_: str) -> object:
        calls.append(tuple(net.layers))  # type: ignore[attr-defined]
        return real(backbone, net, size, pool_)  # type: ignore[arg-type]

    monkeypatch.setattr(extractor_module, "check_layers", counted)
    cfg = ExtractConfig(input_size=(32, 32), device="cpu")
    first = Extractor(resnet18, ["layer3"], cfg)
    assert first.row_shapes() == {"layer3": (256,)}
    with torch.no_grad():
        resnet18.model.layer3[0].conv1.weight.mul_(2)  # new weights, same structure
    again = Extractor(resnet18, ["layer3"], cfg)
    assert len(calls) == 1 and again.row_shapes() == {"layer3": (256,)}
    x, m = torch.rand(2, 3, 32, 32), resnet18.model
    stem = m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))
    torch.testing.assert_close(again(x)["layer3"], m.layer3(stem).mean((2, 3)))  # the new weights
    new = torch.nn.Sequential(torch.nn.Conv2d(128, 256, 3, stride=2, padding=1), torch.nn.AvgPool2d(2))
    resnet18.model.layer3 = new  # another structure: checked anew
    changed = Extractor(resnet18, ["layer3"], cfg)
    assert len(calls) == 2 and changed.row_shapes() == {"layer3": (256,)}
    torch.testing.assert_close(changed(x)["layer3"], new(stem).mean((2, 3)))


def test_a_refused_pool_leaves_no_empty_table_behind(resnet18: Backbone, tmp_path: Path) -> None:
    samples = ArraySamples(np.zeros((4, 8, 8), np.uint8), [0, 1, 0, 1])
    cfg = ExtractConfig(input_size=(32, 32), device="cpu", pool="cls")  # a token pool on a CNN map
    with pytest.raises(FeatcacheError, match="token layers"):
        extract(resnet18, samples, ["layer3"], cfg, cache_dir=str(tmp_path / "c"), progress=False)
    assert FeatureCache(tmp_path / "c").entries() == []


def test_a_shard_buffer_gives_the_rows_in_order_and_moves_them_to_the_host_in_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What a shard writes is the concatenation of its batches, every layer alike, whichever batches
    waited on the device; at most ~_DEVICE_BYTES wait there before moving into the shard's host array."""
    build_mod = importlib.import_module("featcache.extraction.build")
    batch_bytes = 4 * 8 * 4 + 4 * 6 * 4  # 4 float32 rows of an 8-wide and a 2x3 layer
    monkeypatch.setattr(build_mod, "_DEVICE_BYTES", 2 * batch_bytes)  # two batches wait, then move
    ex = SimpleNamespace(to_numpy=lambda t: t.numpy())
    buf = build_mod._ShardBuffer(ex, ["a", "b"], capacity=40)
    batches = [{"a": torch.randn(4, 8), "b": torch.randn(4, 2, 3)} for _ in range(7)]
    waited = []
    for batch in batches:
        buf.add(batch)
        waited.append(sum(len(v) for v in buf.waiting["a"]))
    assert max(waited) == 4 and buf.filled == 24  # three moves of two batches; the seventh still waits
    out = buf.take()
    for layer in ("a", "b"):
        assert np.array_equal(out[layer], torch.cat([b[layer] for b in batches]).numpy())
    assert buf.filled == 0 and buf.take() == {}
