"""Issue #24: the linear probe at ImageNet size: 1.28M x 2048 float16 rows, 1000 classes, above the RAM
budget (L-BFGS on blocks read from the memory maps: ``train.logistic.StreamedSoftmaxRegression``).

``write`` puts a synthetic, learnable table (Gaussian class means plus noise) into a feature cache through
the real writer (``write_segment``: shards, digests, checksums, the index), train rows then val rows;
``probe`` opens the splits as ``featcache probe`` does (``open_split``, ``source_for``) and runs
``linear_probe`` in this (fresh) process, printing one JSON line: CPU seconds, peak RSS (``VmHWM``), the
table's float32 size, val/test accuracy, the solver's iterations and epochs. Usage::

    python benchmarks/imagenet_probe.py write --dir /tmp/inet --train 1281167 --val 50000
    /usr/bin/time -v python benchmarks/imagenet_probe.py probe --dir /tmp/inet --ram-budget-gb 4 \\
        --strengths 1e-4 --max-iter 1 --no-refit
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import time
from pathlib import Path

import numpy as np

LAYER = "penultimate"


def _digests(start: int, n: int) -> list[str]:
    return [hashlib.sha256(f"row {i}".encode()).hexdigest() for i in range(start, start + n)]


def write(folder: Path, train: int, val: int, features: int, classes: int, shard: int = 65536) -> None:
    """The table of ``train + val`` rows through the real writer; labels and sizes in ``meta.json``."""
    from tqdm.auto import tqdm

    from featcache.backbones.registry import load_backbone
    from featcache.cache.store import FeatureCache
    from featcache.cache.writer import write_segment
    from featcache.extraction.build import cache_record
    from featcache.extraction.extractor import Extractor
    from featcache.tools.scale import SCALE_MODEL, _config, register_scale_backbone

    register_scale_backbone()
    bb, cfg = load_backbone(SCALE_MODEL, "none"), _config()
    fc = FeatureCache(folder / "cache")
    table = fc.create(cache_record(bb, [LAYER], cfg))
    layouts = Extractor(bb, table.layers, cfg).stored_layouts()
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (classes, features)).astype(np.float32) * 0.08
    n = train + val
    labels = rng.integers(0, classes, n)
    info = {"process": 0, "method": "synthetic", "layer_layouts": layouts, "seconds": 0.0}
    for s in tqdm(range(0, n, shard), desc="write shards"):
        y = labels[s : s + shard]
        rows = rng.standard_normal((len(y), features), dtype=np.float32)
        rows += centres[y]
        rows += 0.5
        write_segment(table.path, table.layers, {LAYER: rows.astype(np.float16)}, _digests(s, len(y)), {},
                      "float16", info, layouts=layouts)  # fmt: skip
    meta = {"key": table.key, "train": train, "val": val, "features": features, "classes": classes}
    np.save(folder / "labels.npy", labels)
    (folder / "meta.json").write_text(json.dumps(meta))


def _peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def probe(folder: Path, budget: float, strengths: tuple[float, ...], max_iter: int, refit: bool) -> None:
    import torch

    from featcache.cache.store import FeatureCache
    from featcache.train.probe import ProbeConfig, linear_probe
    from featcache.train.sources import source_for

    meta = json.loads((folder / "meta.json").read_text())
    labels = np.load(folder / "labels.npy")
    classes = [f"c{i}" for i in range(meta["classes"])]
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu0, t0, rss0 = ru.ru_utime + ru.ru_stime, time.perf_counter(), _peak()
    fc = FeatureCache(folder / "cache")
    n_train, n = meta["train"], meta["train"] + meta["val"]
    spans = {"train": (0, n_train), "val": (n_train, n)}
    src = {}
    for split, (lo, hi) in spans.items():
        digests = _digests(lo, hi - lo)
        cached = fc.open_split(meta["key"], [LAYER], digests, digests, labels[lo:hi], classes)
        src[split] = source_for(cached, LAYER, torch.device("cpu"), budget)
    cfg = ProbeConfig(strengths=strengths, max_iter=max_iter)
    res = linear_probe(src["train"], src["val"], None, meta["classes"], cfg, progress=True, refit=refit)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    table_gb = n * meta["features"] * 4 / 2**30
    out = {
        "rows": n,
        "features": meta["features"],
        "classes": meta["classes"],
        "ram_budget_gb": budget,
        "streamed": src["train"].streamed,
        "cpu_s": round(ru.ru_utime + ru.ru_stime - cpu0, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak_rss_gb": round(_peak() / 2**30, 3),
        "rss_after_imports_gb": round(rss0 / 2**30, 3),
        "table_float32_gb": round(table_gb, 3),
        "strength": res.strength,
        "sweep": res.sweep,
        **res.extra,
    }
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("write", "probe"))
    p.add_argument("--dir", default="/tmp/featcache_imagenet_probe")
    p.add_argument("--train", type=int, default=1_281_167)
    p.add_argument("--val", type=int, default=50_000)
    p.add_argument("--features", type=int, default=2048)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--ram-budget-gb", type=float, default=4.0)
    p.add_argument("--strengths", default="1e-4")
    p.add_argument("--max-iter", type=int, default=1)
    p.add_argument("--no-refit", action="store_true")
    a = p.parse_args()
    folder = Path(a.dir)
    if a.what == "write":
        folder.mkdir(parents=True, exist_ok=True)
        write(folder, a.train, a.val, a.features, a.classes)
    else:
        strengths = tuple(float(v) for v in a.strengths.split(","))
        probe(folder, a.ram_budget_gb, strengths, a.max_iter, not a.no_refit)


if __name__ == "__main__":
    main()
