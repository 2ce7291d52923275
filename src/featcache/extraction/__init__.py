"""Extraction: several named layers in one forward pass (hooks or torch.fx), pooled, into the cache.

The names below are imported on first use (PEP 562): ``ExtractConfig`` comes without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

# name -> the module of this package that defines it
_HOMES = {
    "POOLS": "config",
    "ExtractConfig": "config",
    "FeatureExtractor": "nodes",
    "View": "config",
    "Views": "config",
    "extract": "build",
    "extract_splits": "build",
    "extract_views": "build",
    "parse_layers": "config",
}

__all__ = sorted(_HOMES)

if TYPE_CHECKING:  # what type checkers see; at run time, __getattr__ imports on demand
    from .build import extract, extract_splits, extract_views  # noqa: F401
    from .config import POOLS, ExtractConfig, View, Views, parse_layers  # noqa: F401
    from .nodes import FeatureExtractor  # noqa: F401

__getattr__, __dir__ = lazy_names(__name__, _HOMES)
