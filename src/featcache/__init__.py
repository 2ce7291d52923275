"""featcache: run a frozen backbone once, cache its activations, train heads on the cache."""

__version__ = "0.1.0"

from .backbones import Backbone, BackboneCfg, list_models, list_sources, load_backbone, register_source
from .cache import CACHE_VERSION, CachedFeatures, FeatureCache
from .data import DatasetSplits, SampleSet, load_dataset
from .export import export_run
from .extract import ExtractConfig, extract, extract_splits
from .finetune_run import FinetuneConfig, finetune_run
from .heads import HeadSpec
from .layers import FeatureExtractor, list_layers
from .predict import load_predictor
from .runs import DataConfig, load_run, train_run
from .train import TrainConfig

__all__ = [
    "CACHE_VERSION",
    "Backbone",
    "BackboneCfg",
    "CachedFeatures",
    "DataConfig",
    "DatasetSplits",
    "ExtractConfig",
    "FeatureCache",
    "FeatureExtractor",
    "FinetuneConfig",
    "HeadSpec",
    "SampleSet",
    "TrainConfig",
    "export_run",
    "extract",
    "extract_splits",
    "finetune_run",
    "list_layers",
    "list_models",
    "list_sources",
    "load_backbone",
    "load_dataset",
    "load_predictor",
    "load_run",
    "register_source",
    "train_run",
]
