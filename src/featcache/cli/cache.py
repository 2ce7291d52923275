"""``featcache extract | cache``: the feature cache from the command line."""

from __future__ import annotations

import argparse

from .._util import FeatcacheError
from ..backbones.registry import load_backbone
from ..cache.store import FeatureCache
from ..data.config import DataConfig
from ..extract.build import extract_splits
from ..extract.config import ExtractConfig, parse_layers
from ..extract.distributed import ranks_from_env
from ..runs.report import format_table
from .flags import from_args
from .models import print_json


def cmd_extract(a: argparse.Namespace) -> None:
    ranks = ranks_from_env()  # several processes under torchrun: each extracts a share of the shards
    bb = load_backbone(a.model, a.weights)
    splits = from_args(DataConfig, a).load()
    config = from_args(ExtractConfig, a)
    layers = parse_layers(a.layers, bb)  # @blocks: every block
    feats = extract_splits(
        bb, splits, layers, config, cache_dir=a.cache_dir, progress=not a.quiet, ranks=ranks
    )
    if ranks is not None:
        ranks.close()
        if not ranks.is_main:
            return
    for split, f in feats.items():
        shapes = ", ".join(f"{k} {list(v.shape[1:])}" for k, v in f.features.items())
        status = "hit" if f.hit else "built"
        print(f"{split:5s} {f.key[:16]}  {len(f):6d} rows  {shapes}  [{status}]  {f.path}")


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
