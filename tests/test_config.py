"""The JSON codec of the frozen configs: round trips through JSON text, tuples and nested records restored
from the type hints, defaults for missing keys, and errors naming the class and the key."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from featcache._config import from_json, to_json
from featcache._util import FeatcacheError
from featcache.backbones.preprocessing import Preprocessing
from featcache.backbones.registry import BackboneCfg
from featcache.data.config import DataConfig
from featcache.export.build import ExportInfo
from featcache.extraction.config import ExtractConfig, Views
from featcache.runs.sweep import SweepGrid
from featcache.train.config import TrainConfig
from featcache.train.heads import HeadInfo, HeadSpec

PRE = Preprocessing((48, 40), 56, (0.1, 0.2, 0.3), (0.3, 0.2, 0.1), "bicubic", 3)
CASES: dict[str, Any] = {
    "preprocessing": PRE,
    "preprocessing-grey": Preprocessing(channels=1, mean=(0.5,), std=(0.25,)).with_input_size(28, 28),
    "backbone": BackboneCfg("timm:x", PRE, "DEFAULT", "ab" * 32, ("cat", "dog"), "head.fc"),
    "backbone-defaults": BackboneCfg("custom"),
    "head-spec": HeadSpec("mlp", hidden=(64, 32), dropout=0.25),
    "head-info": HeadInfo(HeadSpec("conv", conv_channels=8), (16, 4, 4), 10, standardize=True),
    "extract": ExtractConfig(
        pool="none",
        dtype="float16",
        workers=2,
        input_size=(64, 48),
        amp=False,
        channels_last=True,
        shard_rows=7,
    ),
    "views": Views(2, "flip,crop"),
    "sweep": SweepGrid(("layer3", "penultimate"), HeadSpec("mlp", hidden=(8,)), lrs=(1e-3, 1e-2)),
    "extract-defaults": ExtractConfig(),
    "train": TrainConfig(epochs=3, lr=0.5, optimizer="sgd", patience=4, amp=True, warmup_epochs=0.5),
    "data": DataConfig("digits", val_fraction=0.25, limit=100, download=True),
    "export": ExportInfo(
        format="onnx",
        model="torchvision:resnet18",
        weights="none",
        weights_id="0" * 64,
        layer="layer3",
        pool="avg",
        storage_dtype="float16",
        classes=("a", "b"),
        preprocessing=PRE,
        head=to_json(HeadInfo(HeadSpec("linear"), (256,), 2)),
        method="fx",
        return_nodes=("layer3", "layer3"),
        truncated=True,
        notes=("one", "two"),
    ),
    "export-full": ExportInfo(
        format="pt",
        model="m",
        weights="w",
        weights_id="",
        layer="logits",
        pool="none",
        storage_dtype="float32",
        classes=("x",),
        preprocessing=Preprocessing(),
        head={"finetune": "all"},
        method="full",
        return_nodes=None,
        truncated=False,
    ),
}


def _tuples_in(obj: Any) -> list[str]:
    """Names of the tuple-valued attributes of a dataclass, recursively (``preprocessing.mean`` ...)."""
    out = []
    for name, value in vars(obj).items():
        if isinstance(value, tuple):
            out.append(name)
        elif hasattr(value, "__dataclass_fields__"):
            out += [f"{name}.{n}" for n in _tuples_in(value)]
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_through_json_text(name: str) -> None:
    obj = CASES[name]
    text = json.dumps(to_json(obj))  # must be plain JSON
    again = from_json(type(obj), json.loads(text))
    assert again == obj and type(again) is type(obj)
    assert _tuples_in(again) == _tuples_in(obj)  # lists came back as tuples, nested records as records


def test_to_json_writes_plain_values() -> None:
    info = HeadInfo(HeadSpec("mlp", hidden=(64,)), (512,), 10)
    assert to_json(info) == {
        "spec": {"kind": "mlp", "hidden": [64], "dropout": 0.0, "conv_channels": 256},
        "in_shape": [512],
        "num_classes": 10,
        "standardize": False,
        "layout": None,
        "task": "classify",
        "threshold": None,
    }
    cfg = to_json(CASES["backbone"])
    assert cfg["preprocessing"]["input_size"] == [48, 40] and cfg["classes"] == ["cat", "dog"]
    with pytest.raises(FeatcacheError, match="PosixPath"):
        to_json(DataConfig(Path("/x")))  # type: ignore[arg-type]


def test_the_thin_wrappers_are_the_codec() -> None:
    cfg, info = CASES["backbone"], CASES["export"]
    assert cfg.to_dict() == to_json(cfg) and BackboneCfg.from_dict(to_json(cfg)) == cfg
    assert (
        info.to_dict() == to_json(info)
        and ExportInfo.from_dict(json.loads(json.dumps(to_json(info)))) == info
    )
    head = CASES["head-info"]
    assert HeadInfo.from_dict(head.to_dict()) == head and head.spec.to_dict() == to_json(head.spec)


def test_missing_keys_take_the_defaults() -> None:
    assert from_json(TrainConfig, {"epochs": 3}) == TrainConfig(epochs=3)
    assert from_json(ExtractConfig, {}) == ExtractConfig()
    assert from_json(BackboneCfg, {"spec": "m"}) == BackboneCfg("m")
    assert from_json(
        BackboneCfg, {"spec": "m", "preprocessing": {"resize_size": 0}}
    ).preprocessing == Preprocessing(resize_size=0)
    with pytest.raises(FeatcacheError, match="BackboneCfg needs the field 'spec'"):
        from_json(BackboneCfg, {"weights": "none"})


def test_unknown_keys_name_the_key_and_the_class() -> None:
    with pytest.raises(FeatcacheError, match=r"unknown TrainConfig field 'epoch'.*'epochs'"):
        from_json(TrainConfig, {"epoch": 3})
    nested = {"spec": "m", "preprocessing": {"input_size": [8, 8], "means": [0.5, 0.5, 0.5]}}
    with pytest.raises(FeatcacheError, match=r"unknown Preprocessing field 'means'.*'mean'"):
        from_json(BackboneCfg, nested)


def test_values_of_the_wrong_type_are_refused() -> None:
    with pytest.raises(FeatcacheError, match=r"TrainConfig\.epochs must be int, got str '3'"):
        from_json(TrainConfig, {"epochs": "3"})
    with pytest.raises(FeatcacheError, match=r"TrainConfig\.epochs must be int, got bool"):
        from_json(TrainConfig, {"epochs": True})  # JSON true is not 1
    with pytest.raises(FeatcacheError, match=r"TrainConfig\.standardize must be bool, got int"):
        from_json(TrainConfig, {"standardize": 1})
    with pytest.raises(FeatcacheError, match=r"Preprocessing\.input_size must hold 2 values, got 3"):
        from_json(Preprocessing, {"input_size": [1, 2, 3]})
    with pytest.raises(FeatcacheError, match=r"HeadSpec\.hidden must be a list"):
        from_json(HeadSpec, {"hidden": 64})
    with pytest.raises(FeatcacheError, match=r"DataConfig\.spec may not be null"):
        from_json(DataConfig, {"spec": None})
    with pytest.raises(FeatcacheError, match=r"BackboneCfg is stored as a JSON object"):
        from_json(BackboneCfg, ["m"])  # type: ignore[arg-type]
    # An int where a float is meant is the same number (a hand-written config says 2, not 2.0).
    lr = from_json(TrainConfig, {"lr": 2}).lr
    assert lr == 2.0 and isinstance(lr, float)
    # The class's own checks still run.
    with pytest.raises(FeatcacheError, match="unknown optimizer 'adamm'"):
        from_json(TrainConfig, {"optimizer": "adamm"})


@dataclass(frozen=True)
class _Choice:
    mode: Literal["fast", "exact"] = "fast"
    sizes: tuple[int, ...] | None = None
    extra: dict[str, Any] | None = None


def test_literal_fields_and_optional_tuples() -> None:
    obj = _Choice("exact", (1, 2), {"k": [1, {"a": None}]})
    assert from_json(_Choice, json.loads(json.dumps(to_json(obj)))) == _Choice(
        "exact", (1, 2), {"k": [1, {"a": None}]}
    )
    assert from_json(_Choice, {"sizes": None}) == _Choice()
    with pytest.raises(FeatcacheError, match=r"_Choice\.mode must be one of 'fast', 'exact'; got 'slow'"):
        from_json(_Choice, {"mode": "slow"})


def test_backbone_cfg_reads_the_flat_layout_of_older_run_folders() -> None:
    """Run folders written before ``preprocessing`` was one field keep loading (export, load_run)."""
    old = {
        "spec": "timm:x", "input_size": [48, 40], "resize_size": 56, "mean": [0.1, 0.2, 0.3],
        "std": [0.3, 0.2, 0.1], "interpolation": "bicubic", "channels": 3, "weights": "DEFAULT",
        "weights_id": "ab" * 32, "classes": ["cat", "dog"], "classifier": "head.fc",
    }  # fmt: skip
    assert BackboneCfg.from_dict(old) == CASES["backbone"]
