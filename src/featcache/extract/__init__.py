"""Extraction: several named layers in one forward pass (hooks or torch.fx), pooled, into the cache."""

from .build import extract, extract_splits, extract_views
from .config import POOLS, ExtractConfig
from .nodes import FeatureExtractor

__all__ = ["POOLS", "ExtractConfig", "FeatureExtractor", "extract", "extract_splits", "extract_views"]
