"""Preprocessing: an image as the backbone expects it, and a dataset view that a DataLoader decodes.

The backbone's own transforms (mode, resize or resize + centre crop, scale, normalise), applied with
torchvision's tensor functions; a bad file yields zeros and its error text instead of an exception,
so the caller decides (``--on-bad-image``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .._util import FeatcacheError
from ..backbones.preprocessing import Preprocessing
from .config import AUGMENTS, normalize_augment  # noqa: F401  (defined there, without torch)
from .digests import SampleChangedError
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
    return normalize_pixels(resize_pixels(to_pixels(img, pre), pre), pre)


def to_pixels(img: Image.Image, pre: Preprocessing) -> torch.Tensor:
    """The image's uint8 CHW pixels in the backbone's mode, at their own size. A grey image for a colour
    backbone keeps its one channel: Pillow's L -> RGB copies it into all three, which
    :func:`resize_pixels` does after resizing (a third of the work, the same values).

    Example:
        >>> tuple(to_pixels(Image.new("L", (28, 20)), Preprocessing()).shape)
        (1, 20, 28)
    """
    if not (img.mode == "L" and pre.channels == 3):
        img = img.convert("L" if pre.channels == 1 else "RGB")
    return TF.pil_to_tensor(img)


def resize_pixels(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """Resize (+ centre crop) uint8 pixels, one image (CHW) or a batch of one size (NCHW), to the
    backbone's input size with torch's uint8 kernel (a batch gives each image's own result, bit for bit);
    one grey channel becomes the backbone's three."""
    interp = INTERPOLATION[pre.interpolation]
    if pre.resize_size:
        x = TF.resize(x, [pre.resize_size], interpolation=interp, antialias=True)
        x = TF.center_crop(x, list(pre.input_size))
    else:
        x = TF.resize(x, list(pre.input_size), interpolation=interp, antialias=True)
    channel = x.dim() - 3
    if x.shape[channel] != pre.channels:
        x = x.expand(*x.shape[:channel], pre.channels, *x.shape[channel + 1 :]).contiguous()
    return x


def normalize_pixels(x: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """uint8 pixels at the input size, one image (CHW) or a batch (NCHW, on any device), as the float32
    the backbone takes: [0, 1], then normalised by the backbone's mean and std. Per image or on a batch,
    the arithmetic is the same, element by element.

    Example:
        >>> pre = Preprocessing().with_input_size(2, 2)
        >>> normalize_pixels(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8), pre).shape
        torch.Size([1, 3, 2, 2])
    """
    return TF.normalize(x.float().div_(255.0), list(pre.mean), list(pre.std))


class PixelBatch:
    """``collate_fn`` of a :class:`PreprocessedView` made with ``pixels=True``: each group of images of
    one size resized (+ cropped) as one batch, stacked in their order as a uint8 NCHW batch; normalise it
    with :func:`normalize_pixels` (on the device, a quarter of the bytes to move)."""

    def __init__(self, pre: Preprocessing) -> None:
        self.pre = pre

    def __call__(
        self, items: Sequence[tuple[torch.Tensor, int, str]]
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for j, (t, _, _) in enumerate(items):
            groups.setdefault(tuple(t.shape), []).append(j)
        h, w = self.pre.input_size
        out = torch.empty(len(items), self.pre.channels, h, w, dtype=torch.uint8)
        for rows in groups.values():
            out[rows] = resize_pixels(torch.stack([items[j][0] for j in rows]), self.pre)
        return out, torch.tensor([i for _, i, _ in items], dtype=torch.long), [e for _, _, e in items]


class PreprocessedView(torch.utils.data.Dataset):
    """``(tensor, index, error)`` per sample for a DataLoader; a bad image gives zeros and its error text.

    With ``digests`` (the content digest of each of ``indices``), a sample is decoded from bytes that
    hash to its digest (read once: the hash, the header check and the decode share them), else
    :class:`~featcache.data.digests.SampleChangedError` stops the run. With ``augment``, each sample is
    randomly augmented; with ``view`` too, deterministically per (content digest, view), so a cached
    augmented view is the same in any process and for any dataset that holds the image. With ``pixels``,
    the tensor is the decoded uint8 image at its own size (:func:`to_pixels`), for :class:`PixelBatch` to
    resize per batch and :func:`normalize_pixels` to normalise; else :func:`to_model_input`'s.
    """

    def __init__(
        self,
        samples: SampleSet,
        pre: Preprocessing,
        indices: Sequence[int] | None = None,
        augment: Callable[[Image.Image], Image.Image] | None = None,
        view: int | None = None,
        digests: Sequence[str] | None = None,
        pixels: bool = False,
    ) -> None:
        self.samples, self.pre, self.augment, self.view = samples, pre, augment, view
        self.indices = list(range(len(samples))) if indices is None else list(indices)
        self.digests = list(digests) if digests is not None else None
        self.pixels = pixels
        if self.digests is not None and len(self.digests) != len(self.indices):
            raise FeatcacheError(f"{len(self.digests)} digests for {len(self.indices)} samples")
        if view is not None and self.digests is None:
            raise FeatcacheError(
                "a cached view draws its augmentation from each sample's digest: pass digests"
            )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        index = self.indices[i]
        try:
            img = (
                self.samples.load(index)
                if self.digests is None
                else self.samples.load_checked(index, self.digests[i])
            )
            if self.augment is not None and self.view is not None and self.digests is not None:
                # A cached view: the same random draw for (image content, view) in any process or worker.
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(view_seed(self.digests[i], self.view))
                    img = self.augment(img)
            elif self.augment is not None:
                img = self.augment(img)
            return (to_pixels(img, self.pre) if self.pixels else to_model_input(img, self.pre)), index, ""
        except SampleChangedError:
            raise  # not a bad image: the run stops, naming the file
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # PIL's for bad files
            h, w = self.pre.input_size
            dtype = torch.uint8 if self.pixels else torch.float32
            return torch.zeros(self.pre.channels, h, w, dtype=dtype), index, f"{type(exc).__name__}: {exc}"


def view_seed(digest: str, view: int) -> int:
    """The 32-bit seed (the CPU generator keeps 32 bits) of view ``view`` of the image with ``digest``.

    Example:
        >>> view_seed("ab" * 32, 1) != view_seed("ab" * 32, 2)
        True
    """
    return int(hashlib.sha256(f"{digest}:{view}".encode()).hexdigest()[:8], 16)


#: Bumped when an augmentation's parameters or the per-(digest, view) seeding change: part of the
#: key of every augmented view, so older views are rebuilt rather than reused.
AUGMENT_VERSION = 2


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
