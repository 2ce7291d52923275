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
    if a.action in ("info", "verify", "rm") and not a.key:
        raise FeatcacheError(f"`featcache cache {a.action}` needs a KEY (see `featcache cache ls`)")
    if a.action == "ls":
        entries = cache.ls()
        if a.json:
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
                        "split": e.get("split"),
                        "rows": e.get("rows"),
                        "MB": round(e["bytes"] / 2**20, 2),
                        "created": e.get("created", ""),
                    }
                    for e in entries
                ]
            )
        )
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
    else:
        removed = cache.gc()
        for r in removed:
            print(f"removed {r}")
        print(
            f"{len(removed)} partial entries older than a day removed; complete entries stay (`cache rm KEY`)"
        )
