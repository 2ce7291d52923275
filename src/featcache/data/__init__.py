"""Data: dataset specs resolved to train/val/test sample sets, and the backbone's preprocessing.

The names below are imported on first use (PEP 562): ``DataConfig`` comes without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

# name -> the module of this package that defines it
_HOMES = {
    "BUILTIN": "datasets",
    "BadImageError": "samples",
    "DataConfig": "config",
    "DatasetSplits": "datasets",
    "DigestMemo": "digests",
    "SampleChangedError": "digests",
    "SampleSet": "samples",
    "image_paths": "samples",
    "load_dataset": "datasets",
    "read_image": "samples",
}

__all__ = sorted(_HOMES)

if TYPE_CHECKING:  # what type checkers see; at run time, __getattr__ imports on demand
    from .config import DataConfig  # noqa: F401
    from .datasets import BUILTIN, DatasetSplits, load_dataset  # noqa: F401
    from .digests import DigestMemo, SampleChangedError  # noqa: F401
    from .samples import BadImageError, SampleSet, image_paths, read_image  # noqa: F401

__getattr__, __dir__ = lazy_names(__name__, _HOMES)
