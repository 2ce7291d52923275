"""Joint vs per-label L-BFGS for the multi-label probe, and the ridge path vs scikit-learn's Ridge.

On EfficientNet-Lite0 penultimate features of MNIST-5k at 64 px (the cache is filled on the first run):
the multi-label targets are odd / big (5-9) / round (0, 6, 8, 9) / prime (2, 3, 5, 7); the regression
target is the digit's value. CPU seconds (``time.process_time``) and wall seconds of each fit.

    python benchmarks/multilabel_probe.py [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.linear_model import Ridge

from featcache import DataConfig, ExtractConfig, load_backbone
from featcache.extraction.build import extract_splits
from featcache.train.heads import Standardize
from featcache.train.target_probes import ridge_path, sigmoid_path


def timed(fn):  # type: ignore[no-untyped-def]
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - c0, time.perf_counter() - w0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cache-dir", default=None)
    a = p.parse_args()
    feats = extract_splits(
        load_backbone("efficientnet-lite0"), DataConfig("mnist-5k").load(), ["penultimate"],
        ExtractConfig(input_size=(64, 64)), cache_dir=a.cache_dir, progress=False,
    )  # fmt: skip
    x = torch.as_tensor(np.asarray(feats["train"].features["penultimate"]), dtype=torch.float32)
    digit = feats["train"].labels
    z = Standardize.fit(x)(x).double()
    y = np.stack([digit % 2 == 1, digit >= 5, np.isin(digit, [0, 6, 8, 9]), np.isin(digit, [2, 3, 5, 7])], 1)
    yt = torch.as_tensor(y, dtype=torch.float64)
    strengths = [float(s) for s in np.logspace(-6, 0, 7)]
    print(f"{len(z)} rows x {z.shape[1]} features, {y.shape[1]} labels, {len(strengths)} strengths")
    for joint in (True, False):
        path, cpu, wall = timed(lambda joint=joint: sigmoid_path(z, yt, strengths, joint=joint))
        iters = sum(v[2] for v in path.values())
        print(
            f"multilabel path {'jointly  ' if joint else 'per label'}: {cpu:.2f} s CPU, {wall:.2f} s wall, "
            f"{iters} iterations"
        )
    target = torch.as_tensor(digit, dtype=torch.float64)[:, None]
    out, cpu, wall = timed(lambda: ridge_path(z, target, strengths))
    print(
        f"ridge path, one eigendecomposition, {len(strengths)} strengths: {cpu:.2f} s CPU, {wall:.2f} s wall"
    )
    n = len(z)

    def sk() -> list[np.ndarray]:
        return [Ridge(alpha=n * s).fit(z.numpy(), digit.astype(float)).coef_ for s in strengths]

    coefs, cpu, wall = timed(sk)
    gap = max(float(np.abs(out[s][0][0].numpy() - c).max()) for s, c in zip(strengths, coefs, strict=True))
    print(
        f"scikit-learn Ridge, one fit per strength: {cpu:.2f} s CPU, {wall:.2f} s wall; "
        f"largest weight gap {gap:.2e}"
    )


if __name__ == "__main__":
    main()
