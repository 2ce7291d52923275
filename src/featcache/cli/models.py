"""``featcache models | layers | summary``: choosing a model and a layer."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..backbones.layers import count_macs, list_layers
from ..backbones.registry import list_models, load_backbone
from ..runs.report import format_table


def print_json(obj: Any) -> None:
    """Machine-readable output of every ``--json``."""
    print(json.dumps(obj, indent=2, default=str))


def cmd_models(a: argparse.Namespace) -> None:
    for m in list_models(a.filter, a.source):
        print(m)


def cmd_layers(a: argparse.Namespace) -> None:
    bb = load_backbone(a.model, a.weights)
    rows = [
        r
        for r in list_layers(bb, tuple(a.input_size) if a.input_size else None)
        if a.depth is None or r.depth <= a.depth
    ]
    if a.json:
        print_json([{"name": r.name, "type": r.type, "shape": r.shape, "params": r.params} for r in rows])
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
    bb = load_backbone(a.model, a.weights)
    size = tuple(a.input_size) if a.input_size else None
    rows = [r for r in list_layers(bb, size) if 0 < r.depth <= a.depth]
    total = sum(p.numel() for p in bb.model.parameters())
    trainable = sum(p.numel() for p in bb.model.parameters() if p.requires_grad)
    macs = count_macs(bb, size)
    if a.json:
        print_json(
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
