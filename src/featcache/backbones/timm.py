"""The ``timm:`` backbone source: ``arch.tag`` names, preprocessing from the model's pretrained config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import huggingface_hub.constants
import timm

from .._errors import flag
from .._util import FeatcacheError, unknown
from .lite import imagenet_classes
from .preprocessing import Preprocessing
from .registry import (
    Backbone,
    BackboneCfg,
    finish,
    last_linear,
    load_into,
    load_state_file,
    register_source,
    seeded_init,
)

# --------------------------------------------------------------------------- timm


def _timm_names() -> list[str]:
    return list(timm.list_models())


def _is_timm_model(spec: str) -> bool:
    return bool(timm.is_model(spec.split(".")[0]))


def _timm_sized(name: str, weights: str | None, size: tuple[int, int]) -> Backbone:
    """A timm model built for ``size`` when timm builds it for one input size (ViT, Swin, LeViT, ...)."""
    arch = name.split(".")[0]
    pcfg = timm.get_pretrained_cfg(name) if timm.is_model(arch) else None
    if pcfg is None or not pcfg.fixed_input_size or tuple(pcfg.input_size[1:]) == size:
        return _build(name, weights)
    return _build(name, weights, size)


def _timm_offline() -> set[str]:
    """The architectures with pretrained weights in the Hugging Face hub's cache already (no download)."""
    cache = Path(huggingface_hub.constants.HF_HUB_CACHE)
    prefix = "models--timm--"
    cached = (
        {p.name[len(prefix) :].split(".")[0] for p in cache.glob(f"{prefix}*")} if cache.is_dir() else set()
    )
    return cached & set(_timm_names()) if cached else set()


@register_source("timm", lister=_timm_names, claims=_is_timm_model, sized=_timm_sized, offline=_timm_offline)
def _timm(name: str, weights: str | None) -> Backbone:
    return _build(name, weights)


def _build(name: str, weights: str | None, img_size: tuple[int, int] | None = None) -> Backbone:
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        raise unknown("timm model", name, timm.list_models(), "Run `featcache models 'timm:*name*'` to list.")
    pretrained = weights is None or weights.upper() == "DEFAULT"
    path = weights if weights and weights.lower() not in ("none", "default") else None
    kwargs: dict[str, Any] = {"img_size": img_size} if img_size else {}
    try:
        model = seeded_init(lambda: timm.create_model(name, pretrained=pretrained, **kwargs))
    except TypeError as exc:
        if not img_size:
            raise
        raise FeatcacheError(
            f"timm builds {name} for one input size and cannot build it for {img_size[0]}x{img_size[1]} "
            f"({exc}); use its own input size (`featcache layers timm:{name}` shows it)"
        ) from exc
    except Exception as exc:  # hub download failures surface as many exception types
        raise FeatcacheError(
            f"could not load timm weights for {name} ({type(exc).__name__}: {exc}). Without internet, pass "
            f"{flag('weights', 'none')} for random init, or --weights PATH (weights='PATH') to a checkpoint."
        ) from exc
    if path:
        load_into(model, load_state_file(path), path)
    data = timm.data.resolve_data_config({}, model=model)
    h, w = img_size or data["input_size"][1:]
    return finish(
        model,
        BackboneCfg(
            spec=f"timm:{name}",
            preprocessing=Preprocessing(
                input_size=(h, w),
                resize_size=int(h / data.get("crop_pct", 0.875)),
                mean=tuple(data["mean"]),
                std=tuple(data["std"]),
                interpolation=data.get("interpolation", "bilinear"),
            ),
            weights=path or ("DEFAULT" if pretrained else "none"),
            classes=imagenet_classes() if pretrained and model.num_classes == 1000 else None,
            classifier=dict(getattr(model, "pretrained_cfg", None) or {}).get("classifier")
            or last_linear(model),
        ),
    )
