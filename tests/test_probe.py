"""The linear-probe protocol: sklearn reference, strength chosen on val only, no test influence."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from featcache.train.fit import evaluate
from featcache.train.probe import ProbeConfig, fit_logistic, linear_probe
from featcache.train.sources import FeatureSource


def _data(n: int, seed: int, noise: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 20, generator=torch.Generator().manual_seed(0)) * 2
    y = torch.randint(0, 4, (n,), generator=g)
    return centres[y] + noise * torch.randn(n, 20, generator=g), y


def test_logistic_matches_sklearn() -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = _data(400, 1)
    lam = 1e-2
    head = fit_logistic(x, y, 4, lam, max_iter=500, standardize=False)
    # sklearn minimises sum(loss) + ||w||^2 / (2C); ours mean(loss) + lam/2 ||w||^2  =>  C = 1 / (n * lam)
    ref = LogisticRegression(C=1 / (len(x) * lam), max_iter=5000, tol=1e-10).fit(x.numpy(), y.numpy())
    ours = torch.softmax(head(x), 1).detach().numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(x.numpy()), atol=2e-3)


def test_probe_chooses_on_val_and_never_looks_at_test() -> None:
    (xt, yt), (xv, yv), (xs, ys) = _data(300, 1), _data(150, 2), _data(200, 3)
    cfg = ProbeConfig(strengths=(1e-4, 1e-2, 1.0), max_iter=100)
    res = linear_probe(
        FeatureSource(xt, yt), FeatureSource(xv, yv), FeatureSource(xs, ys), 4, cfg, progress=False
    )
    scrambled = FeatureSource(xs, ys[torch.randperm(len(ys), generator=torch.Generator().manual_seed(0))])
    res2 = linear_probe(FeatureSource(xt, yt), FeatureSource(xv, yv), scrambled, 4, cfg, progress=False)
    assert res.strength == res2.strength and res.sweep == res2.sweep
    # Each reported validation score comes from a model fitted on train alone.
    for row in res.sweep:
        head = fit_logistic(xt, yt, 4, row["strength"], 100)
        assert evaluate(head, FeatureSource(xv, yv), 4)["acc"] == pytest.approx(row["val_acc"])
    assert res.test is not None and res.test["acc"] > 0.8
    assert res.strength == max(res.sweep, key=lambda r: (r["val_acc"], -r["val_loss"]))["strength"]


def test_the_path_converges_in_few_iterations_and_warm_starts_help() -> None:
    (xt, yt), (xv, yv) = _data(400, 1), _data(150, 2)
    cfg = ProbeConfig(strengths=(1e-4, 1e-3, 1e-2, 1e-1), max_iter=300)
    res = linear_probe(FeatureSource(xt, yt), FeatureSource(xv, yv), None, 4, cfg, progress=False)
    path = sum(r["iterations"] for r in res.sweep)
    assert path < 0.25 * cfg.max_iter * len(cfg.strengths)  # stops on the gradient, not at max_iter
    cold = sum(
        linear_probe(
            FeatureSource(xt, yt), FeatureSource(xv, yv), None, 4, ProbeConfig((s,), 300), progress=False
        ).sweep[0]["iterations"]
        for s in cfg.strengths
    )
    assert path < cold  # each fit starts from the previous, stronger-penalty solution
    assert res.extra["refit_on"] == "train+val"


def test_few_shot_trains_on_k_training_rows_per_class_only(monkeypatch: pytest.MonkeyPatch) -> None:
    import featcache.train.probe as probe_mod

    (xt, yt), (xv, yv), (xs, ys) = _data(300, 1), _data(120, 2), _data(200, 3)
    fitted: list[int] = []
    real = probe_mod._lbfgs

    def spy(problem, *args, **kw):  # type: ignore[no-untyped-def]
        fitted.append(problem.rows)
        return real(problem, *args, **kw)

    monkeypatch.setattr(probe_mod, "_lbfgs", spy)
    cfg = ProbeConfig(strengths=(1e-3, 1e-1), shots=5, shot_seeds=4)
    first, summary = probe_mod.few_shot(
        FeatureSource(xt, yt), FeatureSource(xv, yv), FeatureSource(xs, ys), 4, cfg, progress=False
    )
    assert fitted == [5 * 4] * (2 * 4)  # 2 strengths x 4 draws, each on 5 rows per class, no refit
    assert summary["seeds"] == 4 and len(summary["per_seed"]) == 4 and summary["on"] == "test"
    assert summary["test_mean"] == pytest.approx(np.mean(summary["per_seed"]))
    assert summary["test_std"] > 0 and len(set(summary["per_seed"])) > 1  # the draws differ
    assert first.extra["refit_on"] == "train"
    with pytest.raises(ValueError, match="fewer training images"):
        tiny = FeatureSource(xt[:10], yt[:10])
        probe_mod.few_shot(tiny, FeatureSource(xv, yv), None, 4, cfg, progress=False)


def test_balanced_class_weight_and_metric_on_imbalanced_data() -> None:
    from featcache.train.probe import class_weights

    x, y = _data(800, 4, noise=3.0)
    keep = (y != 3) | (torch.arange(len(y)) % 10 == 0)  # class 3 ten times rarer
    xt, yt = x[keep], y[keep]
    (xv, yv), (xs, ys) = _data(200, 5, noise=3.0), _data(400, 6, noise=3.0)
    w = class_weights(yt, 4, "balanced")
    counts = torch.bincount(yt, minlength=4).float()
    torch.testing.assert_close(w * counts, torch.full((4,), len(yt) / 4.0))  # each class weighs n/4
    runs = {
        mode: linear_probe(
            FeatureSource(xt, yt),
            FeatureSource(xv, yv),
            FeatureSource(xs, ys),
            4,
            ProbeConfig(strengths=(1e-2,), class_weight=mode, metric="balanced-acc"),
            progress=False,
        )
        for mode in ("none", "balanced")
    }
    plain, balanced = runs["none"].test, runs["balanced"].test
    assert plain is not None and balanced is not None
    assert balanced["per_class_acc"][3] > plain["per_class_acc"][3]  # the rare class is found more often
    assert balanced["balanced_acc"] == pytest.approx(np.mean(balanced["per_class_acc"]))
    assert runs["balanced"].extra["chosen_on"] == "val_balanced_acc"
    with pytest.raises(ValueError, match="balanced-acc"):
        ProbeConfig(metric="f1")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_the_solvers_objective_is_weighted_cross_entropy(
    backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loss and gradient of both solver backends against autograd through ``F.cross_entropy``."""
    import torch.nn.functional as F

    import featcache.train.logistic as logistic

    monkeypatch.setattr(logistic, "SMALL_PROBLEM", 10**9 if backend == "numpy" else 0)
    x, y = _data(50, 7)
    cw = torch.tensor([0.5, 1.0, 2.0, 3.0])
    problem = logistic.SoftmaxRegression(x, y, 4, cw)
    assert problem.numpy == (backend == "numpy")
    w = torch.randn(
        4, 21, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True
    )
    ref = (
        F.cross_entropy(x.double() @ w[:, :20].T + w[:, 20], y, weight=cw.double())
        + 0.05 * w[:, :20].pow(2).sum()
    )
    ref.backward()
    flat = torch.cat([w[:, :20].reshape(-1), w[:, 20]]).detach()
    loss, grad = problem.objective(0.1)(flat.numpy() if backend == "numpy" else flat.float())
    grad = torch.as_tensor(grad).double()
    want = torch.cat([w.grad[:, :20].reshape(-1), w.grad[:, 20]])  # type: ignore[index]
    tol = 1e-10 if backend == "numpy" else 1e-5
    assert loss == pytest.approx(float(ref.detach()), rel=tol)
    torch.testing.assert_close(grad, want, rtol=tol, atol=tol)


