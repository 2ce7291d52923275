"""One ``Preprocessing`` record: its checks, its key form, and the same object driving the cache key, the
extraction's preprocessing and the exported model (in-graph ``Preprocess`` and sidecar)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import write_tree
from featcache._util import FeatcacheError
from featcache.backbones.preprocessing import Preprocessing
from featcache.backbones.registry import (
    Backbone,
    BackboneCfg,
    finish,
    list_sources,
    load_backbone,
    register_source,
    seeded_init,
)
from featcache.cache.store import cache_key
from featcache.data.config import DataConfig
from featcache.data.preprocess import to_model_input
from featcache.export.build import load_safetensors, read_info
from featcache.export.save import export_run
from featcache.extraction.build import cache_record, extract
from featcache.extraction.config import ExtractConfig
from featcache.runs.spec import RunSpec
from featcache.runs.train import train_run
from featcache.train.config import TrainConfig
from featcache.train.heads import HeadSpec

# Nothing of it is a default: a non-square crop from a resize, bicubic, its own mean and std.
CUSTOM = Preprocessing(
    input_size=(24, 20), resize_size=30, mean=(0.3, 0.4, 0.5), std=(0.2, 0.3, 0.25), interpolation="bicubic"
)


def _tiny(name: str, weights: str | None) -> Backbone:
    model = seeded_init(
        lambda: nn.Sequential(
            nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)
        )
    )
    return finish(model, BackboneCfg(f"preproctest:{name}", CUSTOM, weights="none", classifier="4"))


if "preproctest" not in list_sources():
    register_source("preproctest", lister=lambda: ["tiny"])(_tiny)


def test_checks_name_the_bad_value() -> None:
    with pytest.raises(FeatcacheError, match=r"unknown interpolation 'bicubik'.*'bicubic'"):
        Preprocessing(interpolation="bicubik")
    with pytest.raises(FeatcacheError, match=r"one per channel \(3\)"):
        Preprocessing(mean=(0.5, 0.5), std=(0.5, 0.5))
    with pytest.raises(FeatcacheError, match="input size must be two positive numbers"):
        Preprocessing(input_size=(0, 4))
    with pytest.raises(FeatcacheError, match="channels must be 1 or 3, got 4"):
        Preprocessing(channels=4, mean=(0.5,) * 4, std=(0.5,) * 4)
    with pytest.raises(FeatcacheError, match="std must be positive"):
        Preprocessing(std=(0.2, 0.0, 0.2))
    # Lists and numpy numbers from a source are stored as plain tuples: equal settings are equal.
    assert Preprocessing([24, 20], 30, np.array([0.3, 0.4, 0.5]), [0.2, 0.3, 0.25], "bicubic") == CUSTOM  # type: ignore[arg-type]


def test_key_record_is_the_json_form_with_rounded_floats() -> None:
    assert CUSTOM.key_record() == {
        "input_size": [24, 20],
        "resize_size": 30,
        "mean": [0.3, 0.4, 0.5],
        "std": [0.2, 0.3, 0.25],
        "interpolation": "bicubic",
        "channels": 3,
    }
    noisy = replace(CUSTOM, mean=(0.1 + 0.2, 0.4 + 1e-9, 0.5))  # 0.30000000000000004
    assert noisy != CUSTOM and noisy.key_record() == CUSTOM.key_record()
    assert replace(CUSTOM, mean=(0.3, 0.4, 0.51)).key_record() != CUSTOM.key_record()


def test_backbone_cfg_reads_its_one_preprocessing() -> None:
    cfg = load_backbone("preproctest:tiny").cfg
    assert cfg.preprocessing == CUSTOM
    assert (cfg.input_size, cfg.resize_size, cfg.interpolation, cfg.channels) == ((24, 20), 30, "bicubic", 3)
    assert (cfg.mean, cfg.std) == (CUSTOM.mean, CUSTOM.std)
    small = cfg.with_input_size(16, 12)
    assert small.preprocessing == replace(CUSTOM, input_size=(16, 12), resize_size=0)
    with pytest.raises(AttributeError):
        cfg.input_size = (1, 1)  # type: ignore[misc]  # one place to store it


def test_one_record_drives_the_key_the_extraction_and_the_export(tmp_path: Path) -> None:
    write_tree(tmp_path / "tree", per_class=5, size=(37, 53))
    data, cache = DataConfig(str(tmp_path / "tree")), str(tmp_path / "cache")
    ecfg = ExtractConfig(batch_size=8, device="cpu")  # no input_size: the backbone's own resize + crop
    tcfg = TrainConfig(epochs=2, device="cpu")
    spec = RunSpec(
        "preproctest:tiny", data, tmp_path / "run", "none", ecfg, tcfg, cache_dir=cache, progress=False
    )
    run = train_run(spec, "penultimate", HeadSpec("linear"))
    backbone, test = load_backbone("preproctest:tiny"), data.load().test
    assert test is not None
    images = [test.load(i) for i in range(len(test))]

    # The cache key: the record's preprocessing is CUSTOM's key form, and it is the key the run used.
    record = cache_record(backbone, ["penultimate"], run.extract_config())
    assert record.to_json()["preprocessing"] == CUSTOM.key_record()
    assert cache_key(record) == run.config["cache_keys"]["train"]
    assert BackboneCfg.from_dict(run.config["backbone_cfg"]).preprocessing == CUSTOM

    # The extraction: cached rows are the model's own forward on to_model_input(image, CUSTOM).
    feats = extract(
        backbone, test, ["penultimate"], run.extract_config(), cache_dir=cache, split="test", progress=False
    )
    cached = feats.tensor("penultimate", dtype=torch.float32)[[feats.ids.index(i) for i in test.ids]]
    x = torch.stack([to_model_input(img, CUSTOM) for img in images])
    assert x.shape == (len(images), 3, 24, 20)
    with torch.no_grad():
        torch.testing.assert_close(cached, backbone.model[:-1](x), rtol=1e-5, atol=1e-6)

    # The export: its sidecar holds CUSTOM, and its in-graph Preprocess gives to_model_input's tensors.
    path = export_run(run.dir, "safetensors", tmp_path / "model")
    assert read_info(path).preprocessing == CUSTOM
    model, info = load_safetensors(path)
    assert info.preprocessing == CUSTOM
    for img, want in zip(images, x, strict=True):
        raw = torch.from_numpy(np.array(img.convert("RGB")))[None]  # uint8 NHWC, 37x53
        assert torch.equal(model.preprocess(raw)[0], want)


# Keys of resnet18 (weights none) tables, layer3, computed by the code of main at 6f810b7 (before the
# backbone carried its input size, when each stage applied ExtractConfig.input_size itself).
KEYS_BEFORE = {
    ((32, 32), "avg"): "2b415d7590f665618c172688a40ce587c2343d15829d6b5f58f6ba4567142e68",
    (None, "avg"): "fc9d5b4a38d295eddddfe870085e7684f632d3aa9fd9bf7da6e74baa6800f107",
    ((48, 40), "none"): "0062dfcce3500dc3a7d3d23f780a5d78ad14be1f4a8d71fcd989325e1e2d6659",
}


def test_a_backbone_loaded_for_an_input_size_carries_it_and_keys_tables_as_before() -> None:
    plain = load_backbone("torchvision:resnet18", "none")
    for (size, pool), before in KEYS_BEFORE.items():
        config = ExtractConfig(input_size=size, pool=pool, device="cpu")
        sized = load_backbone("torchvision:resnet18", "none", input_size=size)
        expected = plain.cfg.with_input_size(*size) if size else plain.cfg
        assert sized.cfg == expected  # resolved once, at load: later stages read it as is
        assert sized.at_input_size(size) is sized
        # the same table, whether the backbone or only the config carries the size
        assert cache_record(sized, ["layer3"], config) == cache_record(plain, ["layer3"], config)
        assert cache_key(cache_record(sized, ["layer3"], config)) == before
    small = plain.at_input_size((32, 32))
    assert small.model is plain.model and plain.cfg.input_size == (224, 224)  # the given one unchanged
    # a backbone loaded for 32x32 with a config that names no size keeps its own (not the source's)
    assert cache_record(small, ["layer3"], ExtractConfig(device="cpu")).preprocessing == (
        cache_record(plain, ["layer3"], ExtractConfig(input_size=(32, 32), device="cpu")).preprocessing
    )
