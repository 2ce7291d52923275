"""Extraction: several named layers in one forward pass (hooks or torch.fx), pooled, into the cache."""

from .build import extract, extract_splits, extract_views
from .config import POOLS, ExtractConfig, View, Views, parse_layers
from .nodes import FeatureExtractor

__all__ = [
    "POOLS",
    "ExtractConfig",
    "FeatureExtractor",
    "View",
    "Views",
    "extract",
    "extract_splits",
    "extract_views",
    "parse_layers",
]
