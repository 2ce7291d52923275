"""The fast trainer: heads on cached tensors, with validation, early stopping and resumable checkpoints.

It reads batches from :mod:`featcache.train.sources` and takes the fast paths of
:mod:`featcache.train.fast_step`.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .._util import FeatcacheError
from .config import TrainConfig
from .fast_step import LinearStep, split_front
from .sources import BatchSource, FeatureSource


@dataclass
class FitResult:
    """What :func:`fit` returns: per-epoch history, per-step losses and the best epoch."""

    history: list[dict[str, float]]
    step_losses: list[float]
    best_epoch: int
    stopped_early: bool
    seconds: float
    examples_per_epoch: int
    resumed_from: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


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


def make_schedule(
    opt: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LR multiplier: linear warm-up then cosine to zero, or constant."""
    total = max(1, config.epochs * steps_per_epoch)
    warm = int(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if config.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def evaluate(
    head: nn.Module, data: BatchSource, num_classes: int, batch_size: int = 1024, front_once: bool = True
) -> dict[str, Any]:
    """Loss, top-1, top-5 (when there are >= 5 classes), per-class accuracy and the confusion matrix.

    With ``front_once`` a pooled head on cached maps reads their channel means instead of the maps
    (the same numbers; see :meth:`~featcache.train.sources.FeatureSource.mapped`).

    Example:
        >>> m = evaluate(head, FeatureSource(x, y), num_classes=10)  # doctest: +SKIP
        >>> m["acc"], m["confusion"][0][:3]  # doctest: +SKIP
    """
    was = head.training
    head.eval()
    model, data = _front_on_means(head, data) if front_once else (head, data)
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
    out: dict[str, Any] = {
        "loss": loss_sum / n,
        "acc": correct / n,
        "per_class_acc": per_class,
        "confusion": conf.tolist(),
        "n": len(data),
    }
    if num_classes >= 5:
        out["top5"] = correct5 / n
    return out


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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

    Example:
        >>> result = fit(head, FeatureSource(x, y), None, 10, TrainConfig(epochs=5))  # doctest: +SKIP
    """
    _check_labels(train, val, num_classes)
    device = train.device
    head.to(device)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    params: list[Any] = [p for p in head.parameters() if p.requires_grad]
    if param_groups:
        params = list(param_groups)
    opt = make_optimizer(params, config)
    sched = make_schedule(opt, config, steps_per_epoch)
    amp = config.amp if config.amp is not None else device.type == "cuda"
    step_sched = not (config.schedule == "constant" and config.warmup_epochs == 0)  # skip a no-op per step
    gen = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    step_losses: list[float] = []
    best: dict[str, Any] = {"epoch": 0, "score": None, "state": None}
    start_epoch, bad_epochs = 0, 0
    ckpt = Path(checkpoint) if checkpoint else None
    torch_rng = None
    cuda_rng = None
    if resume and ckpt is not None and ckpt.exists():
        # CPU first: the batch-order generator's state must stay a CPU tensor; modules move it themselves.
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        try:
            head.load_state_dict(state["head"])
        except RuntimeError as exc:
            raise FeatcacheError(
                f"checkpoint {ckpt} does not fit this model (another head, fine-tuning mode or plan): {exc}"
            ) from exc
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        gen.set_state(state["gen"])
        torch_rng, cuda_rng = state["torch_rng"], state.get("cuda_rng")
        history, step_losses = state["history"], state["step_losses"]
        best = {"epoch": state["best_epoch"], "score": state["best_score"], "state": state["best_state"]}
        start_epoch, bad_epochs = int(state["epoch"]), int(state["bad_epochs"])
    split = split_front(head) if config.fast_paths else None
    for src in (train, val):  # read cached features into memory before the clock starts
        prepare = getattr(src, "prepare", None)
        if prepare is not None:
            prepare(split[0] if split else None, range(start_epoch, config.epochs))
    t0 = time.perf_counter()
    model, step = head, None
    if config.fast_paths:
        model, train, val = _front_once(head, train, val, progress)
        step = LinearStep.build(model, opt, config.label_smoothing, amp)
    front_seconds = time.perf_counter() - t0 if model is not head else 0.0
    # Validation reads a pooled head's channel means once per run, not once per epoch (e.g. with views).
    eval_model, eval_val = (
        _front_on_means(model, val) if config.fast_paths and val is not None else (model, val)
    )
    # A run that early stopping already ended stays ended when resumed.
    stopped_early = config.patience is not None and bad_epochs >= config.patience
    sign = -1.0 if config.monitor == "val_acc" else 1.0
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    inner = progress and getattr(train, "streamed", True)  # slow (streamed or live) epochs get a bar
    with torch.random.fork_rng(devices=cuda_devices), warnings.catch_warnings():
        # The closed-form step updates through the optimizer's fused kernel, not opt.step(), which the
        # scheduler's first step() checks for; the order is right.
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
        # torch.manual_seed would also queue a seed for every CUDA device (slow where there is none).
        (torch.manual_seed if cuda_devices else torch.default_generator.manual_seed)(config.seed)
        if torch_rng is not None:
            torch.set_rng_state(torch_rng)
        if cuda_rng is not None and cuda_devices:
            torch.cuda.set_rng_state(cuda_rng, device)
        bar = tqdm(
            range(start_epoch, config.epochs if not stopped_early else start_epoch),
            desc="train",
            unit="epoch",
            disable=not progress,
            initial=start_epoch,
            total=config.epochs,
            dynamic_ncols=True,
        )
        for epoch in bar:
            te = time.perf_counter()
            (train_mode or nn.Module.train)(head)
            losses = []
            if hasattr(train, "set_epoch"):  # e.g. a cycle of cached augmented views
                train.set_epoch(epoch)
            batches = train.batches(config.batch_size, gen)
            if inner:
                batches = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}", leave=False)
            for xb, yb in batches:
                if step is not None:
                    loss = step(xb, yb)
                else:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        logits = model(xb)
                    loss = F.cross_entropy(logits.float(), yb, label_smoothing=config.label_smoothing)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                if step_sched:
                    sched.step()
                losses.append(loss.detach())
            epoch_losses = torch.stack(losses).float().cpu().tolist()
            step_losses += epoch_losses
            row: dict[str, float] = {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(epoch_losses)),
                "lr": float(sched.get_last_lr()[0]),
                "train_seconds": time.perf_counter() - te,
            }
            if not math.isfinite(row["train_loss"]):
                raise TrainingDiverged(
                    f"training diverged in epoch {epoch + 1}: the loss is {row['train_loss']}. Lower the "
                    f"learning rate (--lr {config.lr / 10:g}), or check the cached features for non-finite "
                    "values (`featcache cache verify KEY`; a damaged entry is re-extracted after `cache rm`)"
                )
            if eval_val is not None and len(eval_val):
                m = evaluate(eval_model, eval_val, num_classes, front_once=False)
                row.update(val_loss=m["loss"], val_acc=m["acc"])
            history.append(row)
            if config.monitor not in row:  # no validation: the last epoch is the best, nothing to keep
                best, bad_epochs = {"epoch": epoch + 1, "score": None, "state": None}, 0
            elif best["score"] is None or sign * row[config.monitor] < best["score"]:
                state = copy.deepcopy(head.state_dict())
                best = {"epoch": epoch + 1, "score": sign * row[config.monitor], "state": state}
                bad_epochs = 0
            else:
                bad_epochs += 1
            bar.set_postfix(
                loss=f"{row['train_loss']:.3f}",
                **({"val_acc": f"{row['val_acc']:.3f}"} if "val_acc" in row else {}),
            )
            if ckpt is not None:
                _atomic_torch_save(
                    {
                        "head": head.state_dict(),
                        "optimizer": opt.state_dict(),
                        "schedule": sched.state_dict(),
                        "gen": gen.get_state(),
                        "torch_rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state(device) if cuda_devices else None,
                        "history": history,
                        "step_losses": step_losses,
                        "best_epoch": best["epoch"],
                        "best_score": best["score"],
                        "best_state": best["state"],
                        "epoch": epoch + 1,
                        "bad_epochs": bad_epochs,
                        "config": asdict(config),
                    },
                    ckpt,
                )
            if config.patience is not None and bad_epochs >= config.patience:
                stopped_early = True
                break
            if stop_after_epochs is not None and epoch + 1 - start_epoch >= stop_after_epochs:
                break
    if best["state"] is not None:
        head.load_state_dict(best["state"])
    head.eval()
    return FitResult(
        history,
        step_losses,
        int(best["epoch"]),
        stopped_early,
        time.perf_counter() - t0,
        len(train),
        resumed_from=start_epoch,
        extra={
            "fast_paths": config.fast_paths,
            "front_once": model is not head,
            "front_from_channel_means": bool(getattr(train, "from_channel_means", False)),
            "front_seconds": front_seconds,
            "closed_form_step": step is not None,
        },
    )


class TrainingDiverged(FeatcacheError):
    """The training loss became NaN or infinite (checkpoints of the epochs before are kept)."""


def _check_labels(train: BatchSource, val: BatchSource | None, num_classes: int) -> None:
    """An empty training split, or labels outside ``0..num_classes-1``, named before any step runs
    (on CUDA an out-of-range label would be a device-side assert that poisons the process)."""
    if len(train) == 0:
        raise FeatcacheError(
            "the training split is empty: nothing to train on (check the dataset and --limit)"
        )
    for name, src in (("train", train), ("val", val)):
        y = getattr(src, "y", None)
        if isinstance(y, torch.Tensor) and len(y):
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= num_classes:
                raise FeatcacheError(
                    f"{name} labels run from {lo} to {hi} but the head has {num_classes} classes "
                    f"(0..{num_classes - 1}): these features' labels do not belong to this head; "
                    "build the head from the same dataset's classes"
                )


def _front_on_means(head: nn.Module, data: BatchSource) -> tuple[nn.Module, BatchSource]:
    """(model, data) with a pooled head's front run once over the cached channel means of ``data``,
    when it can: the same numbers as the head on the maps, without reading them."""
    split = split_front(head)
    if split is not None and isinstance(data, FeatureSource) and data.reads_channel_means(split[0]):
        mapped = data.mapped(split[0])
        if mapped is not None:
            return split[1], mapped
    return head, data


def _front_once(
    head: nn.Module, train: BatchSource, val: BatchSource | None, progress: bool
) -> tuple[nn.Module, BatchSource, BatchSource | None]:
    """(module to train, train, val) with the head's frozen front run once over the features, when it can.

    The front (standardisation, pooling, flatten) gives every row the same output in every epoch; see
    :mod:`featcache.train.fast_step`. Both splits are mapped, or neither.
    """
    split = split_front(head)
    if (
        split is None
        or not isinstance(train, FeatureSource)
        or not (val is None or isinstance(val, FeatureSource))
    ):
        return head, train, val
    front, rest = split
    mapped = train.mapped(front, progress)
    mapped_val = val.mapped(front, progress) if val is not None else None
    if mapped is None or (val is not None and mapped_val is None):
        return head, train, val
    return rest, mapped, mapped_val
