"""Freeze/unfreeze specs, BN policy, discriminative LRs, cached prefix == live loop, init-head, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, r2_score
from torch import nn

import test_tasks
from featcache.backbones.registry import load_backbone
from featcache.cache.store import FeatureCache
from featcache.data.config import DataConfig
from featcache.extraction.config import ExtractConfig
from featcache.extraction.nodes import FeatureExtractor
from featcache.runs.finetune import FinetuneConfig, finetune_run
from featcache.runs.folder import Run, load_run
from featcache.runs.spec import RunSpec
from featcache.runs.train import train_run
from featcache.train.config import TrainConfig
from featcache.train.freeze import (
    TrainableSpec,
    apply_train_mode,
    block_names,
    build_suffix,
    param_groups,
    plan_freeze,
    prefix_layer,
)
from featcache.train.heads import HeadSpec
from test_tasks import LITE, cli, read_csv

digits_sets = test_tasks.digits_sets  # the digits as manifests (multi-label, values), a module fixture

SMALL = ExtractConfig(input_size=(32, 32))


def _ft(
    tmp_path: Path,
    name: str,
    data: DataConfig,
    ft: FinetuneConfig,
    cfg: TrainConfig,
    progress: bool = False,
    resume: bool = False,
) -> Run:
    """A random-init resnet18 fine-tuned at 32 px into ``tmp_path / name``, sharing one cache folder."""
    spec = RunSpec(
        "torchvision:resnet18",
        data,
        tmp_path / name,
        "none",
        SMALL,
        cfg,
        cache_dir=str(tmp_path / "c"),
        progress=progress,
        resume=resume,
    )
    return finetune_run(spec, ft)


SEEDS_CFG = TrainConfig(
    epochs=2, batch_size=32, lr=1e-3, optimizer="adam", schedule="constant", weight_decay=0.0, device="cpu"
)


def test_head_spec_trains_only_the_new_classifier() -> None:
    bb = load_backbone("torchvision:resnet18", weights="none")
    plan = plan_freeze(bb, TrainableSpec.parse("head"), num_classes=3)
    model = bb.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    assert plan.trainable_params == 512 * 3 + 3  # the seeds' hand count
    assert isinstance(model.fc, nn.Linear) and model.fc.out_features == 3
    apply_train_mode(model, plan)
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 2])).backward()
    assert model.conv1.weight.grad is None and model.layer4[1].conv2.weight.grad is None
    assert model.fc.weight.grad is not None


def test_last_n_and_from_and_modules_specs() -> None:
    bb = load_backbone("torchvision:resnet18", weights="none")
    assert block_names(bb.model)[-2:] == ["layer4.0", "layer4.1"]
    plan = plan_freeze(bb, TrainableSpec.parse("last:1"), 10)
    assert plan.split == "layer4.1"
    assert set(plan.trainable_modules) == {
        "layer4.1.conv1",
        "layer4.1.bn1",
        "layer4.1.conv2",
        "layer4.1.bn2",
        "fc",
    }
    hand = sum(p.numel() for p in bb.model.layer4[1].parameters()) + 512 * 10 + 10
    assert plan.trainable_params == hand
    bb2 = load_backbone("torchvision:resnet18", weights="none")
    assert plan_freeze(bb2, TrainableSpec.parse("from:layer4"), 10).trainable_params == (
        sum(p.numel() for p in bb2.model.layer4.parameters()) + 5130
    )
    bb3 = load_backbone("torchvision:resnet18", weights="none")
    plan3 = plan_freeze(bb3, TrainableSpec.parse("modules:layer2.0.conv1"), 10)
    assert plan3.trainable_modules == ("layer2.0.conv1", "fc")
    bb4 = load_backbone("torchvision:resnet18", weights="none")
    assert plan_freeze(bb4, TrainableSpec.parse("all"), 10).trainable_params == sum(
        p.numel() for p in bb4.model.parameters()
    )
    with pytest.raises(ValueError, match="last:N"):
        TrainableSpec.parse("lst:2")
    with pytest.raises(ValueError, match="layer4"):
        plan_freeze(
            load_backbone("torchvision:resnet18", weights="none"), TrainableSpec.parse("from:layr4"), 10
        )


def test_discriminative_learning_rates() -> None:
    bb = load_backbone("torchvision:resnet18", weights="none")
    plan = plan_freeze(bb, TrainableSpec.parse("last:2"), 10, lr_decay=0.5)
    groups = param_groups(bb.model, plan, lr=1e-2)
    assert [g["lr"] for g in groups] == pytest.approx([1e-2, 5e-3, 2.5e-3])
    assert groups[0]["modules"] == ["fc"]
    assert all(m.startswith("layer4.1") for m in groups[1]["modules"])
    assert all(m.startswith("layer4.0") for m in groups[2]["modules"])


def test_timm_efficientnet_blocks_are_stages() -> None:
    bb = load_backbone("efficientnet-lite0", weights="none")
    blocks = block_names(bb.model, "classifier")
    assert blocks[0] == "blocks.0" and blocks[-1] == "blocks.6"
    plan = plan_freeze(bb, TrainableSpec.parse("last:1"), 10, input_size=(32, 32))
    assert plan.split == "blocks.6" and "conv_head" in plan.trainable_modules


def test_bn_frozen_keeps_running_statistics(tmp_path: Path) -> None:
    for mode in ("cached", "live"):
        run = _ft(
            tmp_path,
            mode,
            DataConfig("digits", limit=120),
            FinetuneConfig(train="last:1", bn="frozen", mode=mode),
            SEEDS_CFG,
        )
        fresh = load_backbone("torchvision:resnet18", weights="none").model
        for name in ("layer4.1.bn1", "layer4.1.bn2", "layer1.0.bn1"):
            a, b = run.model.get_submodule(name), fresh.get_submodule(name)
            torch.testing.assert_close(a.running_mean, b.running_mean, rtol=0, atol=0)
            torch.testing.assert_close(a.running_var, b.running_var, rtol=0, atol=0)
        assert not torch.equal(run.model.layer4[1].conv1.weight, fresh.layer4[1].conv1.weight)


def test_cached_prefix_equals_live_loop(tmp_path: Path) -> None:
    runs = {}
    for mode in ("cached", "live"):
        runs[mode] = _ft(
            tmp_path,
            mode,
            DataConfig("digits", limit=160),
            FinetuneConfig(train="last:1", bn="train", mode=mode),
            SEEDS_CFG,
        )
    assert runs["cached"].metrics.mode == "cached-prefix" and runs["live"].metrics.mode == "live"
    np.testing.assert_allclose(
        runs["cached"].metrics.step_losses, runs["live"].metrics.step_losses, rtol=1e-4, atol=1e-5
    )
    a, b = runs["cached"].model.state_dict(), runs["live"].model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5, msg=k)
    cfg = json.loads((tmp_path / "cached" / "config.json").read_text())
    assert cfg["plan"]["split"] == "layer4.1" and cfg["mode"] == "cached-prefix"
    info = FeatureCache(tmp_path / "c").info(cfg["cache_keys"]["train"])
    assert info["layers"] == {"input:layer4.1": [512, 1, 1]}


def test_live_fallback_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _ft(
        tmp_path,
        "aug",
        DataConfig("digits", limit=80),
        FinetuneConfig(train="last:1", augment="flip"),
        SEEDS_CFG,
        progress=True,
    )
    assert run.metrics.mode == "live" and "augmentation" in run.config["mode_reason"]
    assert "live because random augmentation" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--mode cached is not possible"):
        _ft(
            tmp_path,
            "x",
            DataConfig("digits", limit=80),
            FinetuneConfig(train="all", mode="cached"),
            SEEDS_CFG,
        )


def test_suffix_sees_the_live_loops_modes_of_the_modules_around_it() -> None:
    """timm's classifier dropout is switched by the root's flag, which ``last:1`` leaves in eval mode."""
    bb = load_backbone("timm:resnet18", weights="none")
    bb.model.drop_rate = 0.5
    plan = plan_freeze(bb, TrainableSpec.parse("last:1"), 10, input_size=(32, 32))
    suffix = build_suffix(bb.model, plan.split or "", plan)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    apply_train_mode(bb.model, plan)
    assert not bb.model.training and bb.model.layer4[1].training
    layer = prefix_layer(plan)
    cached_in = FeatureExtractor(bb.model, [layer])(x)[layer]
    suffix.train()
    torch.manual_seed(1)
    live = bb.model(x)
    torch.manual_seed(1)
    torch.testing.assert_close(suffix(cached_in), live, rtol=1e-5, atol=1e-5)
    # ... and with the root training too (``all``-like modes), the dropout runs in both.
    bb.model.train()
    cached_in = FeatureExtractor(bb.model, [layer])(x)[layer]  # the prefix's BatchNorms on batch stats
    torch.manual_seed(2)
    live = bb.model(x)
    torch.manual_seed(2)
    all_train = build_suffix(bb.model, plan.split or "").train()
    torch.testing.assert_close(all_train(cached_in), live, rtol=1e-5, atol=1e-5)


def test_suffix_refuses_a_split_across_a_skip_connection() -> None:
    bb = load_backbone("torchvision:resnet18", weights="none")
    with pytest.raises(ValueError, match="skip connection"):
        build_suffix(bb.model, "layer4.1.conv2")


def test_init_head_starts_from_the_trained_linear_head(tmp_path: Path) -> None:
    data = DataConfig("digits", limit=150)
    bb = load_backbone("torchvision:resnet18", weights="none")
    spec = RunSpec(
        bb,
        data,
        tmp_path / "probe",
        extract=SMALL,
        train=TrainConfig(epochs=3, standardize=True, device="cpu"),
        cache_dir=str(tmp_path / "c"),
        progress=False,
    )
    probe = train_run(spec, "penultimate", HeadSpec("linear"))
    run = _ft(
        tmp_path,
        "ft",
        data,
        FinetuneConfig(train="head", init_head=str(tmp_path / "probe")),
        TrainConfig(epochs=1, lr=1e-12, device="cpu"),
    )
    # With a negligible learning rate the fine-tuned model still predicts what the probe head does.
    assert run.metrics.test.acc == pytest.approx(load_run(tmp_path / "probe").metrics.test.acc)
    assert run.metrics.test.loss == pytest.approx(probe.metrics.test.loss, rel=1e-4)


def test_resume_reapplies_the_same_plan(tmp_path: Path) -> None:
    data = DataConfig("digits", limit=80)
    _ft(tmp_path, "r", data, FinetuneConfig(train="last:1"), SEEDS_CFG)
    again = _ft(tmp_path, "r", data, FinetuneConfig(train="last:1"), SEEDS_CFG, resume=True)
    assert next(n for n, p in again.model.named_parameters() if p.requires_grad).startswith("layer4.1")
    with pytest.raises(ValueError, match="frozen set"):
        _ft(tmp_path, "r", data, FinetuneConfig(train="last:2"), SEEDS_CFG, resume=True)


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "onnx"])
def test_fine_tuned_run_exports_whole(tmp_path: Path, fmt: str) -> None:
    from featcache.data.preprocess import to_model_input
    from featcache.export.predict import load_predictor
    from featcache.export.save import export_run

    data = DataConfig("digits", limit=80)
    run = _ft(tmp_path, "ft", data, FinetuneConfig(train="last:1"), SEEDS_CFG)
    path = export_run(tmp_path / "ft", fmt, tmp_path / f"model-{fmt}")
    test = data.load().test
    assert test is not None
    images = [test.load(i) for i in range(6)]
    cfg = load_backbone("torchvision:resnet18", weights="none").cfg.with_input_size(32, 32)
    with torch.no_grad():
        want = run.model.cpu().eval()(torch.stack([to_model_input(im, cfg.preprocessing) for im in images]))
    got = load_predictor(path, device="cpu").logits(images)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


def test_augmented_views_keep_the_cached_prefix(tmp_path: Path) -> None:
    ft = FinetuneConfig(train="last:1", augment="flip", views=2)
    run = _ft(tmp_path, "views", DataConfig("digits", limit=120), ft, SEEDS_CFG)
    assert run.metrics.mode == "cached-prefix" and run.config["mode_reason"] is None
    assert len(run.config["view_keys"]) == 2 and len(run.metrics.history) == SEEDS_CFG.epochs
    cache = FeatureCache(tmp_path / "c")
    for key in run.config["view_keys"]:
        info = cache.info(key)
        assert info["layers"] == {"input:layer4.1": [512, 1, 1]} and info["status"] == "ok"
    with pytest.raises(ValueError, match="--views 2 needs --augment"):
        FinetuneConfig(train="last:1", views=2)
    with pytest.raises(ValueError, match=r"cannot use .*everything trains"):  # not silently live
        _ft(
            tmp_path,
            "all",
            DataConfig("digits", limit=60),
            FinetuneConfig(train="all", augment="flip", views=2),
            SEEDS_CFG,
        )


def test_finetune_a_multilabel_set_trains_sigmoid_bce_and_predicts_label_sets(
    digits_sets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ml"
    argv = [*LITE, str(digits_sets["parity"]), "--cache-dir", str(digits_sets["cache"]), "--train", "last:1"]
    code, text, err = cli(capsys, "finetune", *argv, "--epochs", "5", "--out", str(out))
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads((out / "config.json").read_text())["task"] == "multilabel"
    assert metrics["task"] == "multilabel" and metrics["test"]["map"] >= 0.9 and "test mAP" in text
    assert 0 < metrics["threshold"] < 1 and metrics["test"]["threshold"] == metrics["threshold"]
    rows = read_csv(out / "predictions.csv")
    classes = ["big", "even", "odd"]
    y = np.array([[c in r["true"].split(";") for c in classes] for r in rows], dtype=float)
    p = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    aps = [average_precision_score(y[:, k], p[:, k]) for k in range(3)]
    assert metrics["test"]["per_label_ap"] == pytest.approx(aps, abs=1e-4)
    bce = -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()  # sigmoid BCE, not softmax cross-entropy
    assert metrics["test"]["loss"] == pytest.approx(bce, rel=1e-3)
    exported = tmp_path / "ml.safetensors"
    assert cli(capsys, "export", str(out), "--out", str(exported))[0] == 0
    for model in (out, exported):
        code, text, err = cli(capsys, "predict", str(model), str(digits_sets["root"] / "0005.png"), "-q")
        assert code == 0, err
        assert set(text.split(": ")[1].split()[0].split(";")) == {"odd", "big"}  # digit 5: a set


def test_finetune_a_regression_outputs_values_in_the_targets_units(
    digits_sets: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "reg"
    spec = str(digits_sets["value"])
    argv = [*LITE, spec, "--task", "regress", "--cache-dir", str(digits_sets["cache"]), "--train", "last:1"]
    code, text, err = cli(capsys, "finetune", *argv, "--epochs", "8", "--out", str(out))
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "regress" and metrics["test"]["r2"] >= 0.5 and "test R2" in text
    rows = read_csv(out / "predictions.csv")
    true = np.array([float(r["true_label"]) for r in rows])
    pred = np.array([float(r["predicted_label"]) for r in rows])
    assert metrics["test"]["r2"] == pytest.approx(r2_score(true, pred), abs=1e-5)
    # trained on standardised targets (losses near those of z-scores), evaluated in the digits' units
    assert metrics["history"][-1]["train_loss"] < 1 and metrics["test"]["mae"] < 2
    exported = tmp_path / "reg.safetensors"
    assert cli(capsys, "export", str(out), "--out", str(exported))[0] == 0
    for model in (out, exported):
        code, text, err = cli(capsys, "predict", str(model), str(digits_sets["root"] / rows[0]["id"]), "-q")
        assert code == 0, err
        assert float(text.split("label ")[1]) == pytest.approx(float(rows[0]["predicted_label"]), abs=1e-2)
    # a resumed finished run folds the scale into the reloaded weights once: the same numbers
    code, _, err = cli(capsys, "finetune", *argv, "--epochs", "8", "--out", str(out), "--resume")
    assert code == 0, err
    again = json.loads((out / "metrics.json").read_text())
    assert again["test"]["r2"] == pytest.approx(metrics["test"]["r2"], abs=1e-6)


@pytest.mark.parametrize("verb", ["finetune", "train"])
def test_resume_after_a_label_fix_or_an_added_image_is_a_named_refusal(
    verb: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The run resumed on other data would mix two datasets in one history: refused, naming the change
    (as ``train --resume`` refuses it), exit 2 at the command line."""
    from conftest import write_tree
    from featcache.cli.main import main

    data = tmp_path / "data"
    write_tree(data / "train", classes=("a", "b"), per_class=5, formats=("png",))
    write_tree(data / "val", classes=("a", "b"), per_class=2, formats=("png",), seed=1)
    out, cache = str(tmp_path / "run"), str(tmp_path / "c")
    flags = ["--weights", "none", "--input-size", "32", "32", "--epochs", "1", "-q"]
    flags += ["--train", "last:1"] if verb == "finetune" else []
    argv = [verb, "torchvision:resnet18", str(data), *flags, "--out", out, "--cache-dir", cache]
    assert main(argv) == 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert set(config["split_contents"]) == {"dataset", "train", "val"}
    assert set(config["split_keys"]) == {"train", "val"}
    resume = [verb, "--resume", "--out", out, "--epochs", "1", "-q"]
    assert main(resume) == 0  # the same data: fine
    capsys.readouterr()

    (data / "train" / "a" / "00.png").rename(data / "train" / "b" / "99.png")  # a label fix
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert (
        "the data changed since the run started: dataset: the same 14 images with other labels (a label "
        "fix?); train: the same 10 images with other labels (a label fix?); resume with the data" in err
    )
    assert "start a new run" in err and "Traceback" not in err

    (data / "train" / "b" / "99.png").rename(data / "train" / "a" / "00.png")  # undone: resumable again
    keep = (data / "train" / "a" / "00.png").read_bytes()
    write_tree(data / "train", classes=("a",), per_class=1, formats=("png",), seed=7)  # a new a/00.png
    (data / "train" / "a" / "00.png").rename(data / "train" / "a" / "new.png")
    (data / "train" / "a" / "00.png").write_bytes(keep)  # an added image
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert "dataset: other images (14 -> 15; added, removed or edited); train: other images (10 -> 11" in err
