"""The ``hf:`` backbone source: Hugging Face vision models through ``transformers`` (optional extra).

A hub id (with internet) or a local directory holding ``config.json``, ``preprocessor_config.json``
and the weights. Preprocessing comes from the image processor; classes from ``id2label``.
"""

from __future__ import annotations

import pickle
import re
from typing import Any

import torch
from torch import nn

from .._util import FeatcacheError
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from .registry import (
    Backbone,
    BackboneCfg,
    finish,
    last_linear,
    register_source,
    seeded_init,
)


def _main_tensor(out: Any) -> torch.Tensor:
    for key in ("logits", "pooler_output", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    return out[0]


def _tensor_forward(model: nn.Module) -> nn.Module:
    """``model``, its class swapped for a subclass whose ``forward(x)`` returns the main tensor output.

    A subclass instead of a wrapper module keeps the Hugging Face module names (``vit.encoder.layer.0``,
    ``classifier``) as the model card and ``named_modules()`` of the original show them.
    """
    base = type(model)

    def forward(self: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return _main_tensor(base.forward(self, pixel_values=pixel_values))

    model.__class__ = type(f"Featcache{base.__name__}", (base,), {"forward": forward})
    return model


def pickle_refused(name: str, exc: pickle.UnpicklingError) -> FeatcacheError:
    """featcache's error for pickle weights that are more than tensors: torch's weights-only unpickler
    (what transformers loads ``pytorch_model.bin`` with) refused them, so nothing in them ran; torch's
    own message advises loading the file unrestricted, which featcache never suggests."""
    found = re.search(r"WeightsUnpickler error: ([^\n]*)", str(exc))
    why = found.group(1).split(". ")[0][:160] if found else type(exc).__name__  # not torch's advice
    return FeatcacheError(
        f"hf:{name}: its pickle weights (pytorch_model.bin or the like) hold more than tensors ({why}), "
        "and featcache loads weights only as tensors: no code from a weights file ever runs. Use a copy "
        "of the model saved as safetensors (model.safetensors), or --weights none for its architecture "
        "alone"
    )


@register_source("hf", lister=lambda: [])
def _hf(name: str, weights: str | None) -> Backbone:
    try:
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification
    except ImportError as exc:
        raise FeatcacheError("hf: backbones need transformers: pip install 'featcache[hf]'") from exc
    try:
        config = AutoConfig.from_pretrained(name)
        has_head = bool(getattr(config, "id2label", None)) and (config.architectures or [""])[0].endswith(
            "ForImageClassification"
        )
        auto = AutoModelForImageClassification if has_head else AutoModel
        if weights is not None and weights.lower() == "none":
            model = seeded_init(lambda: auto.from_config(config))
        else:
            model = auto.from_pretrained(name)
        proc = AutoImageProcessor.from_pretrained(name)
    except pickle.UnpicklingError as exc:
        raise pickle_refused(name, exc) from None  # torch's advice in the chain would be printed too
    except OSError as exc:
        raise FeatcacheError(
            f"cannot load Hugging Face model {name!r} ({exc}). Pass a hub id (with internet) or a local "
            "directory holding config.json, preprocessor_config.json and the weights."
        ) from exc
    size = getattr(proc, "crop_size", None) or getattr(proc, "size", None) or {}
    if "height" in size:
        hw = (int(size["height"]), int(size["width"]))
    else:
        edge = int(size.get("shortest_edge", 224))
        hw = (edge, edge)
    resize = getattr(proc, "size", {}) or {}
    crop_from = int(resize.get("shortest_edge", 0)) if getattr(proc, "do_center_crop", False) else 0
    head_name = last_linear(model)
    classes = None
    if has_head:
        classes = tuple(config.id2label[i] for i in range(len(config.id2label)))
    return finish(
        _tensor_forward(model),
        BackboneCfg(
            spec=f"hf:{name}",
            preprocessing=Preprocessing(
                input_size=hw,
                resize_size=crop_from,
                mean=tuple(getattr(proc, "image_mean", IMAGENET_MEAN)),
                std=tuple(getattr(proc, "image_std", IMAGENET_STD)),
                interpolation="bicubic" if int(getattr(proc, "resample", 2)) == 3 else "bilinear",
            ),
            weights="none" if weights and weights.lower() == "none" else "pretrained",
            classes=classes,
            classifier=head_name if has_head and head_name else None,
        ),
    )
