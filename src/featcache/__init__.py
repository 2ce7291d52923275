"""featcache: run a frozen backbone once, cache its activations, train heads on the cache."""

__version__ = "0.1.0"

from .backbones import Backbone, BackboneCfg, list_models, list_sources, load_backbone, register_source
from .cache import CACHE_VERSION, CachedFeatures, FeatureCache
from .data import DatasetSplits, SampleSet, load_dataset
from .extract import ExtractConfig, extract, extract_splits
from .layers import FeatureExtractor, list_layers

__all__ = [
    "CACHE_VERSION",
    "Backbone",
    "BackboneCfg",
    "CachedFeatures",
    "DatasetSplits",
    "ExtractConfig",
    "FeatureCache",
    "FeatureExtractor",
    "SampleSet",
    "extract",
    "extract_splits",
    "list_layers",
    "list_models",
    "list_sources",
    "load_backbone",
    "load_dataset",
    "register_source",
]
