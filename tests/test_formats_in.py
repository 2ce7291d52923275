"""Hugging Face ``datasets`` and WebDataset tar shards as data specs: the same images are the same rows
as in an ImageFolder (same digests, same accuracy, a cache hit), memoised per file version, checked."""

from __future__ import annotations

import importlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from featcache import (
    DataConfig,
    ExtractConfig,
    HeadSpec,
    RunSpec,
    TrainConfig,
    extract,
    load_backbone,
    load_dataset,
    train_run,
)
from featcache.cache.store import DIGEST_MEMO, FeatureCache
from featcache.data.digests import DigestMemo, SampleChangedError, bytes_digest
from featcache.data.versions import VERSION_MEMO
from test_distributed import assert_same_entries, torchrun

datasets = pytest.importorskip("datasets")
wds = importlib.import_module("featcache.data.webdataset")
hfd = importlib.import_module("featcache.data.hf_datasets")

Item = tuple[int, str, bytes]  # class, key, PNG bytes


def digit_pngs(n: int = 240) -> list[Item]:
    """The first ``n`` bundled digits as 24x24 PNGs, class-major (the order an ImageFolder lists them)."""
    d = load_digits()
    images, labels = (d.images * (255 / 16)).round().astype(np.uint8)[:n], d.target[:n]
    out = []
    for i in np.lexsort((np.arange(n), labels)):
        buf = io.BytesIO()
        Image.fromarray(images[i]).resize((24, 24)).save(buf, "PNG")
        out.append((int(labels[i]), f"{i:05d}", buf.getvalue()))
    return out


