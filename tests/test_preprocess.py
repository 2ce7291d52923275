"""Preprocessing against torchvision's own transforms (PIL and tensor pipelines), and channel handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.v2 as T2
from PIL import Image

from featcache.backbones.preprocessing import Preprocessing
from featcache.backbones.registry import BackboneCfg, load_backbone
from featcache.data.preprocess import to_model_input


def _reference_pipelines(cfg: BackboneCfg) -> tuple[T.Compose, T2.Compose]:
    """The same preprocessing written with torchvision transforms: on PIL images, and on uint8 tensors."""
    interp = T.InterpolationMode(cfg.interpolation)
    if cfg.resize_size:
        geometry = [T.Resize(cfg.resize_size, interpolation=interp), T.CenterCrop(list(cfg.input_size))]
        geometry2 = [
            T2.Resize(cfg.resize_size, interpolation=interp, antialias=True),
            T2.CenterCrop(list(cfg.input_size)),
        ]
    else:
        geometry = [T.Resize(list(cfg.input_size), interpolation=interp)]
        geometry2 = [T2.Resize(list(cfg.input_size), interpolation=interp, antialias=True)]
    pil = T.Compose([*geometry, T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])
    tensor = T2.Compose(
        [T2.PILToTensor(), *geometry2, T2.ToDtype(torch.float32, scale=True), T2.Normalize(cfg.mean, cfg.std)]
    )
    return pil, tensor


@pytest.mark.parametrize(
    "cfg",
    [
        load_backbone("efficientnet-lite0", weights="none").cfg,  # bicubic, resize 256 + crop 224
        BackboneCfg("m", Preprocessing(input_size=(48, 40), resize_size=56)),  # bilinear, non-square crop
        BackboneCfg("m").with_input_size(32, 40),  # resize straight to the size
        BackboneCfg(
            "m", Preprocessing(interpolation="nearest", mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1))
        ).with_input_size(20, 20),
    ],
    ids=["lite0", "crop", "resize", "nearest"],
)
def test_to_model_input_matches_torchvision_transforms(cfg: BackboneCfg) -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8))
    x = to_model_input(img, cfg.preprocessing)
    pil, tensor = _reference_pipelines(cfg)
    assert x.dtype == torch.float32 and x.shape == (3, *cfg.input_size)
    assert (x - tensor(img)).abs().max().item() <= 1e-5
    if cfg.interpolation != "nearest":  # PIL picks other source pixels for "nearest" than torch does
        # PIL's resampling rounds (and clips bicubic overshoot) differently by at most two grey levels
        std = torch.tensor(cfg.std).view(3, 1, 1)
        assert ((x - pil(img)) * std).abs().max().item() <= 2.01 / 255


def test_to_model_input_channels() -> None:
    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8), mode="L")
    cfg = BackboneCfg("m").with_input_size(16, 16)
    x = to_model_input(grey, cfg.preprocessing)
    ref = to_model_input(grey.convert("RGB"), cfg.preprocessing)
    assert torch.equal(x, ref)
    one = to_model_input(
        Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)),
        Preprocessing(channels=1, mean=(0.5,), std=(0.5,)).with_input_size(16, 16),
    )
    assert one.shape == (1, 16, 16)
    rgba = Image.new("RGBA", (20, 20), (10, 20, 30, 0))
    assert to_model_input(rgba, cfg.preprocessing).shape == (3, 16, 16)
