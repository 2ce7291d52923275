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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._util import FeatcacheError
from ..cache.rows import Rows, release_pages, to_torch
from .heads import Standardize

#: rows x features x classes up to which a fit on the CPU runs with numpy in float64
SMALL_PROBLEM = 2_000_000


@dataclass
class Solution:
    """One solution: weights (classes, features), bias (classes) and the L-BFGS iterations it took."""

    weight: torch.Tensor
    bias: torch.Tensor
    iterations: int


def on_numpy(x: torch.Tensor | RowBlocks, num_classes: int) -> bool:
    """Whether a fit on rows ``x`` runs with numpy in float64 (small, in memory on the CPU) or torch in
    float32 (by chunks, in memory or streamed from memory maps).

    Example:
        >>> on_numpy(torch.zeros(100, 8), 3), on_numpy(torch.zeros(5000, 1280), 10)
        (True, False)
    """
    in_memory = isinstance(x, torch.Tensor) or x.in_memory
    return in_memory and x.device.type == "cpu" and math.prod(x.shape) * num_classes <= SMALL_PROBLEM


@dataclass(frozen=True)
class Part:
    """One part of a :class:`RowBlocks`: rows in memory (a tensor) or read from a memory map (an array
    in the storage ``dtype``), all of them or those at ``index``."""

    data: torch.Tensor | Rows
    dtype: str = "float32"
    index: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.data) if self.index is None else len(self.index)


