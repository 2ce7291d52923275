"""A run's pictures of its mistakes: ``top_losses.png`` (fastai's ``plot_top_losses``), ``most_confused``
in metrics.json (fastai's ``most_confused``), and the run's last line naming them."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from conftest import tiny_resnet_on_digits
from featcache.cli.main import main
from featcache.data.config import DataConfig
from featcache.runs.report import most_confused, plot_top_losses


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`featcache train` of a random-init ResNet-18 on 150 digits: a weak model, many mistakes."""
    root = tmp_path_factory.mktemp("pictures")
    argv = ["train", *tiny_resnet_on_digits(150), "--layer", "avgpool", "--epochs", "3", "-q"]
    argv += ["--cache-dir", str(root / "cache"), "--out", str(root / "run")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0
    with (root / "run" / "misclassified.csv").open(newline="") as f:
        wrong = list(csv.DictReader(f))
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    return {"run": root / "run", "stdout": out.getvalue(), "wrong": wrong, "metrics": metrics}


def test_most_confused_counts_the_misclassified_images(digits_run: dict[str, Any]) -> None:
    """The pairs in metrics.json are the (true, predicted) counts of misclassified.csv (written from the
    logits, apart from the confusion matrix), most often first."""
    wrong, test = digits_run["wrong"], digits_run["metrics"]["test"]
    assert wrong and all(r["split"] == "test" for r in wrong)
    counted = Counter((r["true"], r["predicted"]) for r in wrong)
    pairs = test["most_confused"]
    assert {(p["true"], p["predicted"]): p["count"] for p in pairs} == dict(counted)
    assert [p["count"] for p in pairs] == sorted(counted.values(), reverse=True)
    assert "most_confused" in digits_run["metrics"]["val"]


def test_most_confused_is_fastais_order() -> None:
    conf = [[3, 1, 2], [2, 4, 0], [0, 5, 1]]
    got = [(p["true"], p["predicted"], p["count"]) for p in most_confused(conf, ["a", "b", "c"])]
    assert got == [("c", "b", 5), ("a", "c", 2), ("b", "a", 2), ("a", "b", 1)]
    assert [p["count"] for p in most_confused(conf, ["a", "b", "c"], min_count=2)] == [5, 2, 2]


def test_top_losses_png_shows_the_highest_losses_read_through_the_datasets_loader(
    digits_run: dict[str, Any], tmp_path: Path
) -> None:
    png = digits_run["run"] / "top_losses.png"
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width >= 800
    # the grid asks the dataset's own loader for the first 16 rows of misclassified.csv, in order
    test = DataConfig("digits", limit=150).load().test
    assert test is not None
    index = {i: n for n, i in enumerate(test.ids)}
    asked: list[str] = []

    def load(sample_id: str) -> Image.Image:
        asked.append(sample_id)
        return test.load(index[sample_id])

    wrong = digits_run["wrong"]
    plot_top_losses(wrong, load, tmp_path / "t.png")
    assert asked == [r["id"] for r in wrong[:16]]
    losses = [float(r["loss"]) for r in wrong]
    assert losses == sorted(losses, reverse=True)


def test_the_runs_last_line_names_misclassified_csv_and_the_pictures(digits_run: dict[str, Any]) -> None:
    last = digits_run["stdout"].strip().splitlines()[-1]
    n = len(digits_run["wrong"])
    assert last.startswith(f"run folder: {digits_run['run']}")
    for name in (f"misclassified.csv ({n} test images)", "top_losses.png", "confusion.png", "curves.png"):
        assert name in last
