"""Backbones: a registry of sources (torchvision, timm, EfficientNet-Lite, Hugging Face, any ``nn.Module``),
loaded frozen in eval mode with their weights hashed, and the listing of their layers.

Importing this package registers every source.
"""

from . import hf, lite, timm, torchvision  # noqa: F401  (each registers its source)
from .layers import (
    LOGITS,
    PENULTIMATE,
    SHORTHANDS,
    LayerInfo,
    ModelSummary,
    count_macs,
    list_layers,
    summarize,
)
from .preprocessing import Preprocessing
from .registry import (
    Backbone,
    BackboneCfg,
    list_models,
    list_sources,
    load_backbone,
    register_source,
)

__all__ = [
    "LOGITS",
    "PENULTIMATE",
    "SHORTHANDS",
    "Backbone",
    "BackboneCfg",
    "LayerInfo",
    "ModelSummary",
    "Preprocessing",
    "count_macs",
    "list_layers",
    "list_models",
    "list_sources",
    "load_backbone",
    "register_source",
    "summarize",
]
