"""The feature cache: content-addressed entries of memory-mappable arrays, written crash-safely."""

from .store import CachedFeatures, ChannelStats, FeatureCache, cache_root
from .writer import CACHE_VERSION

__all__ = ["CACHE_VERSION", "CachedFeatures", "ChannelStats", "FeatureCache", "cache_root"]
