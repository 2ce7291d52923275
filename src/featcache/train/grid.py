"""A grid of linear heads trained in one pass: one matrix product per batch for every setting.

A sweep of linear heads over learning rates and weight decays on one cached layer trains K heads that
differ only in those two numbers: the same initial weights (same seed), the same batches in the same
order (the batch generator is seeded with the same ``TrainConfig.seed``), the same features. Trained
one by one (:func:`~featcache.train.fit.fit`), each reads and gathers every batch again and runs two
small matrix products per step. Here (as DINOv2's linear evaluation does) the K weight matrices are
stacked into one ``(K*C, F)`` matrix, so one product gives every head's logits and one more every
head's weight gradient (the closed form of :class:`~featcache.train.fast_path.LinearStep`, row for
row the same arithmetic); each head then takes its own optimizer step (its own AdamW/Adam/SGD, its
own warm-up/cosine schedule, so its own lr and weight decay) through
:meth:`~featcache.train.fast_path.LinearStep.update`, validates, keeps its best epoch, stops on its
own patience and is dropped from the stack when it stops or diverges. The result per head is what
``fit`` returns for it, to float rounding (``tests/test_grid.py``).

It covers what the closed-form step covers: a classifier whose trainable part is a lone
``nn.Linear`` (``linear``, ``pooled-linear``), unweighted cross-entropy (label smoothing too), fast
paths on, no augmented views, no checkpoint; :func:`grid_not_covered` names what is not, and the
caller trains those one by one.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from .config import TrainConfig
from .fast_path import FastPaths, LinearStep, prepare_sources, split_front, take_fast_paths
from .fit import (
    FitResult,
    TrainingDiverged,
    _check_task,
    _epoch_row,
    _Progress,
    _report_epoch,
    _seeded_rng,
    _train_epoch,
    _validate,
    make_optimizer,
    make_schedule,
)
from .heads import HeadSpec
from .sources import BatchSource

#: the head kinds whose trainable part after the frozen front is one ``nn.Linear``
GRID_KINDS = ("linear", "pooled-linear")


def grid_not_covered(
    head: HeadSpec, configs: list[TrainConfig], task: str = "classify", views: int = 0
) -> str | None:
    """Why these heads cannot train as one grid (one short sentence), or None when they can.

    Example:
        >>> grid_not_covered(HeadSpec("linear"), [TrainConfig(lr=1e-3), TrainConfig(lr=1e-2)])
        >>> grid_not_covered(HeadSpec("mlp"), [TrainConfig(lr=1e-3), TrainConfig(lr=1e-2)])
        "an 'mlp' head is not a lone linear layer"
    """
    first = configs[0] if configs else None
    reasons = [
        (len(configs) < 2, "one setting: nothing to batch"),
        (head.kind not in GRID_KINDS, f"an {head.kind!r} head is not a lone linear layer"),
        (task != "classify", f"a {task} task has no closed-form step"),
        (views > 0, "augmented views change the rows each epoch"),
        (first is not None and not first.fast_paths, "fast paths are off (TrainConfig.fast_paths)"),
        (first is not None and first.class_weight != "none", "class-weighted loss trains with autograd"),
        (
            first is not None
            and any(replace(c, lr=first.lr, weight_decay=first.weight_decay) != first for c in configs),
            "the settings differ in more than lr and weight decay",
        ),
    ]
    return next((why for bad, why in reasons if bad), None)


@dataclass
class _Head:
    """One head of the grid: its module, optimizer, schedule, step, fast paths and progress."""

    head: nn.Module
    config: TrainConfig
    opt: torch.optim.Optimizer
    sched: Any
    step: LinearStep
    paths: FastPaths
    run: _Progress
    error: TrainingDiverged | None = None
    done: bool = False


class _Schedules:
    """``sched.step()`` for :func:`~featcache.train.fit._train_epoch`: every active head's schedule."""

    def __init__(self, heads: list[_Head]) -> None:
        self.heads = heads

    def step(self) -> None:
        for h in self.heads:
            h.sched.step()


