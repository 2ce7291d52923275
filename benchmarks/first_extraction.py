"""featcache's own CPU time per image on a first extraction (issue #24, "one pass per new file").

Writes 2000 MNIST-5k digits as an ImageFolder of PNGs (dated an hour back: an existing dataset), then
extracts every split into a fresh cache through a backbone whose forward costs next to nothing (a
pooling and a 48 -> 512 linear layer), so the CPU time is featcache's: hashing, reading, decoding,
resizing, normalising, writing shards. Prints the median CPU microseconds per image (this process and
its DataLoader workers) and the wall time, over ``--repeats`` runs after a warm-up. Compare versions by
putting another featcache first on ``PYTHONPATH``::

    OMP_NUM_THREADS=1 python benchmarks/first_extraction.py --work /tmp/first [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from featcache import ExtractConfig, extract, load_backbone
from featcache.data.datasets import builtin_samples, image_folder


class Tiny(nn.Module):
    """A 512-d backbone whose forward is a sliver of the work."""

    def __init__(self) -> None:
        super().__init__()
        self.pool, self.fc, self.head = nn.AdaptiveAvgPool2d(4), nn.Linear(48, 512), nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fc(self.pool(x).flatten(1)))


def write_folder(root: Path, n: int) -> None:
    images = builtin_samples("mnist-5k")
    for i in range(n):
        folder = root / str(int(images.labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        images.load(i).save(folder / f"{i:05d}.png")
    then = time.time() - 3600
    for f in root.rglob("*.png"):
        os.utime(f, (then, then))


def cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=None, help="folder for the images and caches (default: a temp dir)")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: auto)")
    ap.add_argument("--model", default=None, help="a backbone spec instead of the tiny one (default: tiny)")
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp())
    root = work / "pngs"
    if not root.is_dir():
        write_folder(root, a.images)
    torch.manual_seed(0)
    bb = load_backbone(Tiny()) if a.model is None else load_backbone(a.model)
    layer = "fc" if a.model is None else "penultimate"
    config = ExtractConfig(input_size=(64, 64), batch_size=128, workers=a.workers)

    def run() -> tuple[float, float]:
        splits = image_folder(root)  # listed anew: no digest computed yet
        cache = tempfile.mkdtemp(dir=work)  # a fresh cache, and a fresh digest memo
        c0, t0 = cpu_seconds(), time.perf_counter()
        for name, s in splits.items():
            extract(bb, s, [layer], config, cache_dir=cache, split=name, progress=False)
        n = sum(len(s) for _, s in splits.items())
        return 1e6 * (cpu_seconds() - c0) / n, 1e6 * (time.perf_counter() - t0) / n

    run()  # warm-up: the layer checks, the page cache
    runs = [run() for _ in range(a.repeats)]
    cpu, wall = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    print(
        f"{a.images} PNGs, {a.model or 'tiny'}, workers={a.workers}: {cpu:.0f} CPU-us per image, "
        f"{wall:.0f} us wall per image"
    )
    print(f"  runs (CPU-us per image): {[round(r[0]) for r in runs]}")


if __name__ == "__main__":
    main()
