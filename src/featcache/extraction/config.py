"""``ExtractConfig``: the settings of an extraction that decide the cached values (and how fast they
are made).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .._checks import check_device, check_input_side, check_number
from .._errors import FeatcacheError, unknown
from ..cache.rows import STORAGE_DTYPES
from ..cache.writer import SHARD_MB
from ..data.config import BAD_IMAGE_POLICIES, normalize_augment
from ..layout import TOKEN_POOLS

if TYPE_CHECKING:
    from ..backbones.registry import Backbone

# This module imports no torch: the command line checks these settings before loading any model.

#: the layer a job reads when none is named: the classifier's input (``backbones.layers.PENULTIMATE``)
DEFAULT_LAYER = "penultimate"

POOLS = ("avg", "max", "none", "flatten", *TOKEN_POOLS)
#: other names for the pools, as other libraries spell them
POOL_SYNONYMS = {
    "mean": "avg",
    "average": "avg",
    "gap": "avg",
    "token": "cls",
    "cls-token": "cls",
    "max-pool": "max",
}


@dataclass(frozen=True)
class ExtractConfig:
    """How to extract.

    Attributes:
        pool: ``avg`` / ``max`` over spatial positions (or tokens), ``flatten``, or ``none`` (keep maps);
            for ViT token layers also ``cls`` (the class token) or ``avg-tokens`` (the mean of the patch
            tokens, class and register tokens left out).
        dtype: storage dtype: ``float32``, ``float16`` or ``bfloat16``.
        batch_size: images per forward pass.
        workers: DataLoader worker processes for decoding; ``None`` means 0 on the CPU (the model
            needs the cores) and, on CUDA, half the cores shared among the node's ranks (at most 8),
            since one process cannot decode images as fast as a GPU consumes them.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        input_size: (H, W) override of the backbone's input size (resize without crop); None keeps
            the backbone's own preprocessing (224x224 after a resize to 256 and a centre crop for most
            ImageNet models: 12x the compute of 64x64). The command line also takes timm's C H W.
        on_bad_image: ``error`` stops naming the file; ``skip`` records it in the manifest.
        amp: bf16 autocast; auto (``None``) means on for CUDA, off on CPU.
        channels_last: NHWC memory format; auto (``None``) means on for CUDA.
        shard_mb: target size of one shard (the unit of commit and resume; at least 8 shards per
            split where its batches allow): :func:`~featcache.cache.writer.shard_plan`.
        shard_rows: fixed rows per shard (overrides ``shard_mb``; tests use it). Shards hold whole
            batches: both are rounded up to a multiple of ``batch_size``.
        method: ``auto``, ``hooks`` or ``fx`` (see :class:`~featcache.extraction.nodes.FeatureExtractor`).
        verify: check each cached shard's SHA-256 the first time this process reads it (once per
            file; a damaged table is an error naming ``featcache cache rm``). Index segments are checked
            on every open either way; not part of the cache key.

    The layers are not part of it: they are an argument of :func:`~featcache.extraction.extract`, as
    torchvision's ``return_nodes`` are.

    Example:
        >>> cfg = ExtractConfig(pool="avg", input_size=(64, 64))
    """

    pool: str = "avg"
    dtype: str = "float32"
    batch_size: int = 64
    workers: int | None = None
    device: str = "auto"
    input_size: tuple[int, int] | None = field(default=None, metadata={"shown": "the backbone's own"})
    on_bad_image: str = "error"
    amp: bool | None = None
    channels_last: bool | None = None
    shard_mb: int = SHARD_MB
    shard_rows: int | None = None
    method: str = "auto"
    verify: bool = True

    def __post_init__(self) -> None:
        if self.input_size is not None:
            size = tuple(self.input_size)
            if len(size) != 2:
                raise FeatcacheError(f"input size must be two positive numbers H W, got {self.input_size}")
            for v in size:
                check_input_side(v)
            object.__setattr__(self, "input_size", (int(size[0]), int(size[1])))
        if self.pool not in POOLS:
            fix = "Use --pool avg|max|none|flatten|cls|avg-tokens."
            if self.pool.lower() in POOL_SYNONYMS:  # spelling closeness would suggest 'max' for 'mean'
                synonym = POOL_SYNONYMS[self.pool.lower()]
                raise FeatcacheError(f"unknown pooling {self.pool!r}. Did you mean: {synonym!r}? {fix}")
            raise unknown("pooling", self.pool, POOLS, fix)
        if self.dtype not in STORAGE_DTYPES:
            raise unknown(
                "storage dtype", self.dtype, STORAGE_DTYPES, "Use --dtype float32|float16|bfloat16."
            )
        if self.on_bad_image not in BAD_IMAGE_POLICIES:
            raise unknown("bad-image policy", self.on_bad_image, BAD_IMAGE_POLICIES, "Use error or skip.")
        check_number(
            "batch_size",
            self.batch_size,
            1,
            integer=True,
            why="images per forward pass of the extraction: --extract-batch-size in train, sweep, finetune",
        )
        check_number("workers", self.workers, 0, integer=True, none="auto")
        check_number("shard_mb", self.shard_mb, 1, integer=True)
        check_number("shard_rows", self.shard_rows, 1, integer=True, none="from --shard-mb")
        check_device(self.device)


def parse_layers(layers: str | Sequence[str], backbone: Backbone | None = None) -> tuple[str, ...]:
    """Layer names from a comma list (spaces allowed) or a sequence, in order, without repeats; with a
    ``backbone``, sets such as ``@blocks`` expanded (:func:`~featcache.backbones.layers.expand_layers`).

    Example:
        >>> parse_layers("blocks.4, penultimate")
        ('blocks.4', 'penultimate')
    """
    parts = layers.split(",") if isinstance(layers, str) else list(layers)
    names = tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
    if not names:
        raise FeatcacheError(f"no layers named in {layers!r}; run `featcache layers MODEL` to list them")
    if backbone is None:
        return names
    from ..backbones.layers import expand_layers  # here: the configs are read before torch is imported

    return tuple(expand_layers(backbone, names))


@dataclass(frozen=True)
class View:
    """One cached augmented view of a split: index ``k`` >= 1 and the augmentation it draws.

    View ``k`` draws the same augmentation for a sample in every process, so it is cached like any
    entry (its key holds ``k`` and ``augment``).

    Example:
        >>> View(2, "flip").index
        2
    """

    index: int
    augment: str

    def __post_init__(self) -> None:
        if not isinstance(self.index, int) or isinstance(self.index, bool) or self.index < 1:
            raise FeatcacheError(f"an augmented view's index starts at 1, got {self.index!r}")
        augment = normalize_augment(self.augment)
        if not augment:
            raise FeatcacheError(f"view {self.index} needs an augmentation to vary between views")
        object.__setattr__(self, "augment", augment)


@dataclass(frozen=True)
class Views:
    """K cached augmented views of the training split; a head trains epoch ``e`` on view ``e mod K``.

    Attributes:
        count: how many views (each one backbone pass over the training split).
        augment: what varies between them: ``flip``, ``crop`` or ``flip,crop``.

    Example:
        >>> [v.index for v in Views(3, "crop").each()]
        [1, 2, 3]
    """

    count: int
    augment: str = "flip,crop"

    def __post_init__(self) -> None:
        check_number("views", self.count, 1, integer=True, why="1 or more to cache views")
        augment = normalize_augment(self.augment) if self.augment else None
        if not augment:
            raise FeatcacheError(
                f"--views {self.count} needs an augmentation to vary between views: add --augment flip,crop"
            )
        object.__setattr__(self, "augment", augment)

    @classmethod
    def parse(cls, count: int, augment: str | None) -> Views | None:
        """The views of ``--views K --augment A`` (None for ``K`` = 0); ``A`` defaults to ``flip,crop``.

        Example:
            >>> Views.parse(0, None) is None, Views.parse(2, None).augment
            (True, 'flip,crop')
        """
        check_number("views", count, 0, integer=True, why="0: no views")
        if count == 0:
            if augment:
                raise FeatcacheError(
                    f"--augment {augment} needs --views K: heads augment through K cached views"
                )
            return None
        return cls(count, augment or "flip,crop")

    def each(self) -> list[View]:
        """Views 1..K."""
        return [View(k, self.augment) for k in range(1, self.count + 1)]
