"""Seeded splits that stay put: each image placed by a hash of (seed, content digest), recorded per run."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest

from conftest import random_image, write_tree
from featcache.cli.main import main
from featcache.data.datasets import hash_split, load_dataset


def _digests(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [bytes(rng.integers(0, 256, 32, dtype=np.uint8)).hex() for _ in range(n)]


def _placed(splits) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {sid: name for name, s in splits.items() for sid in s.ids}


def test_adding_five_percent_of_images_moves_no_existing_image(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    write_tree(root, classes=("a", "b", "c", "d"), per_class=50, formats=("png",), size=(16, 16))
    before = _placed(load_dataset(str(root), val_fraction=0.1, test_fraction=0.2, seed=0))
    rng = np.random.default_rng(7)
    for i in range(10):  # 5 % more: 10 new images over the classes
        random_image(rng, (16, 16)).save(root / "abcd"[i % 4] / f"new{i}.png")
    after = _placed(load_dataset(str(root), val_fraction=0.1, test_fraction=0.2, seed=0))
    assert len(after) == len(before) + 10
    assert [sid for sid in before if after[sid] != before[sid]] == []  # 0 existing images moved
    # Removing images moves none either.
    for f in sorted(root.glob("a/*.png"))[:5]:
        f.unlink()
    fewer = _placed(load_dataset(str(root), val_fraction=0.1, test_fraction=0.2, seed=0))
    assert all(after[sid] == name for sid, name in fewer.items())


def test_hash_split_rule_fractions_copies_and_small_classes() -> None:
    digests = _digests(4000)
    labels = np.arange(4000) % 4
    tr, va, te = hash_split(digests, labels, 0.1, 0.2, seed=0)
    assert sorted(np.r_[tr, va, te].tolist()) == list(range(4000))
    for c in range(4):  # each class near its fractions (binomial: sd ~ 0.013 for 1000 images)
        n = 1000
        assert abs((labels[te] == c).sum() / n - 0.2) < 0.05 and abs((labels[va] == c).sum() / n - 0.1) < 0.04
    # The reference: the rule written out with hashlib.
    for i in (0, 1, 2, 3, 999):
        u = int.from_bytes(hashlib.sha256(f"split:0:{digests[i]}".encode()).digest()[:8], "big") / 2.0**64
        want = "test" if u < 0.2 else "val" if u >= 0.9 else "train"
        got = "test" if i in te else "val" if i in va else "train"
        assert got == want
    # Raising val's fraction only moves train images into val; test stays as it was.
    _, va2, te2 = hash_split(digests, labels, 0.2, 0.2, seed=0)
    assert te2.tolist() == te.tolist() and set(va.tolist()) <= set(va2.tolist())
    # Copies of an image (one digest) share a split, whatever their labels.
    dup = [digests[0]] * 3 + digests[1:20]
    dlab = np.r_[0, 1, 2, np.arange(19) % 3]
    parts = hash_split(dup, dlab, 0.3, 0.3, seed=5)
    assert len({k for k, p in enumerate(parts) for i in (0, 1, 2) if i in p}) == 1
    # A class of 1 to 3 images always keeps a train image.
    for seed in range(60):
        small = _digests(3, seed)
        tr3, _, _ = hash_split(small + _digests(30, 99), np.r_[0, 1, 1, np.full(30, 2)], 0.3, 0.4, seed)
        assert 0 in tr3 and ({1, 2} & set(tr3.tolist()))
    with pytest.raises(ValueError, match="fractions"):
        hash_split(digests, labels, 0.6, 0.5)


def test_runs_write_splits_csv_and_say_when_splits_changed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "tree"
    write_tree(root, classes=("a", "b"), per_class=15, formats=("png",), size=(16, 16))
    base = ["torchvision:resnet18", str(root), "--weights", "none", "--input-size", "32", "32", "-q"]
    base += ["--val-fraction", "0.3"]
    assert main(["probe", *base, "--strengths", "0.1", "--out", str(tmp_path / "p")]) == 0
    with (tmp_path / "p" / "splits.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    splits = load_dataset(str(root), val_fraction=0.3)
    assert {r["id"]: r["split"] for r in rows} == _placed(splits)
    assert {r["id"]: r["label"] for r in rows} == {i: i.split("/")[0] for i in _placed(splits)}
    for r in rows:
        assert r["digest"] == hashlib.sha256((root / r["id"]).read_bytes()).hexdigest()
    capsys.readouterr()
    random_image(np.random.default_rng(3), (16, 16)).save(root / "a" / "new.png")  # nothing moves
    assert main(["train", *base, "--epochs", "1", "--out", str(tmp_path / "t")]) == 0
    assert "changed split" not in capsys.readouterr().err
    assert (tmp_path / "t" / "splits.csv").read_text().count("\n") == 32  # header + 31 images
    assert main(["train", *base, "--epochs", "1", "--split-seed", "1", "--out", str(tmp_path / "s")]) == 0
    err = capsys.readouterr().err
    now = _placed(load_dataset(str(root), val_fraction=0.3, seed=1))
    with (tmp_path / "t" / "splits.csv").open(newline="") as f:
        moved = sum(now[r["id"]] != r["split"] for r in csv.DictReader(f))
    assert f"note: {moved} of 31 images changed split since the last run on" in err and "seed 0 -> 1" in err


def test_the_batched_draws_equal_split_draw_per_image() -> None:
    """hash_split draws every image at once; each draw is split_draw's float for that image alone."""
    from featcache.data.datasets import _draws, split_draw

    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(3000)] + ["0" * 64, "f" * 64]
    for seed in (0, 7):
        assert _draws(digests, seed).tolist() == [split_draw(d, seed) for d in digests]
    assert _draws([], 0).shape == (0,)


def _reference_split(
    digests: list[str], labels: np.ndarray, val: float, test: float, seed: int
) -> list[list[int]]:
    """The split rule written plainly: each image by its own draw, then, class by class in sorted order,
    a class with no train image gets its lowest-drawn image (every copy of it) put in train."""
    from featcache.data.datasets import split_draw

    draw = [split_draw(d, seed) for d in digests]
    part = [2 if x < test else 1 if x >= 1.0 - val else 0 for x in draw]
    for c in sorted(set(labels.tolist())):
        mine = [i for i in range(len(digests)) if labels[i] == c]
        if not any(part[i] == 0 for i in mine):
            rescued = digests[min(mine, key=lambda i: draw[i])]
            for i, d in enumerate(digests):
                if d == rescued:
                    part[i] = 0
    return [[i for i, p in enumerate(part) if p == k] for k in (0, 1, 2)]


def test_hash_split_equals_the_rule_written_plainly() -> None:
    """Many classes of one to three images (most need the rescue), copies of one image under two
    classes (a rescue for one class gives the other its train image): the vectorised split equals the
    plain rule."""
    rng = np.random.default_rng(3)
    base = _digests(120, seed=5)
    digests = base + [base[i] for i in rng.integers(0, 120, 30)]  # 30 copies, some under another class
    labels = np.concatenate([rng.integers(0, 60, 120), rng.integers(0, 60, 30)])
    for val, test, seed in ((0.3, 0.4, 0), (0.45, 0.45, 1), (0.0, 0.0, 2), (0.1, 0.2, 7)):
        got = [a.tolist() for a in hash_split(digests, labels, val, test, seed)]
        assert got == _reference_split(digests, labels, val, test, seed)
