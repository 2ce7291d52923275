"""The exported model: in-graph preprocessing of raw images, the cut backbone and the head as one
``nn.Module``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..backbones.preprocessing import Preprocessing
from ..layout import pool_features


def _kernel(x: Tensor, mode: str) -> Tensor:
    """torch's antialiasing kernels (``aa_filter``): triangle, or Keys cubic with a = -0.5."""
    a = x.abs()
    if mode == "bicubic":
        near = (1.5 * a - 2.5) * a * a + 1.0
        far = ((-0.5 * a + 2.5) * a - 4.0) * a + 2.0
        return torch.where(a < 1.0, near, torch.where(a < 2.0, far, torch.zeros_like(a)))
    return (1.0 - a).clamp(min=0.0)


class Preprocess(nn.Module):
    """Raw images to the normalised ``(N, C, h, w)`` batch the backbone was cached on.

    Resizing multiplies by one weight matrix per axis, built from the input's shape (so it traces
    to TorchScript and ONNX with dynamic height and width; the centre crop is folded in). The
    weights are torch's antialiased ``interpolate`` weights (or ``nearest``); for uint8 input they
    are rounded to fixed point and each pass is rounded to 0-255, as torch's uint8 kernel does.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, pre: Preprocessing) -> None:
        super().__init__()
        self.out_h, self.out_w = pre.input_size
        self.resize_size = pre.resize_size
        self.mode = pre.interpolation
        self.channels = pre.channels
        shape = (1, len(pre.mean), 1, 1)
        self.register_buffer("mean", torch.tensor(pre.mean).view(shape), persistent=False)
        self.register_buffer("std", torch.tensor(pre.std).view(shape), persistent=False)

    def _geometry(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        # Sizes are ints eagerly and 0-dim tensors when tracing: every step is a float64 CPU tensor op,
        # on shape-(1,) tensors (the ONNX exporter computes 0-dim tensor arithmetic in float32).
        h = torch.as_tensor(x.shape[-2], dtype=torch.float64).reshape(1)
        w = torch.as_tensor(x.shape[-1], dtype=torch.float64).reshape(1)
        oh, ow = torch.full_like(h, float(self.out_h)), torch.full_like(w, float(self.out_w))
        if not self.resize_size:
            return h, w, oh, ow, torch.zeros_like(h), torch.zeros_like(w)
        r = torch.full_like(h, float(self.resize_size))
        portrait = w <= h  # torchvision: the shorter side becomes r, the longer one int(r * long / short)
        nh = torch.where(portrait, torch.floor(r * h / w), r)
        nw = torch.where(portrait, r, torch.floor(r * w / h))
        return h, w, nh, nw, self._offset(nh, oh), self._offset(nw, ow)

    @staticmethod
    def _offset(n: Tensor, out: Tensor) -> Tensor:
        """torchvision's ``center_crop`` start: round((n - out) / 2), or minus the top padding."""
        return torch.where(n >= out, torch.round((n - out) / 2.0), -torch.floor((out - n) / 2.0))

    def _axis(self, n_in: Tensor, new: Tensor, offset: Tensor, out: int, fixed_point: bool) -> Tensor:
        """``(out, n_in)`` float64 weights: resize ``n_in`` to ``new``, keep ``out`` rows from ``offset``."""
        # Tensor ends keep sizes dynamic in a trace; all resized rows are built (precision uses their max).
        src = torch.arange(n_in.reshape(()), dtype=torch.float64)  # type: ignore[call-overload]
        dst = torch.arange(new.reshape(()), dtype=torch.float64)  # type: ignore[call-overload]
        scale = n_in / new
        if self.mode == "nearest":  # torch: min(floorf(i * (float) (in / out)), in - 1)
            idx = torch.floor(dst.float() * (n_in.float() / new.float())).double()
            w = (src[None, :] == torch.minimum(idx, n_in - 1.0)[:, None]).double()
        else:
            center = scale * (dst + 0.5)
            w = _kernel((src[None, :] - center[:, None] + 0.5) * (1.0 / scale.clamp(min=1.0)), self.mode)
            total = w.sum(1, keepdim=True)
            w = torch.where(total != 0.0, w / total, w)
        if fixed_point:  # _compute_index_ranges_int16_weights: int16 weights at the largest safe precision
            bits = torch.arange(22, dtype=torch.float64)
            w_max = w.amax(1).amax(0, keepdim=True)
            precision = (
                (torch.floor(0.5 + w_max * 2.0 ** (bits + 1.0)) < 32768.0).sum(0, keepdim=True).double()
            )
            unit = 2.0**precision
            w = torch.sign(w) * torch.floor(w.abs() * unit + 0.5) / unit
        rows = torch.arange(out, dtype=torch.float64) + offset
        inside = ((rows >= 0) & (rows < new)).double()  # rows outside are the crop's zero padding
        return w.index_select(0, rows.clamp(min=0.0).minimum(new - 1.0).long()) * inside[:, None]

    def resize(self, x: Tensor, quantize: bool) -> Tensor:
        """Resize (+ centre crop) ``(N, C, H, W)``, width first; ``quantize``: uint8 semantics (0-255 in)."""
        h, w, nh, nw, top, left = self._geometry(x)
        wh = self._axis(h, nh, top, self.out_h, quantize)
        ww = self._axis(w, nw, left, self.out_w, quantize)
        if not quantize:
            return torch.matmul(wh.type_as(x), torch.matmul(x, ww.t().type_as(x)))
        x = x.to(torch.float64)  # exact: integer pixels times fixed-point weights
        x = torch.floor(torch.matmul(x, ww.t().type_as(x)) + 0.5).clamp(0.0, 255.0)
        x = torch.floor(torch.matmul(wh.type_as(x), x) + 0.5).clamp(0.0, 255.0)
        return x.to(torch.float32)

    def normalize(self, x: Tensor) -> Tensor:
        """Replicate a grey channel when the backbone wants three, then ``(x - mean) / std``."""
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std

    def from_uint8(self, x: Tensor) -> Tensor:
        """uint8 ``(N, H, W, C)`` images to the normalised batch."""
        x = self.resize(x.permute(0, 3, 1, 2).to(torch.float32), quantize=True)
        return self.normalize(x / 255.0)

    def from_float(self, x: Tensor) -> Tensor:
        """float ``(N, C, H, W)`` images in [0, 1] to the normalised batch."""
        return self.normalize(self.resize(x.to(torch.float32), quantize=False))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"expected a batch (N, H, W, C) uint8 or (N, C, H, W) float, got shape {tuple(x.shape)}"
            )
        return self.from_uint8(x) if x.dtype == torch.uint8 else self.from_float(x)


