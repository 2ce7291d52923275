"""``featcache extract``: a backbone's layers over a dataset into the cache, with each split's counts;
``featcache embed``: the same, then one layer's rows of a split out to ``.npy`` + ``.csv`` or Parquet."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from .._errors import FeatcacheError
from ..cache.embed import EmbedConfig
from ..data.config import DataConfig
from ..extraction.config import ExtractConfig, parse_layers
from .flags import from_args
from .show import print_json

if TYPE_CHECKING:
    from ..cache.splits import CachedFeatures


def cmd_extract(a: argparse.Namespace) -> None:
    data, config = from_args(DataConfig, a), from_args(ExtractConfig, a)  # refused before any loading
    # torch loads from here on, once every setting is checked
    from ..backbones.registry import load_backbone
    from ..extraction.build import extract_splits
    from ..extraction.distributed import ranks_from_env

    ranks = ranks_from_env()  # several processes under torchrun: each extracts a share of the shards
    bb = load_backbone(a.model, a.weights, input_size=a.input_size)
    splits = data.load(a.cache_dir)
    layers = parse_layers(a.layers, bb)  # @blocks: every block
    feats = extract_splits(
        bb, splits, layers, config, cache_dir=a.cache_dir, progress=not a.quiet, ranks=ranks
    )
    if ranks is not None:
        ranks.close()
        if not ranks.is_main:
            return
    # A [hit] says the rows read back intact, not only that the table lists them: the shards of rows
    # from the cache are hashed now (once: a build's own shards were just written and are not).
    for f in feats.values():
        if config.verify and f.from_cache:
            f.check()
    if a.json:
        print_json({s: counts(f) | {"table": f.key, "split_key": f.split_key} for s, f in feats.items()})
        return
    for split, f in feats.items():
        shapes = ", ".join(f"{k} {list(v.shape[1:])}" for k, v in f.features.items())
        status = "hit" if f.hit else ("built" if not f.from_cache else "appended")
        print(f"{split:5s} {f.key[:16]}  {count_text(f)}  {shapes}  [{status}]")
    tables = sorted({str(f.path) for f in feats.values()})  # the splits usually share one table
    print(f"cache table{'s' if len(tables) > 1 else ''}: {', '.join(tables)}")
    skipped = [(split, s) for split, f in feats.items() for s in f.result.skipped]
    for split, (id_, why) in skipped[:5]:  # all of them are in each split's manifest (`cache info`)
        print(f"skipped ({split}): {id_}: {why}", file=sys.stderr)
    if len(skipped) > 5:
        print(
            f"... and {len(skipped) - 5} more skipped images (each split's manifest lists them)",
            file=sys.stderr,
        )


def cmd_embed(a: argparse.Namespace) -> None:
    data, config = from_args(DataConfig, a), from_args(ExtractConfig, a)  # refused before any loading
    embed = from_args(EmbedConfig, a)
    # torch loads from here on, once every setting is checked
    from ..backbones.registry import load_backbone
    from ..cache.embed import write_embeddings
    from ..extraction.build import extract_splits

    bb = load_backbone(a.model, a.weights, input_size=a.input_size)
    layers = parse_layers(embed.layer, bb)
    if len(layers) != 1:
        raise FeatcacheError(
            f"embed writes one layer, but {embed.layer!r} names {len(layers)}; run it once per layer"
        )
    splits = data.load(a.cache_dir)
    feats = extract_splits(bb, splits, layers, config, cache_dir=a.cache_dir, progress=not a.quiet)
    for split, f in feats.items():
        print(f"{split:5s} {f.key[:16]}  {count_text(f)}", file=sys.stderr)
    done = write_embeddings(feats, layers[0], embed.out, embed.split, progress=not a.quiet)
    shape = "x".join(map(str, done.row_shape))
    files = " and ".join(str(p) for p in done.paths)
    print(f"wrote {done.rows} rows of {layers[0]} ({shape}, {done.dtype}) to {files}")


def counts(f: CachedFeatures) -> dict[str, int]:
    """A split's row counts: from the cache, extracted in this call, images skipped as unreadable."""
    return {
        "rows": f.rows,
        "from_cache": f.from_cache,
        "extracted": f.extracted,
        "skipped": len(f.result.skipped),
    }


def count_text(f: CachedFeatures) -> str:
    """``N rows: K from the cache, M extracted`` (and the unreadable images skipped)."""
    c = counts(f)
    skipped = f", {c['skipped']} skipped (unreadable)" if c["skipped"] else ""
    return f"{c['rows']} rows: {c['from_cache']} from the cache, {c['extracted']} extracted{skipped}"
