"""Kill ``extract`` with SIGKILL at random points, resume it, and compare the table's rows byte for byte
with an uninterrupted run's (issue #16: "100 random SIGKILLs of extract resume byte-identical").

Each extraction runs in a child process forked from this one (the library call ``featcache extract``
makes: the same record, shards and commits; forking skips re-importing torch for each of the ~200
runs). A kill waits for a random number of committed segments, then a random part of one shard's
time, so kills land while loading the model, hashing, extracting a batch, writing a shard and
committing it. After each kill the same extraction runs again to completion in the same cache; every
row of the resumed table (each layer and channel statistic) must equal the uninterrupted table's row
of the same image, byte for byte, and no image may be missing::

    python benchmarks/kill_resume.py --kills 100 --rows 300 --work /tmp/kills

A run that finishes before its kill is drawn again (and reported), so ``--kills`` SIGKILLs land. It
prints one line per run and a JSON summary (``--out`` writes it too).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np

LAYERS = ("layer2", "penultimate")  # a map (with channel statistics) and a vector


def run_extract(cache_dir: str, rows: int, batch_size: int, shard_rows: int | None) -> None:
    """One ``extract`` of the digits subset, in this (child) process, single-threaded."""
    import torch

    from featcache.backbones.registry import load_backbone
    from featcache.data.datasets import load_dataset
    from featcache.extraction.build import extract
    from featcache.extraction.config import ExtractConfig

    torch.set_num_threads(1)  # the same arithmetic in every child
    backbone = load_backbone("torchvision:resnet18", weights="none")
    splits = load_dataset("digits", limit=rows, val_fraction=0, test_fraction=0)
    config = ExtractConfig(
        pool="none", input_size=(32, 32), device="cpu", batch_size=batch_size, shard_rows=shard_rows
    )
    extract(backbone, splits.train, LAYERS, config, cache_dir=cache_dir, progress=False)


def warm_up(rows: int) -> None:
    """Import what a child needs before forking it (each child then starts in milliseconds); one thread,
    so no OpenMP pool exists to be forked."""
    import torch

    import featcache.extraction.build  # noqa: F401
    from featcache.data.datasets import load_dataset

    torch.set_num_threads(1)
    load_dataset("digits", limit=rows, val_fraction=0, test_fraction=0)


def table_rows(cache_dir: Path) -> dict[str, bytes]:
    """Every row of the one table under ``cache_dir``: ``{digest: bytes of every layer and statistic}``."""
    from featcache.cache.store import FeatureCache

    cache = FeatureCache(cache_dir)
    (key,) = cache.entries()
    return cache.open(key).row_bytes()


def segments(cache_dir: Path) -> int:
    """Committed segments so far (0 before the table exists)."""
    return sum(1 for _ in cache_dir.glob("*/segments/*.json"))


def child(args: tuple[Any, ...]) -> multiprocessing.Process:
    p = multiprocessing.get_context("fork").Process(target=run_extract, args=args)
    p.start()
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=100, help="SIGKILLs that land before the run ends")
    ap.add_argument("--rows", type=int, default=300, help="digits images to extract")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--shard-rows", type=int, default=None, help="default: the automatic shard size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="/tmp/featcache-kills")
    ap.add_argument("--out", default=None, help="write the JSON summary here")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warm_up(a.rows)
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = np.random.default_rng(a.seed)
    job = (a.rows, a.batch_size, a.shard_rows)

    t0 = time.perf_counter()
    ref_dir = work / "reference"
    p = child((str(ref_dir), *job))
    p.join()
    assert p.exitcode == 0, f"the uninterrupted run failed ({p.exitcode})"
    run_seconds = time.perf_counter() - t0
    reference = table_rows(ref_dir)
    n_segments = segments(ref_dir)
    shard_seconds = run_seconds / max(n_segments, 1)
    print(f"reference: {len(reference)} rows in {n_segments} shards, {run_seconds:.2f} s")

    results: list[dict[str, Any]] = []
    i = 0
    while sum(r["killed"] for r in results) < a.kills and i < 3 * a.kills:  # a run may finish first
        cache_dir = work / f"kill{i:03d}"
        i += 1
        wait_for = int(rng.integers(0, n_segments))  # committed segments before the kill
        extra = float(rng.uniform(0, shard_seconds))
        p = child((str(cache_dir), *job))
        while p.is_alive() and segments(cache_dir) < wait_for:
            time.sleep(0.002)
        time.sleep(extra)
        killed = p.is_alive()
        if killed:
            os.kill(p.pid, signal.SIGKILL)
        p.join()
        before = segments(cache_dir)
        p = child((str(cache_dir), *job))  # the resume
        p.join()
        rows = table_rows(cache_dir) if p.exitcode == 0 else {}
        same = rows.keys() == reference.keys() and all(rows[d] == reference[d] for d in reference)
        differ = sum(rows.get(d) != reference[d] for d in reference)
        results.append({"killed": killed, "segments_at_kill": before, "resume_rc": p.exitcode, "same": same})
        print(
            f"run {i:3d}: {'killed' if killed else 'finished first'} with {before} segments committed; "
            f"resume rc {p.exitcode}; {'byte-identical' if same else f'{differ} rows DIFFER'}",
            flush=True,
        )
        shutil.rmtree(cache_dir, ignore_errors=True)
    landed = [r for r in results if r["killed"]]
    summary = {
        "kills": len(landed),
        "resumed_byte_identical": sum(r["same"] for r in landed),
        "runs_that_finished_before_the_kill": len(results) - len(landed),
        "those_byte_identical": sum(r["same"] for r in results if not r["killed"]),
        "rows": len(reference),
        "shards": n_segments,
        "batch_size": a.batch_size,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(summary))
    if a.out:
        Path(a.out).write_text(json.dumps({"summary": summary, "kills": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
