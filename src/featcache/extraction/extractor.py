"""The batch loop of an extraction: device, AMP, channels_last, decode workers, pooling, one shard at
a time.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .._util import FeatcacheError, resolve_device
from ..backbones.registry import Backbone
from ..backbones.shapes import LayerShape, layer_shapes, output_shapes
from ..backbones.tokens import Tokens, model_tokens, pool_prefix
from ..cache.rows import STORAGE_DTYPES
from ..cache.writer import shard_plan
from ..layout import NC, NLD, TOKEN_POOLS, pool, pooled_layout, position_axes
from .config import ExtractConfig
from .nodes import FeatureExtractor


def decode_workers(workers: int | None, device: torch.device) -> int:
    """DataLoader workers for decoding: ``workers`` when given, else the automatic choice above.

    Example:
        >>> decode_workers(None, torch.device("cpu")), decode_workers(3, torch.device("cpu"))
        (0, 3)
    """
    if workers is not None:
        return workers
    if device.type != "cuda":
        return 0
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 2) // (2 * ranks_here)))


def use_amp(config: ExtractConfig, device: torch.device) -> bool:
    return config.amp if config.amp is not None else device.type == "cuda"


class Extractor:
    """A prepared extraction: the truncated backbone on its device, ready to run batches.

    Preparing it probes the layers (:func:`~featcache.backbones.shapes.layer_shapes`): a layer whose
    first axis is not the batch is refused, and so is pooling a layer whose layout is unknown; an FX
    path is checked against forward hooks on a random batch before any image is extracted.

    Example:
        >>> ex = Extractor(backbone, ("layer3",), ExtractConfig())  # doctest: +SKIP
        >>> feats = ex(batch)  # {"layer3": (N, 256) tensor}
    """

    def __init__(self, backbone: Backbone, layers: Sequence[str], config: ExtractConfig) -> None:
        backbone = backbone.at_input_size(config.input_size)  # itself when loaded for that size
        self.backbone, self.layers, self.config = backbone, tuple(layers), config
        self.device = resolve_device(config.device)
        self.amp = use_amp(config, self.device)
        cl = config.channels_last if config.channels_last is not None else self.device.type == "cuda"
        self.memory_format = torch.channels_last if cl else torch.contiguous_format
        backbone.model.to(self.device)
        if cl:
            backbone.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.net = FeatureExtractor(
            backbone.model, self.layers, config.method, backbone.cfg.classifier, backbone.cfg.spec
        )
        cfg = backbone.cfg
        key = (self.layers, self.net.method, config.pool, cfg.input_size, cfg.channels, str(self.device), cl)
        self.checked = _checks_of(backbone.model, key)
        if "layouts" not in self.checked:  # first extractor of this model, layers and settings
            probe = torch.rand(2, cfg.channels, *cfg.input_size, generator=torch.Generator().manual_seed(0))
            with torch.inference_mode(), self._autocast():
                self.net.verify(probe.to(self.device).to(memory_format=self.memory_format))
            self.checked["layouts"] = check_layers(backbone, self.net, cfg.input_size, config.pool)
        self.layouts: dict[str, str | None] = self.checked["layouts"]
        self.prefix = pool_prefix(backbone.model, config.pool)  # what --pool avg-tokens skips

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.to(self.device, non_blocking=True).to(memory_format=self.memory_format)
        with self._autocast():
            out = self.net(x)
        return {k: pool(v, self.config.pool, self.layouts[k], self.prefix) for k, v in out.items()}

    def stored_layouts(self) -> dict[str, str | None]:
        """Each layer's layout as cached: its own under ``--pool none``, else vectors (``NC``)."""
        return {k: pooled_layout(v, self.config.pool) for k, v in self.layouts.items()}

    def row_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each layer's cached row shape (pooling applied), from one blank image."""
        if "row_shapes" not in self.checked:  # one forward, memoised with the checks
            cfg = self.backbone.cfg
            out = self(torch.zeros(1, cfg.channels, *cfg.input_size))
            self.checked["row_shapes"] = {k: tuple(v.shape[1:]) for k, v in out.items()}
        return dict(self.checked["row_shapes"])

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        """Cast one layer's batch to the storage dtype, staying on the device (no host sync)."""
        return t.to(getattr(torch, self.config.dtype)).contiguous()

    def to_numpy(self, t: torch.Tensor) -> np.ndarray:
        """Move a storage-dtype tensor to a host numpy array (bfloat16 as raw uint16)."""
        if self.config.dtype == "bfloat16":
            return t.cpu().view(torch.int16).numpy().view(np.uint16)
        return t.cpu().numpy()

    def to_storage(self, t: torch.Tensor) -> np.ndarray:
        """Cast one layer's batch to the storage dtype as a contiguous numpy array."""
        return self.to_numpy(self.cast(t))


#: What building an extractor found (the layers' layouts, the cached row shapes), per model, keyed by
#: the extraction settings and the model's structure. Finding them runs the model four times on probe
#: inputs; a re-run that extracts a few new images per split would spend most of its time there. Only
#: the architecture decides them, so new weights keep them and any change of structure checks anew.
_CHECKED: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], dict[str, Any]]] = (
    weakref.WeakKeyDictionary()
)


def _structure(model: nn.Module) -> tuple[Any, ...]:
    """The model's modules (name, type) and parameter shapes: what the checks depend on."""
    modules = tuple((n, type(m).__qualname__) for n, m in model.named_modules())
    return modules + tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


