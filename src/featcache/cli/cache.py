"""``featcache cache``: list, inspect, verify and remove cache entries (no backbone, no data: it imports
the store alone, so it starts fast)."""

from __future__ import annotations

import argparse

from .._errors import FeatcacheError
from .._format import format_table
from ..cache.store import FeatureCache
from .show import print_json


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
