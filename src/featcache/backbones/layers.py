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
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn

from .._util import FeatcacheError, unknown
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
from .registry import Backbone
from .shapes import layer_shapes

#: names for sets of layers; the ``@`` keeps them apart from any module name
LAYER_SETS = {"@blocks": "every block (see block_names) and the classifier's input"}
_CONTAINERS = ("blocks", "stages", "features", "encoder.layers", "layers", "encoder.layer")


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
    parameters, and why it cannot be extracted where it cannot (:func:`.probe.layer_shapes`).

    Example:
        >>> from featcache.backbones import load_backbone
        >>> rows = list_layers(load_backbone("torchvision:resnet18", weights="none"), (64, 64))
        >>> next((r.shape, r.layout) for r in rows if r.name == "layer3")
        ((1, 256, 4, 4), 'NCHW')
    """
    model = backbone.model
    probes = layer_shapes(backbone, None, input_size)
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
    """timm's registered no-trace modules and functions (padding helpers, ...), if timm is loaded: a
    model can hold timm's modules and call its functions only once timm is imported, so a torchvision
    model's trace does not import it (nor do its node names change when timm is loaded later)."""
    if "timm" not in sys.modules:
        return (), ()
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


@dataclass(frozen=True)
class ModelSummary:
    """``featcache summary``: layer rows down to a depth, parameter totals over the whole model, MACs.

    The backbone is loaded frozen, so ``trainable`` counts what a fine-tuning plan has unfrozen (0 for a
    freshly loaded backbone).
    """

    spec: str
    input_size: tuple[int, int]
    rows: tuple[LayerInfo, ...]
    params: int
    trainable: int
    macs: int | None

    def __repr__(self) -> str:
        return f"ModelSummary({self.spec!r}, {len(self.rows)} rows, params={self.params:,}, macs={self.macs})"


def summarize(backbone: Backbone, input_size: tuple[int, int] | None = None, depth: int = 2) -> ModelSummary:
    """Rows of modules down to ``depth``, totals over every parameter (not only the rows shown), MACs.

    Example:
        >>> s = summarize(load_backbone("torchvision:resnet18", weights="none"), (64, 64), depth=1)
        >>> s.params, s.trainable
        (11689512, 0)
    """
    if depth < 1:
        raise FeatcacheError(f"summary depth must be 1 or more, got {depth}")
    size = input_size or backbone.cfg.input_size
    params = list(backbone.model.parameters())
    return ModelSummary(
        spec=backbone.cfg.spec,
        input_size=(int(size[0]), int(size[1])),
        rows=tuple(r for r in list_layers(backbone, input_size) if 0 < r.depth <= depth),
        params=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in params if p.requires_grad),
        macs=count_macs(backbone, input_size),
    )


def block_names(model: nn.Module, classifier: str | tuple[str, ...] | None = None) -> list[str]:
    """The model's blocks in order.

    A *block* is, by family: ResNet ``layerK.i`` (torchvision and timm), the children of a
    ``blocks`` / ``stages`` / ``features`` / ``encoder.layers`` / ``layers`` container (timm ViT
    blocks, timm EfficientNet stages, ConvNeXt stages, torchvision EfficientNet/MobileNet/VGG
    features), else the model's top-level children but the classifier.

    Example:
        >>> import torchvision
        >>> block_names(torchvision.models.resnet18())[-2:]
        ['layer4.0', 'layer4.1']
    """
    names = module_names(model)
    resnet = [n for n in names if re.fullmatch(r"layer\d+\.\d+", n)]
    if resnet:
        return resnet
    for container in _CONTAINERS:  # also nested, e.g. Hugging Face's ``model.vit.layers``
        for name, mod in model.named_modules():
            if (
                (name == container or name.endswith("." + container))
                and isinstance(mod, (nn.Sequential, nn.ModuleList))
                and len(mod) > 1
            ):
                return [f"{name}.{child}" for child, _ in mod.named_children()]
    heads = (classifier,) if isinstance(classifier, str) else classifier or ()
    return [n for n, _ in model.named_children() if n not in heads]


def expand_layers(backbone: Backbone, names: Sequence[str]) -> list[str]:
    """``names`` with each set of :data:`LAYER_SETS` replaced by its layers for this backbone, in order,
    without repeats; other names are kept as given (the extractor checks them).

    Example:
        >>> from featcache.backbones import load_backbone
        >>> expand_layers(load_backbone("torchvision:resnet18", weights="none"), ["@blocks"])[-3:]
        ['layer4.0', 'layer4.1', 'penultimate']
    """
    out: list[str] = []
    for name in names:
        if not name.startswith("@"):
            out.append(name)
        elif name == "@blocks":
            out += block_names(backbone.model, backbone.cfg.classifier)
            out += [PENULTIMATE] if backbone.cfg.classifier else []
        else:
            raise unknown("layer set", name, LAYER_SETS, "The sets: " + "; ".join(
                f"{k}: {v}" for k, v in LAYER_SETS.items()) + ".")  # fmt: skip
    return list(dict.fromkeys(out))