def write_folder(root: Path, items: Sequence[Item]) -> Path:
    for c, key, data in items:
        path = root / str(c) / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def write_tar(path: Path, members: Sequence[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    aged(path)
    return path


def aged(path: Path) -> None:
    """Date a file 10 s back: a file modified within 2 s of being read is read again (racily clean)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - 10**10))


def write_shards(folder: Path, items: Sequence[Item], count: int = 4, label: str = "cls") -> str:
    """``items`` as ``count`` shards ``digits-00000N.tar`` (contiguous, in order); the brace pattern."""
    per = -(-len(items) // count)
    for s in range(count):
        members = []
        for c, key, data in items[s * per : (s + 1) * per]:
            text = str(c) if label != "json" else json.dumps({"label": c, "url": "x"})
            members += [(f"{key}.png", data), (f"{key}.{label}", text.encode())]
        write_tar(folder / f"digits-{s:06d}.tar", members)
    return str(folder / f"digits-{{000000..{count - 1:06d}}}.tar")


def write_hf(folder: Path, items: Sequence[Item], splits: dict[str, slice] | None = None) -> Path:
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )

    def make(part: Sequence[Item]) -> object:
        rows = {"image": [{"bytes": b, "path": None} for _, _, b in part], "label": [c for c, _, _ in part]}
        return datasets.Dataset.from_dict(rows, features=features)

    ds = (
        make(items)
        if splits is None
        else datasets.DatasetDict({name: make(items[part]) for name, part in splits.items()})
    )
    ds.save_to_disk(str(folder))  # type: ignore[attr-defined]
    for f in folder.rglob("*.arrow"):
        aged(f)
    return folder


def assert_same_rows(reference: object, other: object) -> None:
    """Every split holds the same images (digests) with the same labels, in the same order."""
    for name in ("train", "val", "test"):
        ref, got = getattr(reference, name), getattr(other, name)
        assert got.digests() == ref.digests(), name
        assert got.labels.tolist() == ref.labels.tolist(), name
        assert [got.classes[i] for i in got.labels] == [ref.classes[i] for i in ref.labels]


def test_shards_and_a_saved_dataset_hold_the_folders_rows(tmp_path: Path) -> None:
    items = digit_pngs(120)
    folder = load_dataset(str(write_folder(tmp_path / "folder", items)))
    shards = load_dataset(write_shards(tmp_path / "shards", items), cache_dir=str(tmp_path / "c"))
    saved = load_dataset(str(write_hf(tmp_path / "hf", items)))
    assert_same_rows(folder, shards)
    assert_same_rows(folder, load_dataset(str(tmp_path / "shards")))  # a folder of shards
    assert_same_rows(folder, saved)
    assert shards.train.ids[0] == "digits-000000.tar/" + folder.train.ids[0].split("/")[1][:-4]
    first = items[0][2]
    assert shards.train.digests()[0] == bytes_digest(first) == folder.train.digests()[0]
    for s in (shards.train, saved.train):  # decoded from the bytes the digest names, checked
        np.testing.assert_array_equal(
            np.asarray(s.load_checked(0, s.digest(0))), np.asarray(folder.train.load(0))
        )


def test_train_on_shards_and_a_dataset_is_the_folders_run_and_a_cache_hit(tmp_path: Path) -> None:
    items = digit_pngs(240)
    specs = {
        "folder": str(write_folder(tmp_path / "folder", items)),
        "shards": write_shards(tmp_path / "shards", items),
        "hf": str(write_hf(tmp_path / "hf", items)),
    }
    acc, extracted = {}, {}
    for name, spec in [*specs.items(), ("shards again", specs["shards"]), ("hf again", specs["hf"])]:
        run = train_run(
            RunSpec(
                "torchvision:resnet18",
                DataConfig(spec),
                tmp_path / "runs" / name,
                weights="none",
                extract=ExtractConfig(input_size=(32, 32), batch_size=32, device="cpu"),
                train=TrainConfig(epochs=3, seed=0, device="cpu"),
                cache_dir=str(tmp_path / "cache"),
                progress=False,
            ),
            "avgpool",
            HeadSpec("linear"),
        )
        acc[name] = run.metrics.test.acc
        extracted[name] = sum(v.extracted for v in run.metrics.cache_rows.values())
    assert extracted["folder"] == len(items)
    assert {k: v for k, v in extracted.items() if k != "folder"} == dict.fromkeys(list(acc)[1:], 0)
    assert len(set(acc.values())) == 1, acc


def test_a_rerun_reads_no_shard_and_a_changed_shard_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = digit_pngs(80)
    spec = write_shards(tmp_path / "shards", items)
    cache = str(tmp_path / "c")
    first = load_dataset(spec, cache_dir=cache)
    assert (tmp_path / "c" / VERSION_MEMO).is_file()
    read: list[str] = []
    real = wds.read_shard

    def counted(path: Path) -> dict[str, object]:
        read.append(path.name)
        return real(path)

    monkeypatch.setattr(wds, "read_shard", counted)
    again = load_dataset(spec, cache_dir=cache)
    assert read == []  # every shard's index from the memo: no member read
    assert_same_rows(first, again)
    # Rewrite shard 2 with its first image replaced: only it is read again, and the row follows it.
    per = len(items) // 4
    moved = [(c, k, items[0][2] if j == 0 else b) for j, (c, k, b) in enumerate(items[2 * per : 3 * per])]
    write_tar(
        tmp_path / "shards" / "digits-000002.tar",
        [m for c, k, b in moved for m in ((f"{k}.png", b), (f"{k}.cls", str(c).encode()))],
    )
    changed = load_dataset(spec, cache_dir=cache)
    assert read == ["digits-000002.tar"]
    digests = dict(
        zip(
            changed.train.ids + changed.val.ids + changed.test.ids,
            changed.train.digests() + changed.val.digests() + changed.test.digests(),
        )
    )
    assert digests[f"digits-000002.tar/{moved[0][1]}"] == bytes_digest(items[0][2])


def test_a_member_changed_after_listing_is_refused_when_read(tmp_path: Path) -> None:
    items = digit_pngs(40)
    spec = write_shards(tmp_path / "shards", items, count=1)
    train = load_dataset(spec, cache_dir=str(tmp_path / "c")).train
    shard = tmp_path / "shards" / "digits-000000.tar"
    data = bytearray(shard.read_bytes())
    _, s = train.parent.rows[train.indices[0]]  # type: ignore[attr-defined]
    data[s.offset + 40] ^= 0xFF  # one byte of the first image's data, same size and place
    shard.write_bytes(bytes(data))
    with pytest.raises(SampleChangedError, match=r"digits-000000.tar:\d+\.png.*changed during this run"):
        train.load_checked(0, train.digest(0))


def test_shard_labels_from_txt_and_json_and_the_refusals(tmp_path: Path) -> None:
    items = digit_pngs(40)
    for label in ("txt", "json"):
        splits = load_dataset(write_shards(tmp_path / label, items, 2, label), cache_dir=str(tmp_path / "c"))
        assert splits.classes == [str(i) for i in range(10)]
        assert_same_rows(load_dataset(write_shards(tmp_path / f"{label}-cls", items, 2)), splits)
    both = tmp_path / "both"
    write_tar(both / "a.tar", [("k1.png", items[0][2]), ("k1.cls", b"0"), ("k1.txt", b"zero")])
    with pytest.raises(ValueError, match=r"2 kinds of label member \(KEY.cls, KEY.txt\).*--label-column cls"):
        load_dataset(str(both / "a.tar"))
    assert load_dataset(str(both / "a.tar"), label_column="txt", val_fraction=0, test_fraction=0).classes == [
        "zero"
    ]
    write_tar(both / "b.tar", [("k1.png", items[0][2]), ("k1.jpg", items[1][2]), ("k1.cls", b"0")])
    with pytest.raises(ValueError, match=r"'k1' has 2 images \(k1.png, k1.jpg\).*--image-column png"):
        load_dataset(str(both / "b.tar"))
    write_tar(both / "c.tar", [("k1.png", items[0][2]), ("k2.png", items[1][2]), ("k2.cls", b"1")])
    with pytest.raises(ValueError, match=r"1 samples have no label member KEY.cls \('k1'\)"):
        load_dataset(str(both / "c.tar"))
    with pytest.raises(
        ValueError, match=r"no label member KEY.json .*choose the label member they have: --label-column cls"
    ):
        load_dataset(str(tmp_path / "txt-cls"), label_column="json")
    write_tar(both / "d.tar", [("k1.png", items[0][2]), ("k1.cls", b"cat")])
    with pytest.raises(ValueError, match=r"k1.cls holds 'cat', not an integer class index"):
        load_dataset(str(both / "d.tar"))
    with pytest.raises(FileNotFoundError, match=r"'.*x-2.tar' \(2 of 3 exist\)"):
        write_tar(tmp_path / "x-0.tar", []), write_tar(tmp_path / "x-1.tar", [])
        load_dataset(str(tmp_path / "x-{0..2}.tar"))
    (tmp_path / "z.tar").write_bytes(b"\x1f\x8b" + b"\0" * 600)
    with pytest.raises(ValueError, match=r"not a plain \(uncompressed\) tar file"):
        load_dataset(str(tmp_path / "z.tar"))


def test_a_shard_folder_with_split_subfolders(tmp_path: Path) -> None:
    items = digit_pngs(120)
    train, test = items[::2], items[1::2]
    write_shards(tmp_path / "s" / "train", train, 2)
    write_shards(tmp_path / "s" / "test", test, 1)
    splits = load_dataset(str(tmp_path / "s"), cache_dir=str(tmp_path / "c"))
    assert len(splits.test) == len(test) and len(splits.train) + len(splits.val) == len(train)
    assert sorted(splits.test.digests()) == sorted(bytes_digest(b) for _, _, b in test)
    assert splits.test.ids[0].startswith("test/digits-000000.tar/")


def test_a_dataset_dicts_own_splits_and_a_dataset_object(tmp_path: Path) -> None:
    items = digit_pngs(120)
    saved = write_hf(
        tmp_path / "hf", items, {"train": slice(0, 80), "validation": slice(80, 100), "test": slice(100, 120)}
    )
    splits = load_dataset(str(saved))
    assert [len(s) for _, s in splits.items()] == [80, 20, 20]
    assert splits.val.digests() == [bytes_digest(b) for _, _, b in items[80:100]]
    in_memory = load_dataset(datasets.load_from_disk(str(saved)))
    assert_same_rows(splits, in_memory)


def test_a_rerun_over_a_saved_dataset_hashes_no_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = digit_pngs(60)
    saved = str(write_hf(tmp_path / "hf", items))
    memo = DigestMemo(tmp_path / "c" / DIGEST_MEMO)  # the version memo lives beside it
    first = load_dataset(saved, memo=memo).train.digests(memo)  # the seeded split reads them: one memo
    hashed: list[int] = []
    real = hfd.HFSamples._hash_stored

    def counted(self: object, progress: bool) -> list[str | None]:
        hashed.append(1)
        return real(self, progress)  # type: ignore[arg-type]

    monkeypatch.setattr(hfd.HFSamples, "_hash_stored", counted)
    assert load_dataset(saved, memo=memo).train.digests(memo) == first and hashed == []
    other = DigestMemo(tmp_path / "other" / DIGEST_MEMO)
    assert load_dataset(saved, memo=other).train.digests(other) == first
    assert hashed == [1]  # another cache root has no memo: hashed again, to the same digests


def test_a_dataset_storing_paths_is_keyed_by_the_files_bytes(tmp_path: Path) -> None:
    items = digit_pngs(60)
    folder = write_folder(tmp_path / "folder", items)
    files = sorted(str(p) for p in folder.rglob("*.png"))
    ds = datasets.Dataset.from_dict({"img": files, "digit": [int(Path(f).parent.name) for f in files]})
    ds = ds.cast_column("img", datasets.Image()).cast_column("digit", datasets.Value("int64"))
    splits = load_dataset(ds, label_column="digit")
    assert_same_rows(load_dataset(str(folder)), splits)


def test_dataset_columns_are_found_or_refused_by_name(tmp_path: Path) -> None:
    items = digit_pngs(20)
    rows = {
        "a": [{"bytes": b, "path": None} for _, _, b in items],
        "b": [{"bytes": b, "path": None} for _, _, b in items],
    }
    rows |= {"y": [c for c, _, _ in items], "z": [c % 2 for c, _, _ in items]}
    feats = datasets.Features(
        {
            "a": datasets.Image(),
            "b": datasets.Image(),
            "y": datasets.ClassLabel(names=[str(i) for i in range(10)]),
            "z": datasets.ClassLabel(names=["even", "odd"]),
        }
    )
    ds = datasets.Dataset.from_dict(rows, features=feats)
    with pytest.raises(ValueError, match=r"2 Image columns \(a, b\); choose one with --image-column a"):
        load_dataset(ds)
    with pytest.raises(ValueError, match=r"2 ClassLabel columns \(y, z\); choose one with --label-column y"):
        load_dataset(ds, image_column="b")
    with pytest.raises(
        ValueError,
        match=r"--image-column y .* is not an Image column; its columns: a \(Image\), b \(Image\), y \(Cl",
    ):
        load_dataset(ds, image_column="y")
    assert load_dataset(ds, image_column="b", label_column="z").classes == ["even", "odd"]


def test_misspelt_specs_and_options_name_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"'hf:' names Hugging Face models.*'hf-dataset:beans'"):
        load_dataset("hf:beans")
    write_folder(tmp_path / "f", digit_pngs(20))
    with pytest.raises(
        ValueError,
        match=r"--label-column y .*: columns are chosen in Hugging Face datasets and WebDataset shards only",
    ):
        load_dataset(str(tmp_path / "f"), label_column="y")
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # not installed
    with pytest.raises(ValueError, match=r"pip install 'featcache\[datasets\]'"):
        load_dataset("hf-dataset:beans")


def test_the_command_line_takes_the_column_options(tmp_path: Path) -> None:
    from featcache.cli.parser import build_parser

    a = build_parser().parse_args(
        ["extract", "torchvision:resnet18", "x", "--image-column", "img", "--label-column", "y"]
    )
    from featcache.cli.flags import from_args

    data = from_args(DataConfig, a)
    assert (data.image_column, data.label_column) == ("img", "y")


@pytest.mark.slow
@pytest.mark.parametrize("source", ["shards", "hf"])
def test_torchrun_over_shards_and_a_dataset_writes_the_table_one_process_would(
    tmp_path: Path, source: str
) -> None:
    items = digit_pngs(150)
    spec = (
        write_shards(tmp_path / "s", items) if source == "shards" else str(write_hf(tmp_path / "hf", items))
    )
    flags = ["--weights", "none", "--input-size", "32", "32", "--layers", "layer2,penultimate"]
    flags += ["--batch-size", "8", "-q", "--cache-dir", str(tmp_path / "sharded")]
    proc = torchrun("-m", "featcache", "extract", "torchvision:resnet18", spec, *flags)
    lines = [ln for ln in proc.stdout.splitlines() if "rows" in ln]
    assert len(lines) == 3 and all("0 from the cache" in ln for ln in lines), proc.stdout
    bb = load_backbone("torchvision:resnet18", weights="none")
    cfg = ExtractConfig(input_size=(32, 32), batch_size=8, device="cpu")
    splits = load_dataset(spec, cache_dir=str(tmp_path / "single"))
    reference = {
        name: extract(
            bb, s, ["layer2", "penultimate"], cfg, cache_dir=str(tmp_path / "single"), progress=False
        )
        for name, s in splits.items()
    }
    sharded = FeatureCache(tmp_path / "sharded")
    assert_same_entries(sharded, reference)
    (table,) = sharded.tables()
    assert {seg.info["process"] for seg in table.index().segments} == {0, 1}  # both ranks extracted
    assert table.key == next(iter(reference.values())).key  # type: ignore[attr-defined]
    if source == "shards":  # a second run: every rank finds the shards' index in the memo, and the rows
        again = torchrun("-m", "featcache", "extract", "torchvision:resnet18", spec, *flags)
        assert again.stdout.count("[hit]") == 3, again.stdout


def test_a_hub_id_loads_through_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    items = digit_pngs(60)
    saved = write_hf(
        tmp_path / "hf", items, {"train": slice(0, 40), "validation": slice(40, 50), "test": slice(50, 60)}
    )
    asked: list[tuple[str, str | None]] = []

    def from_hub(repo: str, config: str | None) -> object:  # offline: the hub's answer, from disk
        asked.append((repo, config))
        return datasets.load_from_disk(str(saved))

    monkeypatch.setattr(datasets, "load_dataset", from_hub)
    splits = load_dataset("hf-dataset:someone/digits:small")
    assert asked == [("someone/digits", "small")]
    assert_same_rows(load_dataset(str(saved)), splits)
    with pytest.raises(ValueError, match=r"'hf-dataset:' names no dataset: use hf-dataset:REPO\[:CONFIG\]"):
        load_dataset("hf-dataset:")
