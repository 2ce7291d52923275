"""A grid of linear heads in one pass: each head equal to training it alone with train_on_cache."""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from featcache.backbones.registry import load_backbone
from featcache.cache.splits import CachedFeatures
from featcache.data.config import DataConfig
from featcache.extraction.build import extract_splits
from featcache.extraction.config import ExtractConfig
from featcache.runs.spec import RunSpec
from featcache.runs.sweep import SweepGrid, grid, sweep_run
from featcache.runs.train import train_grid_on_cache, train_on_cache
from featcache.train.config import TrainConfig
from featcache.train.fit import TrainingDiverged
from featcache.train.grid import grid_not_covered
from featcache.train.heads import HeadSpec

DATA = DataConfig("digits", limit=240)
ECFG = ExtractConfig(input_size=(32, 32), batch_size=32, device="cpu")
# label smoothing, warm-up then cosine, and patience on val_acc: every part of fit the grid redoes
BASE = TrainConfig(
    epochs=5,
    device="cpu",
    standardize=True,
    label_smoothing=0.1,
    warmup_epochs=1,
    patience=2,
    monitor="val_acc",
)
LRS, WDS = (1e-3, 3e-3, 1e-2, 3e-1), (0.0, 1e-1)
#: float tolerance: with one thread (below) the stacked products give each head's values bitwise as
#: training it alone does; only the logged batch loss is summed in another order. With several threads
#: the BLAS splits the stacked and the single products differently, and ten epochs of Adam carry those
#: last-bit differences to ~1e-4 in a weight: the comparison is of the arithmetic, so it runs on one thread.
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Each test of this module with one intra-op thread (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def feats(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CachedFeatures]:
    bb = load_backbone("torchvision:resnet18", weights="none")
    cache = str(tmp_path_factory.mktemp("cache"))
    return extract_splits(bb, DATA.load(), ["penultimate"], ECFG, cache_dir=cache, progress=False)


@pytest.fixture(scope="module")
def maps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CachedFeatures]:
    bb = load_backbone("torchvision:resnet18", weights="none")
    cache, cfg = str(tmp_path_factory.mktemp("cache")), replace(ECFG, pool="none")
    return extract_splits(bb, DATA.load(), ["layer3"], cfg, cache_dir=cache, progress=False)


