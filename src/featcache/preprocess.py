"""Preprocessing: an image as the backbone expects it, and a dataset view that a DataLoader decodes.

The backbone's own transforms (mode, resize or resize + centre crop, scale, normalise), applied with
torchvision's tensor functions; a bad file yields zeros and its error text instead of an exception,
so the caller decides (``--on-bad-image``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from .backbones import BackboneCfg
from .data import SampleSet

INTERPOLATION = {
    "bilinear": TF.InterpolationMode.BILINEAR,
    "bicubic": TF.InterpolationMode.BICUBIC,
    "nearest": TF.InterpolationMode.NEAREST,
}


def to_model_input(img: Image.Image, cfg: BackboneCfg) -> torch.Tensor:
    """Apply the backbone's preprocessing: mode, resize (+ centre crop), [0, 1], normalise. CHW float32.

    Example:
        >>> x = to_model_input(Image.new("L", (28, 28)), BackboneCfg("m").with_input_size(32, 32))
        >>> tuple(x.shape)
        (3, 32, 32)
    """
    img = img.convert("L" if cfg.channels == 1 else "RGB")
    interp = INTERPOLATION.get(cfg.interpolation, TF.InterpolationMode.BILINEAR)
    t = TF.pil_to_tensor(img)
    if cfg.resize_size:
        t = TF.resize(t, [cfg.resize_size], interpolation=interp, antialias=True)
        t = TF.center_crop(t, list(cfg.input_size))
    else:
        t = TF.resize(t, list(cfg.input_size), interpolation=interp, antialias=True)
    t = t.float().div_(255.0)
    return TF.normalize(t, list(cfg.mean), list(cfg.std))


class PreprocessedView(torch.utils.data.Dataset):
    """``(tensor, index, error)`` per sample for a DataLoader; a bad image gives zeros and its error text."""

    def __init__(
        self,
        samples: SampleSet,
        cfg: BackboneCfg,
        indices: Sequence[int] | None = None,
        augment: Callable[[Image.Image], Image.Image] | None = None,
    ) -> None:
        self.samples, self.cfg, self.augment = samples, cfg, augment
        self.indices = list(range(len(samples))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        index = self.indices[i]
        try:
            img = self.samples.load(index)
            if self.augment is not None:
                img = self.augment(img)
            return to_model_input(img, self.cfg), index, ""
        except (OSError, ValueError, SyntaxError) as exc:  # PIL raises these for bad files
            h, w = self.cfg.input_size
            return torch.zeros(self.cfg.channels, h, w), index, f"{type(exc).__name__}: {exc}"
