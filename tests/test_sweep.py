"""Sweeps: one backbone pass for every layer, each row equal to training that layer alone, choice on val."""

from __future__ import annotations

import importlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_resnet_on_digits
from featcache.backbones.registry import Backbone, load_backbone
from featcache.cli.main import main
from featcache.data.config import DataConfig
from featcache.export.predict import load_predictor
from featcache.extraction.config import ExtractConfig
from featcache.runs.folder import load_run
from featcache.runs.job import Job
from featcache.runs.spec import RunSpec
from featcache.runs.sweep import SweepGrid, grid, sweep_run
from featcache.runs.train import train_run
from featcache.train.config import TrainConfig
from featcache.train.heads import HeadSpec

DATA = DataConfig("digits", limit=240)
ECFG = ExtractConfig(input_size=(32, 32), batch_size=32, device="cpu")
BASE = TrainConfig(epochs=4, device="cpu", standardize=True)
LAYERS = ["layer2", "layer3", "penultimate"]


def test_grid_is_every_combination_of_the_given_fields() -> None:
    configs = grid(BASE, lr=[1e-3, 1e-2], weight_decay=[0.0, 1e-4], momentum=[])
    assert [(c.lr, c.weight_decay) for c in configs] == [(1e-3, 0.0), (1e-3, 1e-4), (1e-2, 0.0), (1e-2, 1e-4)]
    assert all(c.epochs == 4 for c in configs) and grid(BASE) == [BASE]


