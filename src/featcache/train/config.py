"""``TrainConfig``: the settings of head training (and of the fine-tuning loop), with their choices;
``HeadSpec``, the head to build; ``TrainableSpec``, what a fine-tuning run trains.

This module imports no torch: the command line checks these settings before loading any model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .._checks import check_device, check_number, check_numbers
from .._config import to_json
from .._util import FeatcacheError, unknown

HEADS = ("linear", "pooled-linear", "mlp", "conv")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "constant")
MONITORS = ("val_loss", "val_acc", "val_map", "val_r2")
#: the losses (auto: the task's first; :mod:`featcache.train.objectives`) and multi-label positive weights
LOSSES = ("auto", "cross-entropy", "bce", "mse", "huber")
POS_WEIGHTS = ("none", "balanced")
CLASS_WEIGHTS = ("none", "balanced")
DEFAULT_STRENGTHS = tuple(float(x) for x in np.logspace(-6, 0, 7))
#: auto: the task's own (acc, map, r2); balanced-acc (classify), map-micro (multilabel), pearson (regress)
METRICS = ("auto", "acc", "balanced-acc", "map", "map-micro", "r2", "pearson")
#: the automatic batch size gives an epoch at least this many steps, within [MIN_BATCH, MAX_BATCH]
STEPS_PER_EPOCH = 20
MIN_BATCH, MAX_BATCH = 16, 256


def auto_batch_size(rows: int) -> int:
    """The power of two that gives ``rows`` at least :data:`STEPS_PER_EPOCH` steps per epoch, kept
    between 16 and 256: 256 on large splits, and on a 256-image split 16 (16 steps), not one step.

    Example:
        >>> auto_batch_size(256), auto_batch_size(3600), auto_batch_size(100_000)
        (16, 128, 256)
    """
    size = MAX_BATCH
    while size > MIN_BATCH and math.ceil(rows / size) < STEPS_PER_EPOCH:
        size //= 2
    return size


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the fast trainer.

    Attributes:
        epochs: passes over the training split.
        batch_size: rows per step; auto (None): the largest power of two from 16 to 256 that gives an
            epoch at least 20 steps (256 on splits of 20 x 256 rows and more, 16 on 256 rows).
        lr: peak learning rate.
        optimizer: ``adamw``, ``adam`` or ``sgd`` (with ``momentum``).
        momentum: SGD momentum.
        weight_decay: decoupled for AdamW, L2 for Adam/SGD.
        schedule: ``cosine`` (to zero, after ``warmup_epochs`` of linear warm-up) or ``constant``.
        warmup_epochs: warm-up length in epochs (may be fractional).
        label_smoothing: cross-entropy label smoothing.
        standardize: standardise features with train-split statistics.
        patience: stop after this many epochs without improvement of ``monitor`` (None: never).
        monitor: val_loss, or the task's metric: val_acc (classify), val_map (multilabel), val_r2
            (regress); selects the best checkpoint and drives --patience.
        seed: seeds the head init, the batch order and dropout.
        device: ``auto``, ``cpu`` or ``cuda``.
        ram_budget_gb: features larger than this (as float32) are streamed from the memory map.
        amp: bf16 autocast for the forward pass; ``None`` means on for CUDA, off on CPU.
        fast_paths: run the head's frozen front (standardisation, pooling) once and train a lone
            Linear with the closed-form step (:mod:`featcache.train.fast_path`); off: plain autograd
            on the whole head every step. Same training either way, to float rounding.
        class_weight: none, or balanced: each class weighs as much in the training loss, whatever its
            size (n / (classes x n_c), as scikit-learn's; trains with autograd).
        loss: auto (the task's: cross-entropy, bce for multilabel, mse for regress), or huber (regress).
        pos_weight: multilabel: none, or balanced (each class's positives weigh negatives / positives,
            so a rare label counts as much as its absence).

    Example:
        >>> cfg = TrainConfig(epochs=30, lr=1e-3, batch_size=256)
    """

    epochs: int = 30
    batch_size: int | None = field(default=None, metadata={"none": "auto"})
    lr: float = 1e-3
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    standardize: bool = False
    patience: int | None = None
    monitor: str = "val_loss"
    seed: int = 0
    device: str = "auto"
    ram_budget_gb: float = 8.0
    amp: bool | None = None
    fast_paths: bool = True
    class_weight: str = "none"
    loss: str | None = field(default=None, metadata={"none": "auto", "shown": "auto"})
    pos_weight: str | None = field(default=None, metadata={"shown": "none"})

    def __post_init__(self) -> None:
        # The words of the command line's defaults are None here: configs written before these fields
        # existed read the same.
        if self.loss == "auto":
            object.__setattr__(self, "loss", None)
        if self.pos_weight == "none":
            object.__setattr__(self, "pos_weight", None)
        if self.loss is not None and self.loss not in LOSSES:
            raise unknown("loss", self.loss, LOSSES, "Use --loss auto|cross-entropy|bce|mse|huber.")
        if self.pos_weight is not None and self.pos_weight not in POS_WEIGHTS:
            raise unknown("pos weight", self.pos_weight, POS_WEIGHTS, "Use --pos-weight none|balanced.")
        if self.class_weight not in CLASS_WEIGHTS:
            raise unknown(
                "class weight", self.class_weight, CLASS_WEIGHTS, "Use --class-weight none|balanced."
            )
        if self.optimizer not in OPTIMIZERS:
            raise unknown("optimizer", self.optimizer, OPTIMIZERS, "Use --optimizer adamw|adam|sgd.")
        if self.schedule not in SCHEDULES:
            raise unknown("schedule", self.schedule, SCHEDULES, "Use --schedule cosine|constant.")
        if self.monitor not in MONITORS:
            raise unknown("monitor", self.monitor, MONITORS, "Use --monitor val_loss|val_acc|val_map|val_r2.")
        self._check_numbers()
        check_device(self.device)

    def _check_numbers(self) -> None:
        """Every numeric field within what trains at all (the command line refuses the same values)."""
        check_number("epochs", self.epochs, 1, integer=True)
        check_number("batch_size", self.batch_size, 1, integer=True, none="auto")
        check_number("lr", self.lr, 0, 10, low_open=True, why="the peak learning rate")
        check_number("momentum", self.momentum, 0, 1, high_open=True)
        check_number("weight_decay", self.weight_decay, 0, 10)
        check_number("warmup_epochs", self.warmup_epochs, 0, self.epochs, why="at most --epochs")
        check_number("label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        check_number("patience", self.patience, 1, integer=True, none="never")
        check_number("seed", self.seed, 0, 2**63 - 1, integer=True)
        check_number("ram_budget_gb", self.ram_budget_gb, 0, why="0 streams every split from the memory map")

    def resolved(self, rows: int) -> TrainConfig:
        """This config with an automatic batch size decided for a training split of ``rows`` rows.

        Example:
            >>> TrainConfig().resolved(256).batch_size
            16
        """
        return replace(self, batch_size=self.batch_for(rows))

    def batch_for(self, rows: int) -> int:
        """The batch size for a training split of ``rows`` rows: the set one, else the automatic one."""
        return self.batch_size if self.batch_size is not None else auto_batch_size(rows)

    def steps_per_epoch(self, rows: int) -> int:
        """Optimiser steps in one epoch over ``rows`` training rows."""
        return math.ceil(rows / self.batch_for(rows))


@dataclass(frozen=True)
class HeadSpec:
    """Which head to build.

    Attributes:
        kind: ``linear`` (flatten + Linear), ``pooled-linear`` (the reference loop's SimpleClassifier:
            AdaptiveAvgPool2d(1) + Flatten + Linear on a map), ``mlp`` or ``conv`` (a new
            3x3 conv + BN + ReLU on a map, then pooling and Linear).
        hidden: hidden sizes of the MLP.
        dropout: dropout before each Linear of the MLP (and the conv head's classifier).
        conv_channels: output channels of the conv head's new convolution.

    Example:
        >>> head = build_head(HeadSpec("mlp", hidden=(256,)), (512,), num_classes=10)
    """

    kind: str = "linear"
    hidden: tuple[int, ...] = (512,)
    dropout: float = 0.0
    conv_channels: int = 256

    def __post_init__(self) -> None:
        if self.kind not in HEADS:
            raise unknown("head", self.kind, HEADS, "Use --head linear|pooled-linear|mlp|conv.")
        for h in self.hidden:
            check_number("hidden", h, 1, integer=True, why="each hidden layer's width")
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        check_number("dropout", self.dropout, 0, 1, high_open=True)
        check_number("conv_channels", self.conv_channels, 1, integer=True)

    def to_dict(self) -> dict[str, Any]:
        return dict(to_json(self))


@dataclass(frozen=True)
class TrainableSpec:
    """A parsed ``--train`` spec.

    Example:
        >>> TrainableSpec.parse("last:2")
        TrainableSpec(kind='last', n=2, names=())
    """

    kind: str
    n: int = 0
    names: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str) -> TrainableSpec:
        """Parse ``head``, ``all``, ``last:N``, ``from:LAYER`` or ``modules:a,b``."""
        kind, _, arg = text.partition(":")
        if kind in ("head", "all") and not arg:
            return cls(kind)
        if kind == "last" and arg.isdigit() and int(arg) > 0:
            return cls(kind, n=int(arg))
        if kind == "from" and arg:
            return cls(kind, names=(arg,))
        if kind == "modules" and arg:
            return cls(kind, names=tuple(a for a in arg.split(",") if a))
        raise unknown(
            "trainable-part spec",
            text,
            ["head", "last:N", "from:LAYER", "all", "modules:a,b"],
            "See `featcache finetune --help`.",
        )

    def __str__(self) -> str:
        if self.kind in ("head", "all"):
            return self.kind
        return f"last:{self.n}" if self.kind == "last" else f"{self.kind}:{','.join(self.names)}"


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of the probe.

    Attributes:
        strengths: L2 strengths (lambda, on the mean loss) tried on the validation split, fitted as one
            regularisation path: strongest first, each fit starting from the previous solution.
        max_iter: L-BFGS iterations per fit at most (a split over the RAM budget, solved by blocks: up
            to 10 per block and epoch, and at most max_iter / 10 epochs, 20 at most).
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
        from .objectives import metric_key  # here: this module is read before torch is imported

        return metric_key(task, self.metric)
