"""Heads trained on cached features: linear, pooled-linear, MLP and conv.

The input shape and layout are read from the cache: pooled features are ``(D,)``, maps ``(C, H, W)``
(``NCHW``) or ``(H, W, C)`` (``NHWC``), tokens ``(L, D)`` (``NLD``). Heads that need a map see it
channels first (:class:`ChannelsFirst`); standardisation is per channel over the positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .._config import from_json, to_json
from .._util import FeatcacheError
from ..cache.rows import Rows, release_pages, to_torch
from ..layout import NC, NCHW, NHWC, channel_axis, channels, channels_first, has_positions, pool, stat_shape
from .config import HEADS, HeadSpec  # noqa: F401  (defined there, without torch)

#: a feature's deviation is floored at this fraction of the RMS deviation of all features (or channels).
#: At 0.1, rare-firing features were still amplified enough to be memorised: a linear head on
#: EfficientNet-Lite0 penultimate features of MNIST-5k (Adam, lr 1e-2, 5 seeds) scored 0.919 standardised
#: against 0.930 raw; at 0.5 it scores 0.930 (and 0.927 against 0.921 raw at lr 1e-3).
STD_FLOOR = 0.5


def head_layout(in_shape: tuple[int, ...], layout: str | None) -> str:
    """The layout a head takes its rows in: the cache's, else (older runs) maps NCHW and all else vectors."""
    return layout if layout is not None else (NCHW if len(in_shape) == 3 else NC)


class ChannelsFirst(nn.Module):
    """An NHWC map or NLD tokens as the (N, C, H, W) map a map head takes (NCHW passes unchanged)."""

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channels_first(x, self.layout)

    def extra_repr(self) -> str:
        return self.layout


