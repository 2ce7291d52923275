"""``DataConfig``: a dataset spec with how it is split (fractions, seed, limit)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .._checks import check_number
from .._util import FeatcacheError, flag
from .datasets import DatasetSplits, load_dataset
from .samples import DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class DataConfig:
    """A dataset spec and how it is split.

    Attributes:
        spec: folder, .csv/.jsonl manifest, torchvision:NAME:ROOT, mnist-5k, digits or faces.
        val_fraction: share of the training images held out for validation (when there is no val/).
        test_fraction: share held out for testing (when there is no test/).
        seed: seed of the stratified split (and of --limit's sample).
        limit: keep at most N samples, stratified.
        download: let torchvision:NAME:ROOT datasets download.
        max_image_pixels: an image file with more pixels (width x height, read from its header) is a
            bad image (--on-bad-image decides), never decoded: a guard against decompression bombs;
            off: no limit. The default is Pillow's own.

    Example:
        >>> DataConfig("mnist-5k", val_fraction=0.2).load().classes[:3]  # doctest: +SKIP
        ['0', '1', '2']
    """

    spec: str
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    limit: int | None = None
    download: bool = False
    max_image_pixels: int | None = field(
        default=DEFAULT_MAX_PIXELS,
        metadata={"none": "off", "shown": f"{DEFAULT_MAX_PIXELS:,}, Pillow's limit"},
    )

    def __post_init__(self) -> None:
        check_number("val_fraction", self.val_fraction, 0, 1, high_open=True)
        check_number("test_fraction", self.test_fraction, 0, 1, high_open=True)
        if self.val_fraction + self.test_fraction >= 1:
            raise FeatcacheError(
                f"{flag('val_fraction', self.val_fraction)} and {flag('test_fraction', self.test_fraction)} "
                "leave no training images: their sum must be below 1"
            )
        check_number("seed", self.seed, 0, 2**63 - 1, integer=True, option="--split-seed")
        check_number("limit", self.limit, 1, integer=True, none="no limit")
        check_number("max_image_pixels", self.max_image_pixels, 1, integer=True, none="off")

    def load(self) -> DatasetSplits:
        """The train/val/test splits of a dataset a classifier can learn: two classes or more."""
        splits = load_dataset(
            self.spec,
            self.val_fraction,
            self.test_fraction,
            self.seed,
            self.download,
            self.limit,
            max_image_pixels=self.max_image_pixels,
        )
        if len(splits.classes) < 2:
            found = f"one class, {splits.classes[0]!r}" if splits.classes else "no classes"
            raise FeatcacheError(
                f"dataset {self.spec!r} has {found}: a classifier needs at least two. Give each class "
                "its own folder (ROOT/CLASS/image.png), or a manifest with two labels or more"
            )
        present = sorted({int(c) for c in splits.train.labels})
        if len(present) < 2:  # classes named, but the training split holds one (a split column, --limit)
            only = f"only class {splits.classes[present[0]]!r}" if present else "no images"
            raise FeatcacheError(
                f"the training split of {self.spec!r} holds {only} of {len(splits.classes)}: a classifier "
                "needs images of at least two classes to train on. Raise --limit (limit=), or give the "
                "train split images of every class"
            )
        return splits
