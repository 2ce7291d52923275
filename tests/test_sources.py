"""Feature sources: every row once per epoch, rows paired with their labels, streaming, mapping."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from featcache._util import FeatcacheError
from featcache.train.config import TrainConfig
from featcache.train.fit import evaluate, fit
from featcache.train.heads import HeadSpec, Standardize, build_head
from featcache.train.sources import FeatureSource, ViewCycle


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


def _memmap(path: Path, x: torch.Tensor) -> np.ndarray:
    np.save(path, x.numpy())
    return np.load(path, mmap_mode="r")


def test_a_pooled_front_reads_the_channel_means_and_never_loads_the_maps(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(60, 3, 4, 4, generator=g) * 2 + 1
    means = maps.mean((2, 3))
    std = Standardize.fit(maps)
    fronts = {
        "pool": nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        "standardise, pool": nn.Sequential(std, nn.AdaptiveAvgPool2d(1), nn.Flatten()),
    }
    for name, front in fronts.items():
        src = FeatureSource(_memmap(tmp_path / "m.npy", maps), torch.zeros(60), channel_mean=means.numpy())
        out = src.mapped(front)
        assert out is not None and out.from_channel_means, name
        assert not src.loaded, name  # the maps were never read into memory
        torch.testing.assert_close(out.x, front(maps), rtol=1e-5, atol=1e-5, msg=name)
    # A front that does not start by pooling (a flatten-first head) must read the maps: by chunks from
    # the memory map, never holding them whole beside the mapped rows.
    src = FeatureSource(_memmap(tmp_path / "m.npy", maps), torch.zeros(60), channel_mean=means.numpy())
    flat = src.mapped(nn.Sequential(std, nn.Flatten()))
    assert flat is not None and not flat.from_channel_means and not src.loaded
    torch.testing.assert_close(flat.x, std(maps).flatten(1))
    with pytest.raises(FeatcacheError, match=r"channel means of shape \(60, 2\)"):
        FeatureSource(maps, torch.zeros(60), channel_mean=means[:, :2])
    # Means given as a tensor, in any dtype, work as the cache's arrays do.
    for means_t in (means, means.bfloat16()):
        out = FeatureSource(maps, torch.zeros(60), channel_mean=means_t).mapped(fronts["pool"])
        assert out is not None and out.from_channel_means
        torch.testing.assert_close(out.x, means_t.float())


def test_training_on_channel_means_equals_training_on_the_maps(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 4, (150,), generator=g)
    maps = torch.randn(150, 6, 5, 5, generator=g) + torch.randn(4, 6, 1, 1, generator=g)[y]
    head = build_head(HeadSpec("pooled-linear"), (6, 5, 5), 4, standardize=Standardize.fit(maps), seed=0)
    cfg = TrainConfig(epochs=3, batch_size=16, device="cpu")
    results = []
    for fast, means in ((True, maps.mean((2, 3)).numpy()), (False, None)):
        src = FeatureSource(_memmap(tmp_path / "m.npy", maps), y, channel_mean=means)
        h = copy.deepcopy(head)
        results.append((fit(h, src, None, 4, replace(cfg, fast_paths=fast), progress=False), h))
    (fast_r, fast_h), (slow_r, slow_h) = results
    assert fast_r.extra["front_from_channel_means"] and not slow_r.extra["front_from_channel_means"]
    np.testing.assert_allclose(fast_r.step_losses, slow_r.step_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast_h.state_dict().values(), slow_h.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_view_cycle_prepares_only_the_views_its_epochs_read(tmp_path: Path) -> None:
    views = [
        FeatureSource(_memmap(tmp_path / f"v{k}.npy", torch.full((20, 3), float(k))), torch.zeros(20))
        for k in range(3)
    ]
    cycle = ViewCycle(views)
    cycle.prepare(None, range(4, 5))  # a resumed run with one epoch left reads view 4 mod 3 = 1
    assert [v.loaded for v in views] == [False, True, False]
    cycle.prepare(None, range(0, 2))
    assert [v.loaded for v in views] == [True, True, False]


class _Rows:
    """A source that implements only the :class:`BatchSource` protocol: rows in a tensor, shuffled by the
    trainer's generator, declining every fast path, and logging what the trainer asks of it."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.device, self.streamed = x, y, x.device, False
        self.calls: list[tuple[Any, ...]] = []

    def __len__(self) -> int:
        return len(self.y)

    def batches(
        self, batch_size: int, gen: torch.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self), generator=gen) if gen is not None else torch.arange(len(self))
        for i in range(0, len(self), batch_size):
            yield self.x[order[i : i + batch_size]], self.y[order[i : i + batch_size]]

    def prepare(self, front: nn.Module | None, epochs: Iterable[int]) -> None:
        self.calls.append(("prepare", front is not None, list(epochs)))

    def set_epoch(self, epoch: int) -> None:
        self.calls.append(("set_epoch", epoch))

    def reads_channel_means(self, front: nn.Module | None) -> bool:
        return False

    def mapped(self, front: nn.Module, progress: bool = False) -> FeatureSource | None:
        self.calls.append(("mapped",))
        return None


