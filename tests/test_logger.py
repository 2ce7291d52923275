"""``--logger tensorboard``: the event files, read with TensorBoard's own reader, hold history.csv."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_resnet_on_digits
from featcache.cli.main import main

EventAccumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator"
).EventAccumulator


def _history(run: Path) -> list[dict[str, str]]:
    with (run / "history.csv").open() as f:
        return list(csv.DictReader(f))


def assert_log_is_history(run: Path) -> None:
    """Every column of history.csv but ``epoch`` is a scalar tag whose (step, value) are the rows'
    (epoch, value), float32 as TensorBoard stores it; nothing more, nothing twice."""
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    rows = _history(run)
    columns = [c for c in rows[0] if c != "epoch"]
    assert sorted(acc.Tags()["scalars"]) == sorted(columns)
    for tag in columns:
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        want = [(int(r["epoch"]), float(np.float32(float(r[tag])))) for r in rows]
        assert got == want, tag


def _train(tmp_path: Path, *extra: str) -> int:
    args = ["train", *tiny_resnet_on_digits(150), "--layer", "avgpool", "--epochs", "3", "-q"]
    return main([*args, "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run"), *extra])


def test_train_logs_history_csv_to_tensorboard_and_a_resume_keeps_it_whole(tmp_path: Path) -> None:
    assert _train(tmp_path, "--logger", "tensorboard") == 0
    assert len(_history(tmp_path / "run")) == 3
    assert_log_is_history(tmp_path / "run")
    # resumed (finished: no epoch trains), the log is written again from the history, not doubled;
    # the logger comes from the run's config.json
    assert main(["train", "--resume", "--out", str(tmp_path / "run"), "-q"]) == 0
    assert len(list((tmp_path / "run" / "tensorboard").iterdir())) == 1
    assert_log_is_history(tmp_path / "run")


def test_sweep_and_finetune_log_each_run(tmp_path: Path) -> None:
    cache = ["--cache-dir", str(tmp_path / "cache"), "-q", "--logger", "tensorboard", "--epochs", "2"]
    sweep = ["sweep", *tiny_resnet_on_digits(150), "--layers", "layer4,avgpool", "--lrs", "1e-3,1e-2"]
    assert main([*sweep, *cache, "--out", str(tmp_path / "sweep")]) == 0
    runs = sorted(p.parent for p in (tmp_path / "sweep").glob("*/history.csv"))
    assert len(runs) == 4
    for run in runs:  # one log per run, each its own history
        assert_log_is_history(run)
    finetune = ["finetune", *tiny_resnet_on_digits(150), "--train", "head"]
    assert main([*finetune, *cache, "--out", str(tmp_path / "ft")]) == 0
    assert_log_is_history(tmp_path / "ft")


def test_unknown_or_missing_logger_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _train(tmp_path, "--logger", "tensorbaord") == 2
    assert "unknown logger 'tensorbaord'. Did you mean: 'tensorboard'?" in capsys.readouterr().err
    assert _train(tmp_path, "--folds", "3", "--logger", "tensorboard") == 2
    assert "--folds trains a head per fold" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    assert _train(tmp_path, "--logger", "tensorboard") == 2
    assert "pip install 'featcache[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
