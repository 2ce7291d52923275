"""Pooling of a layer's activation before it is cached (``--pool avg|max|flatten|none``)."""

from __future__ import annotations

import torch


def pool_features(t: torch.Tensor, pool: str) -> torch.Tensor:
    """Pool (N, C, H, W) maps or (N, L, D) tokens to (N, C); ``flatten`` to (N, -1); ``none`` as is.

    Example:
        >>> pool_features(torch.ones(2, 8, 4, 4), "avg").shape
        torch.Size([2, 8])
    """
    if pool == "none" or t.dim() <= 2:
        return t
    if pool == "flatten":
        return t.flatten(1)
    dims = tuple(range(2, t.dim())) if t.dim() == 4 else (1,)
    return t.mean(dims) if pool == "avg" else t.amax(dims)
