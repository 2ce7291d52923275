"""The settings of the jobs beyond :class:`~featcache.runs.spec.RunSpec`: a probe, a fine-tuning run, a
sweep's grid.

This module imports no torch: the command line checks these settings before loading any model.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .._checks import check_number, check_numbers
from .._errors import FeatcacheError, unknown
from ..extraction.config import parse_layers
from ..train.config import (  # noqa: F401  (ProbeConfig and its choices: the probe trainer's, read here too)
    CLASS_WEIGHTS,
    DEFAULT_STRENGTHS,
    METRICS,
    HeadSpec,
    ProbeConfig,
    TrainableSpec,
    TrainConfig,
)

MODES = ("auto", "cached", "live")


@dataclass(frozen=True)
class FinetuneConfig:
    """What ``featcache finetune`` does beyond the trainer's hyper-parameters.

    Attributes:
        train: what trains: head | last:N | from:LAYER | all | modules:a,b.
        bn: BatchNorm policy: frozen (eval, statistics fixed) | train.
        lr_decay: each earlier group of trained blocks trains at lr x decay^k.
        augment: random augmentation: flip, crop or flip,crop (the live loop, unless views).
        mode: auto (the cached prefix when it is valid) | cached | live.
        init_head: start the classifier from a `train --head linear` run folder.
        views: cache K augmented views of the frozen prefix's output (needs augment) and train epoch
            e on view e mod K: augmentation with the cached prefix, not live.

    Example:
        >>> FinetuneConfig(train="last:1", lr_decay=0.5, augment="flip", views=4).views
        4
    """

    train: str = "head"
    bn: str = "frozen"
    lr_decay: float = 1.0
    augment: str | None = None
    mode: str = "auto"
    init_head: str | None = None
    views: int = 0

    def __post_init__(self) -> None:
        check_number("views", self.views, 0, integer=True, why="0: no views")
        check_number(
            "lr_decay", self.lr_decay, 0, 1, low_open=True, why="earlier blocks train at lr x decay^k"
        )
        if self.views and not self.augment:
            raise FeatcacheError(f"--views {self.views} needs --augment (what varies between the views)")
        if self.mode not in MODES:
            raise unknown("fine-tuning mode", self.mode, MODES, "Use --mode auto|cached|live.")
        TrainableSpec.parse(self.train)


def grid(base: TrainConfig, **values: Sequence[Any]) -> list[TrainConfig]:
    """Every combination of the given :class:`TrainConfig` fields, the others as in ``base``.

    Example:
        >>> [c.lr for c in grid(TrainConfig(), lr=[1e-3, 1e-2], weight_decay=[0.0])]
        [0.001, 0.01]
    """
    keys = [k for k, v in values.items() if v]
    return [
        replace(base, **dict(zip(keys, combo, strict=True)))
        for combo in itertools.product(*(values[k] for k in keys))
    ]


@dataclass(frozen=True)
class SweepGrid:
    """What a sweep varies: the layers (from one backbone pass), and trainer settings per layer.

    Attributes:
        layers: layer names; ``@blocks`` is every block and the classifier's input.
        head: the head trained on each layer.
        lrs: learning rates to try (empty: the spec's ``train.lr``).
        weight_decays: weight decays to try (empty: the spec's ``train.weight_decay``).
        metric: what chooses on val: auto (the task's: acc, map for multilabel, r2 for regress),
            balanced-acc, map-micro, f1, pearson.

    Example:
        >>> SweepGrid(("blocks.4", "penultimate"), lrs=(1e-3, 3e-3)).layers
        ('blocks.4', 'penultimate')
    """

    layers: tuple[str, ...] = field(metadata={"shown": "required; with --resume: the sweep's"})
    head: HeadSpec = field(default_factory=HeadSpec)
    lrs: tuple[float, ...] = field(default=(), metadata={"shown": "--lr's value alone"})
    weight_decays: tuple[float, ...] = field(default=(), metadata={"shown": "--weight-decay's value alone"})
    metric: str | None = field(default=None, metadata={"none": "auto", "shown": "auto"})

    def __post_init__(self) -> None:
        if self.metric == "auto":  # None in configs: sweeps recorded before the field read the same
            object.__setattr__(self, "metric", None)
        object.__setattr__(self, "layers", parse_layers(self.layers))
        object.__setattr__(self, "lrs", tuple(float(v) for v in self.lrs))
        object.__setattr__(self, "weight_decays", tuple(float(v) for v in self.weight_decays))
        # the rules of TrainConfig's lr and weight_decay, checked before any extraction
        check_numbers("lrs", self.lrs, 0, high=10, low_open=True, why="each a peak learning rate")
        check_numbers("weight_decays", self.weight_decays, 0, high=10)

    def configs(self, base: TrainConfig) -> list[TrainConfig]:
        """The trainer settings of the grid, the others as in ``base``."""
        return grid(base, lr=self.lrs, weight_decay=self.weight_decays)


#: how neighbours vote in the kNN evaluation
WEIGHTS = ("exp", "uniform")


@dataclass(frozen=True)
class KnnConfig:
    """Settings of the kNN evaluation.

    Attributes:
        k: the numbers of neighbours, all evaluated in one pass over the bank (DINO reports 10, 20,
            100, 200; 20 is its headline).
        temperature: T of the weights exp(similarity / T) (DINO: 0.07).
        weighting: exp (DINO's temperature-weighted votes) or uniform (one vote per neighbour, as
            scikit-learn's KNeighborsClassifier).
        chunk_rows: bank (training) rows read and compared at a time: the memory of a pass is about
            chunk_rows x (queries in a block + features) floats, whatever the split's size.

    Example:
        >>> KnnConfig(k=(20,), temperature=0.07).k
        (20,)
    """

    k: tuple[int, ...] = (10, 20, 100, 200)
    temperature: float = 0.07
    weighting: str = "exp"
    chunk_rows: int = 8192

    def __post_init__(self) -> None:
        if not self.k:
            raise FeatcacheError("--k needs one or more neighbour counts, e.g. --k 10,20,100,200")
        check_numbers("k", self.k, 1, integer=True, why="neighbour counts")
        object.__setattr__(self, "k", tuple(sorted({int(v) for v in self.k})))
        check_number("temperature", self.temperature, 0, low_open=True)
        if self.weighting not in WEIGHTS:
            raise unknown("kNN weighting", self.weighting, WEIGHTS, "Use --weighting exp|uniform.")
        check_number("chunk_rows", self.chunk_rows, 1, integer=True)
