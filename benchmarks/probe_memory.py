"""Issue #24: the probe's (and train's) CPU seconds and peak RSS on a synthetic fp16 table.

Writes train/val/test rows (N x F, fp16, C classes: Gaussian class means plus noise, so the problem is
learnable) as memory maps under --dir once, then runs in a fresh process one of

- ``probe``: ``linear_probe`` over ``FeatureSource``s of the memory maps (in RAM when the split's
  float32 size fits ``--ram-budget-gb``, streamed otherwise),
- ``train``: ``train_on_cache``'s trainer: a linear head for ``--epochs`` epochs (``fit``),

and prints one JSON line: CPU seconds, peak RSS (``ru_maxrss``), the RSS after imports, the table's
float32 size, test accuracy. Usage::

    python benchmarks/probe_memory.py --rows 200000 --features 512 --classes 100 --what probe
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np


def make(folder: Path, n: int, f: int, c: int, seed: int = 0) -> None:
    """fp16 rows for the three splits (80/10/10), written once in chunks (never N x F float32 at once)."""
    if (folder / "done").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (c, f)).astype(np.float32) * 0.08
    sizes = {"train": n * 8 // 10, "val": n // 10, "test": n - n * 8 // 10 - n // 10}
    for split, m in sizes.items():
        x = np.lib.format.open_memmap(folder / f"{split}_x.npy", "w+", np.float16, (m, f))
        y = rng.integers(0, c, m)
        for s in range(0, m, 20000):
            part = y[s : s + 20000]
            x[s : s + len(part)] = centers[part] + rng.normal(0, 1, (len(part), f)).astype(np.float32) + 0.5
        x.flush()
        np.save(folder / f"{split}_y.npy", y)
    (folder / "done").write_text("ok")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--features", type=int, default=512)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--what", choices=("probe", "train"), default="probe")
    p.add_argument("--dir", default="/tmp/featcache_probe_memory")
    p.add_argument("--ram-budget-gb", type=float, default=8.0)
    p.add_argument("--max-iter", type=int, default=200)
    p.add_argument("--strengths", default="1e-6,1e-5,1e-4,1e-3,1e-2,1e-1,1")
    p.add_argument("--epochs", type=int, default=10)
    a = p.parse_args()
    folder = Path(a.dir) / f"{a.rows}x{a.features}x{a.classes}"
    make(folder, a.rows, a.features, a.classes)

    import torch

    from featcache.train.probe import ProbeConfig, linear_probe
    from featcache.train.sources import FeatureSource

    torch.manual_seed(0)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    base_rss, cpu0, t0 = ru.ru_maxrss / 2**20, ru.ru_utime + ru.ru_stime, time.perf_counter()
    src = {
        s: FeatureSource(
            np.load(folder / f"{s}_x.npy", mmap_mode="r"),
            np.load(folder / f"{s}_y.npy"),
            "float16",
            ram_budget_gb=a.ram_budget_gb,
        )
        for s in ("train", "val", "test")
    }
    table_gb = sum(len(s) for s in src.values()) * a.features * 4 / 2**30
    if a.what == "probe":
        cfg = ProbeConfig(strengths=tuple(float(v) for v in a.strengths.split(",")), max_iter=a.max_iter)
        res = linear_probe(src["train"], src["val"], src["test"], a.classes, cfg, progress=False)
        acc, extra = res.test["acc"] if res.test else None, {"strength": res.strength, **res.extra}
    else:
        from featcache.train.config import TrainConfig
        from featcache.train.fit import evaluate, fit
        from featcache.train.heads import HeadSpec, Standardize, build_head

        # what train_on_cache does: statistics from the rows in memory, fit with val, evaluate val and test
        cfg_t = TrainConfig(epochs=a.epochs, ram_budget_gb=a.ram_budget_gb, device="cpu")
        train = src["train"]
        std = Standardize.fit(train.raw, dtype="float16")  # as train_on_cache: by chunks from the map
        head = build_head(HeadSpec("linear"), (a.features,), a.classes, std, seed=0)
        fit(head, train, src["val"], a.classes, cfg_t, progress=False)
        evaluate(head, src["val"], a.classes)
        acc, extra = evaluate(head, src["test"], a.classes)["acc"], {}
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out = {
        "what": a.what,
        "rows": a.rows,
        "features": a.features,
        "classes": a.classes,
        "ram_budget_gb": a.ram_budget_gb,
        "streamed": src["train"].streamed,
        "cpu_s": round(ru.ru_utime + ru.ru_stime - cpu0, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak_rss_gb": round(ru.ru_maxrss / 2**20, 3),
        "rss_after_imports_gb": round(base_rss, 3),
        "table_float32_gb": round(table_gb, 3),
        "test_acc": acc,
        **extra,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
