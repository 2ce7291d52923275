"""Backbones: a registry of sources (torchvision, timm, EfficientNet-Lite, Hugging Face, any ``nn.Module``),
loaded frozen in eval mode with their weights hashed, and the listing of their layers.

The names below are imported on first use (PEP 562), and each source's module when the source is first
asked for (:data:`~featcache.backbones.registry.BUILTIN_SOURCES`): ``torchvision:resnet18`` loads
neither timm nor transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

# name -> the module of this package that defines it
_HOMES = {
    "LOGITS": "layers",
    "PENULTIMATE": "layers",
    "SHORTHANDS": "layers",
    "Backbone": "registry",
    "BackboneCfg": "registry",
    "LayerInfo": "layers",
    "ModelSummary": "layers",
    "Preprocessing": "preprocessing",
    "count_macs": "layers",
    "list_layers": "layers",
    "list_models": "registry",
    "list_sources": "registry",
    "load_backbone": "registry",
    "register_source": "registry",
    "summarize": "layers",
}

__all__ = sorted(_HOMES)

if TYPE_CHECKING:  # what type checkers see; at run time, __getattr__ imports on demand
    from .layers import (  # noqa: F401
        LOGITS,
        PENULTIMATE,
        SHORTHANDS,
        LayerInfo,
        ModelSummary,
        count_macs,
        list_layers,
        summarize,
    )
    from .preprocessing import Preprocessing  # noqa: F401
    from .registry import (  # noqa: F401
        Backbone,
        BackboneCfg,
        list_models,
        list_sources,
        load_backbone,
        register_source,
    )

__getattr__, __dir__ = lazy_names(__name__, _HOMES)
