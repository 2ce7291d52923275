"""Layouts of layer outputs: which axis holds the channels and which hold positions.

A layer's output is one of

    NC      vectors (N, C)
    NCHW    maps, channels first (N, C, H, W): convolutions
    NHWC    maps, channels last (N, H, W, C): Swin, MambaOut, ConvNeXt-style blocks inside
    NLD     tokens (N, L, D): ViT, LeViT, the token stages of hybrids
    NCL     sequences, channels first (N, C, L): Conv1d, BatchNorm1d

Pooling averages (or takes the max) over the positions, channel statistics are per channel over the
positions, and heads that need a map see it channels first (:func:`channels_first`). These are pure
functions of a tensor and its layout: the backbones stage infers the layout
(:mod:`featcache.backbones.shapes`), the extractor records it in the cache manifest, and every later
stage reads it from there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the cache's listing reads layouts without it
    import torch

from ._util import FeatcacheError, unknown

NC, NCHW, NHWC, NLD, NCL = "NC", "NCHW", "NHWC", "NLD", "NCL"
LAYOUTS = (NC, NCHW, NHWC, NLD, NCL)
#: bump when the rules that infer a layer's layout change (part of the cache record)
LAYOUT_RULES = 1

_CHANNEL_AXIS = {NC: 1, NCHW: 1, NHWC: 3, NLD: 2, NCL: 1}
_POSITION_AXES: dict[str, tuple[int, ...]] = {NC: (), NCHW: (2, 3), NHWC: (1, 2), NLD: (1,), NCL: (2,)}


def _check(layout: str, t_dim: int | None = None) -> None:
    if layout not in LAYOUTS:
        raise unknown("layout", layout, LAYOUTS, "")
    if t_dim is not None and t_dim != len(layout) and not (layout == NC and t_dim >= 2):
        raise FeatcacheError(f"a {t_dim}-D tensor cannot have layout {layout} ({len(layout)}-D)")


def channel_axis(layout: str) -> int:
    """The channel axis of a batch in ``layout`` (the batch is axis 0).

    Example:
        >>> channel_axis("NHWC"), channel_axis("NLD")
        (3, 2)
    """
    _check(layout)
    return _CHANNEL_AXIS[layout]


def position_axes(layout: str) -> tuple[int, ...]:
    """The axes of a batch in ``layout`` that index positions (spatial or token).

    Example:
        >>> position_axes("NCHW"), position_axes("NHWC"), position_axes("NC")
        ((2, 3), (1, 2), ())
    """
    _check(layout)
    return _POSITION_AXES[layout]


def has_positions(layout: str | None) -> bool:
    """Whether ``layout`` is a map or token layout (channel statistics and map heads apply)."""
    return layout is not None and layout != NC


def channels(layout: str, row_shape: tuple[int, ...]) -> int:
    """The number of channels of one row (no batch axis) in ``layout``.

    Example:
        >>> channels("NHWC", (7, 7, 768))
        768
    """
    _check(layout)
    return int(row_shape[_CHANNEL_AXIS[layout] - 1]) if layout != NC else int(row_shape[0])


#: pools that read the tokens of an NLD layer by position: the class token, or the patch tokens' mean
TOKEN_POOLS = ("cls", "avg-tokens")


def pooled_layout(layout: str | None, pool: str) -> str | None:
    """The layout of what the cache stores for a layer in ``layout`` under ``--pool``.

    Example:
        >>> pooled_layout("NHWC", "avg"), pooled_layout("NHWC", "none"), pooled_layout(None, "flatten")
        ('NC', 'NHWC', 'NC')
    """
    return layout if pool == "none" else NC


def pool(t: torch.Tensor, how: str, layout: str | None, prefix: int = 0) -> torch.Tensor:
    """``avg`` / ``max`` over the positions of ``layout`` to (N, C); ``flatten`` to (N, -1); ``none`` as is.

    Token layers (``NLD``) also take ``cls`` (token 0, the class token) and ``avg-tokens`` (the mean of
    the patch tokens: the ``prefix`` class / register / distillation tokens ahead of them left out, see
    :mod:`featcache.backbones.tokens`). A vector layout (``NC``) is always flattened: a 1x1-conv
    classifier's input (N, C, 1, 1) is (N, C). An unknown layout (None) can be kept or flattened, not
    pooled.

    Example:
        >>> pool(torch.ones(2, 4, 4, 8), "avg", "NHWC").shape
        torch.Size([2, 8])
        >>> tokens = torch.arange(6.0).reshape(1, 3, 2)  # a class token, then 2 patch tokens
        >>> pool(tokens, "cls", "NLD", prefix=1).tolist(), pool(tokens, "avg-tokens", "NLD", 1).tolist()
        ([[0.0, 1.0]], [[3.0, 4.0]])
    """
    if how == "flatten" or layout == NC:
        return t.flatten(1) if t.dim() > 2 else t
    if how == "none":
        return t
    if layout is None:
        raise FeatcacheError(f"cannot {how}-pool a {t.dim()}-D output whose layout is unknown")
    _check(layout, t.dim())
    if how in TOKEN_POOLS:
        if layout != NLD:
            raise FeatcacheError(f"--pool {how} reads token layers (NLD), not {layout}; use --pool avg")
        if t.shape[1] <= prefix:
            raise FeatcacheError(f"--pool {how}: {t.shape[1]} tokens hold no patch token after {prefix}")
        return t[:, 0] if how == "cls" else t[:, prefix:].mean(1)
    axes = _POSITION_AXES[layout]
    return t.mean(axes) if how == "avg" else t.amax(axes)


def pool_features(t: torch.Tensor, how: str, layout: str | None = None, prefix: int = 0) -> torch.Tensor:
    """:func:`pool` for a layer read back from a run: without a recorded ``layout`` (runs made before
    layouts were recorded), the layout those runs assumed (:func:`legacy_layout`): (N, C, H, W) maps and
    (N, L, D) tokens.

    Example:
        >>> pool_features(torch.ones(2, 8, 4, 4), "avg").shape
        torch.Size([2, 8])
        >>> pool_features(torch.ones(2, 4, 4, 8), "avg", "NHWC").shape
        torch.Size([2, 8])
    """
    return pool(t, how, layout or legacy_layout(tuple(t.shape[1:])), prefix)


def channel_stats(t: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and channel: the mean and population variance over the positions, each (N, C) float32.

    Example:
        >>> mean, var = channel_stats(torch.ones(2, 3, 3, 5), "NHWC")
        >>> mean.shape, float(var.max())
        (torch.Size([2, 5]), 0.0)
    """
    _check(layout, t.dim())
    if layout == NC:
        raise FeatcacheError("vectors have no positions to take channel statistics over")
    import torch

    var, mean = torch.var_mean(t.float(), dim=_POSITION_AXES[layout], correction=0)
    return mean, var


