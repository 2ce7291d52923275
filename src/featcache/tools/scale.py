"""``featcache bench --only scale [--rows N]``: what a run costs on an N-image folder, as ratios to floors.

An ImageFolder of N tiny distinct PPM files in 100 classes and a feature table of it in the real
format: the files hashed through the real digest memo, the rows (512-d float16, the shape of a ResNet
penultimate at half the width) appended through the real writer in the shards extraction would cut, for
a cheap registered backbone (``scalebench:linear512``: one 192 x 512 linear layer) whose forward is a
rounding error, so every figure is featcache's own cost. Each operation runs in a fresh process, as a
command would, and reports its CPU seconds and peak RSS:

- **hit**: ``extract`` with nothing to extract (list, stat, memo, choose the table, read the split,
  check its shards as ``featcache extract`` does), against the floor: ``os.scandir`` + ``stat`` of
  every file; the least of three rounds of each, floor and hit in turn.
- **add 1 %**: the same after 1 % new images were added, against the hit plus the extraction of those
  images alone into an empty cache.
- ``cache ls`` seconds; the index parse in microseconds per row.
- **train epoch**: a linear head's epoch over the split, against the matmul floor.
- peak RSS per row of a hit.

- **probe**: the linear probe's peak RSS over the table's float32 size (:func:`probe_row`).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SCALE_MODEL = "scalebench:linear512"
CLASSES = 100
SIDE = 8  # 8 x 8 RGB images: 203-byte files
WIDTH = 512
_HEADER = f"P6\n{SIDE} {SIDE}\n255\n".encode()


def register_scale_backbone() -> None:
    """Register ``scalebench:linear512`` (once per process): flatten an 8 x 8 image, one linear layer to
    512 features, ReLU, a 100-class classifier."""
    from ..backbones.registry import list_sources, register_source

    if "scalebench" not in list_sources():
        register_source("scalebench", lister=lambda: ["linear512"])(_scale_backbone)


def _scale_backbone(name: str, weights: str | None) -> Any:
    from torch import nn

    from ..backbones.preprocessing import Preprocessing
    from ..backbones.registry import BackboneCfg, finish, seeded_init

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Flatten(), nn.Linear(3 * SIDE * SIDE, WIDTH), nn.ReLU(), nn.Linear(WIDTH, CLASSES)
        )

    pre = Preprocessing((SIDE, SIDE), resize_size=0)
    return finish(seeded_init(build), BackboneCfg(f"scalebench:{name}", pre, weights="none", classifier="3"))


def _config() -> Any:
    from ..extraction.config import ExtractConfig

    return ExtractConfig(input_size=(SIDE, SIDE), device="cpu", dtype="float16", batch_size=256)


def write_images(root: Path, start: int, count: int, seconds_ago: float = 3600.0) -> None:
    """Write images ``start .. start+count-1`` as ``root/cNNN/IIIIIII.ppm`` (distinct: the index is in
    the pixels), dated ``seconds_ago`` (a folder that is not brand new)."""
    from tqdm.auto import tqdm

    for c in range(CLASSES):
        (root / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
    t = time.time() - seconds_ago
    rng = np.random.default_rng(start)
    step = 65536
    with tqdm(total=count, desc="write images", unit="img", delay=2) as bar:
        for s in range(start, start + count, step):
            n = min(step, start + count - s)
            pixels = rng.integers(0, 256, (n, 3 * SIDE * SIDE), dtype=np.uint8)
            pixels[:, :8] = np.arange(s, s + n, dtype=np.uint64)[:, None].view(np.uint8)
            for j in range(n):
                i = s + j
                path = os.path.join(root, f"c{i % CLASSES:03d}", f"{i:07d}.ppm")
                with open(path, "wb") as f:
                    f.write(_HEADER + pixels[j].tobytes())
                os.utime(path, (t, t))
            bar.update(n)


def fill_table(tree: Path, cache: Path) -> str:
    """The table of ``tree`` for :data:`SCALE_MODEL`, its rows written through the real writer in the
    shards extraction cuts (random float16 values: a hit never looks at them); returns its key."""
    from ..backbones.registry import load_backbone
    from ..cache.store import FeatureCache
    from ..cache.writer import write_segment
    from ..extraction.build import cache_record
    from ..extraction.extractor import Extractor, shard_rows

    register_scale_backbone()
    bb, cfg = load_backbone(SCALE_MODEL, "none"), _config()
    digests = list(dict.fromkeys(_splits(str(tree), str(cache)).train.digests()))
    fc = FeatureCache(cache)
    table = fc.create(cache_record(bb, ["penultimate"], cfg))
    ex = Extractor(bb, table.layers, cfg)
    per = shard_rows(ex, len(digests))
    rng = np.random.default_rng(0)
    # one run, as one extraction commits it (the merge policy's unit: cache.table.merge_plan)
    info = {"process": 0, "method": ex.net.method, "layer_layouts": ex.layouts, "seconds": 0.0, "run": "fill"}
    for s in range(0, len(digests), per):
        part = digests[s : s + per]
        rows = rng.standard_normal((len(part), WIDTH), dtype=np.float32).astype(np.float16)
        write_segment(
            table.path, table.layers, {"penultimate": rows}, part, {}, "float16", info,
            layouts=ex.stored_layouts(),
        )  # fmt: skip
    return table.key


def _splits(tree: str, cache: str, val: float = 0.0, test: float = 0.0) -> Any:
    """The tree's splits as the command line loads them: every file's digest through the cache's memo
    (as ``DataConfig.load`` passes it), so a file is hashed once across the bench's processes."""
    from ..data.datasets import load_dataset
    from ..data.digests import DIGEST_MEMO, DigestMemo

    memo = DigestMemo(os.path.join(cache, DIGEST_MEMO))
    return load_dataset(tree, val_fraction=val, test_fraction=test, memo=memo)


