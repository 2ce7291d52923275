"""The probe's solver: L2-regularised multinomial logistic regression by L-BFGS, with the gradient
written out (no autograd) and the L-BFGS loop kept to a few array operations per iteration.

On the small problems a probe often is (a few hundred rows), the cost of a fit is the per-iteration
overhead, not the arithmetic: ``torch.optim.LBFGS`` with autograd spent about 1.5 ms per function
evaluation on 140 rows x 1280 features, most of it dispatch, and torch's own matmul of such thin
shapes is slower than numpy's. So problems up to :data:`SMALL_PROBLEM` elements on the CPU are solved
with numpy in float64 (their arithmetic is free, and the tolerances then mean what they say); larger
ones, and any on a GPU, with torch in float32 on the features' device. Both run the same L-BFGS
(:func:`minimize_lbfgs`, written once for numpy arrays and torch tensors alike) on the same objective.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: rows x features x classes up to which a fit on the CPU runs with numpy in float64
SMALL_PROBLEM = 2_000_000


@dataclass
class Solution:
    """One solution: weights (classes, features), bias (classes) and the L-BFGS iterations it took."""

    weight: torch.Tensor
    bias: torch.Tensor
    iterations: int


def on_numpy(x: torch.Tensor, num_classes: int) -> bool:
    """Whether a fit on rows ``x`` runs with numpy in float64 (small, on the CPU) or torch in float32.

    Example:
        >>> on_numpy(torch.zeros(100, 8), 3), on_numpy(torch.zeros(5000, 1280), 10)
        (True, False)
    """
    return x.device.type == "cpu" and math.prod(x.shape) * num_classes <= SMALL_PROBLEM


@contextlib.contextmanager
def small_problem_threads(x: torch.Tensor, num_classes: int) -> Iterator[None]:
    """One torch thread while a small problem (:func:`on_numpy`) is solved: its tensor operations are
    microseconds long, and handing each to a second thread costs more than it saves (on a busy machine
    many times more: a probe on 140 rows took 0.2 s with two threads and 0.02 s with one).

    Example:
        >>> with small_problem_threads(torch.zeros(100, 8), 3):
        ...     torch.get_num_threads()
        1
    """
    before = torch.get_num_threads()
    if before == 1 or not on_numpy(x, num_classes):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


Vector = Any  # a 1-D numpy array or torch tensor: minimize_lbfgs takes either
Objective = Callable[[Vector], tuple[float, Vector]]


def _row_shares(y: torch.Tensor, class_weight: torch.Tensor | None) -> torch.Tensor:
    """Each row's share of the loss: 1/N, or its class weight over the weights' sum (what
    ``F.cross_entropy(..., weight=class_weight)`` divides by), float64 on the CPU."""
    y = y.cpu()
    rows = torch.ones(len(y), dtype=torch.float64) if class_weight is None else class_weight.cpu().double()[y]
    return rows / rows.sum()


def _torch_objective(
    x: torch.Tensor, rows: torch.Tensor, target: torch.Tensor, num_classes: int, strength: float
) -> Objective:
    d = x.shape[1]
    split = num_classes * d

    def f(w: torch.Tensor) -> tuple[float, torch.Tensor]:
        weight, bias = w[:split].view(num_classes, d), w[split:]
        logits = torch.addmm(bias, x, weight.t())
        lse = torch.logsumexp(logits, 1)
        loss = float(rows @ lse - (target * logits).sum() + 0.5 * strength * weight.pow(2).sum())
        g = torch.exp(logits - lse[:, None]).mul_(rows[:, None]).sub_(target)  # d loss / d logits
        grad_w = torch.addmm(weight, g.t(), x, beta=strength) if strength else g.t() @ x
        return loss, torch.cat([grad_w.reshape(-1), g.sum(0)])

    return f


def _numpy_objective(
    x: np.ndarray, xt: np.ndarray, rows: np.ndarray, target: np.ndarray, num_classes: int, strength: float
) -> Objective:
    split = num_classes * x.shape[1]

    def f(w: np.ndarray) -> tuple[float, np.ndarray]:
        weight = w[:split].reshape(num_classes, -1)
        logits = (weight @ xt).T + w[split:]  # numpy's matmul of thin shapes is faster this way round
        top = logits.max(1, keepdims=True)
        e = np.exp(logits - top)
        total = e.sum(1, keepdims=True)
        lse = np.log(total[:, 0]) + top[:, 0]
        loss = float(rows @ lse - (target * logits).sum() + 0.5 * strength * (weight * weight).sum())
        g = e * (rows[:, None] / total) - target  # d loss / d logits
        grad_w = g.T @ x + strength * weight
        return loss, np.concatenate([grad_w.ravel(), g.sum(0)])

    return f


class SoftmaxRegression:
    """L2-regularised softmax regression on rows ``x`` (N, F) with labels ``y``, prepared once for the
    fits of a regularisation path.

    The objective is the (class-weighted) mean cross-entropy of ``x @ W.T + b`` plus
    ``strength / 2 * |W|^2``, as ``F.cross_entropy(..., weight=class_weight)`` computes it (a weighted
    mean: the weights' sum divides). Small problems on the CPU are solved with numpy in float64, others
    with torch in float32 on ``x``'s device (:func:`on_numpy`).

    Example:
        >>> problem = SoftmaxRegression(torch.randn(100, 8), torch.randint(0, 3, (100,)), 3)
        >>> strong = problem.fit(1e-1, max_iter=100, tol=1e-4)
        >>> weak = problem.fit(1e-3, max_iter=100, tol=1e-4, start=strong)  # a warm start
        >>> weak.weight.shape, weak.bias.shape
        (torch.Size([3, 8]), torch.Size([3]))
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, num_classes: int, class_weight: torch.Tensor | None = None
    ) -> None:
        x = x.flatten(1)
        self.rows, self.features, self.num_classes, self.device = len(x), x.shape[1], num_classes, x.device
        self.numpy = on_numpy(x, num_classes)
        shares = _row_shares(y, class_weight)
        target = torch.zeros(len(x), num_classes, dtype=torch.float64)
        target[torch.arange(len(x)), y.cpu()] = shares
        if self.numpy:
            self.x_np = x.double().cpu().numpy()
            self.xt_np = np.ascontiguousarray(self.x_np.T)
            self.shares_np, self.target_np = shares.numpy(), target.numpy()
        else:
            self.x = x.float()
            self.shares, self.target = shares.to(x.device, torch.float32), target.to(x.device, torch.float32)

    def objective(self, strength: float) -> Objective:
        """``w -> (loss, gradient)`` for flat ``w = [W.ravel(), b]`` (numpy or torch, as this problem)."""
        if self.numpy:
            return _numpy_objective(
                self.x_np, self.xt_np, self.shares_np, self.target_np, self.num_classes, strength
            )
        return _torch_objective(self.x, self.shares, self.target, self.num_classes, strength)

    def fit(self, strength: float, max_iter: int, tol: float, start: Solution | None = None) -> Solution:
        """The solution for ``strength`` from ``start`` (a warm start) or zero, float32 on ``x``'s device."""
        c, d = self.num_classes, self.features
        w: Vector
        if start is not None:
            w = torch.cat([start.weight.reshape(-1), start.bias]).detach()
            w = w.double().cpu().numpy() if self.numpy else w.to(self.x)
        else:
            w = np.zeros(c * (d + 1)) if self.numpy else self.x.new_zeros(c * (d + 1))
        w, it = minimize_lbfgs(self.objective(strength), w, max_iter, tol)
        w = torch.from_numpy(w).to(self.device) if self.numpy else w
        return Solution(w[: c * d].view(c, d).float().contiguous(), w[c * d :].float().contiguous(), it)


