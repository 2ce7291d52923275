"""``DataConfig``: a dataset spec with how it is split (fractions, seed, limit)."""

from __future__ import annotations

from dataclasses import dataclass

from .._util import FeatcacheError
from .datasets import DatasetSplits, load_dataset


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

    def load(self) -> DatasetSplits:
        """The train/val/test splits of a dataset a classifier can learn: two classes or more."""
        splits = load_dataset(
            self.spec, self.val_fraction, self.test_fraction, self.seed, self.download, self.limit
        )
        if len(splits.classes) < 2:
            found = f"one class, {splits.classes[0]!r}" if splits.classes else "no classes"
            raise FeatcacheError(
                f"dataset {self.spec!r} has {found}: a classifier needs at least two. Give each class "
                "its own folder (ROOT/CLASS/image.png), or a manifest with two labels or more"
            )
        return splits
