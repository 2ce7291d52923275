"""K-fold cross-validation on cached rows: folds by content, a head per fold, no backbone pass."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, r2_score

import test_tasks
from conftest import tiny_resnet_on_digits
from featcache.backbones.registry import load_backbone
from featcache.cli.main import main
from featcache.data.config import DataConfig
from featcache.extraction.build import extract, extract_splits
from featcache.extraction.config import ExtractConfig
from featcache.runs.folds import assign_folds, folds_probe, folds_train
from featcache.runs.probe import ProbeConfig
from featcache.runs.train import train_on_cache
from featcache.train.config import TrainConfig
from featcache.train.heads import HeadSpec
from test_tasks import LITE, cli, read_csv

ECFG = ExtractConfig(input_size=(32, 32), batch_size=32, device="cpu")
DATA = DataConfig("digits", limit=200)
digits_sets = test_tasks.digits_sets  # the digits as manifests (multi-label, values), a module fixture


def _digests(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [bytes(rng.integers(0, 256, 32, dtype=np.uint8)).hex() for _ in range(n)]


def test_folds_are_stratified_by_content_and_keep_copies_together() -> None:
    digests = _digests(60)
    labels = np.arange(60) % 3
    # Row 60 copies row 0 (same image, same class); row 61 copies row 1 under another label.
    digests += [digests[0], digests[1]]
    labels = np.r_[labels, 0, 2]
    fold = assign_folds(digests, labels, 4, seed=0)
    assert set(fold.tolist()) == {0, 1, 2, 3}
    assert fold[60] == fold[0] and fold[61] == fold[1]  # no image both trained on and held out
    for c in range(3):  # each class spread evenly: 20 images over 4 folds
        counts = np.bincount(fold[:60][labels[:60] == c], minlength=4)
        assert counts.max() - counts.min() <= 1, counts
    sizes = np.bincount(fold[:60], minlength=4)
    assert sizes.max() - sizes.min() <= 1
    # By content, not position: shuffled rows keep their folds; another seed deals other folds.
    perm = np.random.default_rng(1).permutation(60)
    shuffled = assign_folds([digests[i] for i in perm], labels[perm], 4, seed=0)
    assert shuffled.tolist() == fold[perm].tolist()
    assert assign_folds(digests, labels, 4, seed=1).tolist() != fold.tolist()
    with pytest.raises(ValueError, match="at least 2 folds"):
        assign_folds(digests, labels, 1)
    with pytest.raises(ValueError, match="only 60 distinct images"):
        assign_folds(digests, labels, 61)


def test_each_fold_trains_as_a_run_on_those_rows_would_with_no_backbone_pass(tmp_path: Path) -> None:
    bb = load_backbone("torchvision:resnet18", weights="none")
    splits = DATA.load()
    cache = str(tmp_path / "c")
    extract_splits(bb, splits, ["layer3"], ECFG, cache_dir=cache, progress=False)
    calls: list[int] = []
    hook = bb.model.register_forward_pre_hook(lambda _m, i: calls.append(len(i[0])))
    feats = extract_splits(bb, splits, ["layer3"], ECFG, cache_dir=cache, progress=False)
    cfg = TrainConfig(epochs=3, lr=1e-2, device="cpu", standardize=True)
    res = folds_train(feats, "layer3", HeadSpec("linear"), cfg, k=3)
    assert calls == [] and len(res.acc) == 3 and len(res.test_acc) == 3
    assert res.mean == pytest.approx(statistics.fmean(res.acc))
    assert res.std == pytest.approx(float(np.std(res.acc)))
    assert sum(res.rows) == len(splits.train) + len(splits.val)  # type: ignore[arg-type]
    # The reference for fold 1: the same rows as plain splits of the dataset, through `extract`.
    pool = splits.train.parent.subset(  # type: ignore[attr-defined]
        np.r_[splits.train.indices, splits.val.indices],
        "pool",  # type: ignore[union-attr]
    )
    fold = assign_folds(pool.digests(), pool.labels, 3, seed=0)
    parts = {
        name: extract(
            bb, pool.subset(np.flatnonzero(sel), name), ["layer3"], ECFG, cache_dir=cache, progress=False
        )
        for name, sel in (("train", fold != 1), ("test", fold == 1))
    }
    assert calls == []  # every row is in the table already
    _, _, _, metrics = train_on_cache(parts, "layer3", HeadSpec("linear"), cfg, progress=False)
    assert res.acc[1] == pytest.approx(metrics.test.acc)
    assert res.rows[1] == int((fold == 1).sum())
    hook.remove()


def test_probe_folds_choose_the_strength_by_cross_validation(tmp_path: Path) -> None:
    bb = load_backbone("torchvision:resnet18", weights="none")
    feats = extract_splits(bb, DATA.load(), ["penultimate"], ECFG, cache_dir=str(tmp_path), progress=False)
    res = folds_probe(feats, "penultimate", ProbeConfig(strengths=(1e-4, 1e2)), k=3, device="cpu")
    cv = {float(s): statistics.fmean(v) for s, v in res.extra["cv_by_strength"].items()}
    assert res.extra["strength"] == max(cv, key=cv.__getitem__) and res.mean == pytest.approx(
        max(cv.values())
    )
    assert cv[1e2] < cv[1e-4]  # an absurd strength loses on every fold
    assert len(res.test_acc) == 1 and 0 <= res.test_acc[0] <= 1
    # Pooled rows over the RAM budget: each fold's rows streamed from the table's maps by index, the
    # same folds and (to float32 rounding of the solver) the same accuracies as in memory.
    cfg = ProbeConfig(strengths=(1e-4, 1e2))
    streamed = folds_probe(feats, "penultimate", cfg, k=3, device="cpu", ram_budget_gb=1e-9)
    assert streamed.extra["strength"] == res.extra["strength"] and streamed.rows == res.rows
    np.testing.assert_allclose(streamed.acc, res.acc, atol=0.02)
    np.testing.assert_allclose(streamed.test_acc, res.test_acc, atol=0.02)
    # The views' rows in the table are the splits' own.
    for split in ("train", "val"):
        torch.testing.assert_close(
            feats[split].tensor("penultimate"),
            torch.from_numpy(np.asarray(feats[split].features["penultimate"])),
        )


def test_cli_folds(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "cache"))
    base = tiny_resnet_on_digits()
    assert main(["train", *base, "-q", "--epochs", "2", "--out", str(tmp_path / "r"), "--folds", "3"]) == 0
    out = capsys.readouterr().out
    assert "3-fold cross-validation accuracy" in out and "+-" in out and out.count("fold ") >= 3
    assert "test accuracy: " in out and "(the folds' heads)" in out  # three heads: a mean and a spread
    saved = json.loads((tmp_path / "r" / "folds.json").read_text())
    assert len(saved["acc"]) == 3 and saved["mean"] == pytest.approx(statistics.fmean(saved["acc"]))
    # The second job reads every row from the cache: the counts say so.
    assert main(["probe", *base, "-q", "--strengths", "0.001,0.1", "--folds", "3"]) == 0
    out = capsys.readouterr().out
    assert "0 extracted" in out and "at L2 strength" in out
    # One head refitted on train+val is tested: one number, no spread of one value.
    assert "test accuracy of the head refitted on train+val: " in out and "test accuracy: " not in out
    assert main(["train", *base, "-q", "--out", str(tmp_path / "x"), "--folds", "1"]) == 2
    assert "at least 2 folds" in capsys.readouterr().err


def _digit_tree(root: Path, per_class: int = 30) -> list[Path]:
    """Bundled digits 0, 1 and 7 as an ImageFolder of 32 px PNGs (``per_class`` each)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    files = []
    for c in (0, 1, 7):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for j, i in enumerate(np.flatnonzero(d.target == c)[:per_class]):
            img = Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32), Image.NEAREST)
            files.append(root / str(c) / f"{j:02d}.png")
            img.save(files[-1])
    return files


