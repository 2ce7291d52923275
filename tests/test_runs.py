"""Run folders: cache reuse, report files, reload, resume; the real-data linear probe (slow)."""

from __future__ import annotations

import csv
import importlib
import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import featcache.runs.train as runs_mod
from featcache._util import FeatcacheError
from featcache.backbones.registry import Backbone, load_backbone
from featcache.cli import main
from featcache.data.config import DataConfig
from featcache.export.predict import load_predictor
from featcache.export.save import export_run
from featcache.extraction.build import extract
from featcache.extraction.config import ExtractConfig, Views
from featcache.runs.folder import Run, RunFolder, RunRecord, load_run
from featcache.runs.metrics import Metrics
from featcache.runs.probe import ProbeConfig, probe_run
from featcache.runs.record import RUN_FORMAT, RunExtraction, TrainPart
from featcache.runs.report import curves_figure
from featcache.runs.spec import RunSpec
from featcache.runs.sweep import SweepGrid, sweep_run
from featcache.runs.train import train_run
from featcache.train.config import TrainConfig
from featcache.train.fit import FitResult, fit
from featcache.train.heads import HeadSpec, Standardize
from featcache.train.sources import FeatureSource

fit_mod = importlib.import_module("featcache.train.fit")  # the module (the package exports fit, the function)
SMALL = ExtractConfig(input_size=(32, 32), batch_size=64)


def _train(
    model: Backbone | str,
    data: DataConfig,
    layer: str,
    head: HeadSpec,
    cfg: TrainConfig,
    ecfg: ExtractConfig,
    out: Path,
    resume: bool = False,
    weights: str | None = None,
    overwrite: bool = False,
    views: Views | None = None,
) -> Run:
    """``train_run`` with the tests' cache folder (``c`` beside the run folder) and no progress bars."""
    spec = RunSpec(
        model,
        data,
        out,
        weights,
        ecfg,
        cfg,
        views,
        cache_dir=str(out.parent / "c"),
        progress=False,
        resume=resume,
        overwrite=overwrite,
    )
    return train_run(spec, layer, head)


def _count_forwards(model: torch.nn.Module) -> dict[str, int]:
    calls = {"n": 0}
    model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    return calls