# --------------------------------------------------------------------------- one operation per process


def _usage() -> tuple[float, int]:
    """CPU seconds of this process and its peak RSS in bytes (``VmHWM``: getrusage's ``ru_maxrss`` keeps
    the parent's peak across fork and exec)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    peak = r.ru_maxrss * 1024
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    return r.ru_utime + r.ru_stime, peak


#: CPU seconds when an operation's imports were done (what featcache's own work is measured from)
_MARK: list[float] = []


def _imported() -> None:
    _MARK.append(_usage()[0])


def _op_floor(tree: str) -> dict[str, Any]:
    n = 0
    for d in sorted(os.listdir(tree)):
        with os.scandir(os.path.join(tree, d)) as it:
            for e in it:
                e.stat()
                n += 1
    return {"files": n}


def _op_extract(tree: str, cache: str) -> dict[str, Any]:
    """What ``featcache extract`` does: list, digests, choose, append what is missing, read the split,
    and check the shards of rows from the cache."""
    from ..backbones.registry import load_backbone
    from ..extraction.build import extract_splits

    register_scale_backbone()
    bb = load_backbone(SCALE_MODEL, "none")
    _imported()
    splits = _splits(tree, cache)
    feats = extract_splits(bb, splits, ["penultimate"], _config(), cache_dir=cache, progress=False)
    for f in feats.values():
        if f.from_cache:
            f.check()
    return {
        "rows": sum(f.rows for f in feats.values()),
        "extracted": sum(f.extracted for f in feats.values()),
    }


def _op_index(cache: str, key: str) -> dict[str, Any]:
    from ..cache.store import FeatureCache

    t0 = time.process_time()
    index = FeatureCache(cache).open(key).index()
    return {"rows": len(index.where), "parse_s": time.process_time() - t0}


def _op_train(tree: str, cache: str) -> dict[str, Any]:
    """One linear head's epochs over the split read from the table, and the matmul floor of an epoch."""
    import torch

    from ..backbones.registry import load_backbone
    from ..extraction.build import extract
    from ..train.config import TrainConfig
    from ..train.fit import fit
    from ..train.heads import HeadSpec, build_head
    from ..train.sources import FeatureSource

    register_scale_backbone()
    torch.set_num_threads(1)
    bb = load_backbone(SCALE_MODEL, "none")
    _imported()
    train = _splits(tree, cache).train
    feats = extract(bb, train, ["penultimate"], _config(), cache_dir=cache, progress=False)
    x, y = feats.tensor("penultimate", dtype=torch.float32), torch.as_tensor(feats.labels)
    bs = 1024
    cfg = TrainConfig(epochs=2, batch_size=bs, optimizer="adam", schedule="constant", weight_decay=0.0)
    src = FeatureSource(x, y, device=torch.device("cpu"))
    res = fit(build_head(HeadSpec("linear"), (WIDTH,), CLASSES), src, None, CLASSES, cfg, progress=False)
    w = torch.zeros(CLASSES, WIDTH)
    t0 = time.perf_counter()
    for i in range(0, len(x), bs):
        xb = x[i : i + bs]
        (xb @ w.t()).t() @ xb
    return {"epoch_s": res.seconds / cfg.epochs, "matmul_s": time.perf_counter() - t0}


