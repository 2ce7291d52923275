"""Named layers: list them with output shapes, summarise a model, and extract several at once.

Layer names are what ``model.named_modules()`` shows (``layer3``, ``layer4.1.conv2``) plus two
shorthands: ``penultimate`` (the input of the classifier, what ``model.fc = Identity()`` returns)
and ``logits`` (the model's output). Graph-node names that are not modules (``flatten``, ``add_1``)
work through torch.fx where the model traces.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import nn

from .._util import FeatcacheError, unknown
from .registry import Backbone

PENULTIMATE = "penultimate"
LOGITS = "logits"
SHORTHANDS = (PENULTIMATE, LOGITS)
#: names for sets of layers; the ``@`` keeps them apart from any module name
LAYER_SETS = {"@blocks": "every block (see block_names) and the classifier's input"}
_CONTAINERS = ("blocks", "stages", "features", "encoder.layers", "layers", "encoder.layer")
INPUT_PREFIX = "input:"  # ``input:layer4.1``: the input of a module (where a cached prefix ends)


@dataclass(frozen=True)
class LayerInfo:
    """One row of ``featcache layers``: name, module type, output shape (batch 1) and parameters."""

    name: str
    type: str
    shape: tuple[int, ...] | None
    params: int
    trainable: int
    depth: int


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor in a module output (tensor, tuple/list, dict or a transformers ModelOutput)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for v in value:
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def module_names(model: nn.Module) -> list[str]:
    """All non-root module names in registration order."""
    return [n for n, _ in model.named_modules() if n]


def dummy_input(
    backbone: Backbone, input_size: tuple[int, int] | None = None, batch: int = 1
) -> torch.Tensor:
    """A zero batch at the backbone's (or the given) input size, on the model's device."""
    h, w = input_size or backbone.cfg.input_size
    p = next(backbone.model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    return torch.zeros(batch, backbone.cfg.channels, h, w, device=device)


def list_layers(backbone: Backbone, input_size: tuple[int, int] | None = None) -> list[LayerInfo]:
    """Every named module with its output shape for one image at ``input_size`` and its parameters.

    Example:
        >>> from featcache.backbones import load_backbone
        >>> rows = list_layers(load_backbone("torchvision:resnet18", weights="none"), (64, 64))
        >>> next(r.shape for r in rows if r.name == "layer3")
        (1, 256, 4, 4)
    """
    model = backbone.model
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            t = first_tensor(out)
            if t is not None and name not in shapes:
                shapes[name] = tuple(t.shape)

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            out = model(dummy_input(backbone, input_size))
    except RuntimeError as exc:  # e.g. an input too small for the network's pooling
        raise FeatcacheError(
            f"{backbone.cfg.spec} cannot run on a {input_size or backbone.cfg.input_size} input: {exc}"
        ) from exc
    finally:
        for h in handles:
            h.remove()
    rows = []
    for name, mod in model.named_modules():
        if not name:
            continue
        params = list(mod.parameters())
        rows.append(
            LayerInfo(
                name=name,
                type=type(mod).__name__,
                shape=shapes.get(name),
                params=sum(p.numel() for p in params),
                trainable=sum(p.numel() for p in params if p.requires_grad),
                depth=name.count(".") + 1,
            )
        )
    cls = backbone.cfg.classifier
    if cls and cls in shapes:
        pen = _capture_input(model, cls, dummy_input(backbone, input_size))
        rows.append(LayerInfo(PENULTIMATE, f"input of {cls}", tuple(pen.shape), 0, 0, 0))
    logits = first_tensor(out)
    if logits is not None:
        rows.append(LayerInfo(LOGITS, "model output", tuple(logits.shape), 0, 0, 0))
    return rows


def _capture_input(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The first tensor entering module ``name`` when the model runs on ``x``."""
    seen: list[torch.Tensor | None] = []
    module = dict(model.named_modules())[name]
    handle = module.register_forward_pre_hook(lambda _m, inp: seen.append(first_tensor(inp)))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        handle.remove()
    if not seen or seen[0] is None:
        raise FeatcacheError(f"the classifier {name!r} was not called with a tensor")
    return seen[0]


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


def block_names(model: nn.Module, classifier: str | None = None) -> list[str]:
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
    return [n for n, _ in model.named_children() if n != classifier]


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
