"""Heads: shapes, the seeds' SimpleClassifier as reference, shape errors, standardisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from featcache._util import FeatcacheError
from featcache.train.heads import (
    STD_FLOOR,
    HeadInfo,
    HeadSpec,
    Standardize,
    build_head,
    check_input,
    fit_standardize,
)


@pytest.mark.parametrize(
    ("kind", "shape"),
    [
        ("linear", (64,)),
        ("linear", (8, 3, 3)),
        ("pooled-linear", (8, 3, 3)),
        ("mlp", (64,)),
        ("conv", (8, 4, 4)),
    ],
)
def test_heads_output_logits(kind: str, shape: tuple[int, ...]) -> None:
    head = build_head(HeadSpec(kind, hidden=(16,)), shape, num_classes=5)
    assert head(torch.randn(3, *shape)).shape == (3, 5)


def test_pooled_linear_is_the_seeds_simple_classifier() -> None:
    class SimpleClassifier(nn.Module):  # seed 000, verbatim structure
        def __init__(self, feature_size: int, num_classes: int) -> None:
            super().__init__()
            self.classifier = nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(feature_size, num_classes)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(x)

    ref = SimpleClassifier(256, 10)
    head = build_head(HeadSpec("pooled-linear"), (256, 7, 7), 10)
    head.body[2].load_state_dict(ref.classifier[2].state_dict())
    x = torch.randn(4, 256, 7, 7)
    torch.testing.assert_close(head(x), ref(x))


def test_spatial_heads_refuse_pooled_features() -> None:
    with pytest.raises(FeatcacheError, match=r"\(1280,\).*--pool none"):
        build_head(HeadSpec("conv"), (1280,), 10)


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(FeatcacheError, match=r"\(512,\).*\(256, 4, 4\)"):
        check_input((512,), (256, 4, 4))


def test_unknown_head_suggests() -> None:
    with pytest.raises(ValueError, match="'mlp'"):
        HeadSpec("mpl")


def test_standardize_matches_torch_statistics() -> None:
    x = torch.randn(500, 6) * torch.arange(4, 10) + 3  # spreads within 2x: none floored
    std = Standardize.fit(x, chunk=64)
    torch.testing.assert_close(std.mean, x.mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(std.std, x.std(0, unbiased=False), atol=1e-4, rtol=1e-4)
    maps = torch.randn(20, 3, 4, 4) + 5
    s2 = Standardize.fit(maps)
    assert s2.mean.shape == (3, 1, 1)
    torch.testing.assert_close(s2.mean.flatten(), maps.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)


def test_standardize_from_channel_statistics_equals_fitting_the_maps() -> None:
    g = torch.Generator().manual_seed(0)
    # Channels with different offsets and scales, rows with different means: both variance terms count.
    maps = (torch.randn(90, 5, 6, 6, generator=g) + torch.randn(90, 5, 1, 1, generator=g)) * torch.arange(
        4, 9
    ).view(1, 5, 1, 1) + 10
    var, mean = torch.var_mean(maps, dim=(2, 3), correction=0)
    ref = Standardize.fit(maps)
    got = Standardize.from_channel_stats(mean.numpy(), var.numpy(), chunk=16)
    assert got.mean.shape == ref.mean.shape == (5, 1, 1)
    torch.testing.assert_close(got.mean, ref.mean, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(got.std, ref.std, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.std.flatten(), maps.transpose(0, 1).flatten(1).std(1, unbiased=False))


def test_fit_standardize_takes_what_the_first_trainable_layer_sees() -> None:
    g = torch.Generator().manual_seed(1)
    maps = torch.randn(70, 4, 5, 5, generator=g) * 3 + torch.randn(70, 4, 1, 1, generator=g)
    var, mean = torch.var_mean(maps, dim=(2, 3), correction=0)
    pooled = maps.mean((2, 3))
    for s in (
        fit_standardize("pooled-linear", maps),  # an entry without channel statistics: pools the maps
        fit_standardize("pooled-linear", maps.numpy(), mean.numpy(), var.numpy()),
    ):
        assert s.mean.shape == (4, 1, 1)
        out = s(maps).mean((2, 3))  # standardise, then pool: unit variance per pooled feature
        torch.testing.assert_close(out.mean(0), torch.zeros(4), rtol=0, atol=1e-5)
        torch.testing.assert_close(out.std(0, unbiased=False), torch.ones(4), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s.mean.flatten(), pooled.mean(0), rtol=1e-5, atol=1e-5)
    conv = fit_standardize("conv", maps.numpy(), mean.numpy(), var.numpy())
    torch.testing.assert_close(conv.std, Standardize.fit(maps).std, rtol=1e-5, atol=1e-6)
    flat = fit_standardize("linear", pooled)
    torch.testing.assert_close(flat.std, pooled.std(0, unbiased=False), rtol=1e-5, atol=1e-6)


def test_head_info_rebuilds_same_structure() -> None:
    head = build_head(
        HeadSpec("mlp", hidden=(32, 16), dropout=0.1), (20,), 4, Standardize.fit(torch.randn(50, 20))
    )
    info = HeadInfo(HeadSpec("mlp", hidden=(32, 16), dropout=0.1), (20,), 4, standardize=True)
    again = HeadInfo.from_dict(info.to_dict()).build()
    again.load_state_dict(head.state_dict())
    x = torch.randn(3, 20)
    torch.testing.assert_close(again.eval()(x), head.eval()(x))


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("kind", ["pooled-linear", "conv", "linear"])
def test_channels_last_heads_equal_channels_first_heads_on_the_same_maps(kind: str) -> None:
    maps = torch.randn(40, 6, 4, 5, generator=torch.Generator().manual_seed(0))  # (N, C, H, W)
    hwc = maps.permute(0, 2, 3, 1).contiguous()
    std_c = fit_standardize(kind, maps)
    var, mean = torch.var_mean(hwc, dim=(1, 2), correction=0)
    std_l = fit_standardize(kind, hwc, mean.numpy(), var.numpy(), layout="NHWC")
    assert torch.allclose(std_l.mean.flatten(), std_c.mean.flatten(), atol=1e-5)
    assert torch.allclose(std_l.std.flatten(), std_c.std.flatten(), atol=1e-4)
    assert torch.allclose(
        fit_standardize(kind, hwc, layout="NHWC").std.flatten(), std_c.std.flatten(), atol=1e-4
    )
    first = build_head(HeadSpec(kind), (6, 4, 5), 3, std_c)
    last = build_head(HeadSpec(kind), (4, 5, 6), 3, std_l, layout="NHWC")
    if kind != "linear":  # same seed, same weights: the channels-first view has no parameters
        with torch.no_grad():
            assert torch.allclose(last.eval()(hwc), first.eval()(maps), atol=1e-5)
    info = HeadInfo(HeadSpec(kind), (4, 5, 6), 3, standardize=True, layout="NHWC")
    rebuilt = HeadInfo.from_dict(info.to_dict()).build()
    rebuilt.load_state_dict(last.state_dict())  # same structure, standardisation shaped for NHWC


def test_token_layers_take_pooled_heads_not_conv_heads() -> None:
    tokens = torch.randn(8, 10, 16)
    head = build_head(HeadSpec("pooled-linear"), (10, 16), 3, layout="NLD")
    linear = head.body[-1]
    assert torch.allclose(head(tokens), linear(tokens.mean(1)), atol=1e-6)
    with pytest.raises(FeatcacheError, match="needs a spatial map"):
        build_head(HeadSpec("conv"), (10, 16), 3, layout="NLD")
    with pytest.raises(FeatcacheError, match="needs a map or tokens"):
        build_head(HeadSpec("pooled-linear"), (16,), 3, layout="NC")


def test_standardize_is_safe_on_features_constant_in_train() -> None:
    """Dead features (zero on every training row) that fire at test time get a bounded value, not
    value / 1e-6; features of comparable spread are still standardised exactly."""
    g = torch.Generator().manual_seed(0)
    scales = torch.rand(60, generator=g) * 0.5 + 1  # spreads within 1.5x: none floored

    def live(n: int) -> torch.Tensor:
        return torch.randn(n, 60, generator=g) * scales + 1

    train = torch.cat([live(400), torch.zeros(400, 4)], 1)  # four features constant on the training split
    test = torch.cat([live(100), torch.full((100, 4), 3.0)], 1)  # ... that fire on the test images
    s = Standardize.fit(train)
    rms = float(train.var(0, unbiased=False).mean().sqrt())  # the features' typical deviation
    want = torch.cat([train[:, :60].std(0, unbiased=False), torch.full((4,), STD_FLOOR * rms)])
    torch.testing.assert_close(s.std, want, rtol=1e-4, atol=1e-6)
    assert float(s(test)[:, 60:].abs().max()) <= 3.0 / (STD_FLOOR * rms) + 1e-3  # was 3 / 1e-6
    # A linear head trained on them keeps a sane test loss where the dead ones fire; the textbook
    # standardisation (deviation clamped at 1e-6) does not.
    y, test_y = (train[:, 0] > 1).long(), (test[:, 0] > 1).long()
    textbook = Standardize(train.mean(0), train.std(0, unbiased=False).clamp_min(1e-6))
    losses = []
    for std in (s, textbook):
        head = build_head(HeadSpec("linear"), (64,), 2, std, seed=0)
        opt = torch.optim.Adam(head.body.parameters(), lr=1e-2)
        for _ in range(100):
            opt.zero_grad()
            nn.functional.cross_entropy(head(train), y).backward()
            opt.step()
        with torch.no_grad():
            losses.append(float(nn.functional.cross_entropy(head(test), test_y)))
    assert losses[0] < 10 < 1000 < losses[1], losses
    maps = torch.zeros(40, 3, 2, 2)
    maps[:, :2] = torch.randn(40, 2, 2, 2, generator=g)  # channel 2 dead on the training split
    var = maps.transpose(0, 1).flatten(1).var(1, unbiased=False)
    torch.testing.assert_close(Standardize.fit(maps).std.flatten()[2], STD_FLOOR * var.mean().sqrt())
