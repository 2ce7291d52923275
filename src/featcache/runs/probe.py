"""The linear-probe protocol: L2-regularised logistic regression on cached features.

As in the CLIP paper's linear probes: the regularisation strength is chosen on the validation
split (models fitted on train only), then the model is refitted on train + val with that strength
and evaluated once on test. The test split never influences a choice, and no validation score is
reported for a model that saw the validation split (the leak in CLIP_benchmark issue #125).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._config import to_json
from .._util import FeatcacheError, resolve_device
from ..cache.rows import to_torch
from ..extraction.config import DEFAULT_LAYER
from ..train.fit import class_weights, evaluate
from ..train.heads import Head, HeadInfo, HeadSpec, Standardize, build_head
from ..train.logistic import (
    Part,
    RowBlocks,
    SoftmaxRegression,
    Solution,
    chunk_rows,
    fit_standardize_rows,
    small_problem_threads,
)
from ..train.sources import FeatureSource, source_for
from .config import CLASS_WEIGHTS, DEFAULT_STRENGTHS, METRICS, ProbeConfig  # noqa: F401  (no torch)
from .job import Job
from .report import most_confused
from .spec import RunSpec
from .target_probes import probe_task
from .train import write_mistakes


@dataclass
class ProbeResult:
    """Chosen strength, the path's validation scores, and the refitted head's test metrics."""

    strength: float
    sweep: list[dict[str, float]]
    test: dict[str, Any] | None
    head: Head
    info: HeadInfo
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        key = next((k for k in ("acc", "map", "r2") if k in (self.test or {})), None)
        test = f", test_{key}={self.test[key]:.4g}" if self.test and key else ""
        return f"ProbeResult(strength={self.strength:g}, strengths tried={len(self.sweep)}{test})"


def _problem(
    z: torch.Tensor | RowBlocks, y: torch.Tensor, num_classes: int, config: ProbeConfig
) -> SoftmaxRegression:
    """The rows of one fit or path, prepared once (:class:`~featcache.train.logistic.SoftmaxRegression`)."""
    return SoftmaxRegression(z, y, num_classes, class_weights(y, num_classes, config.class_weight))


def _lbfgs(
    problem: SoftmaxRegression, strength: float, config: ProbeConfig, start: Solution | None = None
) -> Solution:
    """Full-batch L-BFGS for mean cross-entropy + ``strength``/2 |W|^2 on the problem's rows.

    It stops when the largest gradient entry is below ``config.tol`` or the loss stops changing, as
    scikit-learn's ``lbfgs`` solver does, from ``start`` (a warm start along the path) or from zero.

    Example:
        >>> rows = _problem(torch.randn(100, 8), torch.randint(0, 3, (100,)), 3, ProbeConfig())
        >>> fit = _lbfgs(rows, 1e-3, ProbeConfig())
    """
    return problem.fit(strength, config.max_iter, config.tol, start)


def fit_logistic(
    x: torch.Tensor | RowBlocks,
    y: torch.Tensor,
    num_classes: int,
    strength: float,
    max_iter: int = 200,
    standardize: bool = True,
    tol: float = 1e-6,
) -> Head:
    """One L2-regularised logistic regression as a ``linear`` head (standardisation folded in front).

    Solved tighter (``tol``) than the probe's path, whose strengths only need ranking on val. ``x`` may
    be :class:`~featcache.train.logistic.RowBlocks` (some rows of a split, or a split streamed from its
    memory maps): the rows are read by chunks and never copied.

    Example:
        >>> head = fit_logistic(torch.randn(100, 8), torch.randint(0, 3, (100,)), 3, 1e-3)
    """
    blocks = x if isinstance(x, RowBlocks) else RowBlocks([Part(x)])
    std = fit_standardize_rows(blocks) if standardize else None
    config = ProbeConfig(max_iter=max_iter, tol=tol)
    with small_problem_threads(blocks, num_classes):
        fit = _lbfgs(_problem(blocks.standardized(std), y, num_classes, config), strength, config)
    return _head(fit, std, blocks.row_shape, num_classes)


def _scores(
    fit: Solution, z: torch.Tensor | RowBlocks, y: torch.Tensor, num_classes: int
) -> dict[str, float]:
    """Validation loss, accuracy and balanced accuracy of one solution (no head built), by chunks."""
    blocks = z if isinstance(z, RowBlocks) else RowBlocks([Part(z)])
    loss = torch.zeros((), dtype=torch.float64, device=blocks.device)
    hit = torch.zeros(len(blocks), device=blocks.device)
    with torch.no_grad():
        for start, zc in blocks.chunks(chunk_rows(blocks.features, num_classes)):
            t = y[start : start + len(zc)]
            logits = F.linear(zc, fit.weight, fit.bias)
            loss += F.cross_entropy(logits, t, reduction="sum").double()
            hit[start : start + len(zc)] = (logits.argmax(1) == t).float()
        seen = torch.bincount(y, minlength=num_classes)
        recall = torch.bincount(y, hit, minlength=num_classes)[seen > 0] / seen[seen > 0]
        # one transfer for the three numbers: on a small problem each sync costs more than the maths
        mean = torch.stack([loss / max(1, len(y)), hit.mean().double(), recall.mean().double()])
        val_loss, acc, balanced = mean.tolist()
        return {"val_loss": val_loss, "val_acc": acc, "val_balanced_acc": balanced}


def _rows_of(source: FeatureSource) -> RowBlocks:
    """A source's rows for the solver: its tensor in memory, or its memory map streamed (over the RAM
    budget)."""
    if source.x is not None:
        return RowBlocks([Part(source.x)])
    return RowBlocks([Part(source.raw, source.dtype)], source.device)


def _head(fit: Solution, std: Standardize | None, in_shape: tuple[int, ...], num_classes: int) -> Head:
    """A ``linear`` head holding the solution (the standardisation folded in front of it)."""
    head = build_head(HeadSpec("linear"), in_shape, num_classes, std, seed=0)
    linear = next(m for m in head.body.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        linear.weight.copy_(fit.weight)
        linear.bias.copy_(fit.bias)
    return head.eval()


def linear_probe(
    train: FeatureSource,
    val: FeatureSource,
    test: FeatureSource | None,
    num_classes: int,
    config: ProbeConfig | None = None,
    progress: bool = True,
    refit: bool = True,
) -> ProbeResult:
    """Fit the regularisation path on train, choose the strength on ``val``, refit on train + val, test.

    Without ``refit`` the chosen train-only solution is the head (no validation row is trained on).

    Example:
        >>> res = linear_probe(source_for(f["train"], "penultimate"), source_for(f["val"], "penultimate"),
        ...                    source_for(f["test"], "penultimate"), 10)  # doctest: +SKIP
        >>> res.strength, res.test["acc"]  # doctest: +SKIP
    """
    config = config or ProbeConfig()
    if not len(val):
        raise FeatcacheError(
            "the linear probe needs a validation split to choose the strength (--val-fraction > 0)"
        )
    with small_problem_threads(_rows_of(train), num_classes):
        return _probe(train, val, test, num_classes, config, progress, refit)


def _probe(
    train: FeatureSource,
    val: FeatureSource,
    test: FeatureSource | None,
    num_classes: int,
    config: ProbeConfig,
    progress: bool,
    refit: bool,
) -> ProbeResult:
    """:func:`linear_probe` once its inputs are checked.

    The rows are read through :class:`~featcache.train.logistic.RowBlocks`: standardised on the fly, the
    refit's train + val rows as two parts of one problem, a split over the RAM budget streamed from its
    memory maps by the same full-batch L-BFGS (each function evaluation one pass over the rows).
    """
    x, xv = _rows_of(train), _rows_of(val)
    std = fit_standardize_rows(x) if config.standardize else None
    z, zv = x.standardized(std), xv.standardized(std)
    sweep, fits, start = [], {}, None
    path = _problem(z, train.y, num_classes, config)
    for s in tqdm(sorted(config.strengths, reverse=True), desc="probe path", disable=not progress):
        start = fits[s] = _lbfgs(path, s, config, start)
        sweep.append(
            {"strength": s, **_scores(start, zv, val.y, num_classes), "iterations": start.iterations}
        )
    del path  # its float64 copy of a small problem's rows
    sweep.sort(key=lambda r: r["strength"])
    key = "val_" + config.score
    best = max(sweep, key=lambda r: (r[key], -r["val_loss"]))
    final, final_std = fits[best["strength"]], std
    if refit:
        both_x = RowBlocks(x.parts + xv.parts, x.device)
        both_y = torch.cat([train.y, val.y])
        final_std = fit_standardize_rows(both_x) if config.standardize else None
        problem = _problem(both_x.standardized(final_std), both_y, num_classes, config)
        final = _lbfgs(problem, best["strength"], config, final)
    head = _head(final, final_std, x.row_shape, num_classes)
    info = HeadInfo(HeadSpec("linear"), x.row_shape, num_classes, standardize=config.standardize)
    test_metrics = evaluate(head, test, num_classes) if test is not None else None
    iterations = sum(r["iterations"] for r in sweep) + (final.iterations if refit else 0)
    extra = {"iterations": iterations, "chosen_on": key, "refit_on": "train+val" if refit else "train"}
    return ProbeResult(best["strength"], sweep, test_metrics, head, info, extra)


def few_shot(
    train: FeatureSource,
    val: FeatureSource,
    test: FeatureSource | None,
    num_classes: int,
    config: ProbeConfig,
    progress: bool = True,
) -> tuple[ProbeResult, dict[str, Any]]:
    """``config.shot_seeds`` probes, each on ``config.shots`` training rows per class drawn by its seed.

    Only the training split is subsampled and only its rows are trained on: the strength is chosen on
    the whole validation split (no refit on it), and the test split is only evaluated. Returns the
    first draw's result and the summary (mean, std).

    Example:
        >>> first, summary = few_shot(tr, va, te, 10, ProbeConfig(shots=5))  # doctest: +SKIP
        >>> summary["test_mean"], summary["test_std"]  # doctest: +SKIP
    """
    if config.shots is None:
        raise FeatcacheError("a few-shot probe needs --shots K")
    y = train.y.cpu().numpy()
    short = [c for c in range(num_classes) if (y == c).sum() < config.shots]
    if short:
        raise FeatcacheError(
            f"--shots {config.shots}: classes {short} have fewer training images; lower --shots"
        )
    results = []
    for seed in tqdm(range(config.shot_seeds), desc=f"{config.shots}-shot", disable=not progress):
        rng = np.random.default_rng(seed)
        rows = np.sort(
            np.concatenate(
                [rng.choice(np.flatnonzero(y == c), config.shots, replace=False) for c in range(num_classes)]
            )
        )
        picked = torch.as_tensor(rows, device=train.device)
        # K rows per class: gathered, from memory or (a streamed split) from the memory map
        xs = (
            train.x.index_select(0, picked)
            if train.x is not None
            else to_torch(np.asarray(train.raw[rows]), train.dtype).to(train.device, torch.float32)
        )
        subset = FeatureSource(xs, train.y.index_select(0, picked))
        results.append(linear_probe(subset, val, test, num_classes, config, progress=False, refit=False))
    key = config.score
    scores = [r.test[key] for r in results if r.test] or [
        max(row["val_" + key] for row in r.sweep) for r in results
    ]
    summary = {
        "shots": config.shots,
        "seeds": config.shot_seeds,
        "metric": key.replace("_", "-"),
        "on": "test" if results[0].test else "val",
        "per_seed": scores,
        "test_mean": float(np.mean(scores)),
        "test_std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
    }
    return results[0], summary


def probe_run(spec: RunSpec, layer: str = DEFAULT_LAYER, config: ProbeConfig | None = None) -> ProbeResult:
    """The ``featcache probe`` job: cache (build or reuse), probe, and write a run folder if ``spec.out``.

    The folder is a run like ``featcache train``'s (``config.json``, ``metrics.json`` with the sweep,
    ``head.safetensors``, ``confusion.png``), so :func:`~featcache.runs.load_run`, ``export`` and
    ``predict`` take it. The probe runs on ``spec.train.device``.

    Example:
        >>> spec = RunSpec("efficientnet-lite0", DataConfig("mnist-5k"), out="runs/probe",
        ...                extract=ExtractConfig(input_size=(64, 64)))
        >>> res = probe_run(spec, "penultimate")  # doctest: +SKIP
        >>> res.strength, res.test["acc"]  # doctest: +SKIP
    """
    config = config or ProbeConfig()
    spec.no_resume("probe")
    job = Job.open(spec, "probe", layer, folder=None, one_layer=True)
    folder, backbone, layer, splits = job.folder, job.backbone, job.layer, job.splits
    what = f"layer {layer}, L2 strengths {', '.join(f'{s:g}' for s in config.strengths)} (L-BFGS, full batch)"
    job.announce(what, None)
    feats, _ = job.extract_all()
    job.note_data(feats)
    if "val" not in feats:
        raise FeatcacheError(
            "the probe needs a validation split: use --val-fraction > 0 (DataConfig(val_fraction=...)) or a "
            "val/ folder"
        )
    dev = resolve_device(spec.train.device)
    src = {k: source_for(v, layer, dev, spec.train.ram_budget_gb) for k, v in feats.items()}
    classes, task = feats["train"].classes, feats["train"].task
    args = (src["train"], src["val"], src.get("test"), len(classes), config, spec.progress)
    config.score_for(task)  # a metric of another task is refused before anything is fitted
    if task != "classify":
        if config.shots is not None or config.class_weight != "none":
            raise FeatcacheError(
                f"--shots and --class-weight are for classifiers; this {task} set takes neither"
            )
        res = probe_task(task, src["train"], src["val"], src.get("test"), classes, config, spec.progress)
    elif config.shots is None:
        res = linear_probe(*args)
    else:
        res, summary = few_shot(*args)
        res.extra["few_shot"] = summary
    if res.test and "confusion" in res.test:  # in the result, so --json and metrics.json say the same
        res.test["most_confused"] = most_confused(res.test["confusion"], classes)
    if folder is not None:
        folder.write_config(
            job.record(
                "probe",
                backbone,
                feats,
                [layer],
                layer=layer,
                head=res.info.spec.to_dict(),
                probe=to_json(config),
            )
        )
        folder.save_head(res.head, res.info)  # with --shots: the first draw's head
        metrics = {
            "strength": res.strength,
            "sweep": res.sweep,
            **res.extra,
            **({"test": res.test} if res.test else {}),
        }
        folder.write_metrics(metrics)
        folder.write_report(metrics, classes, f"{backbone.cfg.spec} · {layer} · probe")
        write_mistakes(folder, res.head, feats, layer, spec.train, splits)
    return res
