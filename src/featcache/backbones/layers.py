"""Named layers: list them with output shapes, summarise a model, and extract several at once.

Layer names are what ``model.named_modules()`` shows (``layer3``, ``layer4.1.conv2``) plus two
shorthands: ``penultimate`` (the input of the classifier, what ``model.fc = Identity()`` returns, as
vectors; for timm's two-head distilled models the pre-logits features both heads are built on) and
``logits`` (the model's output). Graph-node names that are not modules (``flatten``, ``add_1``)
work through torch.fx where the model traces.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn

from .hooks import (  # noqa: F401  (re-exported: where these names have always been imported from)
    INPUT_PREFIX,
    LOGITS,
    PENULTIMATE,
    SHORTHANDS,
    dummy_input,
    first_tensor,
    heads,
    module_names,
)
from .probe import probe_layers
from .registry import Backbone


@dataclass(frozen=True)
class LayerInfo:
    """One row of ``featcache layers``: name, module type, output shape (batch 1), parameters, and the
    output's layout (:mod:`featcache.layout`) and why it cannot be extracted, if it cannot.
    """

    name: str
    type: str
    shape: tuple[int, ...] | None
    params: int
    trainable: int
    depth: int
    layout: str | None = None
    refused: str | None = None


def list_layers(backbone: Backbone, input_size: tuple[int, int] | None = None) -> list[LayerInfo]:
    """Every named module with its output shape and layout for one image at ``input_size``, its
    parameters, and why it cannot be extracted where it cannot (:func:`.probe.probe_layers`).

    Example:
        >>> from featcache.backbones import load_backbone
        >>> rows = list_layers(load_backbone("torchvision:resnet18", weights="none"), (64, 64))
        >>> next((r.shape, r.layout) for r in rows if r.name == "layer3")
        ((1, 256, 4, 4), 'NCHW')
    """
    model = backbone.model
    probes = probe_layers(backbone, None, input_size)
    rows = []
    for name, mod in model.named_modules():
        if not name:
            continue
        params = list(mod.parameters())
        p = probes[name]
        rows.append(
            LayerInfo(
                name=name,
                type=type(mod).__name__,
                shape=p.shape,
                params=sum(q.numel() for q in params),
                trainable=sum(q.numel() for q in params if q.requires_grad),
                depth=name.count(".") + 1,
                layout=p.layout,
                refused=p.refused if p.shape is not None else None,
            )
        )
    heads_ = heads(backbone.cfg.classifier)
    pen = probes.get(PENULTIMATE)
    if pen is not None and pen.shape is not None:
        what = f"input of {heads_[0]}" if len(heads_) == 1 else f"pre-logits of {', '.join(heads_)}"
        rows.append(LayerInfo(PENULTIMATE, what, pen.shape, 0, 0, 0, pen.layout, pen.refused))
    logits = probes[LOGITS]
    if logits.shape is not None:
        rows.append(LayerInfo(LOGITS, "model output", logits.shape, 0, 0, 0, logits.layout, logits.refused))
    return rows


def count_macs(backbone: Backbone, input_size: tuple[int, int] | None = None) -> int | None:
    """Multiply-accumulates of one forward pass (torch's FlopCounterMode, FLOPs / 2), or None."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # pragma: no cover - torch < 2.1
        return None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        backbone.model(dummy_input(backbone, input_size))
    return int(counter.get_total_flops() // 2)


def timm_notrace() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    """timm's registered no-trace modules and functions (padding helpers, ...), if timm is installed."""
    try:
        import timm.models  # noqa: F401  (importing registers them)
        from timm.layers._fx import get_notrace_functions, get_notrace_modules
    except ImportError:
        return (), ()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


def tracer_kwargs() -> dict[str, Any]:
    """torchvision's defaults (its ops as leaves) plus what timm marks as not traceable.

    Every torch.fx trace in featcache (layer listing, extraction, export) uses these, so graph-node
    names agree between them.
    """

    ops = [m for _, m in inspect.getmembers(torchvision.ops, inspect.isclass) if issubclass(m, nn.Module)]
    modules, functions = timm_notrace()
    return {
        "autowrap_modules": (math, torchvision.ops),
        "autowrap_functions": functions,
        "leaf_modules": [*ops, *modules],
    }
