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

from .._checks import check_number, check_numbers
from .._config import to_json
from .._util import FeatcacheError, resolve_device, unknown
from ..train.fit import class_weights, evaluate
from ..train.heads import Head, HeadInfo, HeadSpec, Standardize, build_head
from ..train.objectives import metric_key
from ..train.sources import FeatureSource, source_for
from .logistic import SoftmaxRegression, Solution, small_problem_threads
from .spec import RunSpec, skipped_rows
from .target_probes import probe_task
from .train import write_mistakes

DEFAULT_STRENGTHS = tuple(float(x) for x in np.logspace(-6, 0, 7))
#: auto: the task's own (acc, map, r2); balanced-acc (classify), map-micro (multilabel), pearson (regress)
METRICS = ("auto", "acc", "balanced-acc", "map", "map-micro", "r2", "pearson")
CLASS_WEIGHTS = ("none", "balanced")


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of the probe.

    Attributes:
        strengths: L2 strengths (lambda, on the mean loss) tried on the validation split, fitted as one
            regularisation path: strongest first, each fit starting from the previous solution.
        max_iter: L-BFGS iterations per fit at most.
        tol: stop a fit when the largest gradient entry is below this (scikit-learn's default, 1e-4).
        standardize: standardise features with train statistics (train+val for the refit).
        metric: what chooses the strength on val and is reported: auto (the task's: acc, map for
            multilabel, r2 for regress), balanced-acc (the mean of the per-class recalls, for imbalanced
            sets), map-micro (multilabel), pearson (regress).
        class_weight: none, or balanced (each class weighs as much in the loss, whatever its size).
        shots: few-shot probe: K training images per class, drawn from the training split only.
        shot_seeds: how many draws of the few-shot training set (the report is their mean and std).

    Example:
        >>> cfg = ProbeConfig(strengths=(1e-4, 1e-3, 1e-2), shots=5)
    """

    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    max_iter: int = 200
    tol: float = 1e-4
    standardize: bool = True
    metric: str = "auto"
    class_weight: str = "none"
    shots: int | None = None
    shot_seeds: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "strengths", tuple(float(v) for v in self.strengths))
        if not self.strengths:
            raise FeatcacheError("--strengths must be one or more values >= 0, got none")
        check_numbers("strengths", self.strengths, 0, why="L2 strengths")
        if self.metric not in METRICS:
            raise unknown("probe metric", self.metric, METRICS, "Use --metric " + "|".join(METRICS) + ".")
        if self.class_weight not in CLASS_WEIGHTS:
            raise unknown(
                "class weight", self.class_weight, CLASS_WEIGHTS, "Use --class-weight none|balanced."
            )
        check_number("max_iter", self.max_iter, 1, integer=True)
        check_number("tol", self.tol, 0, low_open=True)
        check_number("shots", self.shots, 1, integer=True, none="all images", why="images per class")
        check_number("shot_seeds", self.shot_seeds, 1, integer=True)

    @property
    def score(self) -> str:
        """The metrics key the strength of a classifier's probe is chosen on."""
        return self.score_for("classify")

    def score_for(self, task: str) -> str:
        """The metrics key the strength is chosen on for ``task``; a metric of another task is refused.

        Example:
            >>> ProbeConfig().score_for("regress"), ProbeConfig(metric="balanced-acc").score
            ('r2', 'balanced_acc')
        """
        return metric_key(task, self.metric)


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


def _problem(z: torch.Tensor, y: torch.Tensor, num_classes: int, config: ProbeConfig) -> SoftmaxRegression:
    """The rows of one fit or path, prepared once (:class:`~featcache.runs.logistic.SoftmaxRegression`)."""
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
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    strength: float,
    max_iter: int = 200,
    standardize: bool = True,
    tol: float = 1e-6,
) -> Head:
    """One L2-regularised logistic regression as a ``linear`` head (standardisation folded in front).

    Solved tighter (``tol``) than the probe's path, whose strengths only need ranking on val.

    Example:
        >>> head = fit_logistic(torch.randn(100, 8), torch.randint(0, 3, (100,)), 3, 1e-3)
    """
    x = x.float()
    std = Standardize.fit(x) if standardize else None
    config = ProbeConfig(max_iter=max_iter, tol=tol)
    with small_problem_threads(x, num_classes):
        fit = _lbfgs(_problem(std(x) if std is not None else x, y, num_classes, config), strength, config)
    return _head(fit, std, tuple(x.shape[1:]), num_classes)


