"""Trust nothing on the input side (#16, #15 item 11): absurd option values, bad manifest rows, bad and
oversized images, full, read-only and foreign disks. Each ends in a named error (exit 2 from the
command line, no traceback) or a correct result, never a crash or silently wrong data."""

from __future__ import annotations

import errno
import gc
import importlib
import json
import math
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import featcache._disk as disk
import featcache.cache.writer as writer
from conftest import png_header, random_image, write_tree
from featcache._disk import DiskError
from featcache._util import FeatcacheError, resolve_device, write_json
from featcache.backbones.registry import Backbone
from featcache.cli.main import main
from featcache.cli.show import print_json
from featcache.data.config import DataConfig
from featcache.data.datasets import load_dataset
from featcache.data.samples import DEFAULT_MAX_PIXELS, BadImageError, decode_image, pixel_limit
from featcache.extraction.build import extract, extract_splits
from featcache.extraction.config import ExtractConfig
from featcache.runs.finetune import FinetuneConfig
from featcache.runs.folder import RunFolder
from featcache.runs.job import skipped_rows
from featcache.runs.probe import ProbeConfig
from featcache.runs.spec import RunSpec
from featcache.runs.sweep import SweepGrid
from featcache.runs.train import train_run
from featcache.train.config import TrainConfig
from featcache.train.fit import TrainingDiverged, fit
from featcache.train.heads import HeadSpec, build_head
from featcache.train.sources import FeatureSource

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
TINY = ["--weights", "none", "--input-size", "32", "32", "--limit", "60", "-q"]


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """Run the command line in this process; its exit status and stderr."""
    code = main(list(argv))
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------- option values