def test_sweep_runs_the_backbone_once_and_each_row_is_that_layers_own_run(tmp_path: Path) -> None:
    bb = load_backbone("torchvision:resnet18", weights="none")
    batches = []
    handle = bb.model.conv1.register_forward_hook(lambda m, i, o: batches.append(len(o)))
    configs = grid(BASE, lr=[1e-3, 1e-2])
    cache = str(tmp_path / "c")

    def spec(out: Path) -> RunSpec:
        return RunSpec(bb, DATA, out, extract=ECFG, train=BASE, cache_dir=cache, progress=False)

    res = sweep_run(spec(tmp_path / "s"), SweepGrid(tuple(LAYERS), HeadSpec("linear"), lrs=(1e-3, 1e-2)))
    n_images = sum(len(s) for _, s in DATA.load().items())
    # every image through the backbone once for all three layers, plus one 1-row shape probe (memoised)
    assert sum(batches) == n_images + 1 and batches.count(1) >= 1
    assert [(r["layer"], r["lr"]) for r in res.rows] == [(n, lr) for n in LAYERS for lr in (1e-3, 1e-2)]
    assert res.best == max(res.rows, key=lambda r: (r["val_acc"], -r["val_loss"]))
    summary = json.loads((tmp_path / "s" / "sweep.json").read_text())
    assert summary["best"] == res.best and summary["axes"] == ["lr"]
    assert (tmp_path / "s" / "sweep.png").stat().st_size > 20_000

    batches.clear()
    again = sweep_run(spec(tmp_path / "s2"), SweepGrid(tuple(LAYERS), HeadSpec("linear"), lrs=(1e-3,)))
    handle.remove()
    assert batches == [] and len(again.rows) == 3  # the cache holds every layer: no backbone pass

    row = res.rows[3]  # layer3 at lr 1e-2, against `featcache train` of that layer alone
    alone = train_run(replace(spec(tmp_path / "alone"), train=configs[1]), "layer3", HeadSpec("linear"))
    swept = load_run(tmp_path / "s" / row["run"])
    assert swept.metrics["val"]["acc"] == row["val_acc"] == alone.metrics["val"]["acc"]
    assert swept.metrics["test"]["acc"] == alone.metrics["test"]["acc"]
    for a, b in zip(swept.head.state_dict().values(), alone.head.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_sweep_cli_prints_the_choice_and_needs_a_validation_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "cache"))
    base = ["sweep", "torchvision:resnet18", "digits", "--weights", "none", "--limit", "150"]
    base += ["--input-size", "32", "32", "--layers", "layer3,penultimate", "--epochs", "2", "-q"]
    assert main([*base, "--lrs", "1e-3,1e-2", "--out", str(tmp_path / "s"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["rows"]) == 4 and out["best"] in out["rows"]
    # Cached augmented views: one pass per view serves every layer and setting.
    assert main([*base, "--views", "2", "--augment", "flip", "--out", str(tmp_path / "v"), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["rows"]) == 2
    summary = json.loads((tmp_path / "v" / "sweep.json").read_text())
    assert len(summary["view_keys"]) == 2
    assert main([*base, "--augment", "flip", "--out", str(tmp_path / "w")]) == 2
    assert "needs --views" in capsys.readouterr().err
    base[base.index("layer3,penultimate")] = "@blocks"  # every residual block, then the classifier's input
    assert main([*base, "--out", str(tmp_path / "b"), "--json"]) == 0
    layers = [r["layer"] for r in json.loads(capsys.readouterr().out)["rows"]]
    assert layers == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)] + ["penultimate"]
    assert main([*base, "--val-fraction", "0", "--out", str(tmp_path / "t")]) == 2
    assert "validation split" in capsys.readouterr().err
    # A head that needs maps, on pooled layers: refused before any training, naming the layer.
    assert main([*base, "--head", "pooled-linear", "--out", str(tmp_path / "p")]) == 2
    assert "layer 'layer1.0'" in capsys.readouterr().err and not (tmp_path / "p" / "sweep.json").exists()


def test_a_diverging_setting_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    bb = load_backbone("torchvision:resnet18", weights="none")
    sgd = TrainConfig(epochs=3, optimizer="sgd", weight_decay=10.0, schedule="constant", device="cpu")
    # L2 decay at lr x weight_decay = 100 multiplies the weights by -99 a step: inf in 3 epochs, NaN loss
    configs = grid(sgd, lr=[1e-2, 10.0])
    spec = RunSpec(
        bb, DATA, tmp_path / "s", extract=ECFG, train=sgd, cache_dir=str(tmp_path / "c"), progress=False
    )
    res = sweep_run(spec, SweepGrid(("penultimate",), HeadSpec("linear"), lrs=tuple(c.lr for c in configs)))
    ok, bad = res.rows
    assert (
        "diverged" not in ok and "training diverged in epoch" in bad["diverged"] and "--lr" in bad["diverged"]
    )
    assert res.best == ok
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["rows"][1]["diverged"] == bad["diverged"]


def test_a_run_records_and_says_its_automatic_batch_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "cache"))
    argv = tiny_resnet_on_digits()
    assert main(["train", *argv, "--epochs", "1", "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    splits = DataConfig("digits", limit=150).load()
    n = len(splits.train)
    assert f"batch size 16 (auto), {-(-n // 16)} steps per epoch" in err
    sizes = f"{n} train / {len(splits.val or [])} val / {len(splits.test or [])} test images, 10 classes"
    start = "train: torchvision:resnet18 (weights none), input 32x32: resize to 32x32, no crop (bilinear)"
    assert f"{start}, ImageNet mean/std; layer penultimate, linear head; digits: {sizes}" in err
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert metrics["batch_size"] == config["train"]["batch_size"] == 16
    assert metrics["steps_per_epoch"] == -(-n // 16) == len(metrics["step_losses"])
    # One epoch: every run's best epoch is its last, so the sweep says the heads were still improving.
    spec = RunSpec("torchvision:resnet18", DATA, tmp_path / "s", "none", ECFG, replace(BASE, epochs=1),
                   cache_dir=str(tmp_path / "c"), progress=False)  # fmt: skip
    sweep_run(spec, SweepGrid(("layer3", "penultimate")))
    warnings = json.loads((tmp_path / "s" / "sweep.json").read_text())["warnings"]
    assert len(warnings) == 1 and "still improving" in warnings[0] and "--epochs" in warnings[0]


@pytest.mark.slow
def test_on_a_small_training_split_the_sweep_chooses_a_layer_as_good_as_the_best(
    tmp_path: Path, lite0: Backbone
) -> None:
    """256 training images of four digit classes (scikit-learn's digits, upscaled, randomly cropped): with
    one optimiser step per epoch (batch 256) the heads barely train, and the sweep chose the layer
    that learns fastest, not the best one. The reference: scikit-learn's logistic regression per layer."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    digits, rng = load_digits(), np.random.default_rng(0)
    for c in (3, 5, 8, 9):
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        half = 64 + (len(idx) - 64) // 2
        for split, part in (("train", idx[:64]), ("val", idx[64:half]), ("test", idx[half:])):
            (tmp_path / "d" / split / str(c)).mkdir(parents=True)
            for j in part:
                img = Image.fromarray((digits.images[j] * 255 / 16).astype(np.uint8)).resize((40, 40))
                x, y = rng.integers(0, 9, 2)
                img.crop((x, y, x + 32, y + 32)).save(tmp_path / "d" / split / str(c) / f"{j}.png")
    ecfg = ExtractConfig(input_size=(64, 64))
    spec = RunSpec(lite0, DataConfig(str(tmp_path / "d")), tmp_path / "s", extract=ecfg,
                   cache_dir=str(tmp_path / "c"), progress=False)  # fmt: skip
    res = sweep_run(spec, SweepGrid(("@blocks",)))  # the default trainer settings, batch size included
    layers = sorted({r["layer"] for r in res.rows})
    feats = Job.open(spec, "sweep", layers, folder=False).extract_all()[
        0
    ]  # the splits as the sweep read them
    assert all(f.hit for f in feats.values())  # the sweep's own rows: no backbone pass
    assert len(feats["train"]) == 256 and len(feats["test"]) > 200
    reference = {}
    for layer in {r["layer"] for r in res.rows}:
        x_train, x_test = (np.asarray(feats[s].features[layer]) for s in ("train", "test"))
        scale = StandardScaler().fit(x_train)
        model = LogisticRegression(max_iter=2000).fit(scale.transform(x_train), feats["train"].labels)
        reference[layer] = model.score(scale.transform(x_test), feats["test"].labels)
    assert reference[res.best["layer"]] >= max(reference.values()) - 0.02, (res.best["layer"], reference)
    assert res.best["test_acc"] >= max(r["test_acc"] for r in res.rows) - 0.02


def test_export_and_predict_take_a_sweep_folder_and_use_its_chosen_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = RunSpec("torchvision:resnet18", DATA, tmp_path / "s", "none", ECFG, replace(BASE, epochs=2),
                   cache_dir=str(tmp_path / "c"), progress=False)  # fmt: skip
    res = sweep_run(spec, SweepGrid(("layer2", "layer3"), lrs=(1e-3, 1e-2)))
    chosen = res.out / res.best["run"]
    images = torch.randint(0, 256, (3, 40, 36, 3), dtype=torch.uint8)
    want = load_predictor(chosen, device="cpu").logits(images)
    torch.testing.assert_close(load_predictor(res.out, device="cpu").logits(images), want)
    assert load_run(res.out).dir == chosen
    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "c"))
    assert main(["export", str(res.out), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    assert f"is a sweep: using its chosen run {res.best['run']} (layer {res.best['layer']}" in out
    assert (chosen / "model.onnx").is_file()
    torch.testing.assert_close(
        load_predictor(chosen / "model.onnx").logits(images), want, rtol=1e-4, atol=1e-4
    )
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(images[0].numpy()).save(folder / "a.png")
    assert main(["predict", str(res.out), str(folder), "--json", "-q"]) == 0
    captured = capsys.readouterr()
    assert "using its chosen run" in captured.err and json.loads(captured.out)[0]["top"]


def four_class_photo_folder(root: Path) -> Path:
    """368 real images in 4 class folders, as a user's own small photo set: 100 faces and 100 non-faces
    (scikit-image's LFW subset), 84 zeros and 84 ones (scikit-learn's digits), RGB PNGs."""
    from skimage.data import lfw_subset
    from sklearn.datasets import load_digits

    faces, digits = lfw_subset(), load_digits()
    groups = {
        "face": faces[:100],
        "not-face": faces[100:],
        "zero": digits.images[digits.target == 0][:84] / 16,
        "one": digits.images[digits.target == 1][:84] / 16,
    }
    for name, images in groups.items():
        (root / name).mkdir(parents=True)
        for i, im in enumerate(images):
            pixels = (np.clip(im, 0, 1) * 255).astype("uint8")
            Image.fromarray(pixels).convert("RGB").save(root / name / f"{i:03d}.png")
    return root


def test_a_default_sweep_on_a_small_photo_folder_chooses_a_layer_near_the_best(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the default trainer settings (automatic batch size, default epochs), the layer chosen on
    val scores within 2 points of the best layer's test accuracy: with one optimiser step per epoch
    (batch 256 on a small split) the early layers score near chance after 30 epochs."""
    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "cache"))
    folder = four_class_photo_folder(tmp_path / "photos")
    argv = ["sweep", "efficientnet-lite0", str(folder), "--layers", "@blocks", "--input-size", "64", "64"]
    assert main([*argv, "-q", "--out", str(tmp_path / "s")]) == 0
    done = json.loads((tmp_path / "s" / "sweep.json").read_text())
    best_test = max(row["test_acc"] for row in done["rows"])
    assert len(done["rows"]) == 8 and done["best"]["test_acc"] >= best_test - 0.02, done["rows"]


def test_an_interrupted_sweep_resumes_from_its_folder_alone_and_reuses_its_finished_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep_mod = importlib.import_module("featcache.runs.sweep")
    fit_mod = importlib.import_module("featcache.train.fit")  # the module (the package exports fit)
    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "cache"))
    argv = ["sweep", *tiny_resnet_on_digits(), "--layers", "layer3,penultimate", "--lrs", "1e-3,1e-2"]
    argv += ["--epochs", "2", "-q"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0  # the reference: never interrupted
    capsys.readouterr()
    validate, calls = fit_mod._validate, {"n": 0}

    def ctrl_c_in_the_second_run(*args: Any) -> Any:  # 2 epochs a run: call 4 is the 2nd run's last
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return validate(*args)

    cut = tmp_path / "cut"
    # layer3's two settings train as one grid (tests/test_grid.py): the 2nd head's last epoch is cut
    monkeypatch.setattr(fit_mod, "_validate", ctrl_c_in_the_second_run)
    monkeypatch.setattr(
        importlib.import_module("featcache.train.grid"), "_validate", ctrl_c_in_the_second_run
    )
    assert main([*argv, "--out", str(cut)]) == 130
    assert f"featcache sweep --resume --out {cut}" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "cache"))
    assert not (cut / "sweep.json").exists()
    with pytest.raises(FileNotFoundError, match=r"sweep that did not finish.*--resume"):
        load_run(cut)
    first = sorted(p for p in cut.iterdir() if p.is_dir())[0]
    assert json.loads((first / "metrics.json").read_text())["finished"] is True
    stamps = {f.name: f.stat().st_mtime_ns for f in first.iterdir()}
    trained: list[str] = []
    train_on_cache, train_grid_on_cache = sweep_mod.train_on_cache, sweep_mod.train_grid_on_cache

    def spy(feats: Any, layer: str, *args: Any, **kwargs: Any) -> Any:
        trained.append(layer)
        return train_on_cache(feats, layer, *args, **kwargs)

    def grid_spy(feats: Any, layer: str, head: Any, configs: Any, *args: Any) -> Any:
        trained.extend([f"{layer} (grid)"] * len(configs))
        return train_grid_on_cache(feats, layer, head, configs, *args)

    monkeypatch.setattr(sweep_mod, "train_on_cache", spy)
    monkeypatch.setattr(sweep_mod, "train_grid_on_cache", grid_spy)
    assert main(["sweep", "--resume", "--out", str(cut), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # the 1st run reused, the 2nd retrained (alone), penultimate's two as one grid
    assert trained == ["layer3", "penultimate (grid)", "penultimate (grid)"]
    assert {f.name: f.stat().st_mtime_ns for f in first.iterdir()} == stamps  # not rewritten

    def untimed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]

    whole, resumed = (json.loads((d / "sweep.json").read_text()) for d in (tmp_path / "whole", cut))
    assert untimed(resumed["rows"]) == untimed(whole["rows"]) == untimed(out["rows"])
    assert untimed([resumed["best"]]) == untimed([whole["best"]])
    assert (cut / "sweep.png").stat().st_size > 20_000
    assert load_run(cut).dir == cut / whole["best"]["run"]

    trained.clear()  # a finished sweep: said so, nothing trained, the same table
    assert main(["sweep", "--resume", "--out", str(cut), "--json"]) == 0
    again = capsys.readouterr()
    assert trained == [] and "is finished: all 4 runs reused" in again.err
    assert untimed(json.loads(again.out)["rows"]) == untimed(whole["rows"])
    # settings written with --resume are checked against the sweep's own, as train's resume does
    assert main(["sweep", "--resume", "--out", str(cut), "--lrs", "1e-3", "-q"]) == 2
    assert "grid.lrs: [0.001, 0.01] -> [0.001]" in capsys.readouterr().err
    assert main(["sweep", "--resume", "--out", str(cut), "--epochs", "3", "-q"]) == 2
    assert "train.epochs: 2 -> 3" in capsys.readouterr().err
    assert trained == []
