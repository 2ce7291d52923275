"""``featcache export | predict | demo | bench``."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from .._checks import check_device, check_number
from .._errors import FeatcacheError, unknown
from ..export.config import FORMATS
from ..tools.config import QUICK, BenchConfig, check_bench_options
from .show import print_json

# Each verb checks its options here and imports its job (and torch) only after: a usage error is
# reported in a fraction of a second.


def cmd_export(a: argparse.Namespace) -> None:
    if a.format not in FORMATS:
        raise unknown("export format", a.format, FORMATS, f"Use --format {'|'.join(FORMATS)}.")
    from ..export.build import read_info
    from ..export.save import export_run, load_hint
    from ..runs.folder import RunFolder

    note = RunFolder.resolve(a.run)[1]
    if note:
        print(note)
    path = export_run(a.run, a.format, a.out, weights=a.weights)
    print(f"exported {path}")
    print(load_hint(path, read_info(path)))


def cmd_predict(a: argparse.Namespace) -> None:
    check_number("top_k", a.top_k, 1, integer=True)  # before any image is read
    check_number("batch_size", a.batch_size, 1, integer=True)
    check_device(a.device)
    from ..data.samples import IMAGE_EXTENSIONS, image_paths
    from ..export.predict import load_predictor
    from ..runs.folder import RunFolder

    paths = []
    for target in a.images:
        found = image_paths(target)
        if not found:  # an empty folder (or one of .txt files) would otherwise print nothing and exit 0
            kinds = ", ".join(IMAGE_EXTENSIONS)
            raise FeatcacheError(f"no image files under {target!r} (looked for {kinds})")
        paths += found
    note = RunFolder.resolve(a.model)[1] if Path(a.model).is_dir() else ""
    if note:
        print(note, file=sys.stderr)
    predictor = load_predictor(a.model, device=a.device)
    results = predictor.predict_files(paths, top_k=a.top_k, batch_size=a.batch_size, progress=not a.quiet)
    if a.json:
        print_json(results)
    else:
        for r in results:
            if "error" in r:
                print(f"{r['path']}: ERROR {r['error']}")
            elif predictor.task == "regress":
                print(f"{r['path']}: " + ", ".join(f"{t['target']} {t['value']:.4g}" for t in r["top"]))
            elif predictor.task == "multilabel":
                labels = ";".join(t["class"] for t in r["top"]) or "(no label)"
                probs = ", ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"])
                print(f"{r['path']}: {labels}" + (f"  ({probs})" if probs else ""))
            else:
                print(f"{r['path']}: " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"]))
    bad = [r for r in results if "error" in r]
    if bad:
        print(f"{len(bad)} of {len(results)} files could not be read", file=sys.stderr)


def cmd_demo(a: argparse.Namespace) -> None:
    check_device(a.device)
    from ..tools.demo import run_demo

    run_demo(quick=a.quick, out_dir=a.out, cache_dir=a.cache_dir, device=a.device, progress=not a.quiet)


def cmd_bench(a: argparse.Namespace) -> None:
    only = [name.strip() for name in a.only.split(",") if name.strip()] if a.only else None
    check_bench_options(only, a.repeats)
    check_number("rows", a.rows, 1, integer=True, why="images of the scale benchmark")
    check_device(a.device)
    from ..tools.bench import run_bench

    run_bench(
        quick=a.quick,
        device=a.device,
        out=a.out,
        repeats=a.repeats,
        only=only,
        progress=not a.quiet,
        config=replace(QUICK if a.quick else BenchConfig(), scale_rows=a.rows),
    )
