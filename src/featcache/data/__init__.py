"""Data: dataset specs resolved to train/val/test sample sets, and the backbone's preprocessing."""

from .config import DataConfig
from .datasets import BUILTIN, DatasetSplits, load_dataset
from .digests import DigestMemo, SampleChangedError
from .samples import BadImageError, SampleSet, image_paths, read_image

__all__ = [
    "BUILTIN",
    "BadImageError",
    "DataConfig",
    "DatasetSplits",
    "DigestMemo",
    "SampleChangedError",
    "SampleSet",
    "image_paths",
    "load_dataset",
    "read_image",
]
