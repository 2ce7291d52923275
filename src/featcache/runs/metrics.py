"""A run's metrics, typed: what ``metrics.json`` holds, written and read through the one JSON codec.

:class:`Metrics` is the whole file: the fit (history, timings, the fast paths taken), the scores of
each evaluated split (:data:`Scores`: :class:`ClassifyScores`, :class:`MultilabelScores` or
:class:`RegressScores`, by the run's task) and each verb's own numbers (the probe's path, a
fine-tuning mode, a folds summary). A part a run does not have is None and left out of the file.
A score that is not defined (the R² of one row, the mAP of a label set without a positive) is None:
the file holds JSON ``null`` where the computation gave NaN.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

from .._config import from_json, to_json
from .._util import FeatcacheError, finite_json
from ..train.objectives import METRIC


@dataclass(frozen=True)
class ConfusedPair:
    """A (true, predicted) class pair the model confuses, and on how many images."""

    true: str
    predicted: str
    count: int


class _Scores:
    """What every split's scores answer: a metric by name, and the task's headline one."""

    task = "classify"

    def score(self, name: str) -> float | None:
        """The metric ``name`` (``acc``, ``balanced_acc``, ``map``, ``map_micro``, ``f1``, ``r2``,
        ``pearson`` ...), as :func:`~featcache.train.objectives.metric_key` names it.

        Example:
            >>> run.metrics.test.score("balanced_acc")  # doctest: +SKIP
            0.912
        """
        names = self.__dataclass_fields__  # type: ignore[attr-defined]
        value = getattr(self, name) if name in names else ""
        if isinstance(value, bool) or not (value is None or isinstance(value, (int, float))):
            singles = [n for n in names if n not in ("per_class_acc", "confusion", "most_confused",
                       "per_label_ap", "per_target")]  # fmt: skip
            raise FeatcacheError(
                f"{name!r} is no score of {type(self).__name__}: one of {', '.join(singles)}"
            )
        return None if value is None else float(value)

    @property
    def headline(self) -> float | None:
        """The task's own metric (:data:`~featcache.train.objectives.METRIC`): acc, map or r2."""
        return self.score(METRIC[self.task])


@dataclass(frozen=True)
class ClassifyScores(_Scores):
    """A classifier's scores on one split (:func:`~featcache.train.fit.evaluate`).

    Attributes:
        loss: mean cross-entropy; acc: top-1 accuracy; balanced_acc: the mean of the per-class recalls
            over the classes present; per_class_acc: each class's recall; confusion: true class in
            rows; n: rows; top5: top-5 accuracy (5 classes or more); most_confused: the off-diagonal
            pairs, most often first.
    """

    loss: float
    acc: float
    balanced_acc: float
    per_class_acc: tuple[float, ...]
    confusion: tuple[tuple[int, ...], ...]
    n: int
    top5: float | None = None
    most_confused: tuple[ConfusedPair, ...] | None = None


@dataclass(frozen=True)
class MultilabelScores(_Scores):
    """A multi-label head's scores on one split (:func:`~featcache.train.objectives.multilabel_metrics`):
    mAP (macro over the labels with a positive, and micro), each label's AP, micro and macro F1 and the
    exact-set accuracy at ``threshold``."""

    task = "multilabel"
    loss: float | None
    map: float | None
    map_micro: float | None
    per_label_ap: tuple[float | None, ...]
    threshold: float
    f1: float
    f1_macro: float
    exact_acc: float
    n: int


@dataclass(frozen=True)
class TargetScores:
    """One regression target's MAE, R² and Pearson r."""

    mae: float | None
    r2: float | None
    pearson: float | None


@dataclass(frozen=True)
class RegressScores(_Scores):
    """A regression head's scores on one split (:func:`~featcache.train.objectives.regress_metrics`), in
    the targets' units: MAE, RMSE, R² and Pearson r (means over targets), and each target's."""

    task = "regress"
    loss: float | None
    mae: float | None
    rmse: float | None
    r2: float | None
    pearson: float | None
    per_target: dict[str, TargetScores]
    n: int


Scores = Union[ClassifyScores, MultilabelScores, RegressScores]  # noqa: UP007
SCORES: dict[str, type[Any]] = {
    "classify": ClassifyScores,
    "multilabel": MultilabelScores,
    "regress": RegressScores,
}


def scores_of(task: str, values: Mapping[str, Any]) -> Scores:
    """The typed scores of an evaluation's ``values`` (NaN: None) for ``task``.

    Example:
        >>> scores_of("regress", {"loss": 1.0, "mae": 0.5, "rmse": 1.0, "r2": float("nan"),
        ...                       "pearson": 0.9, "per_target": {}, "n": 1}).r2 is None
        True
    """
    return from_json(SCORES[task], finite_json(dict(values)))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class CacheRows:
    """A split's rows as a run read them: how many, from the cache, extracted now."""

    rows: int
    from_cache: int
    extracted: int


