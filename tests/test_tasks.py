"""Tasks: classify, multilabel and regress manifests; refusals of ambiguous labels; every verb per task.

The end-to-end tests build manifests of the bundled ``digits`` (scikit-learn) as PNGs under a temporary
folder: the digit's value as a float target, and ``odd``/``even`` + ``big`` as label sets. The numbers
each run reports are checked against scikit-learn on the predictions the run wrote.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import average_precision_score, mean_absolute_error, r2_score

from featcache import DataConfig, ExtractConfig
from featcache._util import FeatcacheError
from featcache.backbones.registry import Backbone
from featcache.cli.main import main
from featcache.data.datasets import load_dataset
from featcache.extraction.build import extract_splits
from featcache.train.config import TrainConfig
from featcache.train.fit import fit
from featcache.train.heads import HeadSpec, build_head
from featcache.train.objectives import make_loss, multilabel_metrics, pos_weights, regress_metrics
from featcache.train.sources import FeatureSource
from featcache.train.target_probes import ridge_path, sigmoid_path

N_IMAGES = 400
LITE = ["efficientnet-lite0", "--input-size", "64", "64", "-q"]


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run the command line in this process: exit status, stdout, stderr."""
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _images(root: Path, n: int) -> list[tuple[str, int]]:
    """``n`` digits as 32x32 PNGs under ``root``: (file name, digit)."""
    d = load_digits()
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        img = Image.fromarray((d.images[i] * 255 / 16).round().astype(np.uint8)).resize((32, 32))
        img.save(root / f"{i:04d}.png")
        out.append((f"{i:04d}.png", int(d.target[i])))
    return out