def _rss() -> int:
    """This process's resident bytes now (``VmRSS``)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _op_probe(tree: str, cache: str) -> dict[str, Any]:
    """``featcache probe``'s work on the table: the splits (80/10/10) read from the cache, the
    regularisation path (capped iterations: the memory, not the fit, is measured), the refit, test. The
    peak is reset once the splits are open (``clear_refs``), so the probe's own peak is its own."""
    import torch

    from ..backbones.registry import load_backbone
    from ..extraction.build import extract_splits
    from ..train.probe import ProbeConfig, linear_probe
    from ..train.sources import source_for

    register_scale_backbone()
    torch.set_num_threads(1)
    bb = load_backbone(SCALE_MODEL, "none")
    _imported()
    splits = _splits(tree, cache, 0.1, 0.1)
    feats = extract_splits(bb, splits, ["penultimate"], _config(), cache_dir=cache, progress=False)
    src = {k: source_for(v, "penultimate", torch.device("cpu")) for k, v in feats.items()}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM: what follows is the probe's peak
    before = _rss()
    cfg = ProbeConfig(strengths=(1e-4, 1e-2), max_iter=5)
    res = linear_probe(src["train"], src["val"], src["test"], CLASSES, cfg, progress=False)
    rows = sum(len(v) for v in src.values())
    return {
        "rows": rows,
        "table_f32": rows * WIDTH * 4,
        "rss_before": before,
        "iterations": res.extra["iterations"],
    }


_OPS: dict[str, Callable[..., dict[str, Any]]] = {
    "floor": _op_floor,
    "extract": _op_extract,
    "index": _op_index,
    "train": _op_train,
    "probe": _op_probe,
}


def _child(op: str, *args: str) -> None:
    """Run one operation in this (fresh) process and print its figures as JSON."""
    cpu0, wall0 = _usage()[0], time.perf_counter()
    got = _OPS[op](*args)
    cpu, rss = _usage()
    work = cpu - (_MARK[0] if _MARK else cpu0)
    figures = {
        "seconds": time.perf_counter() - wall0,
        "cpu_s": cpu - cpu0,
        "work_cpu_s": work,
        "peak_rss": rss,
    }
    print(json.dumps({**got, **figures}))


def _run(op: str, *args: str) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "featcache.tools.scale", op, *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"scale bench step {op!r} failed:\n{proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _command(*argv: str) -> dict[str, Any]:
    """``featcache ARGV`` as a user runs it, in a fresh process: its wall and CPU seconds (``os.wait4``:
    that child's own; its ``ru_maxrss`` would keep this process's peak across the fork, so no RSS)."""
    # stderr to a file, not a pipe: nobody reads a pipe while wait4 waits, so a chatty child would block
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "featcache", *argv], stdout=subprocess.DEVNULL, stderr=err,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            text = err.read().decode(errors="replace")
            raise RuntimeError(f"featcache {' '.join(argv)} failed:\n{text[-2000:]}")
    return {"seconds": seconds, "cpu_s": usage.ru_utime + usage.ru_stime}


def probe_row(tree: Path, cache: Path, key: str, rows: int) -> dict[str, Any] | None:
    """The probe's row: its own peak RSS (from the splits opened to the head tested, above what the process
    held before: imports, the opened splits) over the table's float32 size (target <= 1.5x: the rows in
    RAM once, as float32, plus the solver's chunks)."""
    probe = _run("probe", str(tree), str(cache))
    own = probe["peak_rss"] - probe["rss_before"]
    return _ratio_row(
        "scale: probe's own peak RSS / table float32 size",
        own / 2**30,
        probe["table_f32"] / 2**30,
        1.5,
        f"{probe['rows']} rows x {WIDTH} float16, {CLASSES} classes, {probe['iterations']} L-BFGS "
        "iterations; "
        f"peak {probe['peak_rss'] / 2**20:.0f} MB of which {probe['rss_before'] / 2**20:.0f} MB held before "
        f"the probe (imports, the opened splits), table {probe['table_f32'] / 2**20:.0f} MB as float32; "
        f"whole process: {probe['peak_rss'] / probe['table_f32']:.2f}x the table",
    )


