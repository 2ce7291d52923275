"""``ExtractConfig``: the settings of an extraction that decide the cached values (and how fast they
are made).
"""

from __future__ import annotations

from dataclasses import dataclass

from .._util import FeatcacheError, unknown
from ..cache.writer import STORAGE_DTYPES
from ..data.preprocess import normalize_augment
from ..data.samples import BAD_IMAGE_POLICIES

POOLS = ("avg", "max", "none", "flatten")


@dataclass(frozen=True)
class ExtractConfig:
    """How to extract.

    Attributes:
        layers: layer names (``featcache layers MODEL`` lists them) or ``penultimate`` / ``logits``.
        pool: ``avg`` / ``max`` over spatial positions (or tokens), ``flatten``, or ``none`` (keep maps).
        dtype: storage dtype: ``float32``, ``float16`` or ``bfloat16``.
        batch_size: images per forward pass.
        workers: DataLoader worker processes for decoding; ``None`` means 0 on the CPU (the model
            needs the cores) and, on CUDA, half the cores shared among the node's ranks (at most 8),
            since one process cannot decode images as fast as a GPU consumes them.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        input_size: (H, W) override of the backbone's input size (resize without crop).
        on_bad_image: ``error`` stops naming the file; ``skip`` records it in the manifest.
        amp: bf16 autocast; ``None`` means on for CUDA, off on CPU.
        channels_last: NHWC memory format; ``None`` means on for CUDA.
        shard_mb: target size of one shard (the unit of resume).
        shard_rows: fixed rows per shard (overrides ``shard_mb``; tests use it).
        method: ``auto``, ``hooks`` or ``fx`` (see :class:`~featcache.extract.nodes.FeatureExtractor`).
        augment: random augmentation of cached views (``flip``, ``crop`` or ``flip,crop``).
        views: how many augmented views of the training split ``train`` caches and cycles through,
            one per epoch (0: none). View ``k`` draws the same augmentation for a sample every time,
            so it is cached like any entry (its key holds ``k`` and ``augment``).

    Example:
        >>> cfg = ExtractConfig(layers=("layer3",), pool="avg", input_size=(64, 64))
    """

    layers: tuple[str, ...] = ("penultimate",)
    pool: str = "avg"
    dtype: str = "float32"
    batch_size: int = 64
    workers: int | None = None
    device: str = "auto"
    input_size: tuple[int, int] | None = None
    on_bad_image: str = "error"
    amp: bool | None = None
    channels_last: bool | None = None
    shard_mb: int = 64
    shard_rows: int | None = None
    method: str = "auto"
    augment: str | None = None
    views: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            object.__setattr__(self, "layers", tuple(s for s in self.layers.split(",") if s))
        if self.input_size is not None and (len(self.input_size) != 2 or min(self.input_size) < 1):
            raise FeatcacheError(f"input size must be two positive numbers H W, got {self.input_size}")
        if self.pool not in POOLS:
            raise unknown("pooling", self.pool, POOLS, "Use --pool avg|max|none|flatten.")
        if self.dtype not in STORAGE_DTYPES:
            raise unknown(
                "storage dtype", self.dtype, STORAGE_DTYPES, "Use --dtype float32|float16|bfloat16."
            )
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise unknown("bad-image policy", self.on_bad_image, BAD_IMAGE_POLICIES, "Use error or skip.")
        if self.batch_size < 1:
            raise FeatcacheError(f"batch size must be >= 1, got {self.batch_size}")
        if self.views < 0:
            raise FeatcacheError(f"--views must be 0 or more, got {self.views}")
        if self.views and not self.augment:
            raise FeatcacheError(
                f"--views {self.views} needs an augmentation to vary between views: add --augment flip,crop"
            )
        object.__setattr__(self, "augment", normalize_augment(self.augment))