def channels_first(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A map or token batch as an (N, C, H, W) map: NHWC permuted, tokens (N, L, D) as (N, D, L, 1).

    Example:
        >>> channels_first(torch.zeros(2, 10, 16), "NLD").shape
        torch.Size([2, 16, 10, 1])
    """
    _check(layout, t.dim())
    if layout == NHWC:
        return t.permute(0, 3, 1, 2)
    if layout == NLD:
        return t.transpose(1, 2).unsqueeze(-1)
    if layout == NCL:
        return t.unsqueeze(-1)
    return t


def stat_shape(layout: str, row_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of per-channel statistics that broadcast over one row in ``layout`` (vectors: per feature).

    Example:
        >>> stat_shape("NCHW", (8, 4, 4)), stat_shape("NHWC", (4, 4, 8)), stat_shape("NC", (8,))
        ((8, 1, 1), (8,), (8,))
    """
    if layout == NC:
        return tuple(row_shape)
    c = channels(layout, row_shape)
    return {NCHW: (c, 1, 1), NHWC: (c,), NLD: (c,), NCL: (c, 1)}[layout]


def legacy_layout(row_shape: tuple[int, ...]) -> str:
    """The layout assumed before featcache recorded layouts: maps NCHW, (L, D) rows tokens, else NC."""
    return {3: NCHW, 2: NLD}.get(len(row_shape), NC)