@pytest.fixture(scope="module")
def digits_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The digits as manifests: ``value.csv`` (the digit as a number in a 'label' column),
    ``parity.csv`` (labels odd/even and big for 5-9), and a shared cache root."""
    root = tmp_path_factory.mktemp("digits")
    rows = _images(root, N_IMAGES)
    (root / "value.csv").write_text("path,label\n" + "".join(f"{p},{y}\n" for p, y in rows))
    sets = "".join(f"{p},{'odd' if y % 2 else 'even'}{';big' if y >= 5 else ''}\n" for p, y in rows)
    (root / "parity.csv").write_text("path,labels\n" + sets)
    return {"root": root, "value": root / "value.csv", "parity": root / "parity.csv", "cache": root / "cache"}


def _small_manifest(tmp_path: Path, header: str, cells: list[str], suffix: str = ".csv") -> str:
    """A manifest of ``len(cells)`` tiny images with the given cells after each path."""
    lines = []
    for i, cell in enumerate(cells):
        Image.new("L", (8, 8), color=i % 256).save(tmp_path / f"{i}.png")
        lines.append(
            f"{i}.png,{cell}" if suffix == ".csv" else json.dumps({"path": f"{i}.png", **json.loads(cell)})
        )
    path = tmp_path / f"m{suffix}"
    path.write_text((f"{header}\n" if suffix == ".csv" else "") + "\n".join(lines) + "\n")
    return str(path)


# --------------------------------------------------------------------------- reading the task


def test_numbers_in_a_label_column_are_refused_with_the_fix(tmp_path: Path) -> None:
    spec = _small_manifest(tmp_path, "path,label", [f"{v:.3f}" for v in np.linspace(0.1, 0.9, 30)])
    with pytest.raises(
        FeatcacheError, match=r"every label is a number .*'continuous'.*--task regress"
    ) as exc:
        load_dataset(spec)
    assert "--task classify" in str(exc.value)
    regress = load_dataset(spec, task="regress")
    assert regress.task == "regress" and regress.classes == ["label"]
    assert regress.train.labels.dtype == np.float32 and regress.train.labels.shape[1] == 1
    values = np.sort(np.concatenate([s.labels[:, 0] for _, s in regress.items()]))
    np.testing.assert_allclose(values, np.round(np.linspace(0.1, 0.9, 30), 3), rtol=1e-6)
    # class ids a user vouches for are classes
    ids = _small_manifest(tmp_path, "path,label", [str(i % 3) for i in range(30)])
    with pytest.raises(FeatcacheError, match="'multiclass'"):
        load_dataset(ids)
    assert load_dataset(ids, task="classify").classes == ["0", "1", "2"]


def test_a_set_in_a_label_column_is_refused_and_a_labels_column_is_multilabel(tmp_path: Path) -> None:
    cells = ["odd;big", "even", "odd", "even;big"] * 8
    spec = _small_manifest(tmp_path, "path,label", cells)
    with pytest.raises(FeatcacheError, match=r"line 2: label 'odd;big' holds ';'.*'labels'"):
        load_dataset(spec)
    spec = _small_manifest(tmp_path, "path,labels", cells)
    splits = load_dataset(spec, val_fraction=0, test_fraction=0)
    assert splits.task == "multilabel" and splits.classes == ["big", "even", "odd"]  # never "odd;big"
    by_id = dict(zip(splits.train.ids, splits.train.labels.tolist(), strict=True))
    assert by_id["0.png"] == [1.0, 0.0, 1.0] and by_id["1.png"] == [0.0, 1.0, 0.0]
    jsonl = _small_manifest(tmp_path, "", ['{"labels": ["odd", "big"]}', '{"labels": []}'] * 4, ".jsonl")
    js = load_dataset(jsonl, val_fraction=0, test_fraction=0)
    assert js.task == "multilabel" and js.classes == ["big", "odd"] and js.train.labels.sum() == 8


def test_other_ambiguities_are_refused(tmp_path: Path) -> None:
    many = _small_manifest(tmp_path, "path,label", [f"c{i // 1}" for i in range(30)])
    with pytest.raises(FeatcacheError, match=r"30 classes for 30 images \(more than half"):
        load_dataset(many)
    with pytest.raises(FeatcacheError, match=r"--val-fraction 0.1 left the val split empty"):
        load_dataset(many, task="classify")
    both = _small_manifest(tmp_path, "path,label,target", ["a,1.5"] * 4)
    with pytest.raises(FeatcacheError, match=r"columns 'label' and 'target': say which to learn with --task"):
        load_dataset(both)
    with pytest.raises(FeatcacheError, match=r"--task regress: dataset 'digits' is not a CSV/JSONL manifest"):
        load_dataset("digits", task="regress")
    with pytest.raises(FeatcacheError, match=r"unknown task 'regression'"):
        DataConfig("digits", task="regression")
    with pytest.raises(FeatcacheError, match=r"line 3: target 'target' is 'n/a'"):
        load_dataset(_small_manifest(tmp_path, "path,target", ["1.0", "n/a"]))


def test_targets_columns_regress_on_several_values(tmp_path: Path) -> None:
    spec = _small_manifest(tmp_path, "path,age,height,note", [f"{i},{2 * i}.5,x" for i in range(20)])
    splits = load_dataset(spec, targets=("age", "height"), val_fraction=0, test_fraction=0)
    assert splits.task == "regress" and splits.classes == ["age", "height"]
    rows = dict(zip(splits.train.ids, splits.train.labels.tolist(), strict=True))
    assert rows["3.png"] == [3.0, 6.5]
    with pytest.raises(FeatcacheError, match=r"no column 'weight' \(--targets\)"):
        load_dataset(spec, targets=("weight",))
    with pytest.raises(FeatcacheError, match=r"--targets age regresses on those columns"):
        DataConfig(spec, task="classify", targets=("age",))


# --------------------------------------------------------------------------- solvers against scikit-learn


@pytest.mark.parametrize(("n", "f"), [(80, 12), (15, 40)])
def test_the_ridge_path_is_scikit_learns_ridge(n: int, f: int) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, f)), rng.normal(size=(n, 2))
    path = ridge_path(torch.as_tensor(x), torch.as_tensor(y), [1e-3, 0.1, 10.0])
    for lam, (w, b) in path.items():
        ref = Ridge(alpha=n * lam).fit(x, y)
        np.testing.assert_allclose(w.numpy(), ref.coef_, atol=1e-8)
        np.testing.assert_allclose(b.numpy(), ref.intercept_, atol=1e-8)


def test_the_multilabel_path_jointly_and_per_label_is_scikit_learns_logistic() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 6))
    y = np.stack([x[:, 0] + 0.5 * rng.normal(size=120) > 0, x[:, 1] - x[:, 2] > 0.3], 1).astype(float)
    lam = 0.05
    joint = sigmoid_path(torch.as_tensor(x), torch.as_tensor(y), [1.0, lam], tol=1e-8)[lam]
    apart = sigmoid_path(torch.as_tensor(x), torch.as_tensor(y), [1.0, lam], tol=1e-8, joint=False)[lam]
    np.testing.assert_allclose(joint[0].numpy(), apart[0].numpy(), atol=1e-5)
    for k in range(2):  # scikit-learn's C is 1 / (n lambda) for a mean loss + lambda/2 |w|^2
        ref = LogisticRegression(C=1 / (len(x) * lam), tol=1e-10, max_iter=1000).fit(x, y[:, k])
        np.testing.assert_allclose(joint[0][k].numpy(), ref.coef_[0], atol=1e-4)
        np.testing.assert_allclose(float(joint[1][k]), ref.intercept_[0], atol=1e-4)


def test_the_task_metrics_are_scikit_learns() -> None:
    rng = np.random.default_rng(2)
    y = (rng.random((50, 3)) < 0.4).astype(np.float32)
    y[:, 2] = 0  # a label without positives has no AP and stays out of the macro mean
    logits = rng.normal(size=(50, 3)) + 2 * y
    m = multilabel_metrics(logits, y)
    aps = [average_precision_score(y[:, k], logits[:, k]) for k in range(2)]
    assert m["per_label_ap"][:2] == pytest.approx(aps) and m["per_label_ap"][2] is None
    assert m["map"] == pytest.approx(np.mean(aps))
    assert m["map_micro"] == pytest.approx(average_precision_score(y, logits, average="micro"))
    t, p = rng.normal(size=(40, 2)), rng.normal(size=(40, 2))
    r = regress_metrics(p, t, ["a", "b"])
    assert r["mae"] == pytest.approx(mean_absolute_error(t, p))
    assert r["rmse"] == pytest.approx(np.sqrt(((t - p) ** 2).mean()))
    assert r["r2"] == pytest.approx(r2_score(t, p))  # uniform average over targets
    assert r["per_target"]["b"]["pearson"] == pytest.approx(np.corrcoef(t[:, 1], p[:, 1])[0, 1])


def test_a_loss_or_monitor_of_another_task_is_refused() -> None:
    with pytest.raises(FeatcacheError, match="unknown loss 'l1'"):
        TrainConfig(loss="l1")
    assert TrainConfig(loss="auto").loss is None and TrainConfig(pos_weight="none").pos_weight is None
    x, y = torch.randn(40, 3), torch.randn(40, 1)
    head = build_head(HeadSpec("linear"), (3,), 1)
    with pytest.raises(
        FeatcacheError, match="--monitor val_acc is not a metric of a regress task: use val_loss or val_r2"
    ):
        fit(
            head,
            FeatureSource(x, y),
            FeatureSource(x, y),
            1,
            TrainConfig(monitor="val_acc"),
            False,
            task="regress",
        )
    with pytest.raises(FeatcacheError, match="unknown loss for task regress 'bce'"):
        fit(head, FeatureSource(x, y), None, 1, TrainConfig(loss="bce"), False, task="regress")
    with pytest.raises(FeatcacheError, match="a classifier trains with cross-entropy"):
        fit(head, FeatureSource(x, torch.zeros(40).long()), None, 1, TrainConfig(loss="huber"), False)


def test_balanced_positive_weights_are_the_weighted_binary_cross_entropy() -> None:
    y = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    weights = pos_weights(y, "balanced")
    assert weights is not None and weights.tolist() == [3.0, 1.0]  # negatives / positives per label
    z = torch.randn(4, 2)
    p = torch.sigmoid(z)
    reference = -(weights * y * p.log() + (1 - y) * (1 - p).log()).mean()
    assert float(make_loss("multilabel", None, weights)(z, y)) == pytest.approx(float(reference), rel=1e-5)


# --------------------------------------------------------------------------- every verb, per task


def read_csv(path: Path) -> list[dict[str, str]]:
    """A CSV a run wrote, as its rows (test_finetune and test_folds read them with it too)."""
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_regress_train_probe_predict_and_the_refusal(
    digits_sets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec, cache = str(digits_sets["value"]), str(digits_sets["cache"])
    code, _, err = cli(capsys, "train", *LITE, spec, "--cache-dir", cache, "--out", str(tmp_path / "no"))
    assert (
        code == 2 and "every label is a number" in err and "--task regress" in err and "Traceback" not in err
    )
    out = tmp_path / "reg"
    argv = [*LITE, spec, "--task", "regress", "--cache-dir", cache]
    code, text, err = cli(capsys, "train", *argv, "--epochs", "30", "--out", str(out))
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "regress" and json.loads((out / "config.json").read_text())["task"] == "regress"
    assert metrics["test"]["r2"] >= 0.5 and f"test R2 {metrics['test']['r2']:.4f}" in text
    rows = read_csv(out / "predictions.csv")  # the test split, in the targets' units
    true = np.array([float(r["true_label"]) for r in rows])
    pred = np.array([float(r["predicted_label"]) for r in rows])
    assert set(true) <= set(range(10)) and len(rows) == metrics["test"]["n"]
    assert metrics["test"]["r2"] == pytest.approx(r2_score(true, pred), abs=1e-5)
    assert metrics["test"]["mae"] == pytest.approx(mean_absolute_error(true, pred), abs=1e-5)
    assert metrics["test"]["pearson"] == pytest.approx(np.corrcoef(true, pred)[0, 1], abs=1e-5)
    assert (out / "scatter.png").stat().st_size > 0
    # predict (from the raw image, through the exported model) prints the value the run predicted
    first = rows[0]
    code, text, err = cli(capsys, "predict", str(out), str(digits_sets["root"] / first["id"]), "-q")
    assert code == 0, err
    assert float(text.split("label ")[1]) == pytest.approx(float(first["predicted_label"]), abs=1e-2)
    code, text, err = cli(capsys, "probe", *argv, "--out", str(tmp_path / "probe"))
    assert code == 0, err
    probe = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert probe["test"]["r2"] >= 0.5 and probe["chosen_on"] == "val_r2" and "test R2" in text


def test_multilabel_train_probe_predict(
    digits_sets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec, cache = str(digits_sets["parity"]), str(digits_sets["cache"])
    argv = [*LITE, spec, "--cache-dir", cache]
    out = tmp_path / "ml"
    code, text, err = cli(capsys, "train", *argv, "--epochs", "30", "--monitor", "val_map", "--out", str(out))
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "multilabel" and metrics["test"]["map"] >= 0.9 and "test mAP" in text
    assert "val_map" in metrics["history"][0] and (out / "label_ap.png").stat().st_size > 0
    rows = read_csv(out / "predictions.csv")
    classes = ["big", "even", "odd"]
    y = np.array([[c in r["true"].split(";") for c in classes] for r in rows], dtype=float)
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    aps = [average_precision_score(y[:, k], probs[:, k]) for k in range(3)]
    assert metrics["test"]["per_label_ap"] == pytest.approx(aps, abs=1e-4)
    code, text, err = cli(capsys, "predict", str(out), str(digits_sets["root"] / "0005.png"), "-q")
    assert code == 0, err
    label_set = text.split(": ")[1].split()[0]
    assert set(label_set.split(";")) == {"odd", "big"}  # digit 5: a set, never a combined class
    code, text, err = cli(capsys, "probe", *argv, "--out", str(tmp_path / "probe"))
    assert code == 0, err
    probe = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert probe["test"]["map"] >= 0.9 and probe["chosen_on"] == "val_map"
    head = json.loads((tmp_path / "probe" / "head.json").read_text())
    assert head["task"] == "multilabel" and 0 < head["threshold"] < 1


def test_the_task_is_no_part_of_the_cache_key(digits_sets: dict[str, Path], lite0: Backbone) -> None:
    spec, cache = str(digits_sets["value"]), str(digits_sets["cache"])
    cfg = ExtractConfig(input_size=(64, 64))
    got = {
        task: extract_splits(
            lite0, DataConfig(spec, task=task).load(), ["penultimate"], cfg, cache_dir=cache, progress=False
        )
        for task in ("classify", "regress")
    }
    assert got["classify"]["train"].key == got["regress"]["train"].key  # one table serves both tasks
    assert all(f.extracted == 0 for f in got["regress"].values())  # the second read extracts nothing
    assert (
        got["classify"]["train"].split_key != got["regress"]["train"].split_key
    )  # other labels: another view
    assert got["regress"]["train"].task == "regress" and got["regress"]["train"].labels.dtype == np.float32
    # the rows of one image are one row of the table, whichever task (and split) reads it
    rows = {
        task: {
            d: r for f in got[task].values() for d, r in zip(f.digests, np.asarray(f.features["penultimate"]))
        }
        for task in got
    }
    assert rows["classify"].keys() == rows["regress"].keys() and len(rows["regress"]) == N_IMAGES
    for d, r in rows["regress"].items():
        np.testing.assert_array_equal(r, rows["classify"][d])


def test_sweep_chooses_on_the_tasks_metric(
    digits_sets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*LITE, str(digits_sets["value"]), "--task", "regress", "--cache-dir", str(digits_sets["cache"])]
    grid = ["--layers", "penultimate", "--lrs", "1e-3,1e-2", "--epochs", "5"]
    code, _, err = cli(capsys, "sweep", *argv, *grid, "--metric", "map", "--out", str(tmp_path / "no"))
    assert code == 2 and "unknown metric for task regress 'map'" in err and "r2|pearson" in err
    out = tmp_path / "sweep"
    code, text, err = cli(capsys, "sweep", *argv, *grid, "--out", str(out))
    assert code == 0, err
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["chosen_on"] == "val_r2 (ties: val_loss)" and "chosen on val r2" in text
    for row in sweep["rows"]:  # each row's score is its run's own val R2
        run = json.loads((out / row["run"] / "metrics.json").read_text())
        assert row["val_r2"] == run["val"]["r2"] and row["test_r2"] == run["test"]["r2"]
    assert sweep["best"]["run"] == max(sweep["rows"], key=lambda r: r["val_r2"])["run"]
    code, text, err = cli(capsys, "predict", str(out), str(digits_sets["root"] / "0003.png"), "-q")
    assert (
        code == 0 and "val r2" in err and text.startswith(str(digits_sets["root"] / "0003.png") + ": label ")
    )


def test_finetune_of_a_regression_refuses_a_trained_head_to_start_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _small_manifest(tmp_path, "path,target", [f"{i / 10}" for i in range(30)])
    argv = ["finetune", "torchvision:resnet18", spec, "--weights", "none", "--out", str(tmp_path / "r")]
    code, _, err = cli(capsys, *argv, "--init-head", str(tmp_path))
    wanted = "a regression network trains its new classifier on standardised targets"
    assert code == 2 and wanted in err and "Traceback" not in err and not (tmp_path / "r").exists()
