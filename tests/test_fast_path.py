"""The trainer's fast paths (frozen front once, closed-form Linear step) against plain autograd."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from featcache.train.config import TrainConfig
from featcache.train.fast_path import LinearStep, split_front
from featcache.train.fit import fit
from featcache.train.heads import HeadSpec, Standardize, build_head
from featcache.train.sources import FeatureSource


def maps(n: int = 200, shape: tuple[int, ...] = (8, 5, 5), c: int = 4, seed: int = 0):  # type: ignore[no-untyped-def]
    """Features whose per-channel means carry the class, so pooled heads can learn them."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    centres = torch.randn(c, shape[0], generator=g)
    x = torch.randn(n, *shape, generator=g) + centres[y].view(n, shape[0], *([1] * (len(shape) - 1)))
    return x, y


def both(head: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, val: bool = False):  # type: ignore[no-untyped-def]
    """Train copies of ``head`` with the fast paths on and off; return both results and heads."""
    out = []
    for fast in (True, False):
        h = copy.deepcopy(head)
        v = FeatureSource(x[:50], y[:50]) if val else None
        r = fit(
            h, FeatureSource(x[50:], y[50:]), v, 4, TrainConfig(**{**cfg.__dict__, "fast_paths": fast}), False
        )
        out.append((r, h))
    return out


def used(result) -> tuple[bool, bool]:  # type: ignore[no-untyped-def]
    """(front run once, closed-form step) of a fit."""
    return result.extra["front_once"], result.extra["closed_form_step"]


def assert_same_training(runs, rtol: float = 1e-5, atol: float = 1e-6) -> None:  # type: ignore[no-untyped-def]
    (fast, h_fast), (slow, h_slow) = runs
    np.testing.assert_allclose(fast.step_losses, slow.step_losses, rtol=rtol, atol=atol)
    for (k, a), b in zip(h_fast.state_dict().items(), h_slow.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=k)


def test_split_front_keeps_the_function_and_shares_parameters() -> None:
    x, _ = maps()
    std = Standardize.fit(x)
    head = build_head(HeadSpec("pooled-linear"), (8, 5, 5), 4, standardize=std)
    split = split_front(head)
    assert split is not None
    front, rest = split
    torch.testing.assert_close(rest(front(x)), head(x), rtol=1e-5, atol=1e-5)
    assert {id(p) for p in rest.parameters()} == {id(p) for p in head.parameters()}
    assert not list(front.parameters())
    # Nothing to run once: a plain linear head (flatten only), a conv head (it starts with a conv).
    assert split_front(build_head(HeadSpec("linear"), (8,), 4)) is None
    assert split_front(build_head(HeadSpec("conv", conv_channels=4), (8, 5, 5), 4)) is None
    mlp = split_front(
        build_head(HeadSpec("mlp", hidden=(6,)), (8,), 4, standardize=Standardize.fit(x.mean((2, 3))))
    )
    assert mlp is not None and isinstance(mlp[1][0], nn.Dropout)


def test_linear_step_covers_only_a_lone_linear_with_its_own_optimizer() -> None:
    lin = build_head(HeadSpec("linear"), (8,), 4)
    assert LinearStep.build(lin, torch.optim.Adam(lin.parameters())) is not None
    mlp = build_head(HeadSpec("mlp", hidden=(6,)), (8,), 4)
    assert LinearStep.build(mlp, torch.optim.Adam(mlp.parameters())) is None
    other = nn.Linear(8, 4)
    assert LinearStep.build(lin, torch.optim.Adam(other.parameters())) is None
    groups = [{"params": [lin.body[1].weight]}, {"params": [lin.body[1].bias], "lr": 0.1}]
    assert LinearStep.build(lin, torch.optim.Adam(groups)) is None


@pytest.mark.parametrize(
    "overrides",
    [
        {"optimizer": "adam", "schedule": "constant", "weight_decay": 0.0},
        {"optimizer": "adamw", "weight_decay": 0.05, "warmup_epochs": 1.0, "label_smoothing": 0.1},
        {"optimizer": "adam", "weight_decay": 0.01},
        {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 1e-3, "lr": 0.05},
    ],
    ids=["adam", "adamw-smooth-warmup", "adam-l2", "sgd"],
)
def test_closed_form_step_trains_like_autograd(overrides: dict) -> None:  # type: ignore[type-arg]
    x, y = maps(shape=(24,))
    head = build_head(HeadSpec("linear"), (24,), 4, seed=1)
    cfg = TrainConfig(**{"epochs": 4, "batch_size": 32, "lr": 1e-2, "seed": 5, "device": "cpu", **overrides})
    runs = both(head, x, y, cfg, val=True)
    assert used(runs[0][0]) == (False, True)
    assert used(runs[1][0]) == (False, False)
    assert_same_training(runs)


