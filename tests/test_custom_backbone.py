"""Runs made from an ``nn.Module`` passed from Python, end to end: export (``backbone=``) to TorchScript,
ONNX and safetensors, predict like ``featcache predict``, and what the command line says when it cannot
rebuild the module; ``register_source``'s docstring example runs."""

from __future__ import annotations

import doctest
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from featcache.backbones import registry
from featcache.backbones.registry import load_backbone
from featcache.cli.main import main
from featcache.data.config import DataConfig
from featcache.export.predict import load_predictor
from featcache.export.save import export_run
from featcache.extraction.config import ExtractConfig
from featcache.runs.spec import RunSpec
from featcache.runs.train import train_run
from featcache.train.config import TrainConfig
from featcache.train.heads import HeadSpec


class TinyNet(nn.Module):
    """A small convolutional classifier of the user's own (not from any source featcache knows)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.features = nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2)
            )
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.features(x))), 1))


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A train run on 150 digits from a TinyNet passed as a module, and a few digit PNGs to predict."""
    root = tmp_path_factory.mktemp("custom")
    module = TinyNet()
    spec = RunSpec(
        load_backbone(module),
        DataConfig("digits", limit=150),
        out=root / "run",
        extract=ExtractConfig(input_size=(24, 24)),
        train=TrainConfig(epochs=3, device="cpu"),
        cache_dir=str(root / "cache"),
        progress=False,
    )
    train_run(spec, "pool", HeadSpec("linear"))
    images = root / "images"
    images.mkdir()
    from sklearn.datasets import load_digits

    for i, img in enumerate(load_digits().images[:6]):
        Image.fromarray((img * 255 / 16).astype(np.uint8)).convert("RGB").save(images / f"{i}.png")
    return {"run": root / "run", "module": module, "images": images}


def _probs(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """``{file name: {class: probability}}`` of predict's results (all classes: top_k = 10)."""
    return {Path(r["path"]).name: {t["class"]: t["prob"] for t in r["top"]} for r in results}


def _cli_predict(
    target: Path, images: Path, capsys: pytest.CaptureFixture[str]
) -> dict[str, dict[str, float]]:
    assert (
        main(["predict", str(target), str(images), "--top-k", "10", "--json", "-q", "--device", "cpu"]) == 0
    )
    return _probs(json.loads(capsys.readouterr().out))


def _close(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].keys() == b[name].keys()
        for c in a[name]:
            assert a[name][c] == pytest.approx(b[name][c], abs=1e-4), (name, c)


def test_a_custom_module_run_exports_to_torchscript_and_onnx_and_predicts_alike(
    custom_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, module, images = custom_run["run"], custom_run["module"], custom_run["images"]
    in_memory = load_predictor(run, device="cpu", backbone=module)
    files = sorted(images.iterdir())
    want = _probs(in_memory.predict_files(files, top_k=10, progress=False))
    for fmt, name in (("torchscript", "m.ts"), ("onnx", "m.onnx"), ("safetensors", "m.safetensors")):
        path = export_run(run, fmt, tmp_path / name, backbone=module)  # verified against the in-memory model
        if fmt == "safetensors":  # featcache's own format rebuilds the structure: it needs the module
            assert main(["predict", str(path), str(images), "--device", "cpu"]) == 2
            assert "backbone=module" in capsys.readouterr().err
            got = _probs(
                load_predictor(path, "cpu", backbone=module).predict_files(files, 10, progress=False)
            )
        else:  # TorchScript and ONNX carry the network: `featcache predict` needs no module
            got = _cli_predict(path, images, capsys)
        _close(got, want)
    # loading the safetensors file into a copy leaves the module passed as it was
    assert load_backbone(TinyNet()).cfg.weights_id == load_backbone(module).cfg.weights_id


def test_the_exported_model_computes_the_modules_own_layer_and_the_head(
    custom_run: dict[str, Any], tmp_path: Path
) -> None:
    """The TorchScript file equals the module's own ``pool`` output (a forward hook) through the saved
    head, on the run's preprocessing of the same images."""
    from featcache.export.build import build_model
    from featcache.runs.folder import RunFolder

    run, module = custom_run["run"], custom_run["module"]
    path = export_run(run, "torchscript", tmp_path / "m.ts", backbone=module)
    u8 = torch.from_numpy(
        np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted(custom_run["images"].iterdir())])
    )
    x = build_model(run, backbone=module)[0].preprocess(u8)  # normalised (N, 3, 24, 24)
    seen: list[torch.Tensor] = []
    hook = module.pool.register_forward_hook(lambda _m, _i, out: seen.append(out))
    with torch.inference_mode():
        module(x)
    hook.remove()
    head, _ = RunFolder(run).load_head()
    with torch.inference_mode():
        want = head(seen[0].flatten(1))
        got = torch.jit.load(str(path))(u8)
    assert torch.allclose(got, want, atol=1e-4)


def test_the_command_line_names_the_python_call_for_a_custom_module(
    custom_run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    run, images = str(custom_run["run"]), str(custom_run["images"])
    for argv in (["export", run], ["export", run, "--format", "onnx"], ["predict", run, images]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "an nn.Module passed from Python (module:TinyNet)" in err
        assert f"featcache.export_run({run!r}, format='onnx', backbone=module)" in err
        assert f"featcache.load_predictor({run!r}, backbone=module)" in err
        assert "--weights" not in err


def test_a_module_with_other_weights_is_refused(custom_run: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"the backbone passed has weights id .* but the run was trained on"):
        export_run(custom_run["run"], "onnx", tmp_path / "x.onnx", backbone=TinyNet(seed=1))
    assert not (tmp_path / "x.onnx").exists()


def test_register_source_docstring_example_runs() -> None:
    """The example builds a Backbone from a source function; it runs as a doctest (then unregistered)."""
    finder = doctest.DocTestFinder()
    (test,) = finder.find(registry.register_source, "register_source", globs=dict(vars(registry)))
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    try:
        result = runner.run(test)
    finally:
        for table in (registry._SOURCES, registry._LISTERS, registry._CLAIMS, registry._SIZED):
            table.pop("toy", None)
    assert result.attempted >= 3 and result.failed == 0


def test_a_finetuned_custom_module_exports_with_a_module_of_its_base_weights(tmp_path: Path) -> None:
    """finetune_run trains the module it is given; export rebuilds the network from a fresh module with
    the base weights (a copy: the module passed stays as it was) and the run's trained tensors."""
    from featcache.export.build import build_model
    from featcache.runs.finetune import FinetuneConfig, finetune_run

    spec = RunSpec(
        load_backbone(TinyNet()),
        DataConfig("digits", limit=150),
        out=tmp_path / "ft",
        extract=ExtractConfig(input_size=(24, 24)),
        train=TrainConfig(epochs=2, device="cpu", lr=1e-2),
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    run = finetune_run(spec, FinetuneConfig(train="last:1"))
    base = TinyNet()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    path = export_run(tmp_path / "ft", "torchscript", tmp_path / "ft.ts", backbone=base)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    u8 = torch.randint(0, 256, (3, 30, 28, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    with torch.inference_mode():
        want = run.model.eval()(build_model(tmp_path / "ft", backbone=base)[0].preprocess(u8))
        got = torch.jit.load(str(path))(u8)
    assert torch.allclose(got, want, atol=1e-4)
    assert main(["export", str(tmp_path / "ft")]) == 2
