"""``Preprocessing``: what a backbone expects of an image, the one record that extraction
(:func:`featcache.data.to_model_input`), the cache key and the exported model all read.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .._config import to_json
from .._util import FeatcacheError, unknown

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
#: Decimals of mean/std in the cache key: float noise from a source's arithmetic does not split keys.
KEY_DECIMALS = 6


@dataclass(frozen=True)
class Preprocessing:
    """An image as the backbone expects it: mode, resize (+ centre crop), scale to [0, 1], normalise.

    Attributes:
        input_size: (height, width) fed to the network.
        resize_size: shorter side before the centre crop; 0 resizes straight to ``input_size``.
        mean: per-channel normalisation mean (inputs scaled to [0, 1] first).
        std: per-channel normalisation std.
        interpolation: ``bilinear``, ``bicubic`` or ``nearest``.
        channels: input channels the network expects (1 or 3); grey images are replicated to 3.

    Example:
        >>> Preprocessing(mean=(0.5,) * 3, std=(0.5,) * 3).with_input_size(32, 32).resize_size
        0
    """

    input_size: tuple[int, int] = (224, 224)
    resize_size: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    channels: int = 3

    def __post_init__(self) -> None:
        # Sources hand over lists, numpy numbers or torch floats: store plain tuples so equal
        # settings compare (and hash) equal.
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise FeatcacheError(f"input size must be two positive numbers (H, W), got {self.input_size}")
        if self.resize_size < 0:
            raise FeatcacheError(f"resize size must be >= 0 (0: no crop), got {self.resize_size}")
        if self.interpolation not in INTERPOLATIONS:
            raise unknown(
                "interpolation", self.interpolation, INTERPOLATIONS, "Use bilinear, bicubic or nearest."
            )
        if self.channels not in (1, 3):
            raise FeatcacheError(f"input channels must be 1 or 3, got {self.channels}")
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, self.channels):
            raise FeatcacheError(
                f"mean {self.mean} and std {self.std} need one value, or one per channel ({self.channels})"
            )
        if min(self.std) <= 0:
            raise FeatcacheError(f"std must be positive, got {self.std}")

    def with_input_size(self, height: int, width: int) -> Preprocessing:
        """The same preprocessing resized straight to ``(height, width)`` (no crop): small inputs for CPUs."""
        return replace(self, input_size=(int(height), int(width)), resize_size=0)

    def describe(self) -> str:
        """What happens to an image, in words.

        Example:
            >>> Preprocessing().describe()
            'resize the shorter side to 256, centre crop 224x224 (bilinear), ImageNet mean/std'
        """
        h, w = self.input_size
        size = (
            f"resize the shorter side to {self.resize_size}, centre crop {h}x{w}"
            if self.resize_size
            else f"resize to {h}x{w}, no crop"
        )
        norm = "ImageNet mean/std" if (self.mean, self.std) == (IMAGENET_MEAN, IMAGENET_STD) else (
            f"mean {'/'.join(f'{m:g}' for m in self.mean)}, std {'/'.join(f'{s:g}' for s in self.std)}"
        )  # fmt: skip
        grey = ", grey" if self.channels == 1 else ""
        return f"{size} ({self.interpolation}{grey}), {norm}"

    def key_record(self) -> dict[str, Any]:
        """The canonical JSON form, mean and std rounded to ``KEY_DECIMALS``: the cache key's part.

        Example:
            >>> Preprocessing(mean=(0.1 + 0.2,) * 3).key_record()["mean"]
            [0.3, 0.3, 0.3]
        """
        rounded = replace(
            self,
            mean=tuple(round(m, KEY_DECIMALS) for m in self.mean),
            std=tuple(round(s, KEY_DECIMALS) for s in self.std),
        )
        record: dict[str, Any] = to_json(rounded)
        return record
