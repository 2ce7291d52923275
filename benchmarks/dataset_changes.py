"""What ``featcache extract`` does when the data changes, measured with the command line (issue #13).

Writes 600 scikit-learn digits (60 per class, upscaled to 64x64 PNGs) as an ImageFolder, dated an
hour back (an existing dataset), then runs, in a fresh cache folder, after each change::

    python -m featcache extract torchvision:resnet18 FOLDER --weights none --layers avgpool -q

and prints a Markdown table: the change, what each split's line said, and the command's wall time
(process start and imports included). Run it for this checkout, or for any other version of
featcache by putting that version first on ``PYTHONPATH``::

    python benchmarks/dataset_changes.py --work /tmp/changes
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_folder(root: Path, per_class: int = 60, size: int = 64) -> list[Path]:
    """``per_class`` digits of each class as ``root/<class>/<i>.png``; returns the unused digits' files."""
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = (d.images * (255.0 / 16.0)).round().astype(np.uint8)
    spare = []
    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for k, i in enumerate(np.flatnonzero(d.target == c)[: per_class + 1]):
            img = Image.fromarray(pixels[i]).resize((size, size), Image.BILINEAR)
            path = root / str(c) / f"{i:04d}.png"
            if k == per_class:  # one more per class, kept aside to add later
                path = root.parent / "spare" / str(c) / f"{i:04d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                spare.append(path)
            img.save(path)
    then = time.time() - 3600
    for f in root.rglob("*.png"):
        os.utime(f, (then, then))
    return spare


def extract(folder: Path, cache: Path, *extra: str) -> tuple[list[str], float]:
    """Run the CLI once; the split lines it printed, summarised, and its wall time."""
    cmd = [sys.executable, "-m", "featcache", "extract", "torchvision:resnet18", str(folder)]
    cmd += ["--weights", "none", "--layers", "avgpool", "--cache-dir", str(cache), "-q", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    said = []
    for line in proc.stdout.splitlines():
        split, status = line.split()[0], re.findall(r"\[(\w+)\]", line)
        counts = re.search(r"(\d+) rows: (\d+) from the cache, (\d+) extracted", line)
        said.append(f"{split} [{status[-1] if status else '?'}]" + (f" {counts.group(0)}" if counts else ""))
    return said, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/dataset-changes", help="folder for the images and the cache")
    a = p.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    folder, cache = work / "digits", work / "cache"
    spare = write_folder(folder)
    moved = sorted((folder / "3").glob("*.png"))[0]
    steps = [
        ("first extraction", lambda: None, ()),
        ("nothing", lambda: None, ()),
        ("`--val-fraction 0.1` -> `0.2`", lambda: None, ("--val-fraction", "0.2")),
        (
            "one file moved to another class folder (a label fix)",
            lambda: moved.rename(folder / "5" / moved.name),
            (),
        ),
        (
            "one image added",
            lambda: shutil.copy2(spare[0], folder / spare[0].parent.name / spare[0].name),
            (),
        ),
    ]
    print("| change to the data | what `featcache extract` did | seconds |\n| --- | --- | --- |")
    for name, change, extra in steps:
        change()
        said, seconds = extract(folder, cache, *extra)
        print(f"| {name} | {'; '.join(said)} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
