"""The same images as a Hugging Face dataset, an ImageFolder and WebDataset shards: one set of rows.

Writes the 1,797 scikit-learn digits (upscaled to 32x32 PNGs) three ways — a ``datasets`` dataset
saved with ``save_to_disk`` (PNG bytes in an ``Image`` column, a ``ClassLabel``), an ImageFolder, and 4
WebDataset shards ``digits-{000000..000003}.tar`` (``KEY.png`` + ``KEY.cls``) — dated an hour back (an
existing dataset), then runs, in one fresh cache folder, each source twice::

    python -m featcache train efficientnet-lite0 SOURCE --input-size 64 64 --epochs 10 --out RUN

and prints a Markdown table: the source, the rows extracted (from each run's ``metrics.json``), the
test accuracy and the command's wall time (process start and imports included)::

    python benchmarks/formats_in.py --work /tmp/formats
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def digit_pngs(size: int = 32) -> list[tuple[int, str, bytes]]:
    """Every bundled digit as ``(class, key, PNG bytes)``, class-major (the order a folder lists them)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    out = []
    for i in np.lexsort((np.arange(len(d.target)), d.target)):
        buf = io.BytesIO()
        Image.fromarray(pixels[i]).resize((size, size), Image.BILINEAR).save(buf, "PNG")
        out.append((int(d.target[i]), f"{i:04d}", buf.getvalue()))
    return out


def write_sources(work: Path, items: list[tuple[int, str, bytes]]) -> dict[str, str]:
    """The three sources under ``work``; returns ``{name: data spec}``."""
    import datasets

    for c, key, data in items:
        (work / "folder" / str(c)).mkdir(parents=True, exist_ok=True)
        (work / "folder" / str(c) / f"{key}.png").write_bytes(data)
    per = -(-len(items) // 4)
    (work / "shards").mkdir(parents=True, exist_ok=True)
    for s in range(4):
        with tarfile.open(work / "shards" / f"digits-{s:06d}.tar", "w") as tar:
            for c, key, data in items[s * per : (s + 1) * per]:
                for name, blob in ((f"{key}.png", data), (f"{key}.cls", str(c).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    rows = {"image": [{"bytes": b, "path": None} for _, _, b in items], "label": [c for c, _, _ in items]}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(work / "hf"))
    then = time.time() - 3600
    for f in work.rglob("*"):
        if f.is_file():
            os.utime(f, (then, then))
    return {
        "datasets (save_to_disk)": str(work / "hf"),
        "ImageFolder": str(work / "folder"),
        "4 WebDataset shards": str(work / "shards" / "digits-{000000..000003}.tar"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="a scratch folder (emptied first)")
    ap.add_argument("--model", default="efficientnet-lite0")
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    sources = write_sources(args.work, digit_pngs())
    print("| source | run | rows extracted | test acc | wall s |\n| --- | --- | --- | --- | --- |")
    for n, (name, spec) in enumerate([(k, v) for k, v in sources.items() for _ in range(2)]):
        out = args.work / "runs" / str(n)
        cmd = [sys.executable, "-m", "featcache", "train", args.model, spec, "--input-size", "64", "64"]
        cmd += ["--epochs", "10", "--out", str(out), "--cache-dir", str(args.work / "cache"), "-q"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        wall = time.perf_counter() - t0
        metrics = json.loads((out / "metrics.json").read_text())
        extracted = sum(v["extracted"] for v in metrics["cache_rows"].values())
        print(f"| {name} | {n % 2 + 1} | {extracted} | {metrics['test']['acc']:.4f} | {wall:.1f} |")


if __name__ == "__main__":
    main()
