"""The linear-probe protocol: L2-regularised logistic regression on cached features.

As in the CLIP paper's linear probes: the regularisation strength is chosen on the validation
split (models fitted on train only), then the model is refitted on train + val with that strength
and evaluated once on test. The test split never influences a choice, and no validation score is
reported for a model that saw the validation split (the leak in CLIP_benchmark issue #125).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._util import FeatcacheError, best_on_val, resolve_device
from ..train.fit import evaluate
from ..train.heads import Head, HeadInfo, HeadSpec, Standardize, build_head
from ..train.sources import FeatureSource, source_for
from .spec import RunSpec
from .train import write_mistakes

DEFAULT_STRENGTHS = tuple(float(x) for x in np.logspace(-6, 0, 7))


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of the probe sweep.

    Attributes:
        strengths: L2 strengths (lambda, on the mean loss) tried on the validation split.
        max_iter: L-BFGS iterations per fit.
        standardize: standardise features with train statistics (train+val for the refit).

    Example:
        >>> cfg = ProbeConfig(strengths=(1e-4, 1e-3, 1e-2))
    """

    strengths: tuple[float, ...] = DEFAULT_STRENGTHS
    max_iter: int = 200
    standardize: bool = True


@dataclass
class ProbeResult:
    """Chosen strength, the sweep's validation scores, and the refitted head's test metrics."""

    strength: float
    sweep: list[dict[str, float]]
    test: dict[str, Any] | None
    head: Head
    info: HeadInfo
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        test = f", test_acc={self.test['acc']:.4g}" if self.test else ""
        return f"ProbeResult(strength={self.strength:g}, strengths tried={len(self.sweep)}{test})"


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    strength: float,
    max_iter: int = 200,
    standardize: bool = True,
) -> Head:
    """Full-batch L-BFGS logistic regression; returns a ``linear`` head (standardisation folded in front).

    Example:
        >>> head = fit_logistic(torch.randn(100, 8), torch.randint(0, 3, (100,)), 3, 1e-3)
    """
    x = x.float()
    std = Standardize.fit(x) if standardize else None
    z = std(x) if std is not None else x
    head = build_head(HeadSpec("linear"), tuple(x.shape[1:]), num_classes, std, seed=0).to(x.device)
    linear = next(m for m in head.body.modules() if isinstance(m, torch.nn.Linear))
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(
        linear.parameters(),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
    )
    flat = z.flatten(1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(linear(flat), y) + 0.5 * strength * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head.eval()


def linear_probe(
    train: FeatureSource,
    val: FeatureSource,
    test: FeatureSource | None,
    num_classes: int,
    config: ProbeConfig | None = None,
    progress: bool = True,
) -> ProbeResult:
    """Choose the L2 strength on ``val``, refit on train + val, evaluate on ``test``.

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
    sweep = []
    for s in tqdm(config.strengths, desc="probe sweep", disable=not progress):
        head = fit_logistic(train.x, train.y, num_classes, s, config.max_iter, config.standardize)
        m = evaluate(head, val, num_classes)
        sweep.append({"strength": s, "val_acc": m["acc"], "val_loss": m["loss"]})
    best = best_on_val(sweep)
    both_x = torch.cat([train.x, val.x])
    both_y = torch.cat([train.y, val.y])
    head = fit_logistic(both_x, both_y, num_classes, best["strength"], config.max_iter, config.standardize)
    info = HeadInfo(HeadSpec("linear"), tuple(train.x.shape[1:]), num_classes, standardize=config.standardize)
    test_metrics = evaluate(head, test, num_classes) if test is not None else None
    return ProbeResult(best["strength"], sweep, test_metrics, head, info)


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
    splits = spec.data.load()
    what = f"layer {layer}, L2 strengths {', '.join(f'{s:g}' for s in config.strengths)} (L-BFGS, full batch)"
    spec.announce("probe", backbone, splits, what, None)
    feats, _ = spec.extract_all(backbone, splits, [layer])
    if "val" not in feats:
        raise FeatcacheError(
            "the probe needs a validation split: use --val-fraction > 0 (DataConfig(val_fraction=...)) or a "
            "val/ folder"
        )
    dev = resolve_device(spec.train.device)
    src = {k: source_for(v, layer, dev) for k, v in feats.items()}
    classes = feats["train"].classes
    res = linear_probe(src["train"], src["val"], src.get("test"), len(classes), config, spec.progress)
    if folder is not None:
        probe = {**asdict(config), "strengths": list(config.strengths)}
        folder.write_config(
            spec.record(
                "probe", backbone, feats, [layer], layer=layer, head=res.info.spec.to_dict(), probe=probe
            )
        )
        folder.save_head(res.head, res.info)
        metrics = {"strength": res.strength, "sweep": res.sweep, **({"test": res.test} if res.test else {})}
        folder.write_metrics(metrics)
        folder.write_report(metrics, classes, f"{backbone.cfg.spec} · {layer} · probe")
        write_mistakes(folder, res.head, feats, layer, spec.train)
    return res
