"""featcache: run a frozen backbone once, cache its activations, train heads on the cache."""

from ._version import __version__
from .backbones import (
    Backbone,
    BackboneCfg,
    Preprocessing,
    list_layers,
    list_models,
    list_sources,
    load_backbone,
    register_source,
)
from .cache import CACHE_VERSION, CachedFeatures, FeatureCache
from .data import DataConfig, DatasetSplits, SampleSet, load_dataset
from .export import export_run, load_predictor
from .extract import ExtractConfig, FeatureExtractor, Views, extract, extract_splits
from .runs import (
    FinetuneConfig,
    ProbeConfig,
    RunSpec,
    SweepGrid,
    finetune_run,
    load_run,
    probe_run,
    sweep_run,
    train_run,
)
from .train import HeadSpec, TrainConfig

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
    "Preprocessing",
    "ProbeConfig",
    "RunSpec",
    "SampleSet",
    "SweepGrid",
    "TrainConfig",
    "Views",
    "__version__",
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
    "probe_run",
    "register_source",
    "sweep_run",
    "train_run",
]