class Standardize(nn.Module):
    """Fixed ``(x - mean) / std`` with statistics from the training split (per feature or per channel)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    @classmethod
    def fit(
        cls,
        x: torch.Tensor | Rows,
        chunk: int | None = None,
        dtype: str = "float32",
        layout: str | None = None,
    ) -> Standardize:
        """Per-feature (vectors) or per-channel (maps and tokens, over the positions of ``layout``;
        without it 4-D input is NCHW) statistics, computed in float64 by chunks.

        ``x`` may be a tensor or a (memory-mapped) array in the cache's storage ``dtype``: it is read
        ``chunk`` rows at a time (default: 64 MB of float64), never whole.

        Example:
            >>> Standardize.fit(torch.randn(100, 8, 4, 4)).mean.shape
            torch.Size([8, 1, 1])
            >>> Standardize.fit(torch.randn(100, 4, 4, 8), layout="NHWC").mean.shape
            torch.Size([8])
        """
        ndim, row = len(x.shape), tuple(int(d) for d in x.shape[1:])
        layout = head_layout(row, layout)
        chunk = chunk or max(1, (64 << 20) // (8 * max(1, int(np.prod(row)))))
        if has_positions(layout):
            axis = channel_axis(layout)
            dims = tuple(i for i in range(ndim) if i != axis)
            shape = tuple(int(x.shape[i]) if i == axis else 1 for i in range(ndim))
        else:
            dims, shape = (0,), (1, *row)
        # rows given as an array-like that reads tensors (the probe's row blocks) say where they live
        device = x.device if isinstance(x, torch.Tensor) else torch.device(str(getattr(x, "device", "cpu")))
        total = torch.zeros(shape, dtype=torch.float64, device=device)
        sq = torch.zeros(shape, dtype=torch.float64, device=device)
        count = 0
        for i in range(0, len(x), chunk):
            rows = x[i : i + chunk]
            if isinstance(rows, torch.Tensor):
                part = rows.double()
            else:
                part = to_torch(np.asarray(rows), dtype).double()
                release_pages(x, i, i + chunk)  # the rows are read: the map's pages need not stay resident
            total += part.sum(dims, keepdim=True)
            sq += (part * part).sum(dims, keepdim=True)
            count += part.numel() // total.numel()  # values per statistic
        mean = total / count
        std = floored_std(sq / count - mean * mean)
        out = stat_shape(layout, row)
        return cls(mean.reshape(out).float(), std.reshape(out).float())

    @classmethod
    def from_channel_stats(cls, mean: Rows, var: Rows, chunk: int = 1 << 16) -> Standardize:
        """Per-channel statistics of maps from their per-row channel ``mean`` and ``var`` (each (N, C), as
        the cache stores them), without the maps: the same as :meth:`fit` on the maps, to float rounding.

        Every row has the same number of positions, so the channel mean is the mean of the row means and
        the variance is the mean of the row variances plus the variance of the row means.

        Example:
            >>> maps = torch.randn(50, 3, 4, 4)
            >>> var, m = torch.var_mean(maps, dim=(2, 3), correction=0)
            >>> s = Standardize.from_channel_stats(m.numpy(), var.numpy())
            >>> torch.allclose(s.std, Standardize.fit(maps).std)
            True
        """
        n = len(mean)

        def total(fn: Any) -> torch.Tensor:
            acc = torch.zeros(mean.shape[1], dtype=torch.float64)
            for i in range(0, n, chunk):
                acc += fn(slice(i, i + chunk)).sum(0)
            return acc

        def rows(a: Rows, s: slice) -> torch.Tensor:
            return torch.from_numpy(np.array(a[s], dtype=np.float64))

        m = total(lambda s: rows(mean, s)) / n
        v = total(lambda s: rows(var, s) + (rows(mean, s) - m) ** 2) / n
        std = floored_std(v)
        return cls(m.float().view(-1, 1, 1), std.float().view(-1, 1, 1))


def floored_std(var: torch.Tensor) -> torch.Tensor:
    """Deviations from per-feature (or per-channel) variances, floored at :data:`STD_FLOOR` times the RMS
    deviation over all of them (1 when every feature is constant).

    A feature (almost) constant on the training split would otherwise be divided by a near-zero
    deviation, and an image where it fires would get an enormous logit (dead ReLU features of a
    penultimate layer: test loss 88 instead of 0.3). With the floor, no feature is scaled up more than
    ``1 / STD_FLOOR`` times as much as the typical one; features of comparable spread keep unit variance.

    Example:
        >>> floored_std(torch.tensor([4.0, 4.0, 0.0]))
        tensor([2.0000, 2.0000, 0.8165])
    """
    var = var.clamp_min(0)
    scale = float(var.mean().sqrt())
    return var.sqrt().clamp_min(STD_FLOOR * scale if scale > 0 else 1.0)


def fit_standardize(
    kind: str,
    x: torch.Tensor | Rows,
    channel_mean: Rows | None = None,
    channel_var: Rows | None = None,
    dtype: str = "float32",
    layout: str | None = None,
) -> Standardize:
    """Training-split statistics of what the head's first trainable layer sees.

    A ``pooled-linear`` head on maps standardises its pooled features (per channel over images): its
    :class:`Standardize` sits before the pooling, which is the same affine map. Any other head on maps
    standardises per channel over images and positions; vectors per feature. Channels and positions
    are those of the rows' ``layout`` (the cache's; without it 4-D input is NCHW maps). With the
    cache's per-row ``channel_mean`` / ``channel_var`` of maps, the maps themselves are not read.

    Example:
        >>> maps = torch.randn(64, 8, 5, 5)
        >>> s = fit_standardize("pooled-linear", maps)
        >>> torch.allclose(s(maps).mean((2, 3)).std(0, unbiased=False), torch.ones(8), atol=1e-4)
        True
    """
    row = tuple(int(d) for d in x.shape[1:])
    layout = head_layout(row, layout)
    if not has_positions(layout):
        return Standardize.fit(x, dtype=dtype, layout=layout)
    shape = stat_shape(layout, row)
    if kind == "pooled-linear":
        pooled = channel_mean if channel_mean is not None else _pooled(x, dtype, layout)
        per_channel = Standardize.fit(pooled)
        return Standardize(per_channel.mean.reshape(shape), per_channel.std.reshape(shape))
    if channel_mean is not None and channel_var is not None:
        s = Standardize.from_channel_stats(channel_mean, channel_var)
        return Standardize(s.mean.reshape(shape), s.std.reshape(shape))
    return Standardize.fit(x, dtype=dtype, layout=layout)


def _pooled(
    x: torch.Tensor | Rows, dtype: str, layout: str = NCHW, chunk_bytes: int = 64 << 20
) -> torch.Tensor:
    """(N, C) channel means of maps or tokens in ``layout``, read ``chunk_bytes`` at a time."""
    step = max(1, chunk_bytes // max(1, 4 * int(np.prod(x.shape[1:]))))
    parts = []
    for i in range(0, len(x), step):
        rows = x[i : i + step]
        t = rows if isinstance(rows, torch.Tensor) else to_torch(np.asarray(rows), dtype)
        parts.append(pool(t.float(), "avg", layout))
    return torch.cat(parts) if parts else torch.zeros(0, channels(layout, tuple(x.shape[1:])))


class TargetScale(nn.Module):
    """Fixed ``z * std + mean``: a regression head trains on targets standardised with the training
    split's statistics, and this puts its outputs back in the targets' units (exported models too)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean

    @classmethod
    def fit(cls, y: torch.Tensor) -> TargetScale:
        """Each target's mean and deviation over the training rows (a constant target keeps 1).

        Example:
            >>> TargetScale.fit(torch.tensor([[1.0], [3.0]])).std.tolist()
            [1.0]
        """
        y = y.double()
        std = y.std(0, unbiased=False)
        return cls(y.mean(0).float(), torch.where(std > 0, std, torch.ones_like(std)).float())


class Head(nn.Module):
    """An optional :class:`Standardize`, the body, and (regression) a :class:`TargetScale`."""

    def __init__(self, body: nn.Module, standardize: Standardize | None = None) -> None:
        super().__init__()
        self.standardize = standardize if standardize is not None else nn.Identity()
        self.body = body
        self.target: nn.Module = nn.Identity()  # TargetScale once a regression head is trained

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.target(self.body(self.standardize(x)))