def test_train_folds_write_a_run_whose_out_of_fold_mistakes_find_a_planted_mislabel(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    from featcache.export.predict import load_predictor
    from featcache.runs.folder import RunFolder

    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "digits"
    _digit_tree(root)
    (root / "0" / "05.png").rename(root / "1" / "planted.png")  # a 0 filed under 1
    out = tmp_path / "folds"
    base = ["torchvision:resnet18", str(root), "--weights", "none", "--input-size", "32", "32", "-q"]
    flags = ["--epochs", "15", "--lr", "0.01", "--standardize", "--folds", "5", "--out", str(out)]
    assert main(["train", *base, *flags]) == 0
    printed = capsys.readouterr().out
    assert "5-fold cross-validation accuracy" in printed and "refitted on train+val" in printed
    for name in ("config.json", "metrics.json", "folds.json", "oof.csv", "misclassified.csv", "splits.csv"):
        assert (out / name).is_file(), name
    for i in range(5):  # a run folder per fold: metrics, curves, head, the run's splits
        files = ("metrics.json", "curves.png", "head.json", "splits.csv")
        assert all((out / f"fold-{i}" / f).is_file() for f in files)
    with (out / "oof.csv").open(newline="") as f:
        oof = list(csv.DictReader(f))
    splits = {r["id"]: r["split"] for r in csv.DictReader((out / "splits.csv").open(newline=""))}
    assert sorted(r["id"] for r in oof) == sorted(i for i, s in splits.items() if s in ("train", "val"))
    planted = next(r for r in oof if r["id"] == "1/planted.png")
    assert planted["label"] == "1" and float(planted["p_label"]) < 0.5
    with (out / "misclassified.csv").open(newline="") as f:
        ranked = list(csv.DictReader(f))
    assert "1/planted.png" in [r["id"] for r in ranked[:3]], ranked[:5]
    assert ranked[0]["split"] == "out-of-fold"
    losses = [float(r["loss"]) for r in ranked]
    assert losses == sorted(losses, reverse=True)
    # export takes the folds folder (its head: the one refitted on train+val), predict agrees with it
    assert main(["export", str(out), "--format", "safetensors", "--out", str(tmp_path / "m.st"), "-q"]) == 0
    head, _ = RunFolder(out).load_head()
    bb = load_backbone("torchvision:resnet18", weights="none")
    data = DataConfig(str(root)).load()
    feats = extract_splits(bb, data, ["penultimate"], ExtractConfig(input_size=(32, 32)), progress=False)
    test = data.test
    assert test is not None
    with torch.no_grad():
        want = head(feats["test"].tensor("penultimate").float()).argmax(1)
    predictor = load_predictor(tmp_path / "m.st", device="cpu")
    got = predictor.logits([test.load(i) for i in range(len(test))]).argmax(1)
    assert got.tolist() == want.tolist()
    # The run resumes: every fold is finished, so none trains again and the files stay.
    assert main(["train", "--resume", "--out", str(out), "-q"]) == 0
    assert "5-fold cross-validation accuracy" in capsys.readouterr().out


def test_folds_of_a_multilabel_set_score_map_and_rank_the_worst_sets(
    digits_sets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*LITE, str(digits_sets["parity"]), "--cache-dir", str(digits_sets["cache"]), "--folds", "3"]
    for verb, extra in (("train", ["--epochs", "10"]), ("probe", [])):
        out = tmp_path / verb
        code, text, err = cli(capsys, verb, *argv, *extra, "--out", str(out))
        assert code == 0, err
        summary = json.loads((out / "folds.json").read_text())
        assert summary["metric"] == "map" and "cross-validation mAP" in text
        rows = read_csv(out / "oof.csv")
        classes = ["big", "even", "odd"]
        y = np.array([[c in r["labels"].split(";") for c in classes] for r in rows], dtype=float)
        p = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
        fold = np.array([int(r["fold"]) for r in rows])
        for i in range(3):  # each fold's score: scikit-learn's macro AP of its out-of-fold probabilities
            want = np.mean([average_precision_score(y[fold == i, k], p[fold == i, k]) for k in range(3)])
            assert summary["acc"][i] == pytest.approx(want, abs=1e-4)
        assert statistics.fmean(summary["acc"]) >= 0.9
        loss = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean(1)  # the mean BCE per image
        assert [float(r["loss"]) for r in rows] == pytest.approx(loss, abs=1e-3)
        worst = read_csv(out / "misclassified.csv")
        assert worst and all(w["labels"] != w["predicted"] for w in worst)
        assert [float(w["loss"]) for w in worst] == sorted((float(w["loss"]) for w in worst), reverse=True)
        head = json.loads((out / "head.json").read_text())
        assert head["task"] == "multilabel" and 0 < head["threshold"] < 1
        code, text, err = cli(capsys, "predict", str(out), str(digits_sets["root"] / "0005.png"), "-q")
        assert code == 0, err
        assert set(text.split(": ")[1].split()[0].split(";")) == {"odd", "big"}


def test_folds_of_a_regression_score_r2_and_rank_the_worst_fits(
    digits_sets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*LITE, str(digits_sets["value"]), "--task", "regress", "--cache-dir", str(digits_sets["cache"])]
    for verb, extra in (("probe", []), ("train", ["--epochs", "20"])):
        out = tmp_path / verb
        code, text, err = cli(capsys, verb, *argv, "--folds", "3", *extra, "--out", str(out))
        assert code == 0, err
        summary = json.loads((out / "folds.json").read_text())
        assert summary["metric"] == "r2" and "cross-validation R2" in text
        rows = read_csv(out / "oof.csv")
        true = np.array([float(r["true_label"]) for r in rows])
        pred = np.array([float(r["predicted_label"]) for r in rows])
        fold = np.array([int(r["fold"]) for r in rows])
        assert sorted(set(fold.tolist())) == [0, 1, 2] and len(rows) == sum(summary["rows"])
        for i in range(3):
            assert summary["acc"][i] == pytest.approx(r2_score(true[fold == i], pred[fold == i]), abs=1e-4)
        assert statistics.fmean(summary["acc"]) >= 0.5
        assert [float(r["loss"]) for r in rows] == pytest.approx((pred - true) ** 2, rel=1e-4, abs=1e-4)
        worst = read_csv(out / "misclassified.csv")
        assert len(worst) == len(rows) and worst[0]["id"] == rows[int(np.argmax((pred - true) ** 2))]["id"]
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["test"]["r2"] >= 0.5
        code, text, err = cli(capsys, "predict", str(out), str(digits_sets["root"] / "0005.png"), "-q")
        assert code == 0, err
        assert abs(float(text.split("label ")[1]) - 5) < 2.5
