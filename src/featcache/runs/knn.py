"""Weighted k-nearest-neighbour evaluation on cached rows (DINO's protocol), every k in one pass.

Each row is L2-normalised, so the dot product of two rows is their cosine similarity. The training
split is the bank: it is read in chunks of ``chunk_rows`` rows (a memory-mapped split larger than RAM
streams), and every query keeps a running top-``max(k)`` of its similarities, merged chunk by chunk,
so each bank row is read once whatever the number of queries or of ``k``. A query's class scores are
the votes of its ``k`` nearest bank rows, each weighing ``exp(similarity / T)`` (DINO: k = 20,
T = 0.07) or 1 (``weighting="uniform"``, scikit-learn's ``KNeighborsClassifier``); the prediction is the
class with the most votes (ties: the first class). The same votes over multi-hot targets give per-label
scores for a multi-label set (``knn_scores``; the ``knn`` job reports their mAP, macro over the labels
with a positive and micro, as scikit-learn's ``average_precision_score``), and over float targets the
weighted mean of the neighbours' values for a regression set (reported as R², MAE, RMSE, Pearson r).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._util import FeatcacheError, resolve_device
from ..cache.rows import Rows
from ..train.objectives import regress_metrics
from .config import KnnConfig
from .job import Job
from .spec import RunSpec

#: normalised query rows kept in memory between bank chunks up to this many bytes (else re-read)
QUERY_CACHE_BYTES = 2 << 30


@dataclass
class KnnResult:
    """Per query split and k: accuracy (and top-5 accuracy with more than 5 classes), mAP (multilabel)
    or R² (regress); the predictions (class indices, per-label scores, or values)."""

    metrics: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    predictions: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """One table row per (split, k)."""
        return [{"split": s, "k": k, **m} for s, by_k in self.metrics.items() for k, m in by_k.items()]


def _block(rows: Rows | torch.Tensor, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows ``start:stop`` as L2-normalised float32 vectors (a map is flattened)."""
    x = rows[start:stop]
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return F.normalize(t.to(device=device, dtype=torch.float32).flatten(1), dim=1)