#: (config class, the values given in Python, verb, the same values as flags)
BAD_VALUES: list[tuple[type, dict[str, Any], str, list[str]]] = [
    (TrainConfig, {"lr": 1e30}, "train", ["--lr", "1e30"]),
    (TrainConfig, {"lr": 0.0}, "train", ["--lr", "0"]),
    (TrainConfig, {"lr": -1e-3}, "train", ["--lr=-1e-3"]),
    (TrainConfig, {"lr": math.nan}, "train", ["--lr", "nan"]),
    (TrainConfig, {"lr": math.inf}, "train", ["--lr", "inf"]),
    (TrainConfig, {"label_smoothing": 5.0}, "train", ["--label-smoothing", "5"]),
    (TrainConfig, {"label_smoothing": 1.0}, "train", ["--label-smoothing", "1"]),
    (TrainConfig, {"warmup_epochs": -1.0}, "train", ["--warmup-epochs", "-1"]),
    (TrainConfig, {"warmup_epochs": 40.0}, "train", ["--warmup-epochs", "40"]),
    (TrainConfig, {"epochs": 0}, "train", ["--epochs", "0"]),
    (TrainConfig, {"batch_size": 0}, "train", ["--batch-size", "0"]),
    (TrainConfig, {"momentum": 1.5}, "train", ["--momentum", "1.5"]),
    (TrainConfig, {"weight_decay": -1.0}, "train", ["--weight-decay", "-1"]),
    (TrainConfig, {"patience": 0}, "train", ["--patience", "0"]),
    (TrainConfig, {"seed": -1}, "train", ["--seed", "-1"]),
    (TrainConfig, {"ram_budget_gb": -1.0}, "train", ["--ram-budget-gb", "-1"]),
    (TrainConfig, {"device": "cpuu"}, "train", ["--device", "cpuu"]),
    (TrainConfig, {"device": "cuda:x"}, "train", ["--device", "cuda:x"]),
    (HeadSpec, {"kind": "mlp", "hidden": (0,)}, "train", ["--head", "mlp", "--hidden", "0"]),
    (HeadSpec, {"kind": "mlp", "hidden": (-3,)}, "train", ["--head", "mlp", "--hidden", "-3"]),
    (HeadSpec, {"kind": "mlp", "dropout": 1.0}, "train", ["--head", "mlp", "--dropout", "1"]),
    (HeadSpec, {"kind": "conv", "conv_channels": 0}, "train", ["--head", "conv", "--conv-channels", "0"]),
    (ExtractConfig, {"batch_size": 0}, "extract", ["--batch-size", "0"]),
    (ExtractConfig, {"batch_size": 0}, "train", ["--extract-batch-size", "0"]),
    (ExtractConfig, {"workers": -1}, "extract", ["--workers", "-1"]),
    (ExtractConfig, {"shard_mb": 0}, "extract", ["--shard-mb", "0"]),
    (ExtractConfig, {"shard_rows": 0}, "extract", ["--shard-rows", "0"]),
    (ExtractConfig, {"input_size": (0, 32)}, "extract", ["--input-size", "0", "32"]),
    (ExtractConfig, {"input_size": (32, 100_000)}, "train", ["--input-size", "32", "100000"]),
    (ExtractConfig, {"device": "cpuu"}, "extract", ["--device", "cpuu"]),
    (DataConfig, {"val_fraction": 1.0}, "extract", ["--val-fraction", "1"]),
    (DataConfig, {"test_fraction": -0.1}, "train", ["--test-fraction", "-0.1"]),
    (
        DataConfig,
        {"val_fraction": 0.5, "test_fraction": 0.5},
        "train",
        ["--val-fraction", "0.5", "--test-fraction", "0.5"],
    ),
    (DataConfig, {"limit": 0}, "extract", ["--limit", "0"]),
    (DataConfig, {"seed": -1}, "extract", ["--split-seed", "-1"]),
    (DataConfig, {"max_image_pixels": 0}, "extract", ["--max-image-pixels", "0"]),
    (ProbeConfig, {"tol": 0.0}, "probe", ["--tol", "0"]),
    (ProbeConfig, {"max_iter": 0}, "probe", ["--max-iter", "0"]),
    (ProbeConfig, {"shots": 0}, "probe", ["--shots", "0"]),
    (ProbeConfig, {"shot_seeds": 0}, "probe", ["--shot-seeds", "0"]),
    (ProbeConfig, {"strengths": (-1.0,)}, "probe", ["--strengths", "-1"]),
    (ProbeConfig, {"strengths": (math.inf,)}, "probe", ["--strengths", "inf"]),
    (SweepGrid, {"layers": ("a",), "lrs": (1e30,)}, "sweep", ["--lrs", "1e30"]),
    (SweepGrid, {"layers": ("a",), "weight_decays": (-1.0,)}, "sweep", ["--weight-decays", "-1"]),
    (FinetuneConfig, {"lr_decay": 0.0}, "finetune", ["--lr-decay", "0"]),
    (FinetuneConfig, {"lr_decay": 2.0}, "finetune", ["--lr-decay", "2"]),
]
VERB_ARGS = {
    "train": ["--out", "OUT"],
    "finetune": ["--out", "OUT"],
    "sweep": ["--out", "OUT", "--layers", "a"],
    "probe": [],
    "extract": [],
}


