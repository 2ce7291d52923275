"""Layouts: pooling, channel statistics and the channels-first view against torch's own NCHW operations
on the permuted tensor."""

from __future__ import annotations

import pytest
import torch

from featcache._util import FeatcacheError
from featcache.layout import (
    channel_stats,
    channels,
    channels_first,
    pool,
    pooled_layout,
    position_axes,
    stat_shape,
)

MAPS = torch.randn(3, 5, 4, 6, generator=torch.Generator().manual_seed(0))  # (N, C, H, W)
AS = {
    "NCHW": MAPS,
    "NHWC": MAPS.permute(0, 2, 3, 1).contiguous(),
    "NLD": MAPS.flatten(2).transpose(1, 2).contiguous(),  # positions as tokens
    "NCL": MAPS.flatten(2).contiguous(),
}


@pytest.mark.parametrize("layout", list(AS))
def test_pooling_is_the_nchw_pooling_of_the_same_values(layout: str) -> None:
    t = AS[layout]
    assert torch.allclose(pool(t, "avg", layout), torch.nn.functional.adaptive_avg_pool2d(MAPS, 1).flatten(1))
    assert torch.equal(pool(t, "max", layout), torch.nn.functional.adaptive_max_pool2d(MAPS, 1).flatten(1))
    assert torch.equal(pool(t, "none", layout), t) and torch.equal(pool(t, "flatten", layout), t.flatten(1))
    assert channels(layout, tuple(t.shape[1:])) == 5 and pooled_layout(layout, "avg") == "NC"


@pytest.mark.parametrize("layout", list(AS))
def test_channel_statistics_and_channels_first(layout: str) -> None:
    var, mean = torch.var_mean(MAPS, dim=(2, 3), correction=0)
    got_mean, got_var = channel_stats(AS[layout], layout)
    assert torch.allclose(got_mean, mean, atol=1e-6) and torch.allclose(got_var, var, atol=1e-5)
    first = channels_first(AS[layout], layout)
    assert first.shape[:2] == (3, 5) and torch.equal(first.flatten(2), MAPS.flatten(2))
    # per-channel statistics broadcast over one row in its own layout
    mean_b = mean[0].reshape(stat_shape(layout, tuple(AS[layout].shape[1:])))
    assert (AS[layout][0] - mean_b).shape == AS[layout][0].shape


def test_vectors_and_unknown_layouts() -> None:
    one_by_one = torch.randn(2, 7, 1, 1)  # the input of a 1x1-conv classifier
    assert pool(one_by_one, "none", "NC").shape == (2, 7)
    assert position_axes("NC") == () and stat_shape("NC", (7,)) == (7,)
    assert torch.equal(pool(MAPS, "none", None), MAPS)
    with pytest.raises(FeatcacheError, match="layout is unknown"):
        pool(MAPS, "avg", None)
    with pytest.raises(FeatcacheError, match="cannot have layout NHWC"):
        pool(torch.zeros(2, 3, 4), "avg", "NHWC")
    with pytest.raises(FeatcacheError, match="unknown layout 'NWHC'"):
        pool(MAPS, "avg", "NWHC")