class _MappingRows(_Rows):
    """The same rows, taking the front-once fast path: the front's output held in a FeatureSource."""

    def mapped(self, front: nn.Module, progress: bool = False) -> FeatureSource | None:
        super().mapped(front, progress)
        with torch.no_grad():
            return FeatureSource(front(self.x), self.y)


def test_a_source_implementing_only_the_protocol_trains() -> None:
    g = torch.Generator().manual_seed(3)
    y = torch.randint(0, 4, (240,), generator=g)
    maps = torch.randn(240, 6, 3, 3, generator=g) + 3 * torch.randn(4, 6, 1, 1, generator=g)[y]
    head = build_head(HeadSpec("pooled-linear"), (6, 3, 3), 4, seed=1)
    cfg = TrainConfig(
        epochs=3,
        batch_size=32,
        lr=1e-2,
        optimizer="adam",
        schedule="constant",
        weight_decay=0.0,
        device="cpu",
    )
    plain, train, val = copy.deepcopy(head), _Rows(maps[:200], y[:200]), _Rows(maps[200:], y[200:])
    result = fit(plain, train, val, 4, cfg, progress=False)
    assert evaluate(plain, val, 4)["acc"] >= 0.95
    assert (result.extra["front_once"], result.extra["closed_form_step"]) == (False, False)
    epochs = [0, 1, 2]
    assert train.calls == [("prepare", True, epochs), ("mapped",), *(("set_epoch", e) for e in epochs)]
    assert val.calls[0] == ("prepare", True, epochs)  # asked to read ahead; never asked for an epoch
    # The reference: autograd over the source's batches in the order the seeded generator draws.
    ref, gen = copy.deepcopy(head), torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(ref.parameters(), lr=cfg.lr)
    ref_losses = []
    for _ in epochs:
        for xb, yb in train.batches(cfg.batch_size, gen):
            loss = F.cross_entropy(ref(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ref_losses.append(float(loss.detach()))
    np.testing.assert_allclose(result.step_losses, ref_losses, rtol=1e-5, atol=1e-6)
    # A source that maps the front takes the fast paths through the protocol alone: the same training.
    fast = copy.deepcopy(head)
    mapping = _MappingRows(maps[:200], y[:200])
    fast_result = fit(fast, mapping, _MappingRows(maps[200:], y[200:]), 4, cfg, progress=False)
    assert (fast_result.extra["front_once"], fast_result.extra["closed_form_step"]) == (True, True)
    assert ("set_epoch", 0) not in mapping.calls  # the epochs read the mapped rows instead
    np.testing.assert_allclose(fast_result.step_losses, ref_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast.state_dict().values(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("error")  # a buffer of the wrong shape is resized by torch with a warning
def test_shuffled_batches_of_multilabel_targets_keep_each_rows_targets() -> None:
    """The 64 MB shuffle buffer holds (N, K) targets as they are (not flattened to one per row)."""
    x = torch.arange(300, dtype=torch.float32)[:, None].repeat(1, 4)
    y = (torch.rand(300, 3, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    src = FeatureSource(x, y)
    src.SHUFFLE_BYTES = 16 * 40  # several gathers per epoch
    batches = list((xb.clone(), yb.clone()) for xb, yb in src.batches(32, torch.Generator().manual_seed(1)))
    rows = torch.cat([xb[:, 0] for xb, _ in batches]).long()
    assert sorted(rows.tolist()) == list(range(300))
    torch.testing.assert_close(torch.cat([yb for _, yb in batches]), y[rows])