def _checks_of(model: nn.Module, settings: tuple[Any, ...]) -> dict[str, Any]:
    """The memo of checks for ``model`` under ``settings`` (empty the first time)."""
    return _CHECKED.setdefault(model, {}).setdefault((*settings, _structure(model)), {})


def check_layers(
    backbone: Backbone, net: FeatureExtractor, input_size: tuple[int, int], pool_: str
) -> dict[str, str | None]:
    """Each layer of ``net``'s layout (None: unknown, stored as is only); raises naming the reason for a
    layer that cannot be extracted, or cannot be pooled.

    Example:
        >>> bb = load_backbone("torchvision:swin_t", weights="none")  # doctest: +SKIP
        >>> check_layers(bb, FeatureExtractor(bb.model, ["features.5"]), (64, 64), "avg")  # doctest: +SKIP
        {'features.5': 'NHWC'}
    """
    spec, graph = backbone.cfg.spec, net.graph_nodes
    tokens = model_tokens(backbone.model) if pool_ in TOKEN_POOLS else None
    patch = [tokens.patch_module] if tokens is not None and tokens.patch_module else []
    probes = layer_shapes(backbone, [*(n for n in net.layers if n not in graph), *patch], input_size)
    patches = _positions(probes[patch[0]]) if patch else None
    if graph:
        param = next(backbone.model.parameters(), None)
        device = param.device if param is not None else None
        probes.update(output_shapes(net, graph, backbone.cfg.channels, input_size, device))
    probes = {n: probes[n] for n in net.layers}
    for name, p in probes.items():
        if p.shape is None:
            raise FeatcacheError(f"layer {name!r} of {spec} is not called during the forward pass")
        if p.refused:
            raise FeatcacheError(
                f"layer {name!r} of {spec} cannot be extracted: {p.refused}. `featcache layers {spec}` marks "
                "such layers; pick another (the block that contains it, say)"
            )
        if p.layout is None and p.shape is not None and pool_ in ("avg", "max"):
            raise FeatcacheError(
                f"cannot {pool_}-pool layer {name!r} of {spec} (output {list(p.shape[1:])}): its layout is "
                f"{p.how}. Extract it with --pool none or --pool flatten, or pick a layer whose layout "
                "`featcache layers` shows"
            )
    if pool_ in TOKEN_POOLS:
        _check_tokens(spec, probes, pool_, tokens, patches)
    return {n: p.layout for n, p in probes.items()}


def _positions(p: LayerShape) -> int | None:
    """The number of patches a patch embedding outputs for one image: its map's positions, or its tokens
    (timm's ``PatchEmbed`` gives (1, L, D) that no probe source can tell from (1, C, L))."""
    if p.shape is None or p.layout == NC:
        return None
    if p.layout is None:
        return int(p.shape[1]) if len(p.shape) == 3 else None
    return math.prod(p.shape[a] for a in position_axes(p.layout))


def _check_tokens(
    spec: str, probes: dict[str, LayerShape], how: str, tokens: Tokens | None, patches: int | None
) -> None:
    """Refuse ``--pool cls|avg-tokens`` where it would not read what it says: a layer that is not tokens,
    a model whose prefix tokens featcache does not know, ``cls`` without a class token, or a layer whose
    tokens are not the prefix + patch tokens of the blocks (the patch embedding, before the class token
    is prepended). Vector layers (``penultimate``) are stored as they are, as under ``--pool avg``."""
    token_layers = {n: p for n, p in probes.items() if p.layout != NC}
    for name, p in token_layers.items():
        if p.layout != NLD:
            fix = "--pool avg" if p.layout else "--pool none or --pool flatten"
            raise FeatcacheError(
                f"--pool {how} reads the tokens of token layers (NLD); layer {name!r} of {spec} is "
                f"{p.layout or 'of unknown layout'}: use {fix}, or pick a token layer "
                f"(`featcache layers {spec}` shows layouts)"
            )
    if not token_layers:
        return
    if tokens is None:
        raise FeatcacheError(
            f"--pool {how}: featcache does not know how many class / register tokens the token layers of "
            f"{spec} start with (it knows timm models' num_prefix_tokens, torchvision's VisionTransformer "
            "and Hugging Face ViT, DeiT, DINOv2 and BEiT); use --pool avg (every token), or --pool none and "
            "pool the cached tokens yourself"
        )
    if how == "cls" and not tokens.has_class_token:
        raise FeatcacheError(
            f"--pool cls: {spec} has no class token ({tokens.source}: {tokens.prefix} prefix tokens, none of "
            "them a class token); use --pool avg-tokens (the mean of its patch tokens) or --pool avg"
        )
    for name, p in token_layers.items():
        n = int(p.shape[1]) if p.shape is not None else 0
        if n <= tokens.prefix or (patches is not None and n != tokens.prefix + patches):
            expected = f"{tokens.prefix} prefix + {patches} patch tokens" if patches else "more than that"
            raise FeatcacheError(
                f"--pool {how}: layer {name!r} of {spec} holds {n} tokens, not the {expected} of its blocks "
                f"({tokens.prefix} prefix tokens from the {tokens.source}; the patch embedding comes before "
                f"they are prepended); pick a block or the final norm (`featcache layers {spec}`)"
            )


def shard_rows(ex: Extractor, n: int) -> int:
    if ex.config.shard_rows:
        return ex.config.shard_rows
    itemsize = np.dtype(STORAGE_DTYPES[ex.config.dtype]).itemsize
    row_bytes = sum(math.prod(shape) for shape in ex.row_shapes().values()) * itemsize
    return shard_plan(row_bytes, n, ex.config.batch_size, ex.config.shard_mb)