@pytest.mark.parametrize(("cls", "values", "verb", "flags"), BAD_VALUES, ids=lambda v: str(v)[:40])
def test_an_absurd_value_is_refused_alike_by_python_and_the_command_line(
    cls: type,
    values: dict[str, Any],
    verb: str,
    flags: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    required = {"spec": "digits"} if cls is DataConfig else {}
    with pytest.raises(FeatcacheError) as lib:
        cls(**required, **values)
    message = str(lib.value)
    assert any(f"--{k.replace('_', '-')}" in message or k in message for k in values), message
    out = tmp_path / "run"
    argv = [verb, "torchvision:resnet18", "digits", *[str(out) if a == "OUT" else a for a in VERB_ARGS[verb]]]
    code, err = cli(capsys, *argv, *flags)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert not out.exists()  # refused before anything was written


def test_values_at_the_edges_are_taken() -> None:
    TrainConfig(lr=10.0, label_smoothing=0.0, warmup_epochs=30.0, momentum=0.0, weight_decay=0.0, patience=1)
    TrainConfig(batch_size=1, epochs=1, ram_budget_gb=0.0, seed=2**63 - 1, device="cuda:3")
    ExtractConfig(workers=0, input_size=(1, 1), device="mps")
    DataConfig("digits", val_fraction=0.0, test_fraction=0.0, limit=1, max_image_pixels=None)
    assert TrainConfig(epochs=np.int64(3)).epochs == 3  # numpy numbers count as numbers


def test_an_unknown_device_names_the_choices_everywhere(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(FeatcacheError, match=r"unknown device 'cpuu'\. Did you mean: 'cpu'.*auto\|cpu\|cuda"):
        resolve_device("cpuu")
    code, err = cli(capsys, "predict", "model.onnx", str(tmp_path), "--device", "gpu")
    assert code == 2 and "unknown device 'gpu'" in err and "Traceback" not in err


def test_a_non_finite_loss_stops_training_with_the_divergence_error() -> None:
    x = torch.randn(64, 8)
    x[5, 3] = math.inf  # a float16 cache overflowed: one non-finite value is a nan loss
    y = torch.arange(64) % 2
    head = build_head(HeadSpec("linear"), (8,), 2)
    with pytest.raises(TrainingDiverged, match=r"training diverged in epoch 1: the loss is nan.*--lr"):
        fit(head, FeatureSource(x, y), None, 2, TrainConfig(epochs=2, lr=1.0, device="cpu"), progress=False)


# --------------------------------------------------------------------------- manifests


def _manifest(tmp_path: Path, name: str, text: str, images: tuple[str, ...] = ("a.png", "b.png")) -> str:
    for f in images:
        Image.new("RGB", (8, 8)).save(tmp_path / f)
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


@pytest.mark.parametrize(
    ("name", "text", "wanted"),
    [
        ("nolabel.csv", "path,label\na.png,x\nb.png\n", r"line 3: image 'b.png' has no label"),
        ("emptylabel.csv", "path,label\na.png,x\nb.png,\n", r"line 3: image 'b.png' has no label"),
        ("nopath.csv", "path,label\na.png,x\n,y\n", r"line 3: no image path"),
        ("nocolumn.csv", "file,label\na.png,x\n", r"needs a header line with 'path' and 'label'"),
        ("cells.csv", "path,label\na.png,x,extra\n", r"line 2: 3 cells for 2 columns"),
        ("split.csv", "path,label,split\na.png,x,train\nb.png,y,valid\n", r"line 3: split 'valid'"),
        (
            "nolabel.jsonl",
            '{"path": "a.png", "label": "x"}\n{"path": "b.png"}\n',
            r"line 2: image 'b.png' has no",
        ),
        ("listlabel.jsonl", '{"path": "a.png", "label": ["x"]}\n', r"line 1: the label of 'a.png' is a list"),
        ("boollabel.jsonl", '{"path": "a.png", "label": true}\n', r"line 1: the label of 'a.png' is a bool"),
        ("notjson.jsonl", '{"path": "a.png", "label": "x"}\n{"path": \n', r"line 2: not JSON"),
        ("array.jsonl", '["a.png", "x"]\n', r"line 1: a JSON list, not an object"),
        ("nopath.jsonl", '{"path": 3, "label": "x"}\n', r"line 1: no image path \(got 3\)"),
        ("outside.csv", "path,label\n/etc/hostname,x\n", r"line 2: '/etc/hostname' is outside the manifest"),
        ("empty.csv", "path,label\n", r"has no rows"),
    ],
)
def test_a_bad_manifest_row_is_named_with_its_line(tmp_path: Path, name: str, text: str, wanted: str) -> None:
    spec = _manifest(tmp_path, name, text)
    with pytest.raises(FeatcacheError, match=wanted) as exc:
        load_dataset(spec)
    assert spec in str(exc.value)


def test_a_manifest_row_of_a_missing_file_is_named_and_integer_labels_are_classes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = _manifest(tmp_path, "gone.csv", "path,label\na.png,x\nc.png,y\n")
    with pytest.raises(FileNotFoundError, match=r"line 3: 'c.png'"):
        load_dataset(spec)
    code, err = cli(capsys, "extract", "torchvision:resnet18", spec, "--weights", "none")
    assert code == 2 and "line 3: 'c.png'" in err and "Traceback" not in err
    good = _manifest(tmp_path, "ints.jsonl", '{"path": "a.png", "label": 1}\n{"path": "b.png", "label": 0}\n')
    splits = load_dataset(good, val_fraction=0, test_fraction=0)
    assert splits.classes == ["0", "1"] and "None" not in splits.classes


# --------------------------------------------------------------------------- images


@pytest.fixture
def bad_tree(tmp_path: Path) -> Path:
    """Two classes of good images; a 15000 x 15000 bomb and an undecodable file in train/, one in test/."""
    root = tmp_path / "bad"
    write_tree(root / "train", ("cat", "dog"), per_class=8, formats=("png",), size=(32, 32))
    write_tree(root / "test", ("cat", "dog"), per_class=3, formats=("png",), size=(32, 32), seed=1)
    (root / "train" / "cat" / "bomb.png").write_bytes(png_header(15000, 15000))
    (root / "train" / "dog" / "broken.png").write_bytes(b"not an image")
    (root / "test" / "cat" / "half.png").write_bytes((root / "test" / "cat" / "00.png").read_bytes()[:60])
    # A JPEG cut short: its header verifies, only its end-of-image marker is missing.
    random_image(np.random.default_rng(3), (64, 64)).save(root / "train" / "dog" / "cut.jpg")
    (root / "train" / "dog" / "cut.jpg").write_bytes((root / "train" / "dog" / "cut.jpg").read_bytes()[:700])
    return root


def test_every_bad_image_of_every_split_is_named_in_one_error_and_the_good_rows_kept(
    bad_tree: Path, resnet18: Backbone, cache_dir: Path
) -> None:
    splits = load_dataset(str(bad_tree), val_fraction=0)
    cfg = ExtractConfig(input_size=(32, 32), device="cpu")
    rows: list[int] = []
    hook = resnet18.model.register_forward_pre_hook(lambda _m, x: rows.append(len(x[0])))
    with pytest.raises(BadImageError) as exc:
        extract_splits(resnet18, splits, ["layer3"], cfg, cache_dir=str(cache_dir), progress=False)
    message = str(exc.value)
    assert message.startswith("4 image(s) cannot be read")
    for name in ("bomb.png (train)", "broken.png (train)", "cut.jpg (train)", "half.png (test)", "skip"):
        assert name in message
    assert "bomb.png' is 225,000,000 pixels, more than the limit of 89,478,485 pixels" in message
    # Each file was read once, while extracting: the good images of both splits are committed (the bomb
    # refused from its header, never decoded), so skipping them now runs no backbone.
    good = len(splits.train) + len(splits.test) - 4
    assert sum(rows) >= good  # (and the layer checks' probe batches, if not memoised yet)
    rows.clear()
    skip = ExtractConfig(input_size=(32, 32), device="cpu", on_bad_image="skip")
    try:
        kept = extract_splits(resnet18, splits, ["layer3"], skip, cache_dir=str(cache_dir), progress=False)
    finally:
        hook.remove()
    assert rows == [] and sum(len(f) for f in kept.values()) == good
    assert all(f.hit for f in kept.values())


def test_skipped_images_are_listed_in_the_run_folder_and_said(
    bad_tree: Path, resnet18: Backbone, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = RunSpec(
        resnet18,
        DataConfig(str(bad_tree), val_fraction=0.25),
        tmp_path / "run",
        extract=ExtractConfig(input_size=(32, 32), device="cpu", on_bad_image="skip"),
        train=TrainConfig(epochs=1, device="cpu"),
        cache_dir=str(tmp_path / "c"),
    )
    run = train_run(spec, "layer4")
    rows = (tmp_path / "run" / "skipped.csv").read_text().splitlines()
    assert rows[0] == "split,id,reason" and len(rows) == 5
    assert {r.split(",")[1] for r in rows[1:]} == {
        "cat/bomb.png",
        "dog/broken.png",
        "dog/cut.jpg",
        "cat/half.png",
    }
    assert "skipped 4 unreadable image(s)" in capsys.readouterr().err
    test_rows = sum(1 for _ in (bad_tree / "test").rglob("*.png")) - 1
    assert sum(run.metrics["test"]["confusion"][0]) + sum(run.metrics["test"]["confusion"][1]) == test_rows


def test_the_pixel_limit_is_configurable_and_a_raised_limit_retries(
    tmp_path: Path, resnet18: Backbone, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "t"
    write_tree(root, ("a", "b"), per_class=4, formats=("png",), size=(32, 32))
    Image.new("RGB", (100, 60)).save(root / "a" / "big.png")  # 6000 pixels
    cfg = ExtractConfig(input_size=(32, 32), device="cpu", on_bad_image="skip")
    small = DataConfig(str(root), val_fraction=0, test_fraction=0, max_image_pixels=5000).load()
    first = extract(resnet18, small.train, ["layer4"], cfg, cache_dir=str(tmp_path / "c"), progress=False)
    assert [s["id"] for s in first.manifest["skipped"]] == ["a/big.png"] and first.rows == 8
    assert "--max-image-pixels 20000" in first.manifest["skipped"][0]["reason"]
    raised = DataConfig(str(root), val_fraction=0, test_fraction=0, max_image_pixels=6000).load()
    second = extract(resnet18, raised.train, ["layer4"], cfg, cache_dir=str(tmp_path / "c"), progress=False)
    assert second.rows == 9 and not second.manifest["skipped"] and second.extracted == 1
    code, err = cli(
        capsys, "extract", "torchvision:resnet18", str(root), "--weights", "none", "--input-size", "32", "32",
        "--max-image-pixels", "100", "--cache-dir", str(tmp_path / "c2"), "-q",
    )  # fmt: skip
    assert code == 2 and "9 image(s) cannot be read" in err and "Traceback" not in err


def test_pillows_global_limit_is_left_alone(tmp_path: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(15000, 15000))
    for limit in (DEFAULT_MAX_PIXELS, 10, None, 10**9):
        with pytest.raises((BadImageError, OSError)):
            decode_image(bomb, limit, str(bomb))
        assert before == Image.MAX_IMAGE_PIXELS
    with pixel_limit(DEFAULT_MAX_PIXELS):
        assert before == Image.MAX_IMAGE_PIXELS  # the default limit never touches the global
    with pytest.raises(BadImageError, match="more than the limit of 89,478,485"):
        decode_image(bomb, DEFAULT_MAX_PIXELS, str(bomb))
    good = tmp_path / "good.png"
    Image.new("RGB", (30, 20)).save(good)
    assert decode_image(good, 600, "good").size == (30, 20)
    with pytest.raises(BadImageError, match=r"30x20 = 600 pixels, more than the limit of 599"):
        decode_image(good, 599, "good")


# --------------------------------------------------------------------------- disks


def _digits(limit: int = 64) -> Any:
    return DataConfig("digits", val_fraction=0, test_fraction=0, limit=limit).load().train


ECFG = ExtractConfig(input_size=(32, 32), batch_size=16, shard_rows=16, device="cpu")


def test_a_full_disk_is_refused_before_a_shard_is_written(
    tmp_path: Path, resnet18: Backbone, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = shutil.disk_usage

    def full(path: Any) -> Any:
        u = real(path)
        return type(u)(u.total, u.total - 1000, 1000)

    monkeypatch.setattr(disk.shutil, "disk_usage", full)
    with pytest.raises(
        DiskError, match=r"not enough space to write a cache shard in '.*' \(.* needed.*1000 bytes"
    ):
        extract(resnet18, _digits(), ["layer4"], ECFG, cache_dir=str(tmp_path / "c"), progress=False)
    assert not list((tmp_path / "c").glob("*/shards/*"))
    code, err = cli(
        capsys,
        "train",
        "torchvision:resnet18",
        "digits",
        *TINY,
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "r"),
    )
    assert code == 2 and "not enough space to write the run folder" in err and "Traceback" not in err


def test_enospc_mid_shard_keeps_what_was_committed_and_the_retry_is_identical(
    tmp_path: Path, resnet18: Backbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = _digits()
    real_save, calls = writer.save_npy, {"n": 0}

    def fills_up(path: Path, array: np.ndarray) -> dict[str, Any]:
        calls["n"] += 1
        if calls["n"] == 5:  # the second file of the second shard (3 files each: 2 layers, digests)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(path, array)

    monkeypatch.setattr(writer, "save_npy", fills_up)
    layers = ["layer3", "layer4"]
    with pytest.raises(DiskError, match="not enough space to write a cache shard") as exc:
        extract(resnet18, samples, layers, ECFG, cache_dir=str(tmp_path / "c"), progress=False)
    assert "MiB needed with a 1.0 MiB margin" in str(exc.value)
    segments = list((tmp_path / "c").glob("*/segments/*.json"))
    shards = list((tmp_path / "c").glob("*/shards/*"))
    assert len(segments) == 1 and len(shards) == 3  # the committed shard; nothing of the failed one
    monkeypatch.setattr(writer, "save_npy", real_save)
    again = extract(resnet18, samples, layers, ECFG, cache_dir=str(tmp_path / "c"), progress=False)
    whole = extract(resnet18, samples, layers, ECFG, cache_dir=str(tmp_path / "u"), progress=False)
    assert again.from_cache == 16 and again.rows == whole.rows == len(samples)
    for layer in layers:
        assert np.array_equal(np.asarray(again.features[layer]), np.asarray(whole.features[layer]))


def test_a_short_write_without_errno_on_a_full_disk_is_a_disk_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: type(real(p))(100, 100, 0))
    err = disk.disk_error(OSError("65536 requested and 2016 written"), tmp_path, 65536, "a cache shard")
    assert isinstance(err, DiskError) and "0 bytes free" in str(err)
    monkeypatch.setattr(disk.shutil, "disk_usage", real)
    assert disk.disk_error(OSError("65536 requested and 2016 written"), tmp_path, 1, "x") is None
    assert disk.disk_error(OSError(errno.ENOENT, "gone"), tmp_path, 1, "x") is None


@pytest.mark.parametrize(("code", "words"), [(errno.EROFS, "read-only"), (errno.EACCES, "may not write")])
def test_a_cache_that_cannot_be_written_is_named(
    tmp_path: Path,
    resnet18: Backbone,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    code: int,
    words: str,
) -> None:
    real_mkdir = Path.mkdir

    def refuse(self: Path, *args: Any, **kwargs: Any) -> None:
        if str(self).startswith(str(tmp_path / "c")):
            raise OSError(code, os.strerror(code), str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(DiskError, match=rf"cannot write the feature cache in '.*/c': .*{words}.*--cache-dir"):
        extract(resnet18, _digits(), ["layer4"], ECFG, cache_dir=str(tmp_path / "c"), progress=False)
    code_, err = cli(
        capsys, "extract", "torchvision:resnet18", "digits", *TINY, "--cache-dir", str(tmp_path / "c")
    )
    assert code_ == 2 and words in err and "Traceback" not in err


def test_an_out_that_cannot_be_written_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real_access = os.access
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
    with pytest.raises(
        DiskError, match=r"cannot write the run folder in '.*locked/run': .*choose another --out"
    ):
        RunFolder.prepare(locked / "run")
    code, err = cli(capsys, "train", "torchvision:resnet18", "digits", *TINY, "--out", str(locked / "run"))
    assert code == 2 and "cannot write the run folder" in err and not (locked / "run").exists()


@pytest.mark.skipif(ROOT, reason="root ignores permissions")
def test_a_chmod_555_cache_and_out_give_the_named_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, err = cli(
            capsys, "extract", "torchvision:resnet18", "digits", *TINY, "--cache-dir", str(locked / "c")
        )
        assert code == 2 and "may not write" in err and "Traceback" not in err
        code, err = cli(capsys, "train", "torchvision:resnet18", "digits", *TINY, "--out", str(locked / "r"))
        assert code == 2 and "cannot write the run folder" in err
    finally:
        locked.chmod(0o755)


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fit_mod = importlib.import_module("featcache.train.fit")  # `featcache.train.fit` is also the function
    path = tmp_path / "checkpoint.pt"
    fit_mod._atomic_torch_save({"epoch": 1}, path)
    real = shutil.disk_usage
    monkeypatch.setattr(disk.shutil, "disk_usage", lambda p: type(real(p))(100, 100, 0))

    def fails(obj: Any, f: Any) -> None:
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", fails)
    with pytest.raises(DiskError, match="not enough space to write the training checkpoint"):
        fit_mod._atomic_torch_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left behind


def test_an_unconverted_disk_error_still_exits_2_without_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def full(a: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "x.json"))

    monkeypatch.setattr("featcache.cli.extract.cmd_extract", full)
    code, err = cli(capsys, "extract", "m", "d")
    assert code == 2 and "not enough space to write files in" in err and str(tmp_path) in err


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs, where mounting one works (root on Linux); skipped elsewhere."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        gc.collect()  # the memory maps of features read from it
        if subprocess.run(["umount", str(mnt)], check=False, capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=False)  # detached once the last map closes


def test_a_real_full_filesystem_ends_in_the_named_error_and_resumes_when_freed(
    tiny_fs: Path, tmp_path: Path, resnet18: Backbone
) -> None:
    samples = _digits(96)
    cfg = ExtractConfig(input_size=(32, 32), batch_size=16, shard_rows=16, device="cpu", pool="none")
    with pytest.raises(DiskError, match=rf"not enough space to write a cache shard in '{tiny_fs}/c/"):
        extract(resnet18, samples, ["layer3"], cfg, cache_dir=str(tiny_fs / "c"), progress=False)
    committed = len(list((tiny_fs / "c").glob("*/segments/*.json")))
    subprocess.run(["mount", "-o", "remount,size=16m", str(tiny_fs)], check=True)  # space freed
    again = extract(resnet18, samples, ["layer3"], cfg, cache_dir=str(tiny_fs / "c"), progress=False)
    whole = extract(resnet18, samples, ["layer3"], cfg, cache_dir=str(tmp_path / "u"), progress=False)
    assert again.from_cache == 16 * committed and again.rows == len(samples)
    assert np.array_equal(np.asarray(again.features["layer3"]), np.asarray(whole.features["layer3"]))


def test_skipped_csv_keeps_reasons_with_commas_and_quotes(tmp_path: Path) -> None:
    """skipped.csv rows come from the splits' results; a reason with a comma or quotes stays one cell."""
    folder = RunFolder(tmp_path / "r")

    feats = SimpleNamespace(result=SimpleNamespace(skipped=(("a/b.png", 'OSError: truncated, "quoted"'),)))
    rows = folder.write_skipped(skipped_rows({"train": feats}))  # type: ignore[dict-item]
    assert rows == [{"split": "train", "id": "a/b.png", "reason": 'OSError: truncated, "quoted"'}]
    assert json.dumps(rows) and (tmp_path / "r" / "skipped.csv").read_text().count("\n") == 2


def test_a_training_split_of_one_class_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = "path,label,split\na.png,cat,train\nb.png,cat,train\nc.png,dog,test\n"
    spec = _manifest(tmp_path, "one.csv", text, images=("a.png", "b.png", "c.png"))
    with pytest.raises(FeatcacheError, match=r"training split of .* holds only class 'cat' of 2"):
        DataConfig(spec).load()
    code, err = cli(
        capsys, "train", "torchvision:resnet18", spec, "--weights", "none", "--out", str(tmp_path / "r")
    )
    assert code == 2 and "at least two classes" in err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("flags", [["--top-k", "0"], ["--batch-size", "0"]])
def test_predict_refuses_absurd_counts_before_reading_anything(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = cli(capsys, "predict", "no-such-model", "no-such-images", *flags)
    assert code == 2 and f"{flags[0]} 0 (" in err and "must be a whole number >= 1" in err


def test_a_read_only_cache_serves_its_hits_and_names_a_miss(
    tiny_fs: Path, resnet18: Backbone, capsys: pytest.CaptureFixture[str]
) -> None:
    subprocess.run(["mount", "-o", "remount,size=16m", str(tiny_fs)], check=True)
    samples, cache = _digits(32), str(tiny_fs / "c")
    first = extract(resnet18, samples, ["layer4"], ECFG, cache_dir=cache, progress=False)
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    hit = extract(resnet18, samples, ["layer4"], ECFG, cache_dir=cache, progress=False)
    assert hit.hit and np.array_equal(
        np.asarray(hit.features["layer4"]), np.asarray(first.features["layer4"])
    )
    with pytest.raises(
        DiskError, match=rf"cannot write the feature cache in '{cache}': its filesystem is read-only"
    ):
        extract(resnet18, _digits(48), ["layer4"], ECFG, cache_dir=cache, progress=False)


@pytest.mark.parametrize(
    ("argv", "wanted"),
    [
        (["train", "m", "d", "--out", "o", "--folds", "1"], "--folds 1: cross-validation needs at least 2"),
        (["probe", "m", "d", "--folds", "-2"], "--folds -2 (folds=-2) must be a whole number >= 0"),
        (["layers", "m", "--depth", "-1"], "--depth -1 (depth=-1) must be a whole number >= 0"),
        (["summary", "m", "--depth", "-1"], "--depth -1 (depth=-1) must be a whole number >= 0"),
    ],
)
def test_counts_outside_the_configs_are_refused_before_a_model_loads(
    argv: list[str], wanted: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = cli(capsys, *argv)  # the model "m" would not load: the value is refused first
    assert code == 2 and wanted in err and "Traceback" not in err


def test_finetune_names_bad_images_before_training_and_lists_the_skipped(
    bad_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "finetune",
        "torchvision:resnet18",
        str(bad_tree),
        "--weights",
        "none",
        "--input-size",
        "32",
        "32",
    ]
    base += ["--epochs", "1", "--train", "last:1", "--cache-dir", str(tmp_path / "c"), "-q"]
    code, err = cli(capsys, *base, "--out", str(tmp_path / "e"))
    assert (
        code == 2 and "4 image(s) cannot be read" in err and not (tmp_path / "e" / "checkpoint.pt").exists()
    )
    code, err = cli(capsys, *base, "--out", str(tmp_path / "s"), "--on-bad-image", "skip")
    assert code == 0, err
    listed = (tmp_path / "s" / "skipped.csv").read_text()
    assert all(name in listed for name in ("cat/bomb.png", "dog/broken.png", "cat/half.png"))


def test_a_non_finite_validation_loss_is_the_divergence_error_and_metrics_stay_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x, y = torch.randn(64, 8), torch.arange(64) % 2
    xv = torch.randn(16, 8)
    xv[3, 1] = math.inf  # finite training rows, one non-finite validation row
    head = build_head(HeadSpec("linear"), (8,), 2)
    config = TrainConfig(epochs=2, lr=0.1, device="cpu")
    with pytest.raises(TrainingDiverged, match=r"validation loss is nan.*cache verify"):
        fit(head, FeatureSource(x, y), FeatureSource(xv, y[:16]), 2, config, progress=False)
    # a non-finite number that still reaches a JSON file is written as null: strict readers parse it
    write_json(tmp_path / "m.json", {"test_loss": math.nan, "curve": [1.0, math.inf, -math.inf]})
    text = (tmp_path / "m.json").read_text()
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {text}"))
    assert doc == {"test_loss": None, "curve": [1.0, None, None]}
    print_json({"test_loss": np.float64("nan")})  # and so is every --json output
    assert json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(c)) == {"test_loss": None}
