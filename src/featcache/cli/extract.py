"""``featcache extract``: a backbone's layers over a dataset into the cache."""

from __future__ import annotations

import argparse

from ..backbones.registry import load_backbone
from ..data.config import DataConfig
from ..extract.build import extract_splits
from ..extract.config import ExtractConfig, parse_layers
from ..extract.distributed import ranks_from_env
from .flags import from_args


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