def test_both_solver_backends_match_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    """The float32 torch path (large problems, GPUs) reaches scikit-learn's solution as the numpy one does."""
    from sklearn.linear_model import LogisticRegression

    import featcache.train.logistic as logistic

    x, y = _data(400, 1)
    lam = 1e-2
    ref = LogisticRegression(C=1 / (len(x) * lam), max_iter=5000, tol=1e-10).fit(x.numpy(), y.numpy())
    for small in (10**9, 0):
        monkeypatch.setattr(logistic, "SMALL_PROBLEM", small)
        head = fit_logistic(x, y, 4, lam, max_iter=500, standardize=False, tol=1e-5)
        ours = torch.softmax(head(x), 1).detach().numpy()
        np.testing.assert_allclose(ours, ref.predict_proba(x.numpy()), atol=2e-3)


@pytest.mark.slow
def test_cli_five_shot_five_seed_probe_on_mnist_trains_on_training_rows_only(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``featcache probe ... --shots 5 --shot-seeds 5`` on MNIST-5k: mean ± std over 5 draws, each fit on
    5 rows per class of the training split; no validation or test row is ever trained on or
    standardised with: every row the solver and the standardisation see is compared with the cached
    rows of each split (the solver's own input is compared with --no-standardize, where it is raw)."""
    import featcache.train.probe as probe_mod
    from featcache.backbones.registry import load_backbone
    from featcache.cli import main
    from featcache.data.config import DataConfig
    from featcache.extraction.build import extract_splits
    from featcache.extraction.config import ExtractConfig

    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "cache"))
    seen: dict[str, list[torch.Tensor]] = {"standardised": [], "solved": []}

    real_problem, real_fit = probe_mod._problem, probe_mod.fit_standardize_rows

    def spy(blocks):  # type: ignore[no-untyped-def]
        seen["standardised"].append(blocks[0 : len(blocks)])  # the rows it reads (not standardised)
        return real_fit(blocks)

    def problem(z, y, *args, **kw):  # type: ignore[no-untyped-def]
        seen["solved"].append(z.standardized(None)[0 : len(z)])  # the rows it solves on, as read
        return real_problem(z, y, *args, **kw)

    monkeypatch.setattr(probe_mod, "fit_standardize_rows", spy)
    monkeypatch.setattr(probe_mod, "_problem", problem)
    model = ["torchvision:resnet18", "mnist-5k", "--weights", "none", "--input-size", "32", "32", "-q"]
    few = ["--shots", "5", "--shot-seeds", "5", "--strengths", "0.01,1"]
    code = main(["probe", *model, *few])
    out = capsys.readouterr().out
    assert code == 0, out
    summary = re.search(r"5-shot acc on test over 5 draws of the training split: ([\d.]+) ± ([\d.]+)", out)
    assert summary, out
    per_draw = [float(v) for v in re.search(r"per draw: ([^)]*)\)", out)[1].split(", ")]  # type: ignore[index]
    assert len(per_draw) == 5 and len(set(per_draw)) > 1
    assert float(summary[1]) == pytest.approx(np.mean(per_draw), abs=1e-3)
    assert float(summary[2]) == pytest.approx(np.std(per_draw, ddof=1), abs=1e-3)
    assert len(seen["solved"]) == 5  # one path per draw, no refit
    seen["solved"].clear()  # standardised: compared below from the raw rows of a --no-standardize run
    assert main(["probe", *model, *few, "--no-standardize"]) == 0

    # The cached rows of each split, read back (all from the cache: the same settings).
    bb = load_backbone("torchvision:resnet18", weights="none")
    ecfg = ExtractConfig(input_size=(32, 32), device="cpu")
    feats = extract_splits(bb, DataConfig("mnist-5k").load(), ["penultimate"], ecfg, progress=False)
    rows = {
        k: {r.tobytes() for r in np.asarray(v.features["penultimate"], np.float32)} for k, v in feats.items()
    }
    assert all(v.extracted == 0 for v in feats.values()) and len(rows["train"]) > 3000
    assert len(seen["standardised"]) == len(seen["solved"]) == 5  # one path per draw, no refit
    for x in seen["standardised"] + seen["solved"]:
        assert len(x) == 5 * 10
        got = {r.tobytes() for r in x.cpu().numpy().astype(np.float32)}
        assert len(got) == 50 and got <= rows["train"] and not got & (rows["val"] | rows["test"])


