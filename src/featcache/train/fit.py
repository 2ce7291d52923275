"""The fast trainer: heads on cached tensors, with validation, early stopping and resumable checkpoints.

It reads batches from any :class:`~featcache.train.sources.BatchSource` and takes the fast paths that
:mod:`featcache.train.fast_path` chooses.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from .._disk import disk_error, disk_errors
from .._errors import flag
from .._util import FeatcacheError
from .config import TrainConfig
from .fast_path import FastPaths, on_channel_means, prepare_sources, take_fast_paths
from .objectives import METRIC, loss_name, make_loss, multilabel_metrics, pos_weights, regress_metrics
from .sources import BatchSource


@dataclass
class FitResult:
    """What :func:`fit` returns: per-epoch history, per-step losses and the best epoch; ``extra`` says which
    fast paths it took (:meth:`~featcache.train.fast_path.FastPathRecord.as_dict`)."""

    history: list[dict[str, float]]
    step_losses: list[float]
    best_epoch: int
    stopped_early: bool
    seconds: float
    examples_per_epoch: int
    resumed_from: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 0
    finished: bool = True

    def __repr__(self) -> str:
        return (
            f"FitResult(epochs={len(self.history)}, best_epoch={self.best_epoch}, "
            f"stopped_early={self.stopped_early}, seconds={self.seconds:.3g})"
        )


def make_optimizer(params: Any, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD as configured (fused kernels where this torch supports them).

    ``params`` may be parameters or parameter groups (dicts with their own ``lr``).
    """
    kw: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, momentum=config.momentum, **kw)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    params = list(params)
    try:
        return cls(params, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return cls(params, **kw)


def make_schedule(opt: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> LambdaLR:
    """Per-step LR multiplier: linear warm-up then cosine to zero, or constant."""
    total = max(1, config.epochs * steps_per_epoch)
    warm = int(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if config.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return LambdaLR(opt, factor)


@torch.no_grad()
def evaluate(
    head: nn.Module,
    data: BatchSource,
    num_classes: int,
    batch_size: int = 1024,
    front_once: bool = True,
    task: str = "classify",
    threshold: float = 0.5,
    names: list[str] | None = None,
) -> dict[str, Any]:
    """Loss, top-1, top-5 (when there are >= 5 classes), per-class accuracy and the confusion matrix;
    for the other tasks their metrics (:mod:`featcache.train.objectives`): mAP, per-label AP and F1 at
    ``threshold`` (multilabel), MAE, RMSE, R², Pearson r (regress, in the units of the head's outputs).

    With ``front_once`` a pooled head on cached maps reads their channel means instead of the maps
    (the same numbers; see :meth:`~featcache.train.sources.FeatureSource.mapped`).

    Example:
        >>> m = evaluate(head, FeatureSource(x, y), num_classes=10)  # doctest: +SKIP
        >>> m["acc"], m["confusion"][0][:3]  # doctest: +SKIP
    """
    if task != "classify":
        return _evaluate_task(head, data, task, batch_size, front_once, threshold, names)
    was = head.training
    head.eval()
    model, data = on_channel_means(head, data) if front_once else (head, data)
    loss_sum, correct, correct5 = 0.0, 0, 0
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for xb, yb in data.batches(batch_size, None):
        logits = model(xb).float()
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        pred = logits.argmax(1)
        correct += int((pred == yb).sum())
        if num_classes >= 5:
            correct5 += int((logits.topk(5, 1).indices == yb[:, None]).any(1).sum())
        conf += torch.bincount((yb * num_classes + pred).cpu(), minlength=num_classes**2).view(
            num_classes, -1
        )
    head.train(was)
    n = max(1, len(data))
    per_class = (conf.diag().double() / conf.sum(1).clamp_min(1).double()).tolist()
    present = [a for a, row in zip(per_class, conf.sum(1).tolist()) if row]
    out: dict[str, Any] = {
        "loss": loss_sum / n,
        "acc": correct / n,
        # the mean of the per-class recalls over the classes present: accuracy that imbalance cannot inflate
        "balanced_acc": sum(present) / max(1, len(present)),
        "per_class_acc": per_class,
        "confusion": conf.tolist(),
        "n": len(data),
    }
    if num_classes >= 5:
        out["top5"] = correct5 / n
    return out


def _evaluate_task(
    head: nn.Module,
    data: BatchSource,
    task: str,
    batch_size: int,
    front_once: bool,
    threshold: float,
    names: list[str] | None,
) -> dict[str, Any]:
    """:func:`evaluate` of a multi-label or regression head: every output, then the task's metrics."""
    was = head.training
    head.eval()
    model, data = on_channel_means(head, data) if front_once else (head, data)
    outs, ys = [], []
    for xb, yb in data.batches(batch_size, None):
        outs.append(model(xb).float().cpu())
        ys.append(yb.float().cpu())
    head.train(was)
    out = torch.cat(outs) if outs else torch.zeros(0, 0)
    y = torch.cat(ys) if ys else torch.zeros(0, 0)
    loss = float(make_loss(task, None)(out, y)) if len(y) else float("nan")
    if task == "multilabel":
        return {"loss": loss, **multilabel_metrics(out.numpy(), y.numpy(), threshold)}
    return {"loss": loss, **regress_metrics(out.numpy(), y.numpy(), names)}


def class_weights(y: torch.Tensor | None, num_classes: int, mode: str) -> torch.Tensor | None:
    """``balanced``: n / (classes x n_c) per class (scikit-learn's formula); None for ``none``.

    Example:
        >>> class_weights(torch.tensor([0, 0, 0, 1]), 2, "balanced").tolist()
        [0.6666666865348816, 2.0]
    """
    if mode == "none":
        return None
    if y is None:
        raise FeatcacheError(f"--class-weight {mode} needs the training labels, and this source has none")
    counts = torch.bincount(y, minlength=num_classes).float()
    return (len(y) / (num_classes * counts.clamp_min(1))).to(y.device)


@torch.no_grad()
def predict_logits(head: nn.Module, data: BatchSource, batch_size: int = 1024) -> torch.Tensor:
    """The logits ``(N, classes)`` of every row of ``data`` in its order, as float32 on the CPU.

    Example:
        >>> predict_logits(head, source_for(cached, "penultimate")).argmax(1)  # doctest: +SKIP
    """
    was = head.training
    head.eval()
    model, data = on_channel_means(head, data)
    out = [model(xb).float().cpu() for xb, _ in data.batches(batch_size, None)]
    head.train(was)
    return torch.cat(out) if out else torch.zeros(0, 0)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    fix = "choose another --out"
    try:
        with disk_errors(path.parent, None, "the training checkpoint", fix):
            try:
                torch.save(obj, tmp)
            except RuntimeError as exc:  # torch's zip writer reports a full disk as "file write failed"
                failed = OSError(None, str(exc), str(tmp))
                err = disk_error(failed, path.parent, None, "the training checkpoint", fix)
                if err is None:
                    raise
                raise err from exc
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # the previous checkpoint stays whole
        raise


def fit(
    head: nn.Module,
    train: BatchSource,
    val: BatchSource | None,
    num_classes: int,
    config: TrainConfig,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    train_mode: Callable[[nn.Module], None] | None = None,
    task: str = "classify",
) -> FitResult:
    """Train ``head`` in place on cached features; the best state (by ``monitor``) is loaded at the end.

    Args:
        head: the module to train (built with :func:`featcache.train.heads.build_head`).
        train: training features.
        val: validation features (None: the last epoch is the best).
        num_classes: number of classes.
        config: hyper-parameters.
        progress: show a progress bar.
        checkpoint: file written after every epoch (head, optimizer, schedule, RNG, history).
        resume: continue from ``checkpoint`` if it exists; ends where an uninterrupted run would.
        stop_after_epochs: stop after this many epochs in this call (simulates an interruption).
        param_groups: optimizer parameter groups (discriminative learning rates); default: all
            parameters of ``head`` that require grad, at ``config.lr``.
        train_mode: puts the model in training mode each epoch (default ``head.train()``); fine-tuning
            uses it to keep frozen parts and frozen BatchNorm layers in eval mode.
        task: ``classify``, ``multilabel`` or ``regress`` (:mod:`featcache.train.objectives`).

    Example:
        >>> result = fit(head, FeatureSource(x, y), None, 10, TrainConfig(epochs=5))  # doctest: +SKIP
    """
    _check_task(train, val, num_classes, task, config)
    config = config.resolved(len(train))  # an automatic batch size, decided by the split's size
    device = train.device
    head.to(device)
    params = list(param_groups) if param_groups else [p for p in head.parameters() if p.requires_grad]
    opt = make_optimizer(params, config)
    sched = make_schedule(opt, config, config.steps_per_epoch(len(train)))
    amp = config.amp if config.amp is not None else device.type == "cuda"
    gen = torch.Generator().manual_seed(config.seed)
    ckpt = Path(checkpoint) if checkpoint else None
    run = _Progress()
    if resume and ckpt is not None and ckpt.exists():
        run = _Progress.load(ckpt, head, opt, sched, gen)
    start_epoch = run.epoch
    # Read cached features into memory before the clock starts.
    prepare_sources(head, (train, val), config.fast_paths, range(start_epoch, config.epochs))
    t0 = time.perf_counter()
    paths = take_fast_paths(head, train, val, opt, config, amp, progress, closed_form=task == "classify")
    step = paths.step or _autograd_step(paths.model, opt, config, amp, train, num_classes, task)
    # A run that early stopping already ended stays ended when resumed.
    end = start_epoch if run.stopped_early(config) else config.epochs
    with _seeded_rng(config.seed, device, run):
        bar = tqdm(range(start_epoch, end), "train", config.epochs, initial=start_epoch, unit="epoch",
                   disable=not progress, dynamic_ncols=True)  # fmt: skip
        interrupted = False
        try:
            for epoch in bar:
                te = time.perf_counter()
                (train_mode or nn.Module.train)(head)
                losses = _train_epoch(
                    paths.train, step, sched, gen, config, epoch, progress and paths.train.streamed
                )
                row = _epoch_row(epoch, losses, sched, time.perf_counter() - te, config)
                row.update(_validate(paths, num_classes, task))
                run.end_epoch(epoch + 1, row, losses, head, config.monitor)
                val_shown = {"val_acc": f"{row['val_acc']:.3f}"} if "val_acc" in row else {}
                # no redraw of its own: tqdm's iterator counts epochs between redraws (0/N shown otherwise)
                bar.set_postfix(loss=f"{row['train_loss']:.3f}", **val_shown, refresh=False)
                if ckpt is not None:
                    run.save(ckpt, head, opt, sched, gen, device, config)
                if run.stopped_early(config):
                    break
                if stop_after_epochs is not None and epoch + 1 - start_epoch >= stop_after_epochs:
                    break
        except KeyboardInterrupt:  # Ctrl-C: keep what the finished epochs trained (below), then say so
            bar.close()
            if not run.history:
                raise
            interrupted = True
    run.restore_best(head, ckpt if interrupted else None, device)
    result = FitResult(
        run.history,
        run.step_losses,
        int(run.best_epoch),
        run.stopped_early(config),
        time.perf_counter() - t0,
        len(paths.train),
        resumed_from=start_epoch,
        extra=paths.record.as_dict(),
        batch_size=config.batch_for(len(train)),
        finished=not interrupted,
    )
    if interrupted:
        raise TrainingInterrupted(result)
    return result


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C after one epoch or more: ``result`` holds the finished epochs (``finished`` False) and the
    head is left with the best of them, so the caller can write a usable, unfinished run."""

    def __init__(self, result: FitResult, hint: str = "") -> None:
        super().__init__(f"interrupted after epoch {len(result.history)}")
        self.result, self.hint = result, hint


class TrainingDiverged(FeatcacheError):
    """The training loss became NaN or infinite (checkpoints of the epochs before are kept)."""


def _check_task(
    train: BatchSource, val: BatchSource | None, num_classes: int, task: str, config: TrainConfig
) -> None:
    """The labels fit ``task`` and the head, and ``config``'s loss and monitor fit ``task``: before a step."""
    if task == "classify":
        if config.loss not in (None, "cross-entropy") or config.pos_weight is not None:
            raise FeatcacheError(
                f"a classifier trains with cross-entropy: --loss {config.loss} / --pos-weight "
                f"{config.pos_weight} are for multilabel and regress tasks (DataConfig.task)"
            )
        _check_labels(train, val, num_classes)
    else:
        loss_name(task, config.loss)
        if config.pos_weight is not None and task != "multilabel":
            raise FeatcacheError(
                f"--pos-weight {config.pos_weight} weighs multi-label positives; this task is {task}"
            )
        for name, src in (("train", train), ("val", val)):
            y = src.y if src is not None else None
            if y is not None and (
                y.dim() != 2 or y.shape[1] != num_classes or y.is_floating_point() is False
            ):
                raise FeatcacheError(
                    f"{name} labels of shape {tuple(y.shape)} do not fit a {task} head of "
                    f"{num_classes} outputs: "
                    "build the head from the same dataset"
                )
    wanted = ("val_loss", f"val_{METRIC[task]}")
    if config.monitor not in wanted:
        raise FeatcacheError(
            f"--monitor {config.monitor} is not a metric of a {task} task: use {' or '.join(wanted)}"
        )


def _check_labels(train: BatchSource, val: BatchSource | None, num_classes: int) -> None:
    """An empty training split, or labels outside ``0..num_classes-1``, named before any step runs
    (on CUDA an out-of-range label would be a device-side assert that poisons the process)."""
    if len(train) == 0:
        raise FeatcacheError(
            "the training split is empty: nothing to train on (check the dataset and --limit)"
        )
    for name, src in (("train", train), ("val", val)):
        y = src.y if src is not None else None
        if y is not None and len(y):
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= num_classes:
                raise FeatcacheError(
                    f"{name} labels run from {lo} to {hi} but the head has {num_classes} classes "
                    f"(0..{num_classes - 1}): these features' labels do not belong to this head; "
                    "build the head from the same dataset's classes"
                )


@dataclass
class _Progress:
    """Where a run stands between epochs: what a checkpoint holds besides the modules and generators."""

    history: list[dict[str, float]] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    epoch: int = 0  # epochs done
    bad_epochs: int = 0  # epochs since ``monitor`` last improved
    best_epoch: int = 0
    best_score: float | None = None  # ``monitor``, negated where higher is better
    best_state: dict[str, Any] | None = None  # the head's state at ``best_epoch`` (None: the last epoch's)
    torch_rng: torch.Tensor | None = None  # the global generators' states to continue from
    cuda_rng: torch.Tensor | None = None

    @classmethod
    def load(
        cls, path: Path, head: nn.Module, opt: torch.optim.Optimizer, sched: LambdaLR, gen: torch.Generator
    ) -> _Progress:
        """Restore ``head``, ``opt``, ``sched`` and ``gen`` from the checkpoint at ``path``; the rest too."""
        # CPU first: the batch-order generator's state must stay a CPU tensor; modules move it themselves.
        state = torch.load(path, map_location="cpu", weights_only=True)
        try:
            head.load_state_dict(state["head"])
        except RuntimeError as exc:
            raise FeatcacheError(
                f"checkpoint {path} does not fit this model (another head, fine-tuning mode or plan): {exc}"
            ) from exc
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        gen.set_state(state["gen"])
        return cls(
            state["history"],
            state["step_losses"],
            int(state["epoch"]),
            int(state["bad_epochs"]),
            state["best_epoch"],
            state["best_score"],
            state["best_state"],
            state["torch_rng"],
            state.get("cuda_rng"),
        )

    def restore_best(self, head: nn.Module, checkpoint: Path | None, device: torch.device) -> None:
        """Put the best epoch's state in ``head`` (without validation: the last epoch's, which a run
        interrupted mid-epoch reads from its ``checkpoint``); eval mode."""
        if self.best_state is not None:
            head.load_state_dict(self.best_state)
        elif checkpoint is not None and checkpoint.exists():  # the last finished epoch, not a half one
            head.load_state_dict(torch.load(checkpoint, map_location=device, weights_only=True)["head"])
        head.eval()

    def stopped_early(self, config: TrainConfig) -> bool:
        """Whether early stopping ends the run here."""
        return config.patience is not None and self.bad_epochs >= config.patience

    def end_epoch(
        self, epoch: int, row: dict[str, float], losses: list[float], head: nn.Module, monitor: str
    ) -> None:
        """Record epoch ``epoch`` (counted from 1); keep the head's state when ``monitor`` improved."""
        self.step_losses += losses
        self.history.append(row)
        self.epoch = epoch
        sign = 1.0 if monitor == "val_loss" else -1.0  # every other monitor is better higher
        if monitor not in row:  # no validation: the last epoch is the best, nothing to keep
            self.best_epoch, self.best_score, self.best_state, self.bad_epochs = epoch, None, None, 0
        elif self.best_score is None or sign * row[monitor] < self.best_score:
            state = copy.deepcopy(head.state_dict())
            self.best_epoch, self.best_score, self.best_state = epoch, sign * row[monitor], state
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1

    def save(
        self,
        path: Path,
        head: nn.Module,
        opt: torch.optim.Optimizer,
        sched: LambdaLR,
        gen: torch.Generator,
        device: torch.device,
        config: TrainConfig,
    ) -> None:
        """Write the checkpoint that :meth:`load` continues from, atomically."""
        _atomic_torch_save(
            {
                "head": head.state_dict(),
                "optimizer": opt.state_dict(),
                "schedule": sched.state_dict(),
                "gen": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "history": self.history,
                "step_losses": self.step_losses,
                "best_epoch": self.best_epoch,
                "best_score": self.best_score,
                "best_state": self.best_state,
                "epoch": self.epoch,
                "bad_epochs": self.bad_epochs,
                "config": asdict(config),
            },
            path,
        )


@contextmanager
def _seeded_rng(seed: int, device: torch.device, run: _Progress) -> Iterator[None]:
    """The global generators (dropout) seeded with ``seed``, or where ``run`` left them, inside; restored
    to the caller's state afterwards."""
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        # torch.manual_seed would also queue a seed for every CUDA device (slow where there is none).
        (torch.manual_seed if cuda_devices else torch.default_generator.manual_seed)(seed)
        if run.torch_rng is not None:
            torch.set_rng_state(run.torch_rng)
        if run.cuda_rng is not None and cuda_devices:
            torch.cuda.set_rng_state(run.cuda_rng, device)
        yield


def _autograd_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    config: TrainConfig,
    amp: bool,
    train: BatchSource,
    num_classes: int,
    task: str,
) -> _AutogradStep:
    """The autograd step with the task's loss: weighted cross-entropy, BCE (with ``config.pos_weight``
    from the training labels), or MSE / Huber on (standardised) targets."""
    if task == "classify":
        weight = class_weights(train.y, num_classes, config.class_weight)
        return _AutogradStep(model, opt, config, amp, train.device, weight)
    pos = pos_weights(train.y, config.pos_weight) if task == "multilabel" and train.y is not None else None
    return _AutogradStep(model, opt, config, amp, train.device, None, make_loss(task, config.loss, pos))


class _AutogradStep:
    """One training step of ``model`` with autograd and ``opt.step()``: the step without a closed form."""

    def __init__(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        config: TrainConfig,
        amp: bool,
        device: torch.device,
        weight: torch.Tensor | None = None,
        loss_fn: Callable[..., torch.Tensor] | None = None,
    ) -> None:
        self.model, self.opt, self.amp, self.device_type = model, opt, amp, device.type
        self.smoothing = config.label_smoothing
        self.weight = weight
        self.loss_fn = loss_fn  # multilabel / regress (None: cross-entropy)

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.model(xb)
        if self.loss_fn is not None:
            loss = self.loss_fn(logits.float(), yb)
        else:
            loss = F.cross_entropy(logits.float(), yb, weight=self.weight, label_smoothing=self.smoothing)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss


def _train_epoch(
    train: BatchSource,
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sched: LambdaLR,
    gen: torch.Generator,
    config: TrainConfig,
    epoch: int,
    bar: bool,
) -> list[float]:
    """One pass over ``train`` in the batches ``gen`` draws, a step and a schedule step each; the losses."""
    step_sched = not (config.schedule == "constant" and config.warmup_epochs == 0)  # skip a no-op per step
    train.set_epoch(epoch)  # e.g. a cycle of cached augmented views
    batches = train.batches(config.batch_for(len(train)), gen)
    if bar:  # slow (streamed or live) epochs get their own bar
        steps = config.steps_per_epoch(len(train))
        batches = tqdm(batches, total=steps, desc=f"epoch {epoch + 1}", leave=False)
    losses = []
    with warnings.catch_warnings():
        # The closed-form step updates through the optimizer's fused kernel, not opt.step(), which the
        # scheduler's first step() checks for; the order is right.
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
        for xb, yb in batches:
            loss = step(xb, yb)
            if step_sched:
                sched.step()
            losses.append(loss.detach())
    return torch.stack(losses).float().cpu().tolist()


def _validate(paths: FastPaths, num_classes: int, task: str = "classify") -> dict[str, float]:
    """``val_loss`` and the task's metric (``val_acc``, ``val_map``, ``val_r2``) of the epoch's model, as
    the fast paths validate it; none without rows."""
    if paths.val is None or not len(paths.val):
        return {}
    m = evaluate(paths.val_model, paths.val, num_classes, front_once=False, task=task)
    if not math.isfinite(m["loss"]):  # it would choose the best epoch and stop early on nothing
        raise TrainingDiverged(
            f"the validation loss is {m['loss']} while the training loss is finite: a validation feature "
            "row holds non-finite values (check the cache with `featcache cache verify KEY`), or the "
            "head's outputs overflow (lower --lr)"
        )
    return {"val_loss": m["loss"], f"val_{METRIC[task]}": m[METRIC[task]]}


def _epoch_row(
    epoch: int,
    losses: list[float],
    sched: LambdaLR,
    seconds: float,
    config: TrainConfig,
) -> dict[str, float]:
    """The history row of epoch ``epoch`` (from 0); :class:`TrainingDiverged` when its loss is not finite."""
    row: dict[str, float] = {
        "epoch": epoch + 1,
        "train_loss": float(np.mean(losses)),
        "lr": float(sched.get_last_lr()[0]),
        "train_seconds": seconds,
    }
    if not math.isfinite(row["train_loss"]):
        raise TrainingDiverged(
            f"training diverged in epoch {epoch + 1}: the loss is {row['train_loss']}. Lower the "
            f"learning rate ({flag('lr', config.lr / 10)}), or check the cached features for non-finite "
            "values (`featcache cache verify KEY`; a damaged entry is re-extracted after `cache rm`)"
        )
    return row