class Network(nn.Module):
    """Normalised batch -> truncated backbone -> the extraction's pooling -> the trained head -> logits."""

    def __init__(
        self,
        backbone: nn.Module,
        key: str,
        pool: str,
        storage_dtype: str,
        head: nn.Module,
        layout: str | None = None,
        prefix: int = 0,
    ) -> None:
        super().__init__()
        self.backbone, self.key, self.pool, self.head = backbone, key, pool, head
        self.storage_dtype, self.layout = storage_dtype, layout  # the layer's layout: what pooling averages
        self.prefix = prefix  # the class / register tokens --pool avg-tokens skips

    def forward(self, x: Tensor) -> Tensor:
        t = pool_features(self.backbone(x)[self.key], self.pool, self.layout, self.prefix)
        if self.storage_dtype in ("float16", "bfloat16"):  # the head saw features stored in this dtype
            t = t.to(getattr(torch, self.storage_dtype)).to(torch.float32)
        return self.head(t)


class ExportedModel(nn.Module):
    """The whole exported model: :class:`Preprocess` then :class:`Network`; ``classes`` name the logits.

    Example:
        >>> model, info = build_model("runs/mnist")  # doctest: +SKIP
        >>> model(torch.zeros(1, 28, 28, 3, dtype=torch.uint8)).shape  # doctest: +SKIP
        torch.Size([1, 10])
    """

    def __init__(self, preprocess: Preprocess, network: Network, classes: list[str]) -> None:
        super().__init__()
        self.preprocess, self.network, self.classes = preprocess, network, list(classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.network(self.preprocess(x))
