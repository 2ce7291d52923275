"""Hugging Face backbones from a local directory (offline): preprocessing, layers, extraction, fine-tuning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from featcache.backbones.layers import list_layers  # noqa: E402
from featcache.backbones.registry import load_backbone  # noqa: E402
from featcache.extraction.nodes import FeatureExtractor  # noqa: E402
from featcache.runs.spec import RunSpec  # noqa: E402
from featcache.train.freeze import TrainableSpec, block_names, plan_freeze  # noqa: E402


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A tiny random ViT classifier saved as a Hugging Face model directory."""
    path = tmp_path_factory.mktemp("tinyvit")
    cfg = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        id2label={0: "cat", 1: "dog", 2: "fox"},
        label2id={"cat": 0, "dog": 1, "fox": 2},
    )
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg).eval()
    model.save_pretrained(path)
    transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3
    ).save_pretrained(path)
    return path, model


def test_hf_directory_loads_with_its_preprocessing(tiny_vit: tuple[Path, torch.nn.Module]) -> None:
    path, ref = tiny_vit
    bb = load_backbone(f"hf:{path}")
    assert bb.cfg.input_size == (32, 32) and bb.cfg.std == (0.25, 0.25, 0.25)
    assert bb.cfg.classes == ("cat", "dog", "fox")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bb.model(x), ref(pixel_values=x).logits)
    assert not any(p.requires_grad for p in bb.model.parameters())


def test_hf_layers_and_penultimate(tiny_vit: tuple[Path, torch.nn.Module]) -> None:
    path, ref = tiny_vit
    bb = load_backbone(f"hf:{path}")
    rows = {r.name: r.shape for r in list_layers(bb)}
    assert rows["vit.layers.1"] == (1, 17, 32)
    ext = FeatureExtractor(bb.model, ["vit.layers.0", "penultimate"], classifier=bb.cfg.classifier)
    x = torch.randn(2, 3, 32, 32)
    out = ext(x)
    with torch.no_grad():
        hidden = ref(pixel_values=x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(out["vit.layers.0"], hidden[1])
    assert out["penultimate"].shape == (2, 32)


def test_hf_blocks_for_fine_tuning(tiny_vit: tuple[Path, torch.nn.Module]) -> None:
    path, _ = tiny_vit
    bb = load_backbone(f"hf:{path}")
    assert block_names(bb.model) == ["vit.layers.0", "vit.layers.1"]
    plan = plan_freeze(bb, TrainableSpec.parse("last:1"), 5)
    assert plan.split == "vit.layers.1" and plan.classifier == "classifier"


def test_hf_missing_directory_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="local directory"):
        load_backbone(f"hf:{tmp_path / 'nope'}")


def test_hf_run_exports_in_every_format(tiny_vit: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    """A head on a ViT block: the exported model gives the cached pipeline's logits (hooks path: HF
    models do not trace with torch.fx)."""
    from featcache import DataConfig, ExtractConfig, HeadSpec, TrainConfig, export_run, extract, train_run
    from featcache.export.predict import load_predictor

    path, _ = tiny_vit
    data = DataConfig("digits", limit=90)
    ecfg = ExtractConfig(input_size=(32, 32), device="cpu")
    train = TrainConfig(epochs=2, device="cpu")
    spec = RunSpec(
        f"hf:{path}",
        data,
        tmp_path / "run",
        extract=ecfg,
        train=train,
        cache_dir=str(tmp_path / "c"),
        progress=False,
    )
    run = train_run(spec, "vit.layers.1", HeadSpec("linear"))
    test = data.load().test
    feats = extract(
        load_backbone(f"hf:{path}"),
        test,
        [run.layer],
        run.extract_config(),
        cache_dir=str(tmp_path / "c"),
        split="test",
        progress=False,
    )
    with torch.no_grad():
        want = run.head(feats.tensor("vit.layers.1", dtype=torch.float32))
    images = [test.load(i) for i in range(len(test))]
    for fmt in ("safetensors", "torchscript", "onnx"):
        got = load_predictor(export_run(tmp_path / "run", fmt), device="cpu").logits(images)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=fmt)


class _RunsCode:
    """A pickle that would run ``print`` when unpickled without restriction."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("a pickle ran",))


def test_pickle_weights_are_refused_with_featcaches_own_message(
    tiny_vit: tuple[Path, torch.nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ``pytorch_model.bin`` holding more than tensors: torch's weights-only unpickler refuses it (no
    code runs), and featcache says so in its own words, never advising ``weights_only=False``."""
    from featcache._util import FeatcacheError
    from featcache.cli.main import main

    _, ref = tiny_vit
    folder = tmp_path / "pickled"
    ref.config.save_pretrained(folder)  # transformers 5 no longer writes pickles: torch.save does
    torch.save({**ref.state_dict(), "extra": _RunsCode()}, folder / "pytorch_model.bin")
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    with pytest.raises(FeatcacheError, match=r"its pickle weights .* hold more than tensors") as exc:
        load_backbone(f"hf:{folder}")
    message = str(exc.value)
    assert "GLOBAL print" in message and "safetensors" in message
    assert "weights_only" not in message and "safe_globals" not in message and exc.value.__cause__ is None
    assert main(["layers", f"hf:{folder}"]) == 2
    out = capsys.readouterr()
    assert "a pickle ran" not in out.out + out.err and "weights_only" not in out.err
    assert load_backbone(f"hf:{folder}", weights="none").cfg.weights == "none"  # no weights: no pickle