@dataclass(frozen=True)
class FewShot:
    """A few-shot probe's summary: ``shots`` rows per class, ``seeds`` draws, the ``metric`` on split
    ``on`` per draw, their mean and standard deviation."""

    shots: int
    seeds: int
    metric: str
    on: str
    per_seed: tuple[float, ...]
    test_mean: float
    test_std: float


@dataclass(frozen=True)
class Metrics:
    """What ``metrics.json`` holds; the parts a run does not have are None (and not written).

    Attributes:
        task: classify, multilabel or regress: which :data:`Scores` its splits hold.
        finished: False for a run interrupted before its last epoch (``--resume`` finishes it).
        val / test: the scores of the best model on each split; fold: a fold's held-out rows (a fold's
            own run folder in a ``--folds`` folder).
        history ... fast_paths: the fit (runs that trained by epochs): a row per epoch, each step's
            loss, rows and steps per epoch, the batch size, the best epoch, whether it stopped early,
            seconds, the trainer's fast paths.
        extract_seconds, cache_hit, cache_rows: ``train``'s extraction: seconds, whether each split
            (and view) was a cache hit, its rows.
        mode, threshold: a fine-tuned network's mode (cached-prefix or live) and its multi-label
            threshold (chosen on val).
        strength ... solver: the probe's chosen L2 strength, its path (a row per strength), L-BFGS
            iterations, what chose (``val_acc`` ...), what the head was refitted on, the path's seconds
            and solver (multi-label and regression probes), a few-shot summary.
        folds: a folds folder's summary (per fold scores, mean, std; ``folds.json``).

    Example:
        >>> run = load_run("runs/mnist")  # doctest: +SKIP
        >>> run.metrics.test.acc, run.metrics.best_epoch  # doctest: +SKIP
        (0.951, 18)
    """

    task: str = "classify"
    finished: bool = True
    history: tuple[dict[str, Any], ...] | None = None
    step_losses: tuple[float | None, ...] | None = None
    examples_per_epoch: int | None = None
    batch_size: int | None = None
    steps_per_epoch: int | None = None
    best_epoch: int | None = None
    stopped_early: bool | None = None
    train_seconds: float | None = None
    fast_paths: dict[str, Any] | None = None
    val: Scores | None = None
    test: Scores | None = None
    fold: Scores | None = None
    extract_seconds: float | None = None
    cache_hit: dict[str, bool] | None = None
    cache_rows: dict[str, CacheRows] | None = None
    mode: str | None = None
    threshold: float | None = None
    strength: float | None = None
    sweep: tuple[dict[str, Any], ...] | None = None
    iterations: int | None = None
    chosen_on: str | None = None
    refit_on: str | None = None
    path_seconds: float | None = None
    solver: str | None = None
    few_shot: FewShot | None = None
    folds: dict[str, Any] | None = None

    def __repr__(self) -> str:
        shown = [f"task={self.task!r}"] + [
            f"{name}_{METRIC[self.task]}={s.headline:.4g}"
            for name, s in (("val", self.val), ("test", self.test), ("fold", self.fold))
            if s is not None and s.headline is not None
        ]
        if not self.finished:
            shown.append("finished=False")
        return f"Metrics({', '.join(shown)})"

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``metrics.json`` (parts the run does not have left out).

        Example:
            >>> Metrics(strength=0.01).to_json()
            {'task': 'classify', 'finished': True, 'strength': 0.01}
        """
        return dict(to_json(self, omit_none=True))

    @classmethod
    def from_json(cls, values: Mapping[str, Any]) -> Metrics:
        """Read ``metrics.json`` (or any dict of its keys: a NaN is read as None, as the file holds it).

        Example:
            >>> Metrics.from_json({"task": "classify", "strength": 0.01}).strength
            0.01
        """
        return from_json(cls, finite_json(dict(values)))

    def score(self, split: str, name: str | None = None) -> float | None:
        """The metric ``name`` (default: the task's own, :data:`~featcache.train.objectives.METRIC`) on
        ``split`` (``val``, ``test`` or ``fold``); None when the split was not evaluated or the score is
        not defined.

        Example:
            >>> run.metrics.score("test"), run.metrics.score("test", "top5")  # doctest: +SKIP
            (0.951, 0.998)
        """
        if split not in ("val", "test", "fold"):
            raise FeatcacheError(f"unknown split {split!r}: scores are kept for val, test and fold")
        scores: Scores | None = getattr(self, split)
        return None if scores is None else scores.score(name or METRIC[self.task])