def minimize_lbfgs(
    f: Objective, w: Vector, max_iter: int, tol: float, history: int = 10
) -> tuple[Vector, int]:
    """Minimise a smooth convex ``f`` from ``w``: L-BFGS with an Armijo backtracking line search.

    Stops when the largest gradient entry is at most ``tol`` (scikit-learn's ``lbfgs`` criterion),
    when the loss stops changing (a relative change within 16 machine epsilons: what the loss's own
    rounding hides; in float32 an absolute floor as scikit-learn's ``ftol`` has would stop small losses
    early), when no step decreases it, or after ``max_iter`` iterations. Returns ``w`` and the iterations
    taken.

    Example:
        >>> f = lambda w: (float((w - 3).pow(2).sum()), 2 * (w - 3))
        >>> w, it = minimize_lbfgs(f, torch.zeros(4, dtype=torch.float64), 50, 1e-8)
        >>> [round(v, 6) for v in w.tolist()]
        [3.0, 3.0, 3.0, 3.0]
    """
    ftol = 16 * float(torch.finfo(w.dtype).eps if isinstance(w, torch.Tensor) else np.finfo(w.dtype).eps)
    loss, g = f(w)
    pairs: list[tuple[Vector, Vector, float]] = []  # (s, y, 1 / y.s)
    it = 0
    while it < max_iter and float(abs(g).max()) > tol:
        p = _direction(g, pairs)
        slope = float(g @ p)
        if slope >= 0:  # not a descent direction (a stale history): restart from the gradient
            pairs.clear()
            p, slope = -g, -float(g @ g)
        step = 1.0 if pairs else min(1.0, 1.0 / float(abs(g).sum()))
        for _ in range(30):  # Armijo backtracking with a quadratic fit of the step
            new_w = w + step * p
            new_loss, new_g = f(new_w)
            if new_loss <= loss + 1e-4 * step * slope:
                break
            fitted = -slope * step * step / (2 * (new_loss - loss - slope * step))
            step = min(max(fitted, 0.1 * step), 0.5 * step)
        else:
            break  # no decrease to be had at this precision
        it += 1
        s, yv = new_w - w, new_g - g
        sy = float(yv @ s)
        if sy > 1e-10 * float(yv @ yv):  # keep the pair only where the curvature is positive
            pairs.append((s, yv, 1.0 / sy))
            del pairs[:-history]
        w, g, change, loss = new_w, new_g, loss - new_loss, new_loss
        if change <= ftol * max(abs(loss), abs(loss + change)):
            break
    return w, it


def _direction(g: Vector, pairs: list[tuple[Vector, Vector, float]]) -> Vector:
    """L-BFGS's two-loop recursion: minus the inverse-Hessian estimate times ``g``."""
    q, alphas = g, []
    for s, yv, rho in reversed(pairs):
        a = rho * float(s @ q)
        alphas.append(a)
        q = q - a * yv
    if pairs:
        s, yv, rho = pairs[-1]
        q = q * (1.0 / (rho * float(yv @ yv)))  # gamma = s.y / y.y
    for (s, yv, rho), a in zip(pairs, reversed(alphas)):
        q = q + (a - rho * float(yv @ q)) * s
    return -q
