"""The head trainer's fast paths, in one place: which apply to a head and its sources, and what ran.

Besides the DataLoader's per-sample indexing and collate, two costs repeat in the reference loop on
cached features although nothing about them changes:

* A head such as ``pooled-linear`` (the reference ``SimpleClassifier``: ``AdaptiveAvgPool2d(1)`` →
  ``Flatten`` → ``Linear``) starts with parameter-free, deterministic modules. They map each cached row
  to the same output in every epoch, so :func:`split_front` cuts them off and the trainer runs them once
  over the features (:meth:`featcache.train.sources.BatchSource.mapped`); the epochs then train the rest
  on ``C`` numbers per row instead of ``C*H*W``. Average pooling and the frozen standardisation are
  linear, so this is the same training, not an approximation; it is also why the front can run on the
  channel means the cache stores beside each map, without reading the map (validation does so even when
  training cannot map its rows, e.g. augmented views: :func:`on_channel_means`).
* For a lone ``nn.Linear`` under cross-entropy the gradient has a closed form: with ``p = softmax(z)``
  and ``q`` the (label-smoothed) one-hot target, ``dL/dz = (p - q) / B``, ``dL/dW = (dL/dz)^T x`` and
  ``dL/db = sum(dL/dz)``. :class:`LinearStep` computes that with two matrix products and updates the
  parameters with the kernel ``torch.optim.Adam(fused=True)`` itself calls, on the optimizer's own state:
  about a dozen tensor operations per step instead of autograd's graph plus the optimizer's Python
  bookkeeping, which is most of a small-batch step. Optimizer state, checkpoints and resume are
  untouched: the state tensors are the optimizer's.

:func:`take_fast_paths` decides which of them apply to one fit and returns what the epochs run
(:class:`FastPaths`) with a record of what it took (:class:`FastPathRecord`). Both paths are checked
against the plain autograd loop in ``tests/test_fast_path.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import TrainConfig
from .heads import Head, Standardize
from .sources import BatchSource

_STATELESS = (nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)


def split_front(model: nn.Module) -> tuple[nn.Sequential, nn.Sequential] | None:
    """Split a :class:`~featcache.train.heads.Head` into its frozen front and the trainable rest.

    The front is the standardisation plus the leading parameter-free, deterministic modules of the
    body (pooling, flatten); the rest shares its modules (and so its parameters) with ``model``.
    Returns None when there is nothing worth running once (no head, or only a flatten).

    Example:
        >>> head = build_head(HeadSpec("pooled-linear"), (256, 7, 7), 10)  # doctest: +SKIP
        >>> front, rest = split_front(head)  # doctest: +SKIP
        >>> torch.allclose(rest(front(x)), head(x))  # doctest: +SKIP
    """
    if not isinstance(model, Head) or not isinstance(model.body, nn.Sequential):
        return None
    body = list(model.body)
    k = 0
    while k < len(body) and isinstance(body[k], _STATELESS) and not any(True for _ in body[k].parameters()):
        k += 1
    front = ([] if isinstance(model.standardize, nn.Identity) else [model.standardize]) + body[:k]
    if not any(isinstance(m, (nn.AdaptiveAvgPool2d, Standardize)) for m in front) or k == len(body):
        return None
    return nn.Sequential(*front), nn.Sequential(*body[k:])


def _lone_linear(model: nn.Module) -> nn.Linear | None:
    if isinstance(model, Head) and isinstance(model.standardize, nn.Identity):
        model = model.body
    mods = list(model) if isinstance(model, nn.Sequential) else [model]
    mods = [m for m in mods if not isinstance(m, (nn.Flatten, nn.Identity))]
    if len(mods) == 1 and isinstance(mods[0], nn.Linear):
        return mods[0]
    return None


class LinearStep:
    """One training step of a lone ``nn.Linear`` on (label-smoothed) cross-entropy, gradient in closed form.

    Build it with :meth:`build`, which returns None when the model or optimizer is not one it covers
    (then train with autograd). Calling it on a batch updates the parameters and returns the batch's
    mean loss (a 0-d tensor, not synchronised).

    Example:
        >>> step = LinearStep.build(nn.Linear(512, 10), opt, label_smoothing=0.1)  # doctest: +SKIP
        >>> loss = step(xb, yb)  # doctest: +SKIP
    """

    def __init__(
        self, linear: nn.Linear, opt: torch.optim.Optimizer, label_smoothing: float, amp: bool
    ) -> None:
        self.linear, self.opt = linear, opt
        self.params = [p for p in (linear.weight, linear.bias) if p is not None]
        self._state: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None = None
        self.amp = amp
        self.smoothing = float(label_smoothing)
        self.classes = linear.out_features
        self._tables: dict[int, torch.Tensor] = {}
        group = opt.param_groups[0]
        decoupled = isinstance(opt, torch.optim.AdamW) or bool(group.get("decoupled_weight_decay"))
        fused_op = getattr(torch, "_fused_adamw_" if decoupled else "_fused_adam_", None)
        adam = isinstance(opt, torch.optim.Adam | torch.optim.AdamW)
        plain = not any(group.get(k) for k in ("amsgrad", "maximize", "capturable", "differentiable"))
        # The optimizer's own fused kernel, called directly, or opt.step() with the gradients set.
        self._fused = fused_op if adam and plain and group.get("fused") else None

    @classmethod
    def build(
        cls, model: nn.Module, opt: torch.optim.Optimizer, label_smoothing: float = 0.0, amp: bool = False
    ) -> LinearStep | None:
        """A step for ``model`` when it is one ``nn.Linear`` (maybe inside a Sequential with flattens) and
        ``opt`` holds exactly its parameters in one group; otherwise None."""
        linear = _lone_linear(model)
        if linear is None or len(opt.param_groups) != 1:
            return None
        params = [p for p in (linear.weight, linear.bias) if p is not None]
        if not all(p.requires_grad for p in params):
            return None
        if {id(p) for p in opt.param_groups[0]["params"]} != {id(p) for p in params}:
            return None
        return cls(linear, opt, label_smoothing, amp)

    def _table(self, n: int, device: torch.device) -> torch.Tensor:
        """Column ``c`` is ``-q_c / n``: class ``c``'s smoothed one-hot target, negated, over the batch."""
        table = self._tables.get(n)
        if table is None:
            eye = torch.eye(self.classes, device=device)
            q = eye * (1 - self.smoothing) + self.smoothing / self.classes
            table = self._tables[n] = -q / n
        return table

    def _grads(
        self, xb: torch.Tensor, yb: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        # Class-major (C, n) logits: the softmax then reduces across rows of a contiguous matrix, which
        # runs several times faster on CPU than over the C elements of each of n rows.
        if xb.dim() > 2:  # a linear head on a map: the head's Flatten
            xb = xb.flatten(1)
        n = len(yb)
        qt = self._table(n, xb.device).index_select(1, yb)
        zt = torch.addmm(b.view(-1, 1), w, xb.t()) if b is not None else w.mm(xb.t())
        logp = torch.log_softmax(zt.float(), 0)
        loss = torch.dot(logp.view(-1), qt.view(-1))  # mean over the batch of -sum_c q_c log p_c
        dzt = torch.add(qt, logp.exp_(), alpha=1.0 / n)  # (p - q) / n, transposed
        grads = [dzt.mm(xb).float()]  # under autocast the product runs in bf16, as autograd's would
        if b is not None:
            grads.append(dzt.sum(1))
        return loss, grads

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        # Detached aliases (reading and updating them records no graph), taken each step: Module.to()
        # or load_state_dict may have given the parameters new storage since the last one.
        data = [p.detach() for p in self.params]
        w, b = data[0], (data[1] if len(data) > 1 else None)
        if self.amp:
            with torch.autocast(xb.device.type, dtype=torch.bfloat16):
                loss, grads = self._grads(xb, yb, w, b)
        else:
            loss, grads = self._grads(xb, yb, w, b)
        if self._fused is None:
            for p, g in zip(self.params, grads, strict=True):
                p.grad = g
            self.opt.step()
            return loss
        state = self._state
        if state is None or state[0][0] is not self.opt.state[self.params[0]].get("exp_avg"):
            state = self._init_state()  # first step, or the optimizer's state was loaded anew
        exp_avgs, exp_avg_sqs, steps = state
        group = self.opt.param_groups[0]
        torch._foreach_add_(steps, 1)
        self._fused(
            data,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            amsgrad=False,
            lr=group["lr"],
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
        return loss

    def _init_state(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The optimizer's exp_avg / exp_avg_sq / step tensors, made as ``Adam(fused=True)`` makes them."""
        out: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
        for p in self.params:
            st = self.opt.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            out[0].append(st["exp_avg"])
            out[1].append(st["exp_avg_sq"])
            out[2].append(st["step"])
        self._state = out
        return out


@dataclass(frozen=True)
class FastPathRecord:
    """Which fast paths one fit took; :meth:`as_dict` is ``FitResult.extra`` and metrics.json's
    ``fast_paths``."""

    enabled: bool  #: ``TrainConfig.fast_paths``
    front_once: bool = False  #: the head's frozen front ran once over the training (and validation) rows
    front_from_channel_means: bool = False  #: ... on the cached channel means instead of the maps
    front_seconds: float = 0.0  #: the time that took
    closed_form_step: bool = False  #: a lone Linear trained with :class:`LinearStep`

    def as_dict(self) -> dict[str, Any]:
        """The record under the keys metrics.json readers know."""
        return {
            "fast_paths": self.enabled,
            "front_once": self.front_once,
            "front_from_channel_means": self.front_from_channel_means,
            "front_seconds": self.front_seconds,
            "closed_form_step": self.closed_form_step,
        }


@dataclass(frozen=True)
class FastPaths:
    """What one fit's epochs run once :func:`take_fast_paths` has chosen: the same training as the head
    on the original sources."""

    model: nn.Module  #: trained each epoch: the head, or the rest of it after its front
    train: BatchSource  #: the rows ``model`` trains on
    step: LinearStep | None  #: the closed-form step for ``model``; None: autograd
    val_model: nn.Module  #: validates: ``model``, or the rest of it after its front on the channel means
    val: BatchSource | None  #: the rows ``val_model`` validates on
    record: FastPathRecord


def prepare_sources(
    head: nn.Module, sources: tuple[BatchSource | None, ...], enabled: bool, epochs: range
) -> None:
    """Have ``sources`` read what ``epochs`` will read into memory now (before the trainer's clock starts),
    except the maps that the fast paths will read the channel means of instead."""
    split = split_front(head) if enabled else None
    for src in sources:
        if src is not None:
            src.prepare(split[0] if split else None, epochs)


def take_fast_paths(
    head: nn.Module,
    train: BatchSource,
    val: BatchSource | None,
    opt: torch.optim.Optimizer,
    config: TrainConfig,
    amp: bool,
    progress: bool = False,
    closed_form: bool = True,
) -> FastPaths:
    """The fast paths that apply to ``head`` trained on ``train`` (validated on ``val``) by ``opt``.

    With ``config.fast_paths`` off, none: the head on the sources, with autograd. Otherwise the head's
    frozen front runs once over both splits (when both can hold the result), a lone Linear left to train
    gets :class:`LinearStep`, and validation reads a pooled head's channel means once per run.

    Example:
        >>> cfg, head = TrainConfig(), build_head(HeadSpec("pooled-linear"), (64, 7, 7), 10)  # doctest: +SKIP
        >>> opt = make_optimizer(head.parameters(), cfg)  # doctest: +SKIP
        >>> paths = take_fast_paths(head, FeatureSource(maps, y), None, opt, cfg, amp=False)  # doctest: +SKIP
        >>> paths.record.front_once, paths.record.closed_form_step  # doctest: +SKIP
        (True, True)
    """
    if not config.fast_paths:
        return FastPaths(head, train, None, head, val, FastPathRecord(enabled=False))
    t0 = time.perf_counter()
    model, train, val, from_means = _front_once(head, train, val, progress)
    # The closed form covers unweighted cross-entropy; class-weighted training, and the losses of the
    # other tasks (``closed_form`` False), take autograd.
    covered = closed_form and config.class_weight == "none"
    step = LinearStep.build(model, opt, config.label_smoothing, amp) if covered else None
    front_seconds = time.perf_counter() - t0 if model is not head else 0.0
    # Validation reads a pooled head's channel means once per run, not once per epoch (e.g. with views).
    val_model, val = on_channel_means(model, val) if val is not None else (model, val)
    record = FastPathRecord(True, model is not head, from_means, front_seconds, step is not None)
    return FastPaths(model, train, step, val_model, val, record)


def on_channel_means(head: nn.Module, data: BatchSource) -> tuple[nn.Module, BatchSource]:
    """(model, data) with a pooled head's front run once over the cached channel means of ``data``,
    when it can: the same numbers as the head on the maps, without reading them.

    Example:
        >>> model, rows = on_channel_means(head, source_for(cached, "layer4"))  # doctest: +SKIP
        >>> evaluate(model, rows, 10, front_once=False)  # doctest: +SKIP
    """
    split = split_front(head)
    if split is not None and data.reads_channel_means(split[0]):
        mapped = data.mapped(split[0])
        if mapped is not None:
            return split[1], mapped
    return head, data


def _front_once(
    head: nn.Module, train: BatchSource, val: BatchSource | None, progress: bool
) -> tuple[nn.Module, BatchSource, BatchSource | None, bool]:
    """(module to train, train, val, read channel means) with the head's frozen front run once over the
    rows, when it can. Both splits are mapped, or neither."""
    split = split_front(head)
    if split is None:
        return head, train, val, False
    front, rest = split
    mapped = train.mapped(front, progress)
    if mapped is None:
        return head, train, val, False
    mapped_val = val.mapped(front, progress) if val is not None else None
    if val is not None and mapped_val is None:
        return head, train, val, False
    return rest, mapped, mapped_val, mapped.from_channel_means
