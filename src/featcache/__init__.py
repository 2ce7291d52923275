"""featcache: run a frozen backbone once, cache its activations, train heads on the cache.

The names below are imported on first use (PEP 562), so ``featcache --help`` starts without torch;
``from featcache import X`` works as usual.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_names
from ._version import __version__  # noqa: F401  (in __all__)

# name -> the subpackage that defines it
_HOMES = {
    "Backbone": "backbones",
    "BackboneCfg": "backbones",
    "Preprocessing": "backbones",
    "list_layers": "backbones",
    "list_models": "backbones",
    "list_sources": "backbones",
    "load_backbone": "backbones",
    "register_source": "backbones",
    "CACHE_VERSION": "cache",
    "CachedFeatures": "cache",
    "FeatureCache": "cache",
    "FeatureDataset": "cache",
    "write_embeddings": "cache",
    "DataConfig": "data",
    "DatasetSplits": "data",
    "SampleSet": "data",
    "load_dataset": "data",
    "export_run": "export",
    "load_predictor": "export",
    "ExtractConfig": "extraction",
    "FeatureExtractor": "extraction",
    "Views": "extraction",
    "extract": "extraction",
    "extract_splits": "extraction",
    "FinetuneConfig": "runs",
    "KnnConfig": "runs",
    "knn_eval": "runs",
    "knn_run": "runs",
    "ProbeConfig": "runs",
    "RunSpec": "runs",
    "SweepGrid": "runs",
    "finetune_run": "runs",
    "load_run": "runs",
    "probe_run": "runs",
    "sweep_run": "runs",
    "train_run": "runs",
    "HeadSpec": "train",
    "TrainConfig": "train",
}

__all__ = sorted([*_HOMES, "__version__"])

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time, __getattr__ imports on demand
    from .backbones import (  # noqa: F401
        Backbone,
        BackboneCfg,
        Preprocessing,
        list_layers,
        list_models,
        list_sources,
        load_backbone,
        register_source,
    )
    from .cache import (  # noqa: F401
        CACHE_VERSION,
        CachedFeatures,
        FeatureCache,
        FeatureDataset,
        write_embeddings,
    )
    from .data import DataConfig, DatasetSplits, SampleSet, load_dataset  # noqa: F401
    from .export import export_run, load_predictor  # noqa: F401
    from .extraction import ExtractConfig, FeatureExtractor, Views, extract, extract_splits  # noqa: F401
    from .runs import (  # noqa: F401
        FinetuneConfig,
        KnnConfig,
        ProbeConfig,
        RunSpec,
        SweepGrid,
        finetune_run,
        knn_eval,
        knn_run,
        load_run,
        probe_run,
        sweep_run,
        train_run,
    )
    from .train import HeadSpec, TrainConfig  # noqa: F401

__getattr__, __dir__ = lazy_names(__name__, _HOMES)