def _same_as_alone(out: Any, alone: Any) -> None:
    """A grid head's (head, info, result, metrics) equal to train_on_cache's, to float rounding."""
    head, info, result, metrics = out
    head1, info1, result1, metrics1 = alone
    for a, b in zip(head.state_dict().values(), head1.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    assert info == info1
    assert (result.best_epoch, result.stopped_early) == (result1.best_epoch, result1.stopped_early)
    assert len(result.history) == len(result1.history)
    for row, row1 in zip(result.history, result1.history, strict=True):
        for k in ("train_loss", "val_loss", "val_acc", "lr"):
            assert row[k] == pytest.approx(row1[k], rel=RTOL, abs=ATOL), k
    torch.testing.assert_close(
        torch.tensor(result.step_losses), torch.tensor(result1.step_losses), rtol=RTOL, atol=ATOL
    )
    for split in ("val", "test"):
        assert metrics[split]["acc"] == metrics1[split]["acc"]
        assert metrics[split]["confusion"] == metrics1[split]["confusion"]
        assert metrics[split]["loss"] == pytest.approx(metrics1[split]["loss"], rel=RTOL, abs=ATOL)


@pytest.mark.parametrize(("layer", "kind"), [("penultimate", "linear"), ("layer3", "pooled-linear")])
def test_a_grid_of_4_lrs_by_2_weight_decays_equals_training_each_head_alone(
    request: pytest.FixtureRequest, layer: str, kind: str
) -> None:
    # pooled-linear: the frozen front (standardise, pool) runs once for the 8 heads, on the cached maps
    feats = request.getfixturevalue("feats" if kind == "linear" else "maps")
    configs = grid(BASE, lr=LRS, weight_decay=WDS)
    outs = train_grid_on_cache(feats, layer, HeadSpec(kind), configs, progress=False)
    assert outs is not None and len(outs) == 8
    stopped = []
    for cfg, out in zip(configs, outs, strict=True):
        assert not isinstance(out, TrainingDiverged)
        assert out[2].extra["grid"] == 8 and out[2].extra["closed_form_step"]
        _same_as_alone(out, train_on_cache(feats, layer, HeadSpec(kind), cfg, progress=False))
        stopped.append(out[2].stopped_early)
    assert any(stopped) or kind == "pooled-linear"  # heads leave the grid at their own epochs


def test_a_diverging_setting_in_the_grid_diverges_as_alone_and_the_others_train(
    feats: dict[str, CachedFeatures],
) -> None:
    # SGD with L2 decay at lr x weight_decay = 100 multiplies the weights by -99 a step: inf, NaN loss
    sgd = TrainConfig(epochs=3, optimizer="sgd", schedule="constant", device="cpu")
    configs = grid(sgd, lr=[1e-2, 10.0], weight_decay=[0.0, 10.0])
    outs = train_grid_on_cache(feats, "penultimate", HeadSpec("linear"), configs, progress=False)
    assert outs is not None
    diverged = 0
    for cfg, out in zip(configs, outs, strict=True):
        try:
            alone = train_on_cache(feats, "penultimate", HeadSpec("linear"), cfg, progress=False)
        except TrainingDiverged as exc:
            assert isinstance(out, TrainingDiverged) and str(out) == str(exc)
            diverged += 1
            continue
        _same_as_alone(out, alone)
    assert 1 <= diverged < len(configs)


def test_what_the_grid_does_not_cover_is_named() -> None:
    two = grid(TrainConfig(), lr=[1e-3, 1e-2])
    assert grid_not_covered(HeadSpec("linear"), two) is None
    assert grid_not_covered(HeadSpec("mlp"), two) == "an 'mlp' head is not a lone linear layer"
    assert grid_not_covered(HeadSpec("linear"), two, "regress") == "a regress task has no closed-form step"
    assert grid_not_covered(HeadSpec("linear"), two, views=2) == "augmented views change the rows each epoch"
    weighted = [TrainConfig(lr=lr, class_weight="balanced") for lr in (1e-3, 1e-2)]
    assert grid_not_covered(HeadSpec("linear"), weighted) == "class-weighted loss trains with autograd"
    mixed = [TrainConfig(lr=1e-3), TrainConfig(lr=1e-2, epochs=3)]
    assert (
        grid_not_covered(HeadSpec("linear"), mixed) == "the settings differ in more than lr and weight decay"
    )
    assert grid_not_covered(HeadSpec("linear"), two[:1]) == "one setting: nothing to batch"


def test_a_sweep_of_linear_heads_trains_each_layer_in_one_pass_with_a_run_folder_per_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    sweep_mod = importlib.import_module("featcache.runs.sweep")
    grid_mod = importlib.import_module("featcache.train.grid")
    bb = load_backbone("torchvision:resnet18", weights="none")
    cache, base = str(tmp_path / "c"), TrainConfig(epochs=2, device="cpu", standardize=True)
    epochs, alone = [], []
    monkeypatch.setattr(grid_mod, "_train_epoch", lambda *a: epochs.append(1) or train_epoch(*a))
    monkeypatch.setattr(
        sweep_mod, "train_on_cache", lambda *a, **k: alone.append(1) or train_on_cache(*a, **k)
    )
    train_epoch = importlib.import_module("featcache.train.fit")._train_epoch
    spec = RunSpec(bb, DATA, tmp_path / "s", extract=ECFG, train=base, cache_dir=cache, progress=False)
    res = sweep_run(
        spec, SweepGrid(("layer3", "penultimate"), HeadSpec("linear"), lrs=LRS, weight_decays=WDS)
    )
    assert len(res.rows) == 16 and alone == [] and len(epochs) == 2 * 2  # 2 passes a layer, 8 heads each
    feats = extract_splits(bb, DATA.load(), ["penultimate"], ECFG, cache_dir=cache, progress=False)
    row = res.rows[8 + 5]  # penultimate, lr 1e-2, wd 0.1: its folder and row as `train` of it alone
    cfg = grid(base, lr=LRS, weight_decay=WDS)[5]
    assert (row["layer"], row["lr"], row["weight_decay"]) == ("penultimate", cfg.lr, cfg.weight_decay)
    _, _, _, metrics1 = train_on_cache(feats, "penultimate", HeadSpec("linear"), cfg, progress=False)
    metrics = json.loads((tmp_path / "s" / row["run"] / "metrics.json").read_text())
    assert metrics["fast_paths"]["grid"] == 8 and metrics["finished"]
    assert row["val_acc"] == metrics["val"]["acc"] == metrics1["val"]["acc"]
    assert row["test_acc"] == metrics["test"]["acc"] == metrics1["test"]["acc"]
    assert (tmp_path / "s" / row["run"] / "history.csv").is_file()

    alone.clear()  # an mlp head trains one by one, and the sweep says why in one line
    spec = RunSpec(bb, DATA, tmp_path / "m", extract=ECFG, train=base, cache_dir=cache, progress=False)
    with caplog.at_level("INFO", logger="featcache.runs.spec"):
        sweep_run(spec, SweepGrid(("penultimate",), HeadSpec("mlp"), lrs=LRS[:2]))
    assert len(alone) == 2
    assert "each of the 2 settings trains on its own, not as one grid: an 'mlp' head" in caplog.text