def _least_of(
    rounds: int, floor: Callable[[], dict[str, Any]], op: Callable[[], dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The least CPU time of the floor and of the operation over ``rounds`` rounds, each round running
    one after the other: a machine that slows down for a while (a neighbour, the kernel's caches)
    slows both alike instead of whichever ran then."""
    floors, ops = [], []
    for _ in range(rounds):
        floors.append(floor())
        ops.append(op())
    return min(floors, key=lambda r: r["cpu_s"]), min(ops, key=lambda r: r["work_cpu_s"])


def _ratio_row(name: str, value: float, floor: float, target: float | None, detail: str) -> dict[str, Any]:
    """A row whose ratio is featcache's seconds over its floor's (lower is better; ``target``: at most)."""
    ratio = value / floor if floor > 0 else None
    return {
        "name": name,
        "featcache_s": value,
        "baseline_s": floor,
        "ratio": ratio,
        "target": f"<= {target:g}x the floor" if target is not None else "(informative)",
        "pass": None if target is None or ratio is None else ratio <= target,
        "detail": detail,
    }


def scale_rows(rows: int, tmp: Path, progress: bool = True) -> list[dict[str, Any]]:
    """Build the N-row folder and table under ``tmp`` and measure each operation in a fresh process.

    Example:
        >>> rows = scale_rows(20_000, Path("/tmp/scale"))  # doctest: +SKIP
    """
    tree, cache, extra = tmp / "tree", tmp / "cache", tmp / "added"
    write_images(tree, 0, rows)
    key = fill_table(tree, cache)
    _run("extract", str(tree), str(cache))  # the first hit records the shards' checks and racy memo rows
    floor, hit = _least_of(
        3, lambda: _run("floor", str(tree)), lambda: _run("extract", str(tree), str(cache))
    )
    ls = _command("cache", "ls", "--cache-dir", str(cache))
    index = _run("index", str(cache), key)
    added = max(1, rows // 100)
    write_images(tree, rows, added)
    write_images(extra, rows, added)  # the same images alone: their extraction into an empty cache
    time.sleep(0.1)
    alone = _run("extract", str(extra), str(tmp / "cache-alone"))
    add = _run("extract", str(tree), str(cache))
    train = _run("train", str(tree), str(cache))
    cpu = "CPU s after imports {:.2f} (whole process {:.2f}), floor {:.2f}; peak RSS {:.0f} MB"
    out = [
        _ratio_row(
            f"scale: hit / scandir+stat ({rows} files)",
            hit["work_cpu_s"],
            floor["cpu_s"],
            2.0,
            cpu.format(hit["work_cpu_s"], hit["cpu_s"], floor["cpu_s"], hit["peak_rss"] / 2**20)
            + f"; wall {hit['seconds']:.2f} s; {hit['peak_rss'] / rows:.0f} B peak RSS per row",
        ),
        _ratio_row(
            f"scale: add 1 % / (hit + its extraction) ({add['extracted']} new)",
            add["work_cpu_s"],
            hit["work_cpu_s"] + alone["work_cpu_s"],
            1.3,
            cpu.format(
                add["work_cpu_s"],
                add["cpu_s"],
                hit["work_cpu_s"] + alone["work_cpu_s"],
                add["peak_rss"] / 2**20,
            ),
        ),
        _ratio_row(
            "scale: cache ls (s, target < 0.5 s)",
            ls["cpu_s"],
            0.5,
            1.0,
            f"the whole command (python, imports, the listing): CPU {ls['cpu_s']:.2f} s, "
            f"wall {ls['seconds']:.2f} s",
        ),
        _ratio_row(
            "scale: index parse (µs per row)",
            index["parse_s"] / max(index["rows"], 1) * 1e6,
            1.0,
            None,
            f"{index['parse_s']:.3f} CPU s for {index['rows']} rows (segments, digests files, the index)",
        ),
        _ratio_row(
            "scale: train epoch / matmul floor",
            train["epoch_s"],
            train["matmul_s"],
            None,
            f"linear head, {CLASSES} classes, batch 1024, 1 thread; "
            f"peak RSS {train['peak_rss'] / 2**20:.0f} MB",
        ),
    ]
    probe = probe_row(tree, cache, key, rows)
    return out + ([probe] if probe is not None else [])


if __name__ == "__main__":
    _child(sys.argv[1], *sys.argv[2:])