def _scores(fit: Solution, z: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Validation loss, accuracy and balanced accuracy of one solution (no head built)."""
    with torch.no_grad():
        logits = F.linear(z.flatten(1).float(), fit.weight, fit.bias)
        hit = (logits.argmax(1) == y).float()
        seen = torch.bincount(y, minlength=num_classes)
        recall = torch.bincount(y, hit, minlength=num_classes)[seen > 0] / seen[seen > 0]
        # one transfer for the three numbers: on a small problem each sync costs more than the maths
        loss, acc, balanced = torch.stack([F.cross_entropy(logits, y), hit.mean(), recall.mean()]).tolist()
        return {"val_loss": loss, "val_acc": acc, "val_balanced_acc": balanced}


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
    if train.x is None or val.x is None:
        raise FeatcacheError(
            "the L-BFGS probe needs the features in memory; use `featcache train` for larger caches"
        )
    with small_problem_threads(train.x, num_classes):
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
    """:func:`linear_probe` once its inputs are checked."""
    if train.x is None or val.x is None:  # sources built by linear_probe always hold their rows
        raise FeatcacheError("the linear probe needs the train and val rows in memory (FeatureSource.x)")
    x, xv = train.x.float(), val.x.float()
    std = Standardize.fit(x) if config.standardize else None
    z, zv = (std(x), std(xv)) if std is not None else (x, xv)
    sweep, fits, start = [], {}, None
    path = _problem(z, train.y, num_classes, config)
    for s in tqdm(sorted(config.strengths, reverse=True), desc="probe path", disable=not progress):
        start = fits[s] = _lbfgs(path, s, config, start)
        sweep.append(
            {"strength": s, **_scores(start, zv, val.y, num_classes), "iterations": start.iterations}
        )
    sweep.sort(key=lambda r: r["strength"])
    key = "val_" + config.score
    best = max(sweep, key=lambda r: (r[key], -r["val_loss"]))
    final, final_std = fits[best["strength"]], std
    if refit:
        both_x, both_y = torch.cat([x, xv]), torch.cat([train.y, val.y])
        final_std = Standardize.fit(both_x) if config.standardize else None
        z_all = final_std(both_x) if final_std is not None else both_x
        final = _lbfgs(_problem(z_all, both_y, num_classes, config), best["strength"], config, final)
    head = _head(final, final_std, tuple(x.shape[1:]), num_classes)
    info = HeadInfo(HeadSpec("linear"), tuple(x.shape[1:]), num_classes, standardize=config.standardize)
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
    if train.x is None or config.shots is None:
        raise FeatcacheError("a few-shot probe needs --shots K and the training features in memory")
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
        picked = torch.as_tensor(rows, device=train.x.device)
        subset = FeatureSource(train.x.index_select(0, picked), train.y.index_select(0, picked))
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


def probe_run(spec: RunSpec, layer: str = "penultimate", config: ProbeConfig | None = None) -> ProbeResult:
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
    folder = spec.folder("probe") if spec.out is not None else None
    backbone = spec.backbone()
    layer = spec.one_layer(backbone, layer, "probe")
    splits = spec.data.load(spec.cache_dir)
    what = f"layer {layer}, L2 strengths {', '.join(f'{s:g}' for s in config.strengths)} (L-BFGS, full batch)"
    spec.announce("probe", backbone, splits, what, None)
    feats, _ = spec.extract_all(backbone, splits, [layer])
    spec.note_skipped(folder, skipped_rows(feats))
    if "val" not in feats:
        raise FeatcacheError(
            "the probe needs a validation split: use --val-fraction > 0 (DataConfig(val_fraction=...)) or a "
            "val/ folder"
        )
    dev = resolve_device(spec.train.device)
    src = {k: source_for(v, layer, dev) for k, v in feats.items()}
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
    if folder is not None:
        folder.write_config(
            spec.record(
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
        write_mistakes(folder, res.head, feats, layer, spec.train)
    return res
