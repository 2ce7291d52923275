"""Preprocessing: an image as the backbone expects it, and a dataset view that a DataLoader decodes.

The backbone's own transforms (mode, resize or resize + centre crop, scale, normalise), applied with
torchvision's tensor functions; a bad file yields zeros and its error text instead of an exception,
so the caller decides (``--on-bad-image``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .._util import FeatcacheError, unknown
from ..backbones.preprocessing import Preprocessing
from .samples import SampleSet

INTERPOLATION = {
    "bilinear": TF.InterpolationMode.BILINEAR,
    "bicubic": TF.InterpolationMode.BICUBIC,
    "nearest": TF.InterpolationMode.NEAREST,
}


def to_model_input(img: Image.Image, pre: Preprocessing) -> torch.Tensor:
    """Apply the backbone's preprocessing (``cfg.preprocessing``): mode, resize (+ centre crop), [0, 1],
    normalise. CHW float32.

    Example:
        >>> x = to_model_input(Image.new("L", (28, 28)), Preprocessing().with_input_size(32, 32))
        >>> tuple(x.shape)
        (3, 32, 32)
    """
    img = img.convert("L" if pre.channels == 1 else "RGB")
    interp = INTERPOLATION[pre.interpolation]
    t = TF.pil_to_tensor(img)
    if pre.resize_size:
        t = TF.resize(t, [pre.resize_size], interpolation=interp, antialias=True)
        t = TF.center_crop(t, list(pre.input_size))
    else:
        t = TF.resize(t, list(pre.input_size), interpolation=interp, antialias=True)
    t = t.float().div_(255.0)
    return TF.normalize(t, list(pre.mean), list(pre.std))


class PreprocessedView(torch.utils.data.Dataset):
    """``(tensor, index, error)`` per sample for a DataLoader; a bad image gives zeros and its error text.

    With ``augment``, each sample is randomly augmented; with ``view`` too, deterministically per
    (view, sample), so a cached augmented view can be rebuilt or resumed exactly.
    """

    def __init__(
        self,
        samples: SampleSet,
        pre: Preprocessing,
        indices: Sequence[int] | None = None,
        augment: Callable[[Image.Image], Image.Image] | None = None,
        view: int | None = None,
    ) -> None:
        self.samples, self.pre, self.augment, self.view = samples, pre, augment, view
        self.indices = list(range(len(samples))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        index = self.indices[i]
        try:
            img = self.samples.load(index)
            if self.augment is not None and self.view is not None:
                # A cached view: the same random draw for (view, sample) in any process or worker.
                with torch.random.fork_rng(devices=[]):
                    # The CPU generator keeps 32 bits of a seed; for one sample every view (< 4294)
                    # gets its own seed. Equal seeds across different samples are harmless.
                    torch.default_generator.manual_seed((self.view * 1_000_003 + index) % 2**32)
                    img = self.augment(img)
            elif self.augment is not None:
                img = self.augment(img)
            return to_model_input(img, self.pre), index, ""
        except (OSError, ValueError, SyntaxError) as exc:  # PIL raises these for bad files
            h, w = self.pre.input_size
            return torch.zeros(self.pre.channels, h, w), index, f"{type(exc).__name__}: {exc}"


AUGMENTS = ("flip", "crop")
#: Bumped when an augmentation's parameters or the per-(view, sample) seeding change: part of the
#: key of every augmented view, so older views are rebuilt rather than reused.
AUGMENT_VERSION = 1


def normalize_augment(spec: str | None) -> str | None:
    """``spec`` with blanks and repeats dropped (``" flip,,flip"`` -> ``"flip"``); unknown names raise.

    Example:
        >>> normalize_augment("flip, crop,flip")
        'flip,crop'
    """
    if spec is None:
        return None
    parts = list(dict.fromkeys(p.strip() for p in spec.split(",") if p.strip()))
    for p in parts:
        if p not in AUGMENTS:
            raise unknown("augmentation", p, AUGMENTS, "Use --augment flip,crop.")
    if not parts:
        raise FeatcacheError(f"--augment {spec!r} names no augmentation; use flip, crop or flip,crop")
    return ",".join(parts)


def make_augment(spec: str | None, size: tuple[int, int]) -> v2.Compose | None:
    """Random PIL-level augmentation from ``flip`` and/or ``crop`` (comma-separated); None for none."""
    spec = normalize_augment(spec) if spec else None
    if not spec:
        return None
    ops: list[Any] = [
        v2.RandomHorizontalFlip() if p == "flip" else v2.RandomResizedCrop(size, scale=(0.6, 1.0))
        for p in spec.split(",")
    ]
    return v2.Compose(ops)
