"""``DataConfig``: a dataset spec with how it is split (fractions, seed, limit)."""

from __future__ import annotations

from dataclasses import dataclass

from .datasets import DatasetSplits, load_dataset


@dataclass(frozen=True)
class DataConfig:
    """How a dataset spec is split: fractions, seed, optional stratified size limit, download permission."""

    spec: str
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    limit: int | None = None
    download: bool = False

    def load(self) -> DatasetSplits:
        return load_dataset(
            self.spec, self.val_fraction, self.test_fraction, self.seed, self.download, self.limit
        )