class RowBlocks:
    """The rows of a fit, never copied whole: one or more parts (a split in memory, a split streamed from
    its memory maps, some rows of either), read a chunk at a time as float32 on ``device``, through the
    standardisation ``std`` when given.

    The probe's solver reads its rows only through :meth:`chunks`, so standardised features, the train +
    val rows of a refit and a fold's training rows are views, not copies: what a fit holds beyond its
    rows is one chunk (and the chunk's logits).

    Example:
        >>> x = torch.randn(10, 4)
        >>> blocks = RowBlocks([Part(x), Part(x, index=torch.tensor([0, 2]))])
        >>> len(blocks), torch.equal(torch.cat([c for _, c in blocks.chunks(3)]), torch.cat([x, x[[0, 2]]]))
        (12, True)
    """

    def __init__(
        self, parts: Sequence[Part], device: torch.device | None = None, std: Standardize | None = None
    ) -> None:
        if not parts:
            raise FeatcacheError("a fit needs rows: got no parts")
        first = parts[0].data
        self.parts, self.std = list(parts), std
        self._held: torch.Tensor | None = None  # all rows as one standardised chunk, when they fit one
        self.device = device or (first.device if isinstance(first, torch.Tensor) else torch.device("cpu"))
        self.row_shape = tuple(int(d) for d in first.shape[1:])
        for p in self.parts:
            if tuple(int(d) for d in p.data.shape[1:]) != self.row_shape:
                raise FeatcacheError(
                    f"rows of shape {tuple(p.data.shape[1:])} and {self.row_shape} in one fit"
                )
        self.features = math.prod(self.row_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.row_shape)

    @property
    def in_memory(self) -> bool:
        """Whether every part is a tensor in memory (none is read from a memory map)."""
        return all(isinstance(p.data, torch.Tensor) for p in self.parts)

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def standardized(self, std: Standardize | None) -> RowBlocks:
        """The same rows read through ``std`` (a view: nothing is copied)."""
        return RowBlocks(self.parts, self.device, std)

    def _chunk_of_all(self) -> torch.Tensor:
        """Every row, standardised and flattened, in one new buffer (never a view of a part's rows)."""
        z = self[0 : len(self)]
        z = self.std(z) if self.std is not None else z.clone()
        return z.reshape(len(self), self.features)

    def __getitem__(self, key: slice) -> torch.Tensor:
        """Rows ``key`` (a slice, step 1) as float32 on the device, not standardised (what
        :meth:`Standardize.fit` reads)."""
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise FeatcacheError(f"RowBlocks reads slices of step 1, got step {step}")
        pieces, offset = [], 0
        for p in self.parts:
            lo, hi = max(start - offset, 0), min(stop - offset, len(p))
            if lo < hi:
                pieces.append(self._read(p, lo, hi))
            offset += len(p)
        if not pieces:
            return torch.empty((0, *self.row_shape), device=self.device)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _read(self, p: Part, lo: int, hi: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``lo:hi`` of part ``p`` as float32 on the device (into ``out`` for an indexed tensor)."""
        if isinstance(p.data, torch.Tensor):
            if p.index is None:
                return p.data[lo:hi].to(self.device, torch.float32)
            if out is not None and p.data.dtype == torch.float32 and p.data.device == self.device:
                return torch.index_select(p.data, 0, p.index[lo:hi], out=out[: hi - lo])
            return p.data.index_select(0, p.index[lo:hi]).to(self.device, torch.float32)
        if p.index is None:
            rows = to_torch(np.asarray(p.data[lo:hi]), p.dtype)
            release_pages(p.data, lo, hi)
        else:
            at = p.index[lo:hi].cpu().numpy()
            rows = to_torch(np.asarray(p.data[at]), p.dtype)
            release_pages(p.data, int(at.min()), int(at.max()) + 1)
        return rows.to(self.device, torch.float32)

    def chunks(self, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(offset, chunk)``: every row once, in order, ``rows`` at a time (a chunk never spans two
        parts), standardised and flattened to (n, features) float32. A chunk is a view of the rows or a
        buffer the next chunk overwrites: use it before asking for the next."""
        if len(self) <= rows and (self.std is not None or any(p.index is not None for p in self.parts)):
            # Every row fits one chunk: it is read and standardised once and kept for the next passes
            # (a small problem's L-BFGS makes hundreds; the chunk buffer is held either way).
            if self._held is None or len(self._held) != len(self):
                self._held = self._chunk_of_all()
            yield 0, self._held
            return
        buf: torch.Tensor | None = None
        offset = 0
        for p in self.parts:
            for lo in range(0, len(p), rows):
                hi = min(lo + rows, len(p))
                if buf is None and (self.std is not None or p.index is not None):
                    buf = torch.empty((min(rows, len(self)), *self.row_shape), device=self.device)
                z = self._read(p, lo, hi, buf)
                if self.std is not None and buf is not None:
                    z = torch.sub(z, self.std.mean, out=buf[: hi - lo]).div_(self.std.std)
                yield offset + lo, z.reshape(hi - lo, self.features)
            offset += len(p)


def fit_standardize_rows(blocks: RowBlocks) -> Standardize:
    """Standardisation statistics of ``blocks``' rows (all parts together), read by chunks.

    Example:
        >>> x = torch.randn(50, 4)
        >>> s = fit_standardize_rows(RowBlocks([Part(x[:20]), Part(x[20:])]))
        >>> torch.allclose(s.mean, Standardize.fit(x).mean)
        True
    """
    if len(blocks.parts) == 1 and blocks.parts[0].index is None:
        p = blocks.parts[0]
        return Standardize.fit(p.data, dtype=p.dtype)  # the one-part statistics, exactly as before
    return Standardize.fit(blocks)  # type: ignore[arg-type]  # RowBlocks slices as Standardize.fit reads


@contextlib.contextmanager
def small_problem_threads(x: torch.Tensor | RowBlocks, num_classes: int) -> Iterator[None]:
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


def chunk_rows(features: int, num_classes: int, chunk_bytes: int = 64 << 20) -> int:
    """Rows per chunk of a fit: a chunk's features and its logits within about ``chunk_bytes``."""
    return max(256, chunk_bytes // (4 * (features + 2 * num_classes)))


def _torch_objective(
    blocks: RowBlocks, rows: torch.Tensor, y: torch.Tensor, num_classes: int, strength: float
) -> Objective:
    """The objective over ``blocks`` by chunks: labels as integers, the gradient by a scatter (no one-hot
    target), the loss summed in float64."""
    d = blocks.features
    split, step = num_classes * d, chunk_rows(d, num_classes)

    def f(w: torch.Tensor) -> tuple[float, torch.Tensor]:
        weight, bias = w[:split].view(num_classes, d), w[split:]
        grad_w, grad_b, loss = torch.zeros_like(weight), torch.zeros_like(bias), 0.0
        for start, z in blocks.chunks(step):
            r, t = rows[start : start + len(z)], y[start : start + len(z), None]
            logits = torch.addmm(bias, z, weight.t())
            lse = torch.logsumexp(logits, 1, keepdim=True)
            loss += float(r @ (lse[:, 0] - logits.gather(1, t)[:, 0]))
            g = logits.sub_(lse).exp_().mul_(r[:, None]).scatter_add_(1, t, -r[:, None])  # d loss / d logits
            grad_w.addmm_(g.t(), z)
            grad_b += g.sum(0)
        loss += 0.5 * strength * float(weight.pow(2).sum())
        if strength:
            grad_w.add_(weight, alpha=strength)
        return loss, torch.cat([grad_w.reshape(-1), grad_b])

    return f


def _numpy_objective(
    x: np.ndarray, xt: np.ndarray, rows: np.ndarray, y: np.ndarray, num_classes: int, strength: float
) -> Objective:
    split = num_classes * x.shape[1]
    at = np.arange(len(y))

    def f(w: np.ndarray) -> tuple[float, np.ndarray]:
        weight = w[:split].reshape(num_classes, -1)
        logits = (weight @ xt).T + w[split:]  # numpy's matmul of thin shapes is faster this way round
        top = logits.max(1, keepdims=True)
        e = np.exp(logits - top)
        total = e.sum(1, keepdims=True)
        lse = np.log(total[:, 0]) + top[:, 0]
        loss = float(rows @ (lse - logits[at, y]) + 0.5 * strength * (weight * weight).sum())
        g = e * (rows[:, None] / total)  # d loss / d logits: softmax minus the (weighted) one-hot label
        g[at, y] -= rows
        grad_w = g.T @ x + strength * weight
        return loss, np.concatenate([grad_w.ravel(), g.sum(0)])

    return f


class SoftmaxRegression:
    """L2-regularised softmax regression on rows ``x`` (N, F) with labels ``y``, prepared once for the
    fits of a regularisation path.

    The objective is the (class-weighted) mean cross-entropy of ``x @ W.T + b`` plus
    ``strength / 2 * |W|^2``, as ``F.cross_entropy(..., weight=class_weight)`` computes it (a weighted
    mean: the weights' sum divides). Small problems in memory on the CPU are solved with numpy in
    float64; others with torch in float32 on ``x``'s device (:func:`on_numpy`), reading the rows a chunk
    at a time (:class:`RowBlocks`: standardised on the fly, in memory or streamed from memory maps), so
    a fit holds the rows once, integer labels, and one chunk's logits.

    Example:
        >>> problem = SoftmaxRegression(torch.randn(100, 8), torch.randint(0, 3, (100,)), 3)
        >>> strong = problem.fit(1e-1, max_iter=100, tol=1e-4)
        >>> weak = problem.fit(1e-3, max_iter=100, tol=1e-4, start=strong)  # a warm start
        >>> weak.weight.shape, weak.bias.shape
        (torch.Size([3, 8]), torch.Size([3]))
    """

    def __init__(
        self,
        x: torch.Tensor | RowBlocks,
        y: torch.Tensor,
        num_classes: int,
        class_weight: torch.Tensor | None = None,
    ) -> None:
        blocks = x if isinstance(x, RowBlocks) else RowBlocks([Part(x.flatten(1))])
        if len(y) != len(blocks):
            raise FeatcacheError(f"{len(blocks)} feature rows but {len(y)} labels")
        self.rows, self.features, self.num_classes = len(blocks), blocks.features, num_classes
        self.device = blocks.device
        self.numpy = on_numpy(blocks, num_classes)
        shares = _row_shares(y, class_weight)
        if self.numpy:
            self.x_np = np.concatenate([z.double().numpy() for _, z in blocks.chunks(max(1, len(blocks)))])
            self.xt_np = np.ascontiguousarray(self.x_np.T)
            self.shares_np, self.y_np = shares.numpy(), y.cpu().numpy()
        else:
            self.blocks = blocks
            self.shares, self.y = shares.to(self.device, torch.float32), y.to(self.device, torch.long)

    def objective(self, strength: float) -> Objective:
        """``w -> (loss, gradient)`` for flat ``w = [W.ravel(), b]`` (numpy or torch, as this problem)."""
        if self.numpy:
            return _numpy_objective(
                self.x_np, self.xt_np, self.shares_np, self.y_np, self.num_classes, strength
            )
        return _torch_objective(self.blocks, self.shares, self.y, self.num_classes, strength)

    def fit(self, strength: float, max_iter: int, tol: float, start: Solution | None = None) -> Solution:
        """The solution for ``strength`` from ``start`` (a warm start) or zero, float32 on ``x``'s device."""
        c, d = self.num_classes, self.features
        w: Vector
        if start is not None:
            w = torch.cat([start.weight.reshape(-1), start.bias]).detach()
            w = w.double().cpu().numpy() if self.numpy else w.to(self.device, torch.float32)
        else:
            w = np.zeros(c * (d + 1)) if self.numpy else torch.zeros(c * (d + 1), device=self.device)
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
