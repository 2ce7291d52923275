"""``featcache <verb>``: a thin command line over the library. No logic lives only here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .._util import FeatcacheError
from .parser import build_parser

_AMP = {"auto": None, "on": True, "off": False}


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _extract_config(a: argparse.Namespace) -> Any:
    from ..extract.config import ExtractConfig

    return ExtractConfig(
        pool=a.pool,
        dtype=a.dtype,
        batch_size=a.extract_batch_size,
        workers=a.workers,
        device=a.device,
        input_size=tuple(a.input_size) if a.input_size else None,
        on_bad_image=a.on_bad_image,
        method=a.method,
        amp=_AMP[a.amp],
    )


def _views(a: argparse.Namespace) -> Any:
    """`train`/`sweep --views K --augment ...`: cached augmented views (finetune's --augment is its own)."""
    from ..extract.config import Views

    return Views.parse(a.views, a.augment)


def _data_config(a: argparse.Namespace) -> Any:
    from ..data.config import DataConfig

    return DataConfig(a.data, a.val_fraction, a.test_fraction, a.split_seed, a.limit, a.download)


def cmd_models(a: argparse.Namespace) -> None:
    from ..backbones.registry import list_models

    for m in list_models(a.filter, a.source):
        print(m)


def cmd_layers(a: argparse.Namespace) -> None:
    from ..backbones.layers import list_layers
    from ..backbones.registry import load_backbone
    from ..runs.report import format_table

    bb = load_backbone(a.model, a.weights)
    rows = [
        r
        for r in list_layers(bb, tuple(a.input_size) if a.input_size else None)
        if a.depth is None or r.depth <= a.depth
    ]
    if a.json:
        _print_json([{"name": r.name, "type": r.type, "shape": r.shape, "params": r.params} for r in rows])
        return
    size = a.input_size or bb.cfg.input_size
    print(f"{bb.cfg.spec}  input 1x{bb.cfg.channels}x{size[0]}x{size[1]}  weights {bb.cfg.weights}")
    print(
        format_table(
            [
                {
                    "layer": r.name,
                    "type": r.type,
                    "output shape": "x".join(map(str, r.shape or ())) or "-",
                    "params": r.params,
                }
                for r in rows
            ]
        )
    )


def cmd_summary(a: argparse.Namespace) -> None:
    from ..backbones.layers import count_macs, list_layers
    from ..backbones.registry import load_backbone
    from ..runs.report import format_table

    bb = load_backbone(a.model, a.weights)
    size = tuple(a.input_size) if a.input_size else None
    rows = [r for r in list_layers(bb, size) if 0 < r.depth <= a.depth]
    total = sum(p.numel() for p in bb.model.parameters())
    trainable = sum(p.numel() for p in bb.model.parameters() if p.requires_grad)
    macs = count_macs(bb, size)
    if a.json:
        _print_json(
            {
                "model": bb.cfg.spec,
                "rows": [r.__dict__ for r in rows],
                "params": total,
                "trainable": trainable,
                "macs": macs,
            }
        )
        return
    print(
        format_table(
            [
                {
                    "layer": ("  " * (r.depth - 1)) + r.name,
                    "type": r.type,
                    "output shape": str(list(r.shape)) if r.shape else "-",
                    "params": r.params,
                    "trainable": r.trainable,
                }
                for r in rows
            ]
        )
    )
    h, w = size or bb.cfg.input_size
    print(
        f"\ntotal params: {total:,}\ntrainable params: {trainable:,}\n"
        f"non-trainable params: {total - trainable:,}"
    )
    if macs is not None:
        print(f"MACs per image at {h}x{w}: {macs / 1e9:.3f} G (torch FlopCounterMode, FLOPs/2)")


def cmd_extract(a: argparse.Namespace) -> None:
    from ..backbones.registry import load_backbone
    from ..extract.build import extract_splits
    from ..extract.distributed import ranks_from_env

    ranks = ranks_from_env()  # several processes under torchrun: each extracts a share of the shards
    bb = load_backbone(a.model, a.weights)
    splits = _data_config(a).load()
    feats = extract_splits(
        bb, splits, a.layers, _extract_config(a), cache_dir=a.cache_dir, progress=not a.quiet, ranks=ranks
    )
    if ranks is not None:
        ranks.close()
        if not ranks.is_main:
            return
    if a.json:
        _print_json(
            {split: _counts(f) | {"table": f.key, "split_key": f.split_key} for split, f in feats.items()}
        )
        return
    for split, f in feats.items():
        shapes = ", ".join(f"{k} {list(v.shape[1:])}" for k, v in f.features.items())
        status = "hit" if f.hit else ("built" if not f.from_cache else "appended")
        print(f"{split:5s} {f.key[:16]}  {_count_text(f)}  {shapes}  [{status}]  {f.path}")


def _counts(f: Any) -> dict[str, int]:
    """A split's row counts: from the cache, extracted in this call, images skipped as unreadable."""
    return {
        "rows": f.rows,
        "from_cache": f.from_cache,
        "extracted": f.extracted,
        "skipped": len(f.manifest["skipped"]),
    }


def _count_text(f: Any) -> str:
    c = _counts(f)
    skipped = f", {c['skipped']} skipped (unreadable)" if c["skipped"] else ""
    return f"{c['rows']} rows: {c['from_cache']} from the cache, {c['extracted']} extracted{skipped}"


def cmd_cache(a: argparse.Namespace) -> None:
    from ..cache.store import FeatureCache

    cache = FeatureCache(a.cache_dir)
    if a.action in ("info", "verify", "rm", "compact") and not a.key:
        raise FeatcacheError(f"`featcache cache {a.action}` needs a KEY (see `featcache cache ls`)")
    if a.action == "ls":
        _cache_ls(cache, a.json)
    elif a.action == "info":
        _print_json(cache.info(a.key))
    elif a.action == "verify":
        problems = cache.verify(a.key)
        for p in problems:
            print(f"BAD  {p}")
        if problems:
            raise FeatcacheError(
                f"cache {a.key} failed verification; remove it with `featcache cache rm {a.key}`"
            )
        print(f"OK   {cache.resolve(a.key)}")
    elif a.action == "rm":
        key = cache.resolve(a.key)
        cache.rm(key)
        print(f"removed {key}")
    elif a.action == "compact":
        before, after = cache.compact(a.key)
        print(f"compacted {cache.resolve(a.key)}: {before} segments -> {after}")
    else:
        removed = cache.gc(unused_for_s=a.unused_days * 86400 if a.unused_days is not None else None)
        for paths in removed.values():
            for r in paths:
                print(f"removed {r}")
        unused = (
            f"; {len(removed['unused'])} tables unused for {a.unused_days:g} days" if a.unused_days else ""
        )
        print(
            f"{len(removed['leftovers'])} partial entries (files of interrupted appends) and "
            f"{len(removed['old_format'])} entries of older cache formats removed{unused}; complete entries "
            "stay (`cache gc --unused-days N` removes tables unused for N days, `cache rm KEY` one table)"
        )


def _cache_ls(cache: Any, as_json: bool) -> None:
    from ..runs.report import format_table

    entries = cache.ls()
    if as_json:
        _print_json(entries)
        return
    print(f"cache root: {cache.root}")
    print(
        format_table(
            [
                {
                    "key": e["key"][:16],
                    "status": e["status"],
                    "model": e.get("model"),
                    "layers": ",".join(e.get("layers") or []),
                    "view": e.get("view"),
                    "rows": e.get("rows"),
                    "segments": e.get("segments"),
                    "MB": round(e["bytes"] / 2**20, 2),
                    "last used": e.get("last_used", ""),
                }
                for e in entries
            ]
        )
    )


def _train_config(a: argparse.Namespace) -> Any:
    from ..train.config import TrainConfig

    return TrainConfig(
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        optimizer=a.optimizer,
        weight_decay=a.weight_decay,
        schedule=a.schedule,
        warmup_epochs=a.warmup_epochs,
        label_smoothing=a.label_smoothing,
        standardize=a.standardize,
        patience=a.patience,
        monitor=a.monitor,
        seed=a.seed,
        device=a.device,
        amp=_AMP[getattr(a, "amp", "auto")],
        fast_paths=getattr(a, "fast_paths", True),
    )


def _head_spec(a: argparse.Namespace) -> Any:
    from ..train.heads import HeadSpec

    return HeadSpec(a.head, hidden=tuple(int(h) for h in a.hidden.split(",") if h), dropout=a.dropout)


def _folds(a: argparse.Namespace, head: Any) -> None:
    """`train|probe --folds K`: a head per fold on the cached train+val rows, mean +- std."""
    from ..runs.folds import folds_run

    tcfg = _train_config(a) if hasattr(a, "epochs") else None
    out = a.out if a.out else None
    res, feats = folds_run(
        a.model,
        _data_config(a),
        a.layer,
        _extract_config(a),
        a.folds,
        head,
        tcfg,
        out,
        a.weights,
        a.cache_dir,
        not a.quiet,
    )
    if getattr(a, "json", False):
        _print_json(res.to_dict())
        return
    for split, f in feats.items():
        print(f"{split}: {_count_text(f)}")
    for i, (acc, n) in enumerate(zip(res.acc, res.rows)):
        print(f"fold {i}: {n} held-out rows, accuracy {acc:.4f}")
    chosen = f" at L2 strength {res.extra['strength']:g}" if "strength" in res.extra else ""
    print(
        f"{res.folds}-fold cross-validation accuracy{chosen}: {res.mean:.4f} +- {res.std:.4f} "
        "(std over folds)"
    )
    if res.test_acc:
        print(f"test accuracy: {res.to_dict()['test_mean']:.4f} +- {res.to_dict()['test_std']:.4f}")


def cmd_train(a: argparse.Namespace) -> None:
    from ..runs.train import train_run

    spec = _head_spec(a)
    if a.folds:
        _folds(a, spec)
        return
    run = train_run(
        a.model,
        _data_config(a),
        a.layer,
        spec,
        _train_config(a),
        _extract_config(a),
        a.out,
        a.weights,
        a.cache_dir,
        not a.quiet,
        a.resume,
        a.overwrite,
        views_spec=_views(a),
    )
    m = run.metrics
    for split, c in m["cache_rows"].items():
        print(f"{split}: {c['rows']} rows: {c['from_cache']} from the cache, {c['extracted']} extracted")
    print(
        f"best epoch {m['best_epoch']}  train {m['train_seconds']:.2f}s  extract {m['extract_seconds']:.2f}s"
    )
    if "test" in m:
        top5 = f"  top-5 {m['test']['top5']:.4f}" if "top5" in m["test"] else ""
        print(f"test accuracy {m['test']['acc']:.4f}{top5}  loss {m['test']['loss']:.4f}")
    else:
        print("no test split: nothing was held out for testing (--test-fraction, or a larger --limit)")
    print(f"run folder: {run.dir}")


def cmd_finetune(a: argparse.Namespace) -> None:
    from ..runs.finetune import FinetuneConfig, finetune_run

    ft = FinetuneConfig(
        train=a.train,
        bn=a.bn,
        lr_decay=a.lr_decay,
        augment=a.augment,
        mode=a.mode,
        init_head=a.init_head,
        views=a.views,
    )
    run = finetune_run(
        a.model,
        _data_config(a),
        ft,
        _train_config(a),
        _extract_config(a),
        a.out,
        a.weights,
        a.cache_dir,
        not a.quiet,
        a.resume,
        a.overwrite,
    )
    m = run.metrics
    print(f"{m['mode']}: best epoch {m['best_epoch']}  train {m['train_seconds']:.2f}s")
    if "test" in m:
        print(f"test accuracy {m['test']['acc']:.4f}  loss {m['test']['loss']:.4f}")
    print(f"run folder: {run.dir}")


def cmd_sweep(a: argparse.Namespace) -> None:
    from ..extract.config import parse_layers
    from ..runs.report import format_table
    from ..runs.sweep import grid, sweep_run

    def floats(text: str | None) -> list[float]:
        return [float(v) for v in text.split(",") if v] if text else []

    layers = parse_layers(a.layers)
    spec = _head_spec(a)
    configs = grid(_train_config(a), lr=floats(a.lrs), weight_decay=floats(a.weight_decays))
    res = sweep_run(
        a.model,
        _data_config(a),
        layers,
        spec,
        configs,
        _extract_config(a),
        a.out,
        a.weights,
        a.cache_dir,
        not a.quiet,
        views_spec=_views(a),
    )
    if a.json:
        _print_json({"best": res.best, "rows": res.rows})
        return
    b = res.best
    columns = [k for k in b if k != "val_loss"]  # a diverged row shows "diverged" as its val_acc
    print(format_table([{**r, "val_acc": r.get("val_acc", "diverged")} for r in res.rows], columns))
    test = f", test {b['test_acc']:.4f}" if "test_acc" in b else ""
    print(f"chosen on val: {b['layer']} {b['run']} (val {b['val_acc']:.4f}{test})")
    n = len({r["layer"] for r in res.rows})
    print(f"one extraction for {n} layers: {res.extract_seconds:.1f}s; sweep folder: {res.out}")


def cmd_probe(a: argparse.Namespace) -> None:
    from ..runs.probe import ProbeConfig, probe_run
    from ..runs.report import format_table

    cfg = (
        ProbeConfig(strengths=tuple(float(s) for s in a.strengths.split(",")))
        if a.strengths
        else ProbeConfig()
    )
    if a.folds:
        _folds(a, cfg)
        return
    res = probe_run(
        a.model,
        _data_config(a),
        a.layer,
        _extract_config(a),
        cfg,
        a.out,
        a.weights,
        a.cache_dir,
        a.device,
        not a.quiet,
    )
    if a.json:
        _print_json({"strength": res.strength, "sweep": res.sweep, "test": res.test})
        return
    print(format_table(res.sweep))
    print(f"chosen L2 strength {res.strength:g} (on val); refit on train+val")
    if res.test:
        print(f"test accuracy {res.test['acc']:.4f}")
    if a.out:
        print(f"run folder: {a.out}  (export it with `featcache export {a.out}`)")


def cmd_export(a: argparse.Namespace) -> None:
    from ..export.save import export_run

    print(f"exported {export_run(a.run, a.format, a.out, weights=a.weights)}")


def cmd_predict(a: argparse.Namespace) -> None:
    from ..data.samples import image_paths
    from ..export.predict import load_predictor

    paths = [p for target in a.images for p in image_paths(target)]
    predictor = load_predictor(a.model, device=a.device)
    results = predictor.predict_files(paths, top_k=a.top_k, batch_size=a.batch_size, progress=not a.quiet)
    if a.json:
        _print_json(results)
    else:
        for r in results:
            if "error" in r:
                print(f"{r['path']}: ERROR {r['error']}")
            else:
                print(f"{r['path']}: " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"]))
    bad = [r for r in results if "error" in r]
    if bad:
        print(f"{len(bad)} of {len(results)} files could not be read", file=sys.stderr)
        if len(bad) == len(results):
            raise FeatcacheError(f"none of the {len(results)} files could be read (first: {bad[0]['error']})")


def cmd_demo(a: argparse.Namespace) -> None:
    from ..tools.demo import run_demo

    run_demo(quick=a.quick, out_dir=a.out, cache_dir=a.cache_dir, device=a.device, progress=not a.quiet)


def cmd_bench(a: argparse.Namespace) -> None:
    from ..tools.bench import run_bench

    run_bench(
        quick=a.quick,
        device=a.device,
        out=a.out,
        repeats=a.repeats,
        only=a.only.split(",") if a.only else None,
        progress=not a.quiet,
    )


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "models": cmd_models,
    "layers": cmd_layers,
    "summary": cmd_summary,
    "extract": cmd_extract,
    "cache": cmd_cache,
    "train": cmd_train,
    "finetune": cmd_finetune,
    "sweep": cmd_sweep,
    "probe": cmd_probe,
    "export": cmd_export,
    "predict": cmd_predict,
    "demo": cmd_demo,
    "bench": cmd_bench,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``featcache`` command; returns the exit status (2 on a user error)."""
    parser = build_parser()
    try:
        a = parser.parse_args(argv)
    except SystemExit as exc:  # a usage error (already printed) is a return value, like the others
        if not exc.code:
            raise  # --help
        return int(exc.code)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="featcache: %(message)s")
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and a.verb != "extract":
            raise FeatcacheError(
                f"`featcache {a.verb}` runs in one process; under torchrun only `extract` is sharded. "
                "Extract with torchrun first, then run this verb once: it finds the features in the cache"
            )
        COMMANDS[a.verb](a)
    except (FeatcacheError, FileNotFoundError, ValueError) as exc:
        if a.verbose:
            raise
        print(f"featcache {a.verb}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `featcache models | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(
            "interrupted; the cache shards and training checkpoints finished so far are kept: run the same "
            "command again (train/finetune with --resume) to go on from them",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
