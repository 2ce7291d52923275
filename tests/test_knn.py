"""kNN evaluation (DINO's protocol) against scikit-learn's KNeighborsClassifier, streamed in chunks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.neighbors import KNeighborsClassifier

import test_tasks
from conftest import tiny_resnet_on_digits
from featcache.cache.rows import RowView
from featcache.cli.main import main
from featcache.runs.knn import KnnConfig, knn_eval, knn_scores
from test_tasks import LITE

digits_sets = test_tasks.digits_sets  # the digits as manifests (multi-label, values), a module fixture


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    d = load_digits()
    x = d.data.astype(np.float32) + np.random.default_rng(0).normal(0, 0.01, d.data.shape).astype(np.float32)
    return x[:1200], d.target[:1200], x[1200:], d.target[1200:]


def _sklearn(k: int, weighting: str, xtr, ytr, xte):  # type: ignore[no-untyped-def]
    # cosine distance d = 1 - similarity: DINO's weight exp(sim / T) is exp((1 - d) / 0.07)
    w = "uniform" if weighting == "uniform" else (lambda d: np.exp((1 - d) / 0.07))
    return KNeighborsClassifier(k, metric="cosine", weights=w, algorithm="brute").fit(xtr, ytr).predict(xte)


@pytest.mark.parametrize("weighting", ["uniform", "exp"])
def test_knn_matches_scikit_learn(weighting: str) -> None:
    xtr, ytr, xte, yte = _digits()
    ks = (1, 10, 20, 100)
    metrics, pred = knn_eval(xtr, ytr, xte, yte, 10, KnnConfig(k=ks, weighting=weighting, chunk_rows=97))
    for k in ks:
        ref = _sklearn(k, weighting, xtr, ytr, xte)
        agree = (ref == pred[k]).mean()
        # uniform votes: the same neighbours and the same tie rule; exp weights: float32 vs float64 sums
        assert agree == 1.0 if weighting == "uniform" else agree >= 0.995, (k, agree)
        assert metrics[k]["acc"] == pytest.approx((ref == yte).mean(), abs=0.005)
        assert 0 <= metrics[k]["acc"] <= metrics[k]["top5"] <= 1


def test_bank_streams_in_chunks_from_shards() -> None:
    xtr, ytr, xte, yte = _digits()
    # The bank as a memory-mapped split spread over three shards, rows in a shuffled order.
    perm = np.random.default_rng(1).permutation(len(xtr))
    shards = [xtr[:400], xtr[400:900], xtr[900:]]
    part = np.repeat([0, 1, 2], [400, 500, 300])[perm]
    row = np.r_[np.arange(400), np.arange(500), np.arange(300)][perm]
    view = RowView(shards, part, row, (64,), np.float32)
    cfg = KnnConfig(k=(5, 20), chunk_rows=64)
    streamed, p1 = knn_eval(view, ytr[perm], xte, yte, 10, cfg)
    whole, p2 = knn_eval(xtr[perm], ytr[perm], xte, yte, 10, KnnConfig(k=(5, 20), chunk_rows=10**6))
    assert streamed == whole and all(np.array_equal(p1[k], p2[k]) for k in (5, 20))


def test_multilabel_scores_are_the_weighted_share_of_neighbours() -> None:
    xtr, ytr, xte, _ = _digits()
    y = np.stack([ytr % 2 == 1, ytr >= 5], 1).astype(np.uint8)  # odd; big
    scores = knn_scores(xtr, y, xte[:50], KnnConfig(k=(10,), chunk_rows=300))[10]
    # The naive reference: every similarity at once, in float64.
    a = xtr / np.linalg.norm(xtr, axis=1, keepdims=True)
    b = xte[:50] / np.linalg.norm(xte[:50], axis=1, keepdims=True)
    sims = b.astype(np.float64) @ a.T.astype(np.float64)
    for i in range(50):
        top = np.argsort(-sims[i])[:10]
        w = np.exp(sims[i, top] / 0.07)
        np.testing.assert_allclose(scores[i], (w[:, None] * y[top]).sum(0) / w.sum(), rtol=1e-4, atol=1e-6)


def test_knn_config_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match="k"):
        KnnConfig(k=(0,))
    with pytest.raises(ValueError, match=r"exp\|uniform"):
        KnnConfig(weighting="cosine")
    with pytest.raises(ValueError, match="temperature"):
        KnnConfig(temperature=0)
    xtr, ytr, xte, yte = _digits()
    with pytest.raises(ValueError, match="one label per row"):
        knn_eval(xtr, ytr[:5], xte, yte, 10)


def test_cli_knn_reads_the_cache_and_matches_scikit_learn(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "cache"))
    base = [*tiny_resnet_on_digits(300), "-q"]
    assert main(["knn", *base, "--k", "5,20", "--weighting", "uniform", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    from featcache.backbones.registry import load_backbone
    from featcache.data.config import DataConfig
    from featcache.extraction.build import extract_splits
    from featcache.extraction.config import ExtractConfig

    bb = load_backbone("torchvision:resnet18", weights="none")
    feats = extract_splits(
        bb, DataConfig("digits", limit=300).load(), ["penultimate"], ExtractConfig(input_size=(32, 32)),
        cache_dir=str(tmp_path / "cache"), progress=False,
    )  # fmt: skip
    tr, te = (np.asarray(feats[s].features["penultimate"], np.float32) for s in ("train", "test"))
    for k in (5, 20):
        ref = _sklearn(k, "uniform", tr, feats["train"].labels, te)
        assert got["metrics"]["test"][str(k)]["acc"] == pytest.approx((ref == feats["test"].labels).mean())
    assert got["cache_rows"]["train"]["extracted"] > 0
    assert main(["knn", *base, "--k", "5"]) == 0
    out = capsys.readouterr().out
    assert "split" in out and "test" in out and "bank:" in out
    assert main(["knn", *base, "--k", "0"]) == 2
    assert "--k" in capsys.readouterr().err


@pytest.mark.parametrize("task", ["multilabel", "regress"])
def test_cli_knn_of_multilabel_and_regression_sets_is_scikit_learns(
    digits_sets: dict[str, Path], capsys: pytest.CaptureFixture[str], task: str
) -> None:
    from sklearn.metrics import average_precision_score, r2_score
    from sklearn.neighbors import KNeighborsRegressor, NearestNeighbors

    from featcache.backbones.registry import load_backbone
    from featcache.data.config import DataConfig
    from featcache.extraction.build import extract_splits
    from featcache.extraction.config import ExtractConfig

    spec = str(digits_sets["parity" if task == "multilabel" else "value"])
    cache = str(digits_sets["cache"])
    argv = ["knn", *LITE, spec, "--task", task, "--cache-dir", cache, "--k", "5,20", "--weighting", "uniform"]
    assert main([*argv, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["metrics"]["test"]
    data = DataConfig(spec, task=task).load()
    feats = extract_splits(
        load_backbone("efficientnet-lite0"), data, ["penultimate"], ExtractConfig(input_size=(64, 64)),
        cache_dir=cache, progress=False,
    )  # fmt: skip
    tr, te = (np.asarray(feats[s].features["penultimate"], np.float32) for s in ("train", "test"))
    ytr, yte = np.asarray(feats["train"].labels, float), np.asarray(feats["test"].labels, float)
    for k in (5, 20):
        if task == "regress":  # uniform votes: the plain mean of the k cosine-nearest targets
            ref = KNeighborsRegressor(k, weights="uniform", metric="cosine", algorithm="brute").fit(tr, ytr)
            assert got[str(k)]["r2"] == pytest.approx(r2_score(yte, ref.predict(te)), abs=1e-4)
            continue
        idx = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(tr).kneighbors(te)[1]
        scores = ytr[idx].mean(1)  # each label's share of the k nearest neighbours
        present = [j for j in range(yte.shape[1]) if yte[:, j].any()]
        macro = np.mean([average_precision_score(yte[:, j], scores[:, j]) for j in present])
        assert got[str(k)]["map"] == pytest.approx(macro, abs=1e-4)
        assert got[str(k)]["map_micro"] == pytest.approx(
            average_precision_score(yte.ravel(), scores.ravel()), abs=1e-4
        )
    # the exp-weighted scores the CLI ranks are the library's knn_scores on the same cached rows
    assert main([*argv[:-2], "--json"]) == 0
    exp = json.loads(capsys.readouterr().out)["metrics"]["test"]
    scores = knn_scores(tr, ytr, te, KnnConfig(k=(20,)))[20]
    if task == "multilabel":
        present = [j for j in range(yte.shape[1]) if yte[:, j].any()]
        macro = np.mean([average_precision_score(yte[:, j], scores[:, j]) for j in present])
        assert exp["20"]["map"] == pytest.approx(macro, abs=1e-4) and macro >= 0.9
    else:
        assert exp["20"]["r2"] == pytest.approx(r2_score(yte, scores), abs=1e-4)
