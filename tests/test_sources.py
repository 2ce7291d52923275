"""Feature sources: every row once per epoch, rows paired with their labels, streaming, mapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from featcache.heads import HeadSpec, build_head
from featcache.sources import FeatureSource, ViewCycle
from featcache.train import TrainConfig, evaluate, fit


def labelled_rows(n: int = 300, d: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i holds the value i everywhere, so a batch shows which rows (and labels) it carries."""
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, d)
    return x, torch.arange(n) % 7


@pytest.mark.parametrize("streamed", [False, True])
def test_each_epoch_yields_every_row_once_with_its_label(tmp_path: Path, streamed: bool) -> None:
    x, y = labelled_rows()
    if streamed:
        np.save(tmp_path / "x.npy", x.numpy())
        src = FeatureSource(np.load(tmp_path / "x.npy", mmap_mode="r"), y.numpy(), ram_budget_gb=1e-9)
    else:
        src = FeatureSource(x, y)
    assert src.streamed is streamed
    gen = torch.Generator().manual_seed(0)
    orders = []
    for _ in range(2):  # the in-RAM source reuses one shuffle buffer across epochs
        batches = list(src.batches(64, gen))
        rows = torch.cat([xb[:, 0] for xb, _ in batches]).long()
        labels = torch.cat([yb for _, yb in batches])
        assert sorted(rows.tolist()) == list(range(len(x)))
        assert torch.equal(labels, y[rows])
        assert [len(b[1]) for b in batches] == [64, 64, 64, 64, 44]
        orders.append(rows.tolist())
    assert orders[0] != orders[1]
    ordered = torch.cat([xb[:, 0] for xb, _ in src.batches(64, None)]).long()
    assert ordered.tolist() == list(range(len(x)))


def test_a_streamed_cache_trains(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 16, generator=g) * 3
    y = torch.randint(0, 5, (1000,), generator=g)
    x = centres[y] + 0.3 * torch.randn(1000, 16, generator=g)
    np.save(tmp_path / "x.npy", x.numpy())
    src = FeatureSource(np.load(tmp_path / "x.npy", mmap_mode="r"), y.numpy(), ram_budget_gb=1e-9)
    head = build_head(HeadSpec("linear"), (16,), 5)
    fit(head, src, None, 5, TrainConfig(epochs=10, lr=1e-2, device="cpu"), progress=False)
    assert evaluate(head, FeatureSource(x, y), 5)["acc"] >= 0.99


def test_mapped_applies_a_row_wise_module_once_within_the_budget(tmp_path: Path) -> None:
    maps = torch.randn(50, 3, 4, 4)
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    np.save(tmp_path / "m.npy", maps.numpy())
    streamed = FeatureSource(np.load(tmp_path / "m.npy", mmap_mode="r"), torch.zeros(50), ram_budget_gb=4e-6)
    assert streamed.streamed  # 9.6 kB of maps over a 4.3 kB budget; the pooled rows take 600 bytes
    pooled = streamed.mapped(pool)
    assert pooled is not None and not pooled.streamed
    torch.testing.assert_close(pooled.x, maps.mean((2, 3)))
    assert FeatureSource(maps, torch.zeros(50), ram_budget_gb=1e-7).mapped(pool) is None


def test_view_cycle_reads_view_e_mod_k_and_resumes_in_order(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (90,), generator=g)
    read: list[int] = []
    views = []
    for k in range(3):
        src = FeatureSource(torch.randn(90, 5, generator=g) + y[:, None], y)
        real = src.batches

        def batches(bs, gen, real=real, k=k):  # type: ignore[no-untyped-def]
            read.append(k)
            return real(bs, gen)

        src.batches = batches  # type: ignore[method-assign]
        views.append(src)
    cycle = ViewCycle(views)
    cfg = TrainConfig(epochs=5, batch_size=32, device="cpu")
    full = fit(build_head(HeadSpec("linear"), (5,), 3), cycle, None, 3, cfg, progress=False)
    assert read == [0, 1, 2, 0, 1]
    assert sum(v._shuffled is not None for v in views) == 1  # one shuffle buffer, handed on, not three
    read.clear()
    ckpt = tmp_path / "ckpt.pt"
    fit(build_head(HeadSpec("linear"), (5,), 3), cycle, None, 3, cfg, False, ckpt, stop_after_epochs=2)
    resumed = fit(
        build_head(HeadSpec("linear"), (5,), 3, seed=9), cycle, None, 3, cfg, False, ckpt, resume=True
    )
    assert read == [0, 1, 2, 0, 1]  # two epochs, then the remaining three in the same order
    np.testing.assert_allclose(resumed.step_losses, full.step_losses, rtol=1e-6)
    with pytest.raises(ValueError, match="view 2 does not match view 1"):
        ViewCycle([views[0], FeatureSource(torch.randn(90, 5), torch.zeros(90))])