@pytest.mark.parametrize("standardize", [False, True])
def test_pooled_head_with_its_front_run_once_trains_like_autograd(standardize: bool) -> None:
    x, y = maps()
    std = Standardize.fit(x[50:]) if standardize else None
    head = build_head(HeadSpec("pooled-linear"), (8, 5, 5), 4, standardize=std, seed=2)
    runs = both(head, x, y, TrainConfig(epochs=3, batch_size=16, lr=3e-3, device="cpu"), val=True)
    assert used(runs[0][0]) == (True, True)
    assert_same_training(runs)
    assert [h["val_acc"] for h in runs[0][0].history] == [h["val_acc"] for h in runs[1][0].history]


def test_mlp_after_a_front_run_once_trains_like_autograd() -> None:
    x, y = maps(shape=(16,))
    head = build_head(
        HeadSpec("mlp", hidden=(12,), dropout=0.2), (16,), 4, standardize=Standardize.fit(x), seed=3
    )
    runs = both(head, x, y, TrainConfig(epochs=3, batch_size=32, device="cpu"))
    assert used(runs[0][0]) == (True, False)
    assert_same_training(runs)  # dropout draws the same masks: the rest sees the same input shape


def test_closed_form_step_under_bf16_autocast_tracks_autograd() -> None:
    x, y = maps(shape=(32,))
    head = build_head(HeadSpec("linear"), (32,), 4)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, optimizer="sgd", amp=True, device="cpu")
    runs = both(head, x, y, cfg)  # SGD: unlike Adam, it would show a wrongly scaled gradient
    assert runs[0][0].extra["closed_form_step"]
    assert_same_training(runs, rtol=2e-2, atol=2e-2)


def test_a_streamed_source_trains_the_same_with_or_without_its_front_run_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FeatureSource, "CHUNK_BYTES", 20 * 8 * 5 * 5 * 4)  # 16-row chunks: 8 of them
    x, y = maps(n=120)
    arr = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=tuple(x.shape))
    arr[:] = x.numpy()
    head = build_head(HeadSpec("pooled-linear"), (8, 5, 5), 4)
    cfg = TrainConfig(epochs=2, batch_size=8, device="cpu")
    tiny = FeatureSource(arr, y, ram_budget_gb=1e-9)  # streamed; even the pooled rows exceed this budget
    assert tiny.streamed and tiny.mapped(split_front(head)[0]) is None  # type: ignore[index]
    r_stream = fit(copy.deepcopy(head), tiny, None, 4, cfg, progress=False)
    assert used(r_stream) == (False, False)  # autograd over the streamed maps
    roomy = FeatureSource(arr, y, ram_budget_gb=1e-5)  # streamed (48 kB > 10 kB), but pooled rows (4 kB) fit
    assert roomy.streamed
    r_roomy = fit(copy.deepcopy(head), roomy, None, 4, cfg, progress=False)
    assert used(r_roomy) == (True, True)
    # The pooled rows are shuffled by the streamed chunks: the same batches, so the same training.
    np.testing.assert_allclose(r_roomy.step_losses, r_stream.step_losses, rtol=1e-5)


def test_linear_head_on_a_map_flattens_in_the_closed_form_step_too() -> None:
    x, y = maps(shape=(4, 3, 3))
    head = build_head(HeadSpec("linear"), (4, 3, 3), 4, seed=4)
    runs = both(head, x, y, TrainConfig(epochs=2, batch_size=16, device="cpu"))
    assert used(runs[0][0]) == (False, True)
    assert_same_training(runs)


def test_linear_step_follows_a_reloaded_optimizer_state() -> None:
    x, y = maps(shape=(12,))
    lin = nn.Linear(12, 4)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, fused=True)
    step = LinearStep.build(lin, opt)
    assert step is not None
    step(x[:32], y[:32])
    saved_opt, saved_lin = copy.deepcopy(opt.state_dict()), copy.deepcopy(lin.state_dict())
    first = [float(step(x[32:64], y[32:64])), float(step(x[64:96], y[64:96]))]
    lin.load_state_dict(saved_lin)
    opt.load_state_dict(saved_opt)  # new state tensors: the step must use them, not its old ones
    again = [float(step(x[32:64], y[32:64])), float(step(x[64:96], y[64:96]))]
    assert again == pytest.approx(first, rel=1e-6)


def test_labels_outside_the_heads_classes_are_named() -> None:
    x, y = maps(shape=(6,))
    with pytest.raises(ValueError, match="labels run from 0 to 3 but the head has 3 classes"):
        fit(
            build_head(HeadSpec("linear"), (6,), 3),
            FeatureSource(x, y),
            None,
            3,
            TrainConfig(device="cpu"),
            False,
        )
    with pytest.raises(ValueError, match="training split is empty"):
        fit(
            build_head(HeadSpec("linear"), (6,), 4),
            FeatureSource(x[:0], y[:0]),
            None,
            4,
            TrainConfig(device="cpu"),
            False,
        )
