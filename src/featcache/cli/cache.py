"""``featcache extract | cache``: the feature cache from the command line."""

from __future__ import annotations

import argparse

from .._util import FeatcacheError
from ..backbones.registry import load_backbone
from ..cache.store import CachedFeatures, FeatureCache
from ..data.config import DataConfig
from ..extract.build import extract_splits
from ..extract.config import ExtractConfig
from ..extract.distributed import ranks_from_env
from ..runs.report import format_table
from .flags import from_args
from .models import print_json


def cmd_extract(a: argparse.Namespace) -> None:
    ranks = ranks_from_env()  # several processes under torchrun: each extracts a share of the shards
    bb = load_backbone(a.model, a.weights, input_size=a.input_size)
    splits = from_args(DataConfig, a).load()
    config = from_args(ExtractConfig, a)
    feats = extract_splits(
        bb, splits, a.layers, config, cache_dir=a.cache_dir, progress=not a.quiet, ranks=ranks
    )
    if ranks is not None:
        ranks.close()
        if not ranks.is_main:
            return
    if a.json:
        print_json(
            {split: counts(f) | {"table": f.key, "split_key": f.split_key} for split, f in feats.items()}
        )
        return
    for split, f in feats.items():
        shapes = ", ".join(f"{k} {list(v.shape[1:])}" for k, v in f.features.items())
        status = "hit" if f.hit else ("built" if not f.from_cache else "appended")
        print(f"{split:5s} {f.key[:16]}  {count_text(f)}  {shapes}  [{status}]  {f.path}")


def counts(f: CachedFeatures) -> dict[str, int]:
    """A split's row counts: from the cache, extracted in this call, images skipped as unreadable."""
    return {
        "rows": f.rows,
        "from_cache": f.from_cache,
        "extracted": f.extracted,
        "skipped": len(f.manifest["skipped"]),
    }


def count_text(f: CachedFeatures) -> str:
    """``N rows: K from the cache, M extracted`` (and the unreadable images skipped)."""
    c = counts(f)
    skipped = f", {c['skipped']} skipped (unreadable)" if c["skipped"] else ""
    return f"{c['rows']} rows: {c['from_cache']} from the cache, {c['extracted']} extracted{skipped}"


def cmd_cache(a: argparse.Namespace) -> None:
    cache = FeatureCache(a.cache_dir)
    if a.action in ("info", "verify", "rm", "compact") and not a.key:
        raise FeatcacheError(f"`featcache cache {a.action}` needs a KEY (see `featcache cache ls`)")
    if a.action == "ls":
        _cache_ls(cache, a.json)
    elif a.action == "info":
        print_json(cache.info(a.key))
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


def _cache_ls(cache: FeatureCache, as_json: bool) -> None:
    entries = cache.ls()
    if as_json:
        print_json(entries)
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
