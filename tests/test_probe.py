"""The linear-probe protocol: sklearn reference, strength chosen on val only, no test influence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from featcache.runs.probe import ProbeConfig, fit_logistic, linear_probe
from featcache.train.fit import evaluate
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
