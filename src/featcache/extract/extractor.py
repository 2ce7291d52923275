"""The batch loop of an extraction: device, AMP, channels_last, decode workers, pooling, one shard at
a time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from .._util import resolve_device
from ..backbones.registry import Backbone, BackboneCfg
from ..cache.writer import STORAGE_DTYPES
from .config import ExtractConfig
from .nodes import FeatureExtractor
from .pooling import pool_features


def resolved_cfg(backbone: Backbone, config: ExtractConfig) -> BackboneCfg:
    """The backbone's preprocessing with the config's input-size override applied."""
    return backbone.cfg.with_input_size(*config.input_size) if config.input_size else backbone.cfg


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

    Example:
        >>> ex = Extractor(backbone, ("layer3",), ExtractConfig())  # doctest: +SKIP
        >>> feats = ex(batch)  # {"layer3": (N, 256) tensor}
    """

    def __init__(self, backbone: Backbone, layers: Sequence[str], config: ExtractConfig) -> None:
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

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.to(self.device, non_blocking=True).to(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            out = self.net(x)
        return {k: pool_features(v, self.config.pool) for k, v in out.items()}

    def row_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each layer's cached row shape (pooling applied), from one blank image."""
        cfg = resolved_cfg(self.backbone, self.config)
        return {k: tuple(v.shape[1:]) for k, v in self(torch.zeros(1, cfg.channels, *cfg.input_size)).items()}

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


def shard_rows(ex: Extractor, n: int) -> int:
    if ex.config.shard_rows:
        return ex.config.shard_rows
    itemsize = np.dtype(STORAGE_DTYPES[ex.config.dtype]).itemsize
    row_bytes = sum(math.prod(shape) for shape in ex.row_shapes().values()) * itemsize
    rows = max(ex.config.batch_size, (ex.config.shard_mb << 20) // max(row_bytes, 1))
    # >= 8 shards when batches allow: an interruption loses at most about an eighth of the split.
    rows = min(rows, max(ex.config.batch_size, math.ceil(n / 8)))
    return int(min(rows, max(n, 1)))