def test_train_twice_hits_the_cache_and_writes_a_report(tmp_path: Path) -> None:
    bb = load_backbone("torchvision:resnet18", weights="none")
    data = DataConfig("digits", limit=300)
    cfg = TrainConfig(epochs=3, lr=1e-2, device="cpu")
    first = _train(bb, data, "layer3", HeadSpec("linear"), cfg, SMALL, tmp_path / "r1")
    assert not any(first.metrics.cache_hit.values())
    calls = _count_forwards(bb.model)
    second = _train(bb, data, "layer3", HeadSpec("linear"), cfg, SMALL, tmp_path / "r2")
    assert calls["n"] == 0
    assert all(second.metrics.cache_hit.values())
    assert second.metrics.test.acc == first.metrics.test.acc

    out = tmp_path / "r1"
    config = json.loads((out / "config.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert config["cache_keys"]["train"] == first.config["cache_keys"]["train"]
    assert config["layer"] == "layer3" and config["train"]["epochs"] == 3
    assert len(metrics["history"]) == 3 and {"val_acc", "val_loss", "train_loss"} <= set(
        metrics["history"][0]
    )
    assert len(metrics["test"]["confusion"]) == 10
    mode = (out / "metrics.json").stat().st_mode & 0o777  # what a plain write gives under this umask
    assert (out / "head.safetensors").stat().st_mode & 0o777 == mode  # not safetensors' private 0600
    for png in ("curves.png", "confusion.png"):
        data_png = (out / png).read_bytes()
        assert data_png[:8] == b"\x89PNG\r\n\x1a\n" and len(data_png) > 15_000


@pytest.fixture
def maps_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows of every cached map a FeatureSource loads, and -1 per Standardize.fit on maps (reads them)."""
    seen: list[int] = []
    load_x = FeatureSource.x.fget

    def x(self: FeatureSource) -> torch.Tensor | None:
        if len(self.row_shape) == 3 and not self.loaded:  # a map read into memory
            seen.append(len(self))
        return load_x(self)  # type: ignore[misc]

    monkeypatch.setattr(FeatureSource, "x", property(x))
    fit_std = Standardize.fit.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(
        Standardize,
        "fit",
        classmethod(
            lambda cls, a, *r, **k: (len(a.shape) == 4 and seen.append(-1)) or fit_std(cls, a, *r, **k)
        ),
    )
    return seen


def test_a_pooled_head_on_maps_trains_from_the_channel_statistics_as_on_the_maps(
    tmp_path: Path, maps_read: list[int]
) -> None:
    bb = load_backbone("torchvision:resnet18", weights="none")
    data, ecfg = DataConfig("digits", limit=200), replace(SMALL, pool="none")
    cfg = TrainConfig(epochs=3, lr=1e-2, standardize=True, device="cpu")
    maps_loaded = maps_read

    def run(fast: bool) -> Metrics:
        return _train(
            bb,
            data,
            "layer2",
            HeadSpec("pooled-linear"),
            replace(cfg, fast_paths=fast),
            ecfg,
            tmp_path / f"r{fast}",
        ).metrics

    fast = run(True)
    assert fast.fast_paths["front_from_channel_means"]
    assert maps_loaded == []  # standardisation, training, validation and test: no map read
    plain = run(False)
    assert not plain.fast_paths["front_once"] and len(maps_loaded) == 3  # train, val, test maps
    for a, b in zip(fast.history, plain.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_acc"] == b["val_acc"]
    assert fast.test.acc == plain.test.acc
    assert fast.test.loss == pytest.approx(plain.test.loss, rel=1e-5)


def test_a_pooled_head_on_maps_trains_as_a_linear_head_on_the_pooled_cache(tmp_path: Path) -> None:
    """Standardised pooled-linear on `--pool none` maps == standardised linear on `--pool avg` vectors:
    the head standardises what its Linear sees, the pooled features."""
    bb = load_backbone("torchvision:resnet18", weights="none")
    data, cfg = (
        DataConfig("digits", limit=200),
        TrainConfig(epochs=4, lr=1e-2, standardize=True, device="cpu"),
    )
    maps = _train(
        bb, data, "layer2", HeadSpec("pooled-linear"), cfg, replace(SMALL, pool="none"), tmp_path / "m"
    )
    vecs = _train(bb, data, "layer2", HeadSpec("linear"), cfg, replace(SMALL, pool="avg"), tmp_path / "v")
    for a, b in zip(maps.metrics.history, vecs.metrics.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_acc"] == b["val_acc"]
    assert maps.metrics.test.acc == vecs.metrics.test.acc


def test_with_views_a_pooled_head_still_validates_and_tests_on_the_channel_means(
    tmp_path: Path, maps_read: list[int]
) -> None:
    bb = load_backbone("torchvision:resnet18", weights="none")
    ecfg = replace(SMALL, pool="none")
    cfg = TrainConfig(epochs=2, lr=1e-2, standardize=True, device="cpu")
    run = _train(
        bb,
        DataConfig("digits", limit=200),
        "layer2",
        HeadSpec("pooled-linear"),
        cfg,
        ecfg,
        tmp_path / "r",
        views=Views(2, "flip"),
    )
    train_rows = run.metrics.examples_per_epoch
    assert maps_read == [train_rows, train_rows]  # the two training views; val and test: channel means only


def test_a_finished_run_is_not_overwritten_by_accident(tmp_path: Path) -> None:
    bb = load_backbone("torchvision:resnet18", weights="none")
    data, cfg = DataConfig("digits", limit=120), TrainConfig(epochs=1, device="cpu")
    first = _train(bb, data, "layer3", HeadSpec("linear"), cfg, SMALL, tmp_path / "r")
    config = (tmp_path / "r" / "config.json").read_text()
    with pytest.raises(FeatcacheError, match=r"already holds a run .*--resume.*--overwrite"):
        _train(bb, data, "layer3", HeadSpec("mlp"), cfg, SMALL, tmp_path / "r")
    assert (tmp_path / "r" / "config.json").read_text() == config  # untouched
    again = _train(bb, data, "layer3", HeadSpec("mlp"), cfg, SMALL, tmp_path / "r", overwrite=True)
    assert again.config["head"]["kind"] == "mlp" and first.config["head"]["kind"] == "linear"


def test_every_verb_keeps_a_finished_run_unless_told_and_an_overwrite_forgets_the_old_run(
    tmp_path: Path,
) -> None:
    bb = load_backbone("torchvision:resnet18", weights="none")
    cfg = TrainConfig(epochs=1, device="cpu")
    spec = RunSpec(bb, DataConfig("digits", limit=120), tmp_path / "s", extract=SMALL, train=cfg,
                   cache_dir=str(tmp_path / "c"), progress=False)  # fmt: skip
    done = sweep_run(spec, SweepGrid(("layer3",)))
    with pytest.raises(FeatcacheError, match=r"already holds a run \(sweep.json\)"):
        sweep_run(spec, SweepGrid(("layer3",)))
    again = sweep_run(replace(spec, resume=True), SweepGrid(("layer3",)))  # finished: its runs read back
    assert again.rows == done.rows and again.best == done.best
    with pytest.raises(FeatcacheError, match=r"differ .*grid\.layers: \['layer3'\] -> \['layer2'\]"):
        sweep_run(replace(spec, resume=True), SweepGrid(("layer2",)))  # another grid is another sweep
    old_runs = [p for p in (tmp_path / "s").iterdir() if p.is_dir()]
    sweep_run(replace(spec, overwrite=True), SweepGrid(("layer2",)))
    assert not any(p.exists() for p in old_runs)  # the replaced sweep's runs are gone, not mixed in
    probe = replace(spec, out=tmp_path / "p")
    probe_run(probe, "layer3", ProbeConfig(strengths=(1e-2,)))
    with pytest.raises(FeatcacheError, match="already holds a run"):
        probe_run(probe, "layer3", ProbeConfig(strengths=(1e-2,)))
    # An --overwrite removes the old run before it writes anything: killed right after, nothing of the
    # old run is left to be resumed as if it were the new one.
    folder = RunFolder.prepare(tmp_path / "p", overwrite=True)
    assert not any(folder.path.iterdir())
    with pytest.raises(FileNotFoundError, match="no run there to resume"):
        RunFolder.prepare(tmp_path / "p", resume=True)


def test_a_run_record_round_trips_and_refuses_another_part(tmp_path: Path) -> None:
    bb = load_backbone("torchvision:resnet18", weights="none")
    data, cfg = DataConfig("digits", limit=60), TrainConfig(epochs=1, device="cpu")
    run = _train(bb, data, "layer3", HeadSpec("linear"), cfg, SMALL, tmp_path / "r")
    folder = RunFolder(run.dir)
    record = folder.read_config()
    assert record == run.record and record.kind == "train" and record.layer == "layer3"
    assert isinstance(record.part, TrainPart) and set(record.part.split_contents) >= {"train", "test"}
    assert RunRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    # a key of another verb's part is no train run's part: refused, naming the parts a train run holds
    with pytest.raises(FeatcacheError, match=r"no train run's part \(TrainPart: split_contents; FoldsPart"):
        RunRecord.from_json({**record.to_json(), "finetune": {"train": "all"}})
    with pytest.raises(FeatcacheError, match="lacks"):
        RunRecord.from_json({"format": RUN_FORMAT, "model": "x"})
    with pytest.raises(FileNotFoundError, match="not a featcache run folder"):
        RunFolder(tmp_path).read_config()


def test_a_head_that_cannot_take_the_layer_fails_before_the_extraction(tmp_path: Path) -> None:
    bb = load_backbone("torchvision:resnet18", weights="none")
    calls = _count_forwards(bb.model)
    with pytest.raises(FeatcacheError, match=r"'conv' needs a spatial map .* \(256,\)"):
        _train(
            bb,
            DataConfig("digits", limit=200),
            "layer3",
            HeadSpec("conv"),
            TrainConfig(epochs=1, device="cpu"),
            replace(SMALL, pool="avg"),
            tmp_path / "r",
        )
    assert calls["n"] == 1  # one blank image, not the 200 of the dataset
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())  # no cache entry begun


def test_reloaded_run_evaluates_the_same(tmp_path: Path) -> None:
    bb = load_backbone("torchvision:resnet18", weights="none")
    run = _train(
        bb,
        DataConfig("digits", limit=200),
        "penultimate",
        HeadSpec("mlp", hidden=(32,)),
        TrainConfig(epochs=2, standardize=True, device="cpu"),
        SMALL,
        tmp_path / "r",
    )
    again = load_run(tmp_path / "r")
    test = DataConfig("digits", limit=200).load().test
    assert test is not None
    feats = extract(
        bb,
        test,
        [run.layer],
        run.extract_config(),
        cache_dir=str(tmp_path / "c"),
        split="test",
        progress=False,
    )
    assert feats.hit
    m = again.evaluate(feats, device="cpu")
    assert m.acc == pytest.approx(run.metrics.test.acc)
    assert m.loss == pytest.approx(run.metrics.test.loss, rel=1e-5)


def test_resume_continues_an_interrupted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bb = load_backbone("torchvision:resnet18", weights="none")
    data = DataConfig("digits", limit=200)
    cfg = TrainConfig(epochs=4, lr=3e-3, device="cpu")
    full = _train(bb, data, "layer2", HeadSpec("linear"), cfg, SMALL, tmp_path / "full")

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        return fit(*args, **kwargs, stop_after_epochs=2)

    monkeypatch.setattr(runs_mod, "fit", interrupted)
    _train(bb, data, "layer2", HeadSpec("linear"), cfg, SMALL, tmp_path / "cut")
    monkeypatch.undo()
    resumed = _train(
        bb,
        data,
        "layer2",
        HeadSpec("linear"),
        replace(cfg, fast_paths=False),
        SMALL,
        tmp_path / "cut",
        resume=True,
    )  # resumed with plain autograd: the fast paths change speed, not the training
    np.testing.assert_allclose(resumed.metrics.step_losses, full.metrics.step_losses, rtol=1e-5)
    for a, b in zip(resumed.head.state_dict().values(), full.head.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match=r"differ .*train\.epochs: \d+ -> 9.*--overwrite"):
        _train(
            bb,
            data,
            "layer2",
            HeadSpec("linear"),
            TrainConfig(epochs=9, device="cpu"),
            SMALL,
            tmp_path / "cut",
            resume=True,
        )


def test_resume_refuses_a_relabelled_dataset(tmp_path: Path) -> None:
    """The table is the same after a label fix, the split views are not: --resume says which."""
    from conftest import write_tree

    write_tree(tmp_path / "tree" / "train", classes=("a", "b"), per_class=6)
    data = DataConfig(str(tmp_path / "tree"), val_fraction=0.0, test_fraction=0.0)
    bb = load_backbone("torchvision:resnet18", weights="none")
    cfg = TrainConfig(epochs=1, device="cpu")
    first = _train(bb, data, "penultimate", HeadSpec("linear"), cfg, SMALL, tmp_path / "r")
    (tmp_path / "tree" / "train" / "a" / "00.png").rename(tmp_path / "tree" / "train" / "b" / "99.png")
    with pytest.raises(ValueError, match=r"train: the same 12 images with other labels \(a label fix\?\)"):
        _train(bb, data, "penultimate", HeadSpec("linear"), cfg, SMALL, tmp_path / "r", resume=True)
    assert (
        json.loads((tmp_path / "r" / "config.json").read_text())["cache_keys"] == first.config["cache_keys"]
    )


@pytest.mark.slow
def test_real_weights_linear_probe_on_mnist(tmp_path: Path) -> None:
    """OFFLINE.md's reference: EfficientNet-Lite0 ImageNet vs random init, MNIST-5k at 64 px."""
    data = DataConfig("mnist-5k")
    ecfg = ExtractConfig(input_size=(64, 64), batch_size=128)
    cfg = TrainConfig(epochs=20, lr=3e-3, standardize=True)
    pre = _train(
        "efficientnet-lite0", data, "penultimate", HeadSpec("linear"), cfg, ecfg, tmp_path / "imagenet"
    )
    rand = _train(
        "efficientnet-lite0",
        data,
        "penultimate",
        HeadSpec("linear"),
        cfg,
        ecfg,
        tmp_path / "random",
        weights="none",
    )
    print(f"imagenet {pre.metrics.test.acc:.4f}  random-init {rand.metrics.test.acc:.4f}")
    assert pre.metrics.test.acc >= 0.90
    assert rand.metrics.test.acc <= pre.metrics.test.acc - 0.05


def test_resume_check_names_each_setting_that_differs(tmp_path: Path) -> None:
    def record(extract: RunExtraction, train: TrainConfig) -> RunRecord:
        return RunRecord("train", "m", {}, DataConfig("digits"), extract, (), TrainPart({}), train=train)

    plain = RunExtraction(ExtractConfig(), ("layer3",))
    same = record(plain, TrainConfig(lr=0.1, fast_paths=False))
    folder = RunFolder(tmp_path)
    folder.write_config(same)
    folder.check_resume(
        replace(same, train=TrainConfig(lr=0.1, fast_paths=True)), ("extract", "train"), "settings"
    )
    with pytest.raises(
        ValueError, match=r"differ .*\(extract\.augment: None -> 'flip'; extract\.views: 0 -> 2\)"
    ):
        folder.check_resume(
            replace(same, extract=replace(plain, views=2, augment="flip")), ("extract", "train"), "settings"
        )
    with pytest.raises(ValueError, match=r"differ .*\(train\.lr: 0\.1 -> 0\.2\)"):
        folder.check_resume(replace(same, train=TrainConfig(lr=0.2)), ("extract", "train"), "settings")
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["extract"]["augment"]  # a field gone is refused, never read as off
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(FeatcacheError, match=r"extract record lacks \['augment'\]"):
        folder.check_resume(same, ("extract",), "settings")


def test_reprs_are_short_and_name_what_a_notebook_user_looks_for(tmp_path: Path) -> None:
    bb = load_backbone("torchvision:resnet18", weights="none")
    data, cfg = DataConfig("digits", limit=120), TrainConfig(epochs=2, device="cpu")
    run = _train(bb, data, "layer3", HeadSpec("linear"), cfg, SMALL, tmp_path / "r", weights="none")
    spec = RunSpec(bb, data, tmp_path / "s", extract=SMALL, train=cfg, cache_dir=str(tmp_path / "c"),
                   progress=False)  # fmt: skip
    sweep = sweep_run(spec, SweepGrid(("layer2", "layer3")))
    probe = probe_run(replace(spec, out=None), "layer3", ProbeConfig(strengths=(1e-2, 1e-1)))
    fitted = FitResult([{"epoch": 1.0}] * 3, [0.5] * 500, 2, False, 1.5, 100)
    predictor = load_predictor(run.dir, device="cpu")
    shown = {
        "run": (run, ["'layer3'", "'linear'", "classes=10", "test_acc="]),
        "record": (run.record, ["'train'", "'torchvision:resnet18'", "'layer3'"]),
        "splits": (data.load(), ["'digits'", "train=", "val=", "test=", "classes=10"]),
        "backbone": (bb, ["'torchvision:resnet18'", "weights='none'", "params"]),
        "sweep": (sweep, ["2 runs", "best="]),
        "probe": (probe, ["strength=", "test_acc="]),
        "fit": (fitted, ["epochs=3", "best_epoch=2"]),
        "predictor": (predictor, ["'layer3'", "classes=10"]),
        "export info": (predictor.info, ["'layer3'", "classes=10"]),
    }
    for name, (obj, needles) in shown.items():
        text = repr(obj)
        assert len(text) < 200, (name, len(text), text[:300])
        assert all(n in text for n in needles), (name, text)
        assert not any(bad in text for bad in ("tensor(", "array(", "0x", "history", "'0', '1'")), (
            name,
            text,
        )


def test_a_run_writes_its_history_and_its_mistakes_as_csv(
    tmp_path: Path, image_tree: Callable[..., list[Path]]
) -> None:
    image_tree("tree", classes=("cat", "dog", "fox"), per_class=12)
    bb = load_backbone("torchvision:resnet18", weights="none")
    data = DataConfig(str(tmp_path / "tree"), val_fraction=0.2, test_fraction=0.4)
    run = _train(bb, data, "layer3", HeadSpec("linear"), TrainConfig(epochs=3, device="cpu"), SMALL,
                 tmp_path / "r")  # fmt: skip
    with (tmp_path / "r" / "history.csv").open(newline="") as f:
        history = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in history] == [1, 2, 3]
    for row, want in zip(history, run.metrics.history):
        assert {k: pytest.approx(float(v)) for k, v in row.items()} == want
    with (tmp_path / "r" / "misclassified.csv").open(newline="") as f:
        wrong = list(csv.DictReader(f))
    # The reference: the head reloaded from the folder on the test images' cached features.
    test = data.load().test
    assert test is not None
    feats = extract(bb, test, ["layer3"], SMALL, cache_dir=str(tmp_path / "c"), split="test", progress=False)
    with torch.no_grad():
        rows = torch.as_tensor(np.array(feats.features["layer3"]))
        probs = torch.softmax(load_run(tmp_path / "r").head(rows), 1)
    truth = torch.as_tensor(feats.labels)
    missed = {feats.ids[i] for i in torch.nonzero(probs.argmax(1) != truth)[:, 0].tolist()}
    assert {r["id"] for r in wrong} == missed
    assert len(wrong) == len(test) - round(run.metrics.test.acc * len(test))
    assert all((tmp_path / "tree" / r["id"]).is_file() and r["split"] == "test" for r in wrong)  # file names
    losses = [float(r["loss"]) for r in wrong]
    assert losses == sorted(losses, reverse=True)
    for r in wrong:
        i = feats.ids.index(r["id"])
        assert r["true"] == ("cat", "dog", "fox")[int(truth[i])] and r["predicted"] != r["true"]
        assert float(r["loss"]) == pytest.approx(-float(torch.log(probs[i, truth[i]])), rel=1e-4)
    fig = curves_figure(run.metrics)
    marks = [line for line in fig.axes[0].lines if line.get_label().startswith("best epoch")]
    per_epoch = run.metrics.examples_per_epoch
    assert len(marks) == 1 and marks[0].get_xdata()[0] == run.metrics.best_epoch * per_epoch
    accs = [h["val_acc"] for h in run.metrics.history] + [run.metrics.test.acc]
    low, high = fig.axes[1].get_ylim()
    assert low <= min(accs) and high >= max(accs) and (low > 0 or min(accs) < 0.05)


def test_ctrl_c_leaves_a_usable_unfinished_run_that_resume_finishes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bb = load_backbone("torchvision:resnet18", weights="none")
    data, cfg = DataConfig("digits", limit=200), TrainConfig(epochs=4, lr=3e-3, device="cpu")
    full = _train(bb, data, "layer2", HeadSpec("linear"), cfg, SMALL, tmp_path / "full", weights="none")
    # The reference for what two finished epochs give: a fit that stops after them by itself.
    monkeypatch.setattr(runs_mod, "fit", lambda *a, **k: fit(*a, **k, stop_after_epochs=2))
    two = _train(bb, data, "layer2", HeadSpec("linear"), cfg, SMALL, tmp_path / "two", weights="none")
    monkeypatch.undo()
    calls = {"n": 0}
    validate = fit_mod._validate

    def ctrl_c_in_epoch_3(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return validate(*args)

    monkeypatch.setattr(fit_mod, "_validate", ctrl_c_in_epoch_3)
    with pytest.raises(KeyboardInterrupt) as stop:
        _train(bb, data, "layer2", HeadSpec("linear"), cfg, SMALL, tmp_path / "cut", weights="none")
    monkeypatch.undo()
    cut = tmp_path / "cut"
    assert f"featcache train --resume --out {cut}" in getattr(stop.value, "hint", "")
    metrics = json.loads((cut / "metrics.json").read_text())
    assert metrics["finished"] is False and len(metrics["history"]) == 2 and "test" in metrics
    assert all((cut / f).is_file() for f in ("curves.png", "history.csv", "head.safetensors"))
    for a, b in zip(load_run(cut).head.state_dict().values(), two.head.state_dict().values()):
        torch.testing.assert_close(a, b)  # the best head of the finished epochs
    with caplog.at_level("WARNING"):
        export_run(cut, "safetensors", tmp_path / "m.safetensors")
    assert "unfinished (interrupted after epoch 2 of 4)" in caplog.text and "--resume" in caplog.text
    resumed = _train(bb, data, "layer2", HeadSpec("linear"), cfg, SMALL, cut, resume=True, weights="none")
    assert resumed.metrics.finished is True and json.loads((cut / "metrics.json").read_text())["finished"]
    np.testing.assert_allclose(resumed.metrics.step_losses, full.metrics.step_losses, rtol=1e-5)
    calls["n"] = 0
    monkeypatch.setattr(fit_mod, "_validate", ctrl_c_in_epoch_3)
    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "c"))
    argv = ["train", "torchvision:resnet18", "digits", "--weights", "none", "--limit", "200", "--layer"]
    argv += ["layer2", "--input-size", "32", "32", "--epochs", "4", "--out", str(tmp_path / "cli"), "-q"]
    assert main(argv) == 130
    assert f"featcache train --resume --out {tmp_path / 'cli'}" in capsys.readouterr().err


