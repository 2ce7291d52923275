"""The ``torchvision:`` backbone source: builder names and weight enums, preprocessing from the enum's
transforms.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch
import torchvision
from torchvision.models import get_model, get_model_weights

from .._errors import flag
from .._util import FeatcacheError, unknown
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
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

# --------------------------------------------------------------------------- torchvision


def _tv_names() -> list[str]:
    return list(torchvision.models.list_models(module=torchvision.models))


def _tv_offline() -> set[str]:
    """The models whose DEFAULT weights file is in torch's hub cache already (no download)."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    cached = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    out = set()
    for name in _tv_names() if cached else ():
        try:
            url = get_model_weights(name).DEFAULT.url  # type: ignore[attr-defined]
        except (ValueError, KeyError, AttributeError):  # a builder without pretrained weights
            continue
        if url.rsplit("/", 1)[-1] in cached:
            out.add(name)
    return out


@register_source("torchvision", lister=_tv_names, claims=lambda n: n in _tv_names(), offline=_tv_offline)
def _torchvision(name: str, weights: str | None) -> Backbone:
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
        model = seeded_init(lambda: get_model(name, weights=enum_obj))
    except (OSError, RuntimeError) as exc:  # urllib errors are OSErrors
        raise FeatcacheError(
            f"could not download torchvision weights {weights!r} for {name} ({exc}). Without internet, pass "
            f"{flag('weights', 'none')} for random init, or --weights PATH (weights='PATH') to a state_dict "
            "file."
        ) from exc
    if path:
        load_into(model, load_state_file(path), path)
    cfg = BackboneCfg(
        spec=f"torchvision:{name}", weights=str(path or (enum_obj.name if enum_obj else "none"))
    )
    if enum_obj is not None:
        t = enum_obj.transforms()
        crop, resize = getattr(t, "crop_size", [224]), getattr(t, "resize_size", [256])
        cfg = replace(
            cfg,
            preprocessing=Preprocessing(
                input_size=(int(crop[0]), int(crop[-1])),
                resize_size=int(resize[0]),
                mean=tuple(getattr(t, "mean", IMAGENET_MEAN)),
                std=tuple(getattr(t, "std", IMAGENET_STD)),
                interpolation=str(getattr(getattr(t, "interpolation", None), "value", "bilinear")),
            ),
            classes=tuple(enum_obj.meta.get("categories") or ()) or None,
        )
    elif "inception" in name:
        cfg = replace(cfg, preprocessing=Preprocessing(input_size=(299, 299), resize_size=342))
    return finish(model, replace(cfg, classifier=last_linear(model)))
