"""Pooling of a layer's activation before it is cached (``--pool avg|max|flatten|none|cls|avg-tokens``),
by layout."""

from __future__ import annotations

import torch

from ..layout import legacy_layout, pool


def pool_features(t: torch.Tensor, pool_: str, layout: str | None = None, prefix: int = 0) -> torch.Tensor:
    """Pool over the positions of ``layout`` to (N, C); ``flatten`` to (N, -1); ``none`` as is; token
    layers' class token (``cls``) or patch tokens' mean (``avg-tokens``, after ``prefix`` tokens).

    ``layout`` is the layer's (:mod:`featcache.layout`): ``NHWC`` maps are averaged over H and W, not
    W and C. Without it, (N, C, H, W) maps and (N, L, D) tokens are assumed, as before layouts were
    recorded.

    Example:
        >>> pool_features(torch.ones(2, 8, 4, 4), "avg").shape
        torch.Size([2, 8])
        >>> pool_features(torch.ones(2, 4, 4, 8), "avg", "NHWC").shape
        torch.Size([2, 8])
    """
    return pool(t, pool_, layout or legacy_layout(tuple(t.shape[1:])), prefix)