def test_the_chunked_objective_reads_parts_standardised_by_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The torch objective over two parts (some rows of a tensor, a float16 memory map streamed), read
    7 rows at a time and standardised on the fly, against autograd on the concatenated copy."""
    import torch.nn.functional as F

    import featcache.train.logistic as logistic
    from featcache.train.heads import Standardize

    monkeypatch.setattr(logistic, "SMALL_PROBLEM", 0)
    monkeypatch.setattr(logistic, "chunk_rows", lambda features, classes, chunk_bytes=0: 7)
    x, y = _data(60, 5)
    x = x * 3 + 5  # far from standardised: the statistics matter
    pick = torch.tensor([3, 0, 9, 4, 17, 11, 2, 30, 25, 8, 41])
    np.save(tmp_path / "m.npy", x[40:].half().numpy())
    mapped = np.load(tmp_path / "m.npy", mmap_mode="r")
    blocks = logistic.RowBlocks([logistic.Part(x, index=pick), logistic.Part(mapped, "float16")])
    rows = torch.cat([x[pick], torch.from_numpy(np.array(mapped)).float()])
    labels = torch.cat([y[pick], y[40:]])
    std = logistic.fit_standardize_rows(blocks)
    ref_std = Standardize.fit(rows)
    torch.testing.assert_close(std.mean, ref_std.mean)
    torch.testing.assert_close(std.std, ref_std.std)
    problem = logistic.SoftmaxRegression(blocks.standardized(std), labels, 4, torch.tensor([0.5, 1, 2, 3]))
    assert not problem.numpy
    w = torch.randn(
        4, 21, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True
    )
    z = ref_std(rows).double()
    ref = F.cross_entropy(z @ w[:, :20].T + w[:, 20], labels, weight=torch.tensor([0.5, 1, 2, 3]).double())
    ref = ref + 0.05 * w[:, :20].pow(2).sum()
    ref.backward()
    loss, grad = problem.objective(0.1)(torch.cat([w[:, :20].reshape(-1), w[:, 20]]).detach().float())
    want = torch.cat([w.grad[:, :20].reshape(-1), w.grad[:, 20]])  # type: ignore[index]
    assert loss == pytest.approx(float(ref.detach()), rel=1e-5)
    torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("min_block", [4096, 256])
def test_a_streamed_probe_reaches_the_in_memory_accuracy_and_sklearns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, min_block: int
) -> None:
    """Splits over the RAM budget are solved from their float16 memory maps by L-BFGS on blocks (one
    block of every training row, or six of 256 rows drawn from a split stored class by class) with early
    stop on the val loss: the in-memory solver's test accuracy, and scikit-learn's protocol's, within 1.5
    points; with one block, nearly the same head."""
    import featcache.train.logistic as logistic
    from featcache.tools.baselines import sklearn_probe

    monkeypatch.setattr(logistic, "MIN_BLOCK_ROWS", min_block)
    x, y = _data(1500, 1)
    order = torch.argsort(y, stable=True)  # stored class by class: a block of consecutive rows is one class
    splits = {"train": (x[order], y[order]), "val": _data(500, 2), "test": _data(800, 3)}
    arrays = {}
    for name, (x, y) in splits.items():
        np.save(tmp_path / f"{name}.npy", x.half().numpy())
        arrays[name] = (np.load(tmp_path / f"{name}.npy", mmap_mode="r"), y.numpy())
    cfg = ProbeConfig(strengths=(1e-4, 1e-2, 1.0), max_iter=300)
    res = {}
    for budget in (8.0, 1e-9):
        src = {k: FeatureSource(a, y, "float16", ram_budget_gb=budget) for k, (a, y) in arrays.items()}
        assert all(s.streamed == (budget < 1) for s in src.values())
        res[budget] = linear_probe(src["train"], src["val"], src["test"], 4, cfg, progress=False)
    streamed, in_memory = res[1e-9], res[8.0]
    assert streamed.extra["solver"] == f"block L-BFGS, blocks of {min(min_block, 1500)} rows"
    assert "solver" not in in_memory.extra and all(1 <= r["epochs"] <= 20 for r in streamed.sweep)
    assert streamed.test is not None and in_memory.test is not None
    assert abs(streamed.test["acc"] - in_memory.test["acc"]) <= 0.015
    ref = sklearn_probe([(np.asarray(a, np.float32), y) for a, y in arrays.values()], cfg.strengths)
    assert abs(streamed.test["acc"] - ref) <= 0.015
    if min_block > 1500:
        xs = torch.from_numpy(np.array(arrays["test"][0])).float()
        with torch.no_grad():
            p_streamed, p_memory = torch.softmax(streamed.head(xs), 1), torch.softmax(in_memory.head(xs), 1)
        assert streamed.strength == in_memory.strength
        torch.testing.assert_close(p_streamed, p_memory, atol=0.02, rtol=0)


def test_the_ram_budget_decides_the_solver(tmp_path: Path) -> None:
    """A split whose float32 rows fit the budget is loaded and solved full-batch; one over it is read from
    its memory map by blocks of half the budget (at least MIN_BLOCK_ROWS rows)."""
    import featcache.train.logistic as logistic
    import featcache.train.probe as probe_mod

    assert logistic.block_rows(2048, 16.0) == 8 * 2**30 // (4 * 2048)
    assert logistic.block_rows(512, 1e-9) == logistic.MIN_BLOCK_ROWS
    x, y = _data(300, 1)
    np.save(tmp_path / "x.npy", x.half().numpy())
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    need = 300 * 20 * 4 / 2**30  # the split's float32 size in GB
    for budget, streamed in ((need * 1.01, False), (need * 0.99, True)):
        src = FeatureSource(mapped, y, "float16", ram_budget_gb=budget)
        assert src.streamed == streamed
        problem = probe_mod._problem(probe_mod._rows_of(src), src.y, 4, ProbeConfig(), budget)
        assert isinstance(problem, logistic.StreamedSoftmaxRegression) == streamed
    fit = problem.fit(1e-3, max_iter=30, tol=1e-4)
    assert fit.epochs == 3 and fit.iterations > 0  # 30 iterations: 3 epochs of 10 per block


def test_a_split_in_memory_is_one_block_of_views_and_the_fit_is_the_standardised_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows in memory that fit one chunk are read as the split's own storage (no standardised copy, no
    held copy): the standardisation is folded into the weights, and the fitted head equals scikit-learn's
    on the standardised rows."""
    from sklearn.linear_model import LogisticRegression

    import featcache.train.logistic as logistic
    from featcache.train.heads import Standardize

    monkeypatch.setattr(logistic, "SMALL_PROBLEM", 0)  # the torch path, which reads chunks
    x, y = _data(400, 1)
    x = x * 3 + 5
    std = Standardize.fit(x)
    blocks = logistic.RowBlocks([logistic.Part(x)]).standardized(std)
    chunks = list(blocks.raw_chunks(logistic.chunk_rows(blocks.features, 4)))
    assert len(chunks) == 1 and chunks[0][1].data_ptr() == x.data_ptr()  # a view of the split
    lam = 1e-2
    head = fit_logistic(x, y, 4, lam, max_iter=500, tol=1e-5)
    z = std(x).numpy()
    ref = LogisticRegression(C=1 / (len(x) * lam), max_iter=5000, tol=1e-10).fit(z, y.numpy())
    with torch.no_grad():
        ours = torch.softmax(head(x), 1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(z), atol=2e-3)
