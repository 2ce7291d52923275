"""The fast trainer against the seeds' DataLoader loop, learnability, resume, early stopping, metrics."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler, TensorDataset

from featcache.train.config import TrainConfig
from featcache.train.fit import evaluate, fit
from featcache.train.heads import HeadSpec, build_head
from featcache.train.sources import FeatureSource

CPU = torch.device("cpu")


def blobs(
    n: int = 600, d: int = 32, c: int = 5, seed: int = 0, noise: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linearly separable clusters around random centres."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(c, d, generator=g) * 3
    y = torch.randint(0, c, (n,), generator=g)
    return centres[y] + noise * torch.randn(n, d, generator=g), y


def test_linear_head_learns_separable_features() -> None:
    x, y = blobs()
    head = build_head(HeadSpec("linear"), (32,), 5)
    fit(
        head,
        FeatureSource(x[:500], y[:500]),
        None,
        5,
        TrainConfig(epochs=20, lr=1e-2, device="cpu"),
        progress=False,
    )
    assert evaluate(head, FeatureSource(x[500:], y[500:]), 5)["acc"] >= 0.99


def test_random_labels_do_not_generalise() -> None:
    x, _ = blobs(n=1000)
    y = torch.randint(0, 5, (1000,), generator=torch.Generator().manual_seed(1))
    head = build_head(HeadSpec("linear"), (32,), 5)
    fit(head, FeatureSource(x[:800], y[:800]), None, 5, TrainConfig(epochs=20, device="cpu"), progress=False)
    assert evaluate(head, FeatureSource(x[800:], y[800:]), 5)["acc"] < 0.35


class _SeededPermutation(Sampler[int]):
    """The batch order the fast trainer uses: one ``randperm`` per epoch from a seeded generator."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.gen = n, torch.Generator().manual_seed(seed)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(torch.randperm(self.n, generator=self.gen).tolist())

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize(
    ("kind", "batch_size"),
    [("mlp", 32), ("mlp", 100), ("linear", 32), ("linear", 100), ("pooled-linear", 32)],
)
def test_same_loss_trajectory_as_the_seeds_dataloader_loop(kind: str, batch_size: int) -> None:
    """Autograd (mlp) and the fast paths (linear; the seeds' SimpleClassifier on a map) vs the seeds' loop."""
    x, y = blobs(n=330, d=24, c=4)
    if kind == "pooled-linear":  # the seeds' SimpleClassifier on a spatial map
        x = x[:, :, None, None] + 0.1 * torch.randn(330, 24, 3, 3, generator=torch.Generator().manual_seed(2))
    head = build_head(HeadSpec(kind, hidden=(16,)), tuple(x.shape[1:]), 4, seed=3)
    ref = copy.deepcopy(head)
    cfg = TrainConfig(
        epochs=3,
        batch_size=batch_size,
        lr=1e-3,
        optimizer="adam",
        schedule="constant",
        weight_decay=0.0,
        seed=7,
        device="cpu",
    )
    result = fit(head, FeatureSource(x, y), None, 4, cfg, progress=False)

    # The seeds' loop: DataLoader(TensorDataset(features, labels)), Adam, cross-entropy.
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, sampler=_SeededPermutation(len(x), 7))
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        ref.train()
        for bx, by in loader:
            loss = F.cross_entropy(ref(bx), by)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    np.testing.assert_allclose(result.step_losses, losses, rtol=1e-5, atol=1e-6)
    for (k, a), b in zip(head.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("kind", ["mlp", "linear"])  # autograd, and the closed-form step's optimizer state
def test_resume_ends_where_an_uninterrupted_run_would(tmp_path, kind: str) -> None:  # type: ignore[no-untyped-def]
    x, y = blobs(n=300)
    xv, yv = blobs(n=100, seed=1)
    cfg = TrainConfig(epochs=5, batch_size=64, lr=3e-3, warmup_epochs=1, device="cpu")
    full = build_head(HeadSpec(kind, hidden=(16,), dropout=0.2), (32,), 5)
    part = copy.deepcopy(full)
    r_full = fit(full, FeatureSource(x, y), FeatureSource(xv, yv), 5, cfg, progress=False)
    ckpt = tmp_path / "ckpt.pt"
    fit(
        part,
        FeatureSource(x, y),
        FeatureSource(xv, yv),
        5,
        cfg,
        progress=False,
        checkpoint=ckpt,
        stop_after_epochs=2,
    )
    again = build_head(
        HeadSpec(kind, hidden=(16,), dropout=0.2), (32,), 5, seed=99
    )  # overwritten by the resume
    r_res = fit(
        again,
        FeatureSource(x, y),
        FeatureSource(xv, yv),
        5,
        cfg,
        progress=False,
        checkpoint=ckpt,
        resume=True,
    )
    assert r_res.resumed_from == 2
    np.testing.assert_allclose(r_res.step_losses, r_full.step_losses, rtol=1e-6)
    for a, b in zip(again.state_dict().values(), full.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert [h["val_acc"] for h in r_res.history] == [h["val_acc"] for h in r_full.history]


def test_early_stopping_keeps_the_best_epoch() -> None:
    x, y = blobs(n=300)
    xv, yv = blobs(n=100, seed=1)
    yv = (yv + 1) % 5  # validation labels that disagree with training: val loss rises as training fits
    head = build_head(HeadSpec("linear"), (32,), 5)
    res = fit(
        head,
        FeatureSource(x, y),
        FeatureSource(xv, yv),
        5,
        TrainConfig(epochs=30, patience=2, lr=1e-2, device="cpu"),
        progress=False,
    )
    assert res.stopped_early
    assert len(res.history) == res.best_epoch + 2
    best_val = min(h["val_loss"] for h in res.history)
    assert evaluate(head, FeatureSource(xv, yv), 5)["loss"] == pytest.approx(best_val, rel=1e-5)


def test_evaluate_metrics_match_sklearn() -> None:
    from sklearn.metrics import confusion_matrix, top_k_accuracy_score

    x, y = blobs(n=200, c=6, noise=3.0)
    head = build_head(HeadSpec("linear"), (32,), 6)
    m = evaluate(head, FeatureSource(x, y), 6, batch_size=37)
    logits = head(x).detach()
    assert m["confusion"] == confusion_matrix(y, logits.argmax(1), labels=range(6)).tolist()
    assert m["acc"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    assert m["top5"] == pytest.approx(top_k_accuracy_score(y, logits, k=5, labels=range(6)))
    assert m["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-5)


def test_resuming_an_early_stopped_run_adds_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    x, y = blobs(n=300)
    xv, yv = blobs(n=100, seed=1)
    yv = (yv + 1) % 5
    cfg = TrainConfig(epochs=30, patience=2, lr=1e-2, device="cpu")
    ckpt = tmp_path / "ckpt.pt"
    head = build_head(HeadSpec("linear"), (32,), 5)
    first = fit(head, FeatureSource(x, y), FeatureSource(xv, yv), 5, cfg, progress=False, checkpoint=ckpt)
    assert first.stopped_early
    again = build_head(HeadSpec("linear"), (32,), 5, seed=5)
    res = fit(
        again,
        FeatureSource(x, y),
        FeatureSource(xv, yv),
        5,
        cfg,
        progress=False,
        checkpoint=ckpt,
        resume=True,
    )
    assert res.stopped_early and res.history == first.history and res.step_losses == first.step_losses
    for a, b in zip(again.state_dict().values(), head.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_balanced_class_weights_find_the_rare_class_and_train_with_autograd() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=g)
    y = torch.cat([torch.zeros(600), torch.ones(600), torch.full((30,), 2)]).long()  # class 2 is rare
    x = centres[y] * 1.5 + torch.randn(len(y), 16, generator=g)
    yt = torch.cat([torch.zeros(200), torch.ones(200), torch.full((200,), 2)]).long()
    xt = centres[yt] * 1.5 + torch.randn(len(yt), 16, generator=g)
    recall, records = {}, {}
    for mode in ("none", "balanced"):
        head = build_head(HeadSpec("linear"), (16,), 3, seed=0)
        cfg = TrainConfig(epochs=15, lr=1e-2, batch_size=64, device="cpu", class_weight=mode)
        result = fit(head, FeatureSource(x, y), None, 3, cfg, progress=False)
        recall[mode] = evaluate(head, FeatureSource(xt, yt), 3)["per_class_acc"][2]
        records[mode] = result.extra
    assert recall["balanced"] > recall["none"] + 0.05
    assert records["none"]["closed_form_step"] and not records["balanced"]["closed_form_step"]
    with pytest.raises(ValueError, match="class weight"):
        TrainConfig(class_weight="inverse")


def test_the_automatic_batch_size_gives_every_split_enough_steps() -> None:
    for rows in (1, 15, 100, 256, 320, 1000, 3600, 5119, 5120, 10**6):
        size = TrainConfig().batch_for(rows)
        assert size in (16, 32, 64, 128, 256), rows
        steps = -(-rows // size)
        assert steps >= 20 or size == 16, (rows, size)  # 20 steps an epoch, unless already at 16
        assert -(-rows // (2 * size)) < 20 or size == 256, (rows, size)  # and the largest such size
        assert TrainConfig().steps_per_epoch(rows) == steps
    assert TrainConfig().batch_for(256) == 16 and TrainConfig(batch_size=256).batch_for(256) == 256
    assert TrainConfig().resolved(3600) == TrainConfig(batch_size=128)
    x, y = blobs(256)
    head = build_head(HeadSpec("linear"), (32,), 5)
    result = fit(head, FeatureSource(x, y), None, 5, TrainConfig(epochs=2, device="cpu"), progress=False)
    assert result.batch_size == 16 and len(result.step_losses) == 2 * 16  # 16 steps an epoch, not 1
