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


def test_a_cached_view_draws_its_augmentation_from_the_image_content() -> None:
    from featcache._util import FeatcacheError
    from featcache.data.preprocess import PreprocessedView, make_augment
    from featcache.data.samples import ArraySamples

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 40, 40, 3), dtype=np.uint8)
    images[2] = images[0]  # the same image twice
    samples = ArraySamples(images, [0, 1, 1])
    cfg = BackboneCfg("m").with_input_size(32, 32)
    aug = make_augment("flip,crop", (32, 32))
    d = samples.digests()

    def view(k: int, order: list[int]) -> list[torch.Tensor]:
        ds = PreprocessedView(samples, cfg.preprocessing, order, aug, k, [d[i] for i in order])
        return [ds[j][0] for j in range(len(order))]

    a, b = view(1, [0, 1, 2]), view(1, [2, 1])
    assert torch.equal(a[0], a[2]) and torch.equal(a[2], b[0]) and torch.equal(a[1], b[1])  # by content
    assert not torch.equal(view(2, [0])[0], a[0])  # another view, another draw
    with pytest.raises(FeatcacheError, match="pass digests"):
        PreprocessedView(samples, cfg.preprocessing, [0], aug, 1)
    with pytest.raises(FeatcacheError, match="1 digests for 2 samples"):
        PreprocessedView(samples, cfg.preprocessing, [0, 1], aug, 1, [d[0]])


@pytest.mark.parametrize(
    "cfg",
    [
        BackboneCfg("m", Preprocessing(input_size=(48, 40), resize_size=56)),
        BackboneCfg("m", Preprocessing(interpolation="bicubic")).with_input_size(32, 40),
        BackboneCfg("m", Preprocessing(channels=1, mean=(0.5,), std=(0.25,))).with_input_size(24, 24),
    ],
    ids=["crop", "bicubic", "one-channel"],
)
def test_batched_pixels_equal_the_per_image_pipeline(cfg: BackboneCfg) -> None:
    """What extraction feeds the backbone (uint8 pixels decoded per image, resized per batch of one size,
    normalised on the batch) equals, bit for bit, the per-image pipeline written with torchvision's
    functions (convert, to tensor, resize, [0, 1], normalise), and torchvision's transforms to rounding."""
    from torchvision.transforms.v2 import functional as TF

    from featcache.data.preprocess import PixelBatch, PreprocessedView, normalize_pixels
    from featcache.data.samples import ArraySamples

    rng = np.random.default_rng(1)
    images = [
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (70, 90), dtype=np.uint8)),  # grey, as MNIST
        Image.fromarray(rng.integers(0, 256, (33, 50, 4), dtype=np.uint8)),  # RGBA
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).convert("P"),  # palette
        Image.fromarray(rng.integers(0, 256, (33, 50), dtype=np.uint8)),
    ]

    class Images(ArraySamples):
        def load(self, index: int) -> Image.Image:
            return images[index]

    samples = Images(np.zeros((len(images), 2, 2), np.uint8), list(range(len(images))))
    view = PreprocessedView(samples, cfg.preprocessing, pixels=True)
    pixels, index, errors = PixelBatch(cfg.preprocessing)([view[i] for i in range(len(images))])
    x = normalize_pixels(pixels, cfg.preprocessing)
    assert index.tolist() == list(range(len(images))) and errors == [""] * len(images)

    interp = TF.InterpolationMode(cfg.interpolation)
    mode = "L" if cfg.channels == 1 else "RGB"
    for img, got in zip(images, x, strict=True):
        t = TF.pil_to_tensor(img.convert(mode))  # the per-image pipeline extraction used before
        if cfg.resize_size:
            t = TF.center_crop(TF.resize(t, [cfg.resize_size], interp, antialias=True), list(cfg.input_size))
        else:
            t = TF.resize(t, list(cfg.input_size), interp, antialias=True)
        want = TF.normalize(t.float().div_(255.0), list(cfg.mean), list(cfg.std))
        assert got.dtype == torch.float32 and torch.equal(got, want)
        assert torch.equal(got, to_model_input(img, cfg.preprocessing))
    if cfg.channels == 3:
        _, reference = _reference_pipelines(cfg)
        ref = torch.stack([reference(img.convert("RGB")) for img in images])
        assert (x - ref).abs().max().item() <= 1e-5