def _need_map(spec: HeadSpec, in_shape: tuple[int, ...], layout: str) -> list[nn.Module]:
    """The modules that show ``in_shape`` rows in ``layout`` as channels-first maps (raises if they are
    not maps, or, for the conv head, not spatial)."""
    spatial = layout in (NCHW, NHWC)
    if not has_positions(layout) or (spec.kind == "conv" and not spatial):
        wants = "a spatial map" if spec.kind == "conv" else "a map or tokens"
        raise FeatcacheError(
            f"head {spec.kind!r} needs {wants} but the cached layer has shape {in_shape} (layout {layout}): "
            "extract with --pool none, or pick a convolutional layer if this one gives vectors (`featcache "
            "layers MODEL` shows each layer's shape and layout), or use --head linear / mlp"
        )
    return [] if layout == NCHW else [ChannelsFirst(layout)]


def build_head(
    spec: HeadSpec,
    in_shape: tuple[int, ...],
    num_classes: int,
    standardize: Standardize | None = None,
    seed: int | None = 0,
    layout: str | None = None,
) -> Head:
    """Build a head for cached features of shape ``in_shape`` (no batch dim) in ``layout``.

    Args:
        spec: which head.
        in_shape: one row's shape, ``(D,)``, ``(C, H, W)``, ``(H, W, C)`` or ``(L, D)``.
        num_classes: outputs.
        standardize: optional fixed input standardisation.
        seed: seed for the initial weights (``None`` uses the global RNG).
        layout: the rows' layout as the cache records it (:attr:`CachedFeatures.layouts`); without it
            3-D rows are NCHW maps and others vectors.

    Example:
        >>> build_head(HeadSpec("pooled-linear"), (256, 4, 4), 10)(torch.zeros(2, 256, 4, 4)).shape
        torch.Size([2, 10])
        >>> swin_map = torch.zeros(2, 4, 4, 96)  # (N, H, W, C)
        >>> build_head(HeadSpec("pooled-linear"), (4, 4, 96), 10, layout="NHWC")(swin_map).shape
        torch.Size([2, 10])
    """
    in_shape = tuple(int(s) for s in in_shape)
    layout = head_layout(in_shape, layout)
    flat = 1
    for s in in_shape:
        flat *= s
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.default_generator.manual_seed(seed)  # CPU only: leaves the CUDA generators alone
        body: nn.Module
        if spec.kind == "linear":
            body = nn.Sequential(nn.Flatten(), nn.Linear(flat, num_classes))
        elif spec.kind == "pooled-linear":
            front = _need_map(spec, in_shape, layout)
            c = channels(layout, in_shape)
            body = nn.Sequential(*front, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
        elif spec.kind == "mlp":
            layers: list[nn.Module] = [nn.Flatten()]
            width = flat
            for h in spec.hidden:
                layers += [nn.Dropout(spec.dropout), nn.Linear(width, h), nn.GELU()]
                width = h
            layers += [nn.Dropout(spec.dropout), nn.Linear(width, num_classes)]
            body = nn.Sequential(*layers)
        else:
            front = _need_map(spec, in_shape, layout)
            c = spec.conv_channels
            body = nn.Sequential(
                *front,
                nn.Conv2d(channels(layout, in_shape), c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Dropout(spec.dropout),
                nn.Linear(c, num_classes),
            )
        return Head(body, standardize)


def check_input(head_in_shape: tuple[int, ...], cached_shape: tuple[int, ...]) -> None:
    """Raise naming both shapes when a head built for one input meets features of another."""
    if tuple(head_in_shape) != tuple(cached_shape):
        raise FeatcacheError(
            f"head expects input shape {tuple(head_in_shape)} but the cached features have shape "
            f"{tuple(cached_shape)}; train a new head for this layer/pooling"
        )


@dataclass(frozen=True)
class HeadInfo:
    """Metadata saved beside a head so it can be rebuilt without pickle."""

    spec: HeadSpec
    in_shape: tuple[int, ...]
    num_classes: int
    standardize: bool = False
    layout: str | None = None  # the rows' layout (None: heads from before layouts, maps NCHW)
    task: str = "classify"  # multilabel: a sigmoid per output; regress: outputs in the targets' units
    threshold: float | None = None  # multilabel: the probability above which a label is predicted

    def to_dict(self) -> dict[str, Any]:
        return dict(to_json(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadInfo:
        return from_json(cls, d)

    def build(self) -> Head:
        """An untrained head of this shape (load a state dict into it)."""
        std = None
        if self.standardize:
            shape = stat_shape(head_layout(self.in_shape, self.layout), self.in_shape)
            std = Standardize(torch.zeros(shape), torch.ones(shape))
        head = build_head(self.spec, self.in_shape, self.num_classes, std, seed=None, layout=self.layout)
        if self.task == "regress":
            head.target = TargetScale(torch.zeros(self.num_classes), torch.ones(self.num_classes))
        return head
