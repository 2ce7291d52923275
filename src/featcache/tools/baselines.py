"""The reference loops, written as transfer-learning tutorials write them: what every speed-up is
measured against.

``naive_epoch`` recomputes the frozen backbone on every image in every epoch (and on the
validation images for the per-epoch validation pass); ``dataloader_epoch`` trains a head on cached
features through ``DataLoader(TensorDataset(features, labels), shuffle=True)``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ..backbones.registry import BackboneCfg
from ..data.preprocess import PreprocessedView
from ..data.samples import SampleSet
from ..extraction.extractor import Extractor, decode_workers


def dataloader_epoch(
    head: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> tuple[float, list[float]]:
    """One epoch of the reference DataLoader(TensorDataset) loop; returns (seconds, per-step losses).

    Example:
        >>> seconds, losses = dataloader_epoch(head, x, y, 32, opt, torch.device("cpu"))  # doctest: +SKIP
    """
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True, generator=generator)
    losses = []
    head.train()
    t0 = time.perf_counter()
    for i, (batch_features, batch_labels) in enumerate(loader):
        batch_features, batch_labels = batch_features.to(device), batch_labels.to(device)
        outputs = head(batch_features)
        loss = F.cross_entropy(outputs, batch_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        if i % 10 == 0:  # the reference prints the loss every 10 steps (a host sync)
            loss.item()
    seconds = time.perf_counter() - t0
    return seconds, torch.stack(losses).tolist() if losses else []


def naive_epoch(
    extractor: Extractor,
    layer: str,
    head: nn.Module,
    train: SampleSet,
    val: SampleSet | None,
    cfg: BackboneCfg,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    workers: int | None = None,
) -> tuple[float, float | None]:
    """One epoch of the naive loop: backbone forward on every training image, then a validation pass.

    It decodes with as many workers as featcache's extraction would (:func:`decode_workers`), so a
    comparison measures the recomputed backbone, not a difference in decoding.

    Returns:
        (seconds, validation accuracy or None).
    """
    device = extractor.device
    workers = decode_workers(workers, device)
    t0 = time.perf_counter()
    head.train()
    loader = DataLoader(
        PreprocessedView(train, cfg.preprocessing), batch_size=batch_size, shuffle=True, num_workers=workers
    )
    labels = torch.as_tensor(train.labels)
    for x, idx, _err in loader:
        # The frozen backbone, recomputed every epoch; clone() leaves inference mode so autograd can use it.
        feats = extractor(x)[layer].float().clone()
        loss = F.cross_entropy(head(feats), labels[idx].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    acc = None
    if val is not None:
        head.eval()
        correct = 0
        vl = DataLoader(PreprocessedView(val, cfg.preprocessing), batch_size=batch_size, num_workers=workers)
        vlabels = torch.as_tensor(val.labels)
        with torch.inference_mode():
            for x, idx, _err in vl:
                correct += int((head(extractor(x)[layer].float()).argmax(1).cpu() == vlabels[idx]).sum())
        acc = correct / max(1, len(val))
    return time.perf_counter() - t0, acc


def sklearn_probe(splits: Sequence[tuple[np.ndarray, np.ndarray]], strengths: Sequence[float]) -> float:
    """The CLIP paper's linear probe with scikit-learn: test accuracy.

    ``splits`` are (features, labels) of train, val, test. Standardise on train, fit each strength
    (``C = 1 / (n * strength)``, lbfgs, scikit-learn's own tolerance) on train, choose on val accuracy,
    refit on train+val (standardised on both), test once.
    """
    from sklearn.linear_model import LogisticRegression  # optional: a dev dependency
    from sklearn.preprocessing import StandardScaler

    (xt, yt), (xv, yv), (xs, ys) = splits
    scaler = StandardScaler().fit(xt)
    scores = []
    for lam in strengths:
        model = LogisticRegression(C=1 / (lam * len(yt)), max_iter=1000).fit(scaler.transform(xt), yt)
        scores.append((float((model.predict(scaler.transform(xv)) == yv).mean()), lam))
    lam = max(scores, key=lambda r: r[0])[1]
    xa, ya = np.concatenate([xt, xv]), np.concatenate([yt, yv])
    scaler = StandardScaler().fit(xa)
    model = LogisticRegression(C=1 / (lam * len(ya)), max_iter=1000).fit(scaler.transform(xa), ya)
    return float((model.predict(scaler.transform(xs)) == ys).mean())
