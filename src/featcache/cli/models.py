"""``featcache models | layers | summary``: choosing a model and a layer."""

from __future__ import annotations

import argparse
import fnmatch
import sys
from typing import TYPE_CHECKING

from .._catalog import catalog
from .._checks import check_number
from .._errors import FeatcacheError, unknown
from .._format import format_table
from ..cache.housekeeping import cache_root
from .show import print_json

if TYPE_CHECKING:
    from ..backbones.registry import Backbone


def _backbone(model: str, weights: str | None, size: tuple[int, int] | None) -> Backbone:
    # Imported here: `featcache models` lists names from the memo (featcache._catalog) without torch.
    from ..backbones.registry import load_backbone

    return load_backbone(model, weights, input_size=size)


def cmd_models(a: argparse.Namespace) -> None:
    cat = catalog(cache_root())
    if a.source is not None and a.source not in cat["models"]:
        known = sorted(cat["models"])
        raise unknown("backbone source", a.source, known, f"Use one of: {', '.join(known)}.")
    sources = [a.source] if a.source else sorted(cat["models"])
    offline = {m for src in sources for m in cat["offline"][src]}
    # a plain word is a part of the name (`models resnet18` lists torchvision:resnet18 and timm:resnet18)
    pattern = a.filter if any(c in a.filter for c in "*?[") else f"*{a.filter}*"
    names = sorted(
        m
        for src in sources
        for m in cat["models"][src]
        if fnmatch.fnmatch(m, pattern) and (not a.offline or m in offline)
    )
    for m in names:
        print(f"{m}  (weights offline)" if m in offline else m)
    here = sum(m in offline for m in names)
    models = "model" if len(names) == 1 else "models"
    load = "loads its" if here == 1 else "load their"
    print(
        f"{len(names)} {models}: {here} {load} weights offline (marked), {len(names) - here} download "
        "them on first use (without internet: --weights none for random init, or --weights PATH)",
        file=sys.stderr,
    )


def cmd_layers(a: argparse.Namespace) -> None:
    from ..backbones.layers import list_layers

    check_number("depth", a.depth, 0, integer=True, none="all")
    size = tuple(a.input_size) if a.input_size else None
    bb = _backbone(a.model, a.weights, size)
    rows = [r for r in list_layers(bb, size) if a.depth is None or r.depth <= a.depth]
    if a.json:
        print_json(
            [
                {
                    "name": r.name,
                    "type": r.type,
                    "shape": r.shape,
                    "params": r.params,
                    "layout": r.layout,
                    "extractable": r.refused is None,
                    "refused": r.refused,
                }
                for r in rows
            ]
        )
        return
    size = size or bb.cfg.input_size
    print(f"{bb.cfg.spec}  input {[1, bb.cfg.channels, *size]}  weights {bb.cfg.weights}")
    table = [
        {
            "layer": r.name,
            "type": r.type,
            "output shape": str(list(r.shape)) if r.shape else "-",  # as summary shows it
            # '?': stored as is only (--pool none/flatten); 'no': cannot be extracted
            "layout": "no" if r.refused else (r.layout or ("?" if r.shape else "-")),
            "params": r.params,
        }
        for r in rows
    ]
    print(format_table(table))
    refused = [r for r in rows if r.refused]
    if refused:
        print(f"\nlayout 'no': {len(refused)} layers cannot be extracted: {refused[0].refused}")
    if any(r.shape and not r.layout and not r.refused for r in rows):
        print("layout '?': unknown, such layers are extracted with --pool none or flatten only")


def cmd_summary(a: argparse.Namespace) -> None:
    check_number("depth", a.depth, 0, integer=True, none="all")
    from ..backbones.layers import summarize
    from ..train.freeze import TrainableSpec, plan_freeze

    bb = _backbone(a.model, a.weights, a.input_size)
    if a.train:  # what a fine-tuning plan would train: the plan's own freezing, the classifier kept
        classifier = bb.model.get_submodule(bb.cfg.classifier) if isinstance(bb.cfg.classifier, str) else None
        classes = getattr(classifier, "out_features", 0)
        if not classes:
            raise FeatcacheError(f"--train {a.train}: {bb.cfg.spec} has no Linear classifier to keep")
        plan_freeze(bb, TrainableSpec.parse(a.train), classes, input_size=a.input_size)
    s = summarize(bb, a.input_size, a.depth)
    if a.json:
        print_json(
            {
                "model": s.spec,
                "rows": [r.__dict__ for r in s.rows],
                "params": s.params,
                "trainable": s.trainable,
                "macs": s.macs,
            }
        )
        return
    rows = [
        {
            "layer": ("  " * (r.depth - 1)) + r.name,
            "type": r.type,
            "output shape": str(list(r.shape)) if r.shape else "-",
            "params": r.params,
            "trainable": r.trainable,
        }
        for r in s.rows
    ]
    print(format_table(rows))
    print(
        f"\ntotal params: {s.params:,}\ntrainable params: {s.trainable:,} "
        + (f"(with --train {a.train})" if a.train else "(featcache loads backbones frozen; see --train SPEC)")
        + f"\nnon-trainable params: {s.params - s.trainable:,}"
    )
    if s.macs is not None:
        h, w = s.input_size
        print(f"MACs per image at {h}x{w}: {s.macs / 1e9:.3f} G (torch FlopCounterMode, FLOPs/2)")