def _similarities(q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``q @ b.T``; on the CPU through numpy's BLAS, which multiplies these float32 shapes about a
    quarter faster than torch's CPU kernel (measured on MNIST-5k Lite0 rows, 2 cores)."""
    if q.device.type == "cpu":
        return torch.from_numpy(q.numpy() @ b.numpy().T)
    return q @ b.T


def nearest(
    bank: Rows | torch.Tensor,
    queries: Rows | torch.Tensor,
    k: int,
    chunk_rows: int = 8192,
    query_rows: int = 4096,
    device: str = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` bank rows most cosine-similar to each query, most similar first: ``(similarities,
    indices)``, each (queries, k). The bank is read ``chunk_rows`` rows at a time, once.

    Example:
        >>> sims, idx = nearest(np.eye(3, dtype=np.float32), np.ones((1, 3), np.float32), 2)
        >>> idx.shape
        torch.Size([1, 2])
    """
    dev = torch.device(resolve_device(device))
    n, m = len(bank), len(queries)
    if n == 0:
        raise FeatcacheError("the kNN bank (the training split) holds no rows")
    k = min(k, n)
    top_s = torch.full((m, k), -torch.inf, device=dev)
    top_i = torch.zeros((m, k), dtype=torch.long, device=dev)
    starts = range(0, m, query_rows)
    kept: dict[int, torch.Tensor] = {}
    dim = int(np.prod(tuple(queries.shape[1:])))
    keep = m * dim * 4 <= QUERY_CACHE_BYTES
    bar = tqdm(total=n, desc="kNN", unit="row", delay=1, disable=not progress)
    for b0 in range(0, n, chunk_rows):
        b = _block(bank, b0, min(b0 + chunk_rows, n), dev)
        for q0 in starts:
            q = kept.get(q0)
            if q is None:
                q = _block(queries, q0, min(q0 + query_rows, m), dev)
                if keep:
                    kept[q0] = q
            # the chunk's own top-k first, then a merge of 2k candidates: nothing chunk-sized is copied
            cv, cj = _similarities(q, b).topk(min(k, len(b)), dim=1)
            sims = torch.cat([top_s[q0 : q0 + len(q)], cv], 1)
            cand = torch.cat([top_i[q0 : q0 + len(q)], cj + b0], 1)
            v, j = sims.topk(k, dim=1)
            top_s[q0 : q0 + len(q)], top_i[q0 : q0 + len(q)] = v, cand.gather(1, j)
        bar.update(len(b))
    bar.close()
    return top_s, top_i


def vote(
    sims: torch.Tensor, targets: torch.Tensor, k: int, num_classes: int, config: KnnConfig
) -> torch.Tensor:
    """Class scores from the first ``k`` neighbours: ``targets`` (queries, >= k) are the neighbours'
    class indices, or (queries, >= k, classes) multi-hot rows for a multi-label set."""
    w = (
        (sims[:, :k] / config.temperature).exp()
        if config.weighting == "exp"
        else torch.ones_like(sims[:, :k])
    )
    if targets.ndim == 3:  # multi-label: each label's weighted share of the neighbours
        return (w[:, :, None] * targets[:, :k].float()).sum(1) / w.sum(1, keepdim=True)
    scores = torch.zeros((len(sims), num_classes), dtype=w.dtype, device=w.device)
    return scores.scatter_add_(1, targets[:, :k], w)


def knn_eval(
    bank: Rows | torch.Tensor,
    bank_labels: np.ndarray | torch.Tensor,
    queries: Rows | torch.Tensor,
    query_labels: np.ndarray | torch.Tensor,
    num_classes: int,
    config: KnnConfig | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> tuple[dict[int, dict[str, float]], dict[int, np.ndarray]]:
    """Weighted kNN classification of ``queries`` by the labelled ``bank`` rows, every ``config.k`` in
    one pass: ``({k: {"acc", "top5"}}, {k: predictions})`` (top-5 with more than 5 classes).

    Example:
        >>> metrics, pred = knn_eval(x_train, y_train, x_test, y_test, 10)  # doctest: +SKIP
        >>> metrics[20]["acc"]  # doctest: +SKIP
        0.957
    """
    config = config or KnnConfig()
    if len(bank_labels) != len(bank) or len(query_labels) != len(queries):
        raise FeatcacheError(
            f"{len(bank)} bank rows with {len(bank_labels)} labels, {len(queries)} queries with "
            f"{len(query_labels)}: one label per row"
        )
    sims, idx = nearest(bank, queries, max(config.k), config.chunk_rows, device=device, progress=progress)
    y_bank = torch.as_tensor(np.asarray(bank_labels), dtype=torch.long, device=sims.device)
    y = torch.as_tensor(np.asarray(query_labels), dtype=torch.long, device=sims.device)
    neighbours = y_bank[idx]
    metrics: dict[int, dict[str, float]] = {}
    preds: dict[int, np.ndarray] = {}
    for k in config.k:
        scores = vote(sims, neighbours, k, num_classes, config)
        pred = scores.argmax(1)
        metrics[k] = {"acc": float((pred == y).double().mean()) if len(y) else float("nan")}
        if num_classes > 5:
            top5 = scores.topk(5, dim=1).indices
            metrics[k]["top5"] = float((top5 == y[:, None]).any(1).double().mean())
        preds[k] = pred.cpu().numpy()
    return metrics, preds


def knn_run(spec: RunSpec, layer: str = "penultimate", config: KnnConfig | None = None) -> KnnResult:
    """The ``featcache knn`` job: cache (build or reuse) the layer, then kNN on val and test with the
    training split as the bank (no head is trained; nothing is written): accuracy, multi-label mAP or
    regression R² (:func:`task_scores`) by the dataset's task.

    Example:
        >>> spec = RunSpec("efficientnet-lite0", "mnist-5k", extract=ExtractConfig(input_size=(64, 64)))
        >>> res = knn_run(spec, "penultimate", KnnConfig(k=(10, 20)))  # doctest: +SKIP
        >>> res.metrics["test"][20]["acc"]  # doctest: +SKIP
    """
    config = config or KnnConfig()
    spec.no_resume("knn")
    job = Job.open(spec, "knn", layer, folder=False, one_layer=True)
    layer = job.layer
    ks = ",".join(map(str, config.k))
    what = f"layer {layer}, k {ks}, {config.weighting} weights (T={config.temperature:g})"
    job.announce(what, None)
    feats, _ = job.extract_all()
    queries = [s for s in ("val", "test") if s in feats]
    if not queries:
        raise FeatcacheError(
            "kNN evaluates val and test against train: use --val-fraction or --test-fraction > 0, or val/ "
            "and test/ folders"
        )
    bank = feats["train"]
    out = KnnResult()
    t0 = time.perf_counter()
    for s in queries:
        q = feats[s]
        if bank.task != "classify":
            out.predictions[s] = knn_scores(
                bank.features[layer], np.asarray(bank.labels), q.features[layer], config, spec.train.device
            )
            y = np.asarray(q.labels, dtype=np.float64)
            out.metrics[s] = {k: task_scores(bank.task, p, y) for k, p in out.predictions[s].items()}
            continue
        out.metrics[s], out.predictions[s] = knn_eval(
            bank.features[layer], bank.labels, q.features[layer], q.labels, len(bank.classes), config,
            spec.train.device, spec.progress,
        )  # fmt: skip
    out.extra = {
        "seconds": round(time.perf_counter() - t0, 3),
        "layer": layer,
        "bank_rows": len(bank),
        "cache_rows": {
            s: {"rows": f.rows, "from_cache": f.from_cache, "extracted": f.extracted}
            for s, f in feats.items()
        },
    }
    return out


def knn_scores(
    bank: Rows | torch.Tensor,
    bank_targets: np.ndarray,
    queries: Rows | torch.Tensor,
    config: KnnConfig | None = None,
    device: str = "cpu",
) -> dict[int, np.ndarray]:
    """Per-label kNN scores of multi-label queries: ``{k: (queries, labels)}``, each label's weighted
    share of the ``k`` neighbours carrying it (rank them for average precision). With float targets
    (regression) the same weighted mean is the prediction of each target.

    Example:
        >>> scores = knn_scores(train_x, train_multi_hot, test_x, KnnConfig(k=(20,)))  # doctest: +SKIP
    """
    config = config or KnnConfig()
    targets = np.asarray(bank_targets)
    if targets.ndim != 2 or len(targets) != len(bank):
        raise FeatcacheError(
            f"multi-label or regression targets must be (bank rows, labels or targets), got {targets.shape}"
        )
    sims, idx = nearest(bank, queries, max(config.k), config.chunk_rows, device=device)
    y = torch.as_tensor(targets, device=sims.device)[idx]
    return {k: vote(sims, y, k, targets.shape[1], config).cpu().numpy() for k in config.k}


def task_scores(task: str, scores: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """The metrics of kNN scores of ``task``: multilabel mAP (macro over the labels with a positive among
    the queries, and micro: scikit-learn's ``average_precision_score``); regress R², MAE, RMSE, Pearson r.

    Example:
        >>> task_scores("regress", np.array([[1.0], [2.0]]), np.array([[1.0], [2.0]]))["r2"]
        1.0
    """
    if task == "regress":
        m = regress_metrics(scores, y)
        return {key: float(m[key]) for key in ("r2", "mae", "rmse", "pearson")}
    from sklearn.metrics import average_precision_score

    true = y > 0.5
    present = np.flatnonzero(true.any(0))
    if not len(present):
        return {"map": float("nan"), "map_micro": float("nan")}
    aps = [average_precision_score(true[:, j], scores[:, j]) for j in present]
    return {
        "map": float(np.mean(aps)),
        "map_micro": float(average_precision_score(true.ravel(), scores.ravel())),
    }