def test_refusals_name_the_setting_as_the_command_line_and_python_spell_it(tmp_path: Path) -> None:
    bb = load_backbone("torchvision:resnet18", weights="none")
    data, cfg = DataConfig("digits", limit=60), TrainConfig(epochs=1, device="cpu")
    _train(bb, data, "layer3", HeadSpec("linear"), cfg, SMALL, tmp_path / "r")
    with pytest.raises(FeatcacheError, match=r"--resume \(resume=True\).*--overwrite \(overwrite=True\)"):
        _train(bb, data, "layer3", HeadSpec("linear"), cfg, SMALL, tmp_path / "r")
    # L2 decay at lr x weight_decay = 100 multiplies the weights by -99 a step: inf, then a NaN loss
    huge = TrainConfig(
        epochs=12, lr=10.0, weight_decay=10.0, optimizer="sgd", schedule="constant", device="cpu"
    )
    with pytest.raises(FeatcacheError, match=r"diverged.*--lr 1 \(lr=1\.0\)"):
        _train(bb, data, "layer3", HeadSpec("linear"), huge, SMALL, tmp_path / "d")


def test_an_unfinished_sweep_folder_names_its_runs(tmp_path: Path) -> None:
    for name in ("00-blocks.0-lr0.001", "01-blocks.1-lr0.001"):
        (tmp_path / "sweep" / name).mkdir(parents=True)
        (tmp_path / "sweep" / name / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="not a featcache run folder but holds 2") as info:
        RunFolder.resolve(tmp_path / "sweep")[0].read_config()
    assert str(tmp_path / "sweep" / "00-blocks.0-lr0.001") in str(info.value)
    assert "a sweep that did not finish has no sweep.json" in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"not a featcache run folder \(no config\.json\)"):  # no runs
        RunFolder(tmp_path).read_config()