class _GridStep:
    """One training step of the active heads: their logits and weight gradients as one product each,
    then each head's own optimizer step. Returns the heads' batch losses, shape ``(K,)``."""

    def __init__(self, heads: list[_Head], amp: bool) -> None:
        self.heads, self.amp = heads, amp

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        if xb.dim() > 2:  # a linear head on a map: the head's Flatten
            xb = xb.flatten(1)
        with torch.autocast(xb.device.type, dtype=torch.bfloat16, enabled=self.amp):
            losses, grads = self._grads(xb, yb)
        for k, h in enumerate(self.heads):
            h.step.update([g[k] for g in grads])
        return losses

    def _grads(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # The arithmetic of LinearStep._grads with the heads' weights stacked as (K*C, F) rows: every
        # row of each product is the row one head alone computes.
        steps = [h.step for h in self.heads]
        k, n, c = len(steps), len(yb), steps[0].classes
        w = torch.stack([s.params[0].detach() for s in steps]).view(k * c, -1)
        biased = len(steps[0].params) > 1
        qt = steps[0]._table(n, xb.device).index_select(1, yb)
        if biased:
            b = torch.stack([s.params[1].detach() for s in steps]).view(k * c, 1)
            zt = torch.addmm(b, w, xb.t())
        else:
            zt = w.mm(xb.t())
        logp = torch.log_softmax(zt.float().view(k, c, n), 1)
        losses = (logp.view(k, -1) * qt.view(1, -1)).sum(1)
        dzt = torch.add(qt, logp.exp_(), alpha=1.0 / n)  # (K, C, n): (p - q) / n per head
        grads = [dzt.view(k * c, n).mm(xb).float().view(k, c, -1)]
        if biased:
            grads.append(dzt.sum(2))
        return losses, grads


def fit_grid(
    heads: Sequence[nn.Module],
    train: BatchSource,
    val: BatchSource | None,
    num_classes: int,
    configs: list[TrainConfig],
    progress: bool = True,
    on_epochs: list[Any] | None = None,
) -> list[FitResult | TrainingDiverged] | None:
    """Train ``heads[k]`` with ``configs[k]`` in place, all in one pass; each ends with its best state.

    The heads must be built alike (same spec, standardisation and seed) and the configs differ only
    in ``lr`` and ``weight_decay`` (:func:`grid_not_covered`). Per head the result is what
    :func:`~featcache.train.fit.fit` returns for it, or the :class:`TrainingDiverged` it raises (the
    other heads go on). None, before any step, when a head is not one the closed form covers.

    Example:
        >>> cfgs = [TrainConfig(lr=lr) for lr in (1e-3, 1e-2)]  # doctest: +SKIP
        >>> heads = [build_head(spec, (512,), 10) for _ in cfgs]  # doctest: +SKIP
        >>> results = fit_grid(heads, src, val, 10, cfgs)  # doctest: +SKIP
    """
    for cfg in configs:
        _check_task(train, val, num_classes, "classify", cfg)
    configs = [c.resolved(len(train)) for c in configs]
    first, device = configs[0], train.device
    amp = first.amp if first.amp is not None else device.type == "cuda"
    grid = _build(heads, train, val, configs, amp, progress)
    if grid is None:
        return None
    t0 = time.perf_counter()
    interrupted = False
    try:
        _epochs(grid, first, num_classes, amp, progress, on_epochs)
    except KeyboardInterrupt:  # Ctrl-C: as fit, the finished epochs make unfinished runs
        if not any(h.run.history for h in grid):
            raise
        interrupted = True
    seconds = time.perf_counter() - t0
    out: list[FitResult | TrainingDiverged] = []
    for h in grid:
        if h.error is not None:
            out.append(h.error)
            continue
        h.run.restore_best(h.head, None, device)
        # Ctrl-C: a head whose epochs had all run (or that had stopped early) is finished all the same
        finished = not interrupted or h.done or len(h.run.history) == h.config.epochs
        extra = {**h.paths.record.as_dict(), "grid": len(grid)}
        bs = h.config.batch_for(len(train))
        out.append(
            FitResult(
                h.run.history, h.run.step_losses, int(h.run.best_epoch), h.run.stopped_early(h.config),
                seconds / len(grid), len(h.paths.train), extra=extra, batch_size=bs, finished=finished,
            )
        )  # fmt: skip
    return out


def _epochs(
    grid: list[_Head],
    first: TrainConfig,
    num_classes: int,
    amp: bool,
    progress: bool,
    on_epochs: list[Any] | None,
) -> None:
    """The epochs of ``fit``'s loop for every head that is still training: one pass over the batches
    per epoch, then each head's history, validation and patience."""
    gen = torch.Generator().manual_seed(first.seed)  # the batch order fit draws for this seed
    train = grid[0].paths.train
    with _seeded_rng(first.seed, train.device, _Progress()):
        bar = tqdm(range(first.epochs), "grid", unit="epoch", disable=not progress, dynamic_ncols=True)
        for epoch in bar:
            active = [h for h in grid if not h.done]
            if not active:
                break
            te = time.perf_counter()
            for h in active:
                h.head.train()
            step, scheds = _GridStep(active, amp), cast(LambdaLR, _Schedules(active))
            # one row per step, a loss per active head
            losses: list[Any] = _train_epoch(
                train, step, scheds, gen, first, epoch, progress and train.streamed
            )
            seconds = (time.perf_counter() - te) / len(active)  # each head's share of the epoch
            for k, h in enumerate(active):
                _end_epoch(h, epoch, [row[k] for row in losses], seconds, num_classes, on_epochs, grid)
            shown = [h for h in active if not h.error and h.run.history]
            if shown:
                _report_epoch(bar, shown[0].run.history[-1], shown[0].run.history, None)
        bar.close()


def _end_epoch(
    h: _Head,
    epoch: int,
    losses: list[float],
    seconds: float,
    num_classes: int,
    on_epochs: list[Any] | None,
    grid: list[_Head],
) -> None:
    """What ``fit`` does after an epoch, for one head: its history row, validation, best state,
    patience; a diverged head is kept with its error and trains no more."""
    try:
        row = _epoch_row(epoch, losses, h.sched, seconds, h.config)
        row.update(_validate(h.paths, num_classes))
    except TrainingDiverged as exc:
        h.error, h.done = exc, True
        return
    h.run.end_epoch(epoch + 1, row, losses, h.head, h.config.monitor)
    hook = on_epochs[grid.index(h)] if on_epochs is not None else None
    if hook is not None:
        hook(h.run.history)
    h.done = h.run.stopped_early(h.config)


def _build(
    heads: Sequence[nn.Module],
    train: BatchSource,
    val: BatchSource | None,
    configs: list[TrainConfig],
    amp: bool,
    progress: bool,
) -> list[_Head] | None:
    """Each head's optimizer, schedule, closed-form step and fast paths, the frozen front run once
    for all (their fronts are the same: same standardisation and pooling); None where a head has no
    closed-form step."""
    for head in heads:
        head.to(train.device)
    prepare_sources(heads[0], (train, val), True, range(configs[0].epochs))
    out = []
    paths0: FastPaths | None = None
    for head, cfg in zip(heads, configs, strict=True):
        opt = make_optimizer([p for p in head.parameters() if p.requires_grad], cfg)
        sched = make_schedule(opt, cfg, cfg.steps_per_epoch(len(train)))
        if paths0 is None:
            paths = paths0 = take_fast_paths(head, train, val, opt, cfg, amp, progress)
        else:
            paths = _same_paths(paths0, heads[0], head, opt, cfg, amp)
        if paths.step is None:
            return None
        out.append(_Head(head, cfg, opt, sched, paths.step, paths, _Progress()))
    return out


def _same_paths(
    paths0: FastPaths,
    head0: nn.Module,
    head: nn.Module,
    opt: torch.optim.Optimizer,
    cfg: TrainConfig,
    amp: bool,
) -> FastPaths:
    """The fast paths of ``head`` as ``paths0`` are of ``head0``: the same (mapped) rows, and the part
    of ``head`` that ``paths0`` trains and validates (the whole head, or the rest after its front)."""

    def part(module: nn.Module) -> nn.Module:
        if module is head0:
            return head
        split = split_front(head)
        if split is None:  # a head built otherwise than head0: not the same grid
            return head
        return split[1]

    model, val_model = part(paths0.model), part(paths0.val_model)
    step = LinearStep.build(model, opt, cfg.label_smoothing, amp) if paths0.step is not None else None
    return FastPaths(model, paths0.train, step, val_model, paths0.val, paths0.record)
