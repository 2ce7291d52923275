"""Predict classes of raw images with an exported model (``.ts`` / ``.pt2`` / ``.onnx`` / ``.safetensors``,
and the ``.pt`` safetensors files of older versions) or a run folder.

This module also holds the modules an exported model is made of (:class:`Preprocess`,
:class:`Network`, :class:`ExportedModel`). The exported model resizes raw uint8 images exactly as
:func:`featcache.data.to_model_input` does (torch's uint8 kernel, emulated bit for bit). To batch
images of different sizes, :func:`prepare_image` does that resize per image in Python and places the
result so that the model's own resize is the identity; a tensor batch goes to the model as is."""

from __future__ import annotations

import json
import logging
import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from .._util import FeatcacheError, resolve_device
from ..backbones.preprocessing import Preprocessing
from ..data.preprocess import INTERPOLATION
from ..data.samples import BadImageError, read_image
from .build import ExportInfo, ModuleArg, build_model, load_safetensors, read_info, sidecar_path
from .config import FORMATS

if TYPE_CHECKING:
    from .build import ExportInfo

log = logging.getLogger(__name__)
ImageLike = Image.Image | np.ndarray
Runner = Callable[[torch.Tensor], torch.Tensor]


def as_pil(image: ImageLike) -> Image.Image:
    """A PIL image from a PIL image or an ``(H, W)`` / ``(H, W, C)`` array (uint8, or floats in [0, 1])."""
    if isinstance(image, Image.Image):
        return image
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3):
        raise ValueError(f"an image array must be (H, W), (H, W, C) or (C, H, W), got shape {a.shape}")
    if a.dtype != np.uint8:
        scale = 255.0 if float(a.max(initial=0)) <= 1.0 else 1.0
        a = np.clip(a.astype(np.float64) * scale, 0, 255).round().astype(np.uint8)
    return Image.fromarray(a)


def prepare_image(image: ImageLike, pre: Preprocessing) -> torch.Tensor:
    """One image as the uint8 ``(H, W, C)`` tensor the predictor gives an exported model.

    It holds the uint8 resize (+ centre crop) of :func:`featcache.data.to_model_input`, placed so that
    the model's own resize is the identity: at the input size, or for resize + crop models centred in
    a ``resize_size`` square. The exported model maps it to exactly ``to_model_input(image)``, and
    images of any size become tensors of one shape, so they batch.

    Example:
        >>> pre = Preprocessing((32, 32), 0, (0.5,) * 3, (0.5,) * 3, "bilinear", 3)
        >>> tuple(prepare_image(Image.new("L", (28, 28)), pre).shape)
        (32, 32, 3)
    """
    t = TF.pil_to_tensor(as_pil(image).convert("L" if pre.channels == 1 else "RGB"))
    interp = INTERPOLATION[pre.interpolation]
    r, (h, w) = pre.resize_size, pre.input_size
    if not r:
        return TF.resize(t, [h, w], interpolation=interp, antialias=True).permute(1, 2, 0).contiguous()
    if r < max(h, w):  # the crop would be padded: the model resizes this image itself (one per batch)
        return t.permute(1, 2, 0).contiguous()
    canvas = torch.zeros(t.shape[0], r, r, dtype=torch.uint8)
    top, left = round((r - h) / 2.0), round((r - w) / 2.0)  # where the model's centre crop reads
    canvas[:, top : top + h, left : left + w] = TF.center_crop(
        TF.resize(t, [r], interpolation=interp, antialias=True), [h, w]
    )
    return canvas.permute(1, 2, 0).contiguous()


def prepare_fixed(image: ImageLike, pre: Preprocessing) -> torch.Tensor:
    """One image as the uint8 ``(h, w, C)`` tensor at the input size, resized (+ centre-cropped) exactly as
    :func:`featcache.data.to_model_input` does: what a ``pt2`` export (fixed height and width) takes.

    Example:
        >>> pre = Preprocessing((32, 32), 36, (0.5,) * 3, (0.5,) * 3, "bilinear", 3)
        >>> tuple(prepare_fixed(Image.new("L", (28, 40)), pre).shape)
        (32, 32, 3)
    """
    t = TF.pil_to_tensor(as_pil(image).convert("L" if pre.channels == 1 else "RGB"))
    interp = INTERPOLATION[pre.interpolation]
    if pre.resize_size:
        t = TF.center_crop(
            TF.resize(t, [pre.resize_size], interpolation=interp, antialias=True), list(pre.input_size)
        )
    else:
        t = TF.resize(t, list(pre.input_size), interpolation=interp, antialias=True)
    return t.permute(1, 2, 0).contiguous()


class Predictor:
    """Top-k class probabilities from an exported model or a run folder (see :func:`load_predictor`).

    Attributes:
        info: the model's :class:`~featcache.export.ExportInfo` (classes, preprocessing, layer...).
        device: where the model runs.

    Example:
        >>> p = load_predictor("runs/mnist/model.onnx")  # doctest: +SKIP
        >>> p.predict([Image.open("seven.png")], top_k=1)  # doctest: +SKIP
        [[{'class': '7', 'prob': 0.98}]]
    """

    def __init__(
        self,
        runner: Runner,
        info: ExportInfo,
        device: torch.device,
        uint8_only: bool = False,
        fixed_size: bool = False,
    ) -> None:
        self._run, self.info, self.device, self.uint8_only = runner, info, device, uint8_only
        #: the model takes images already at the input size (a ``pt2`` export): prepared per image
        self.fixed_size = fixed_size

    def __repr__(self) -> str:
        i = self.info
        return (
            f"Predictor({i.model!r}, layer={i.layer!r}, format={i.format!r}, classes={len(i.classes)}, "
            f"device={str(self.device)!r})"
        )

    @property
    def classes(self) -> list[str]:
        """Class names in logit order."""
        return list(self.info.classes)

    def logits(self, images: Sequence[ImageLike] | ImageLike | torch.Tensor) -> torch.Tensor:
        """Raw logits ``(N, classes)`` on the CPU for images (any sizes) or a tensor batch (given as is).

        Example:
            >>> p.logits(torch.zeros(1, 28, 28, 3, dtype=torch.uint8)).shape  # doctest: +SKIP
            torch.Size([1, 10])
        """
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = torch.from_numpy(np.ascontiguousarray(images))
        if isinstance(images, torch.Tensor):
            return self._forward(images)
        if isinstance(images, (Image.Image, np.ndarray)):
            images = [images]
        if not images:
            raise ValueError("no images given")
        return self._forward_prepared([self._prepare(img) for img in images])

    def _prepare(self, image: ImageLike) -> torch.Tensor:
        """One image as the model takes it (:func:`prepare_image`, or :func:`prepare_fixed`)."""
        return (prepare_fixed if self.fixed_size else prepare_image)(image, self.info.preprocessing)

    def _forward_prepared(self, prepared: list[torch.Tensor]) -> torch.Tensor:
        """Run :func:`prepare_image` outputs, one batch per shape (a single one unless a crop pads)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(prepared):
            groups.setdefault(tuple(t.shape), []).append(i)
        rows: list[torch.Tensor] = [torch.empty(0)] * len(prepared)
        for index in groups.values():
            for i, row in zip(index, self._forward(torch.stack([prepared[i] for i in index]))):
                rows[i] = row
        return torch.stack(rows)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(
                f"a tensor batch must be uint8 (N, H, W, C) or float (N, C, H, W); got {tuple(x.shape)}"
            )
        if x.dtype != torch.uint8 and (self.uint8_only or self.fixed_size):  # quantise float NCHW input
            x = (x.float() * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
        elif x.dtype != torch.uint8:
            x = x.float()
        if self.fixed_size and tuple(x.shape[1:3]) != self.info.preprocessing.input_size:
            x = torch.stack([prepare_fixed(img.cpu().numpy(), self.info.preprocessing) for img in x])
        return self._run(x).float().cpu()

    @property
    def task(self) -> str:
        """What the model predicts: ``classify``, ``multilabel`` or ``regress`` (its head's task)."""
        return str(self.info.head.get("task", "classify"))

    @property
    def threshold(self) -> float:
        """A multi-label model's probability threshold (chosen on val when it trained; else 0.5)."""
        value = self.info.head.get("threshold")
        return float(value) if value is not None else 0.5

    def top(self, logits: torch.Tensor, top_k: int = 5) -> list[list[dict[str, Any]]]:
        """Per row, the ``top_k`` classes by softmax probability: ``[{"class": name, "prob": p}, ...]``;
        for a multi-label model the classes whose sigmoid probability reaches :attr:`threshold` (the
        label set, most probable first, ``top_k`` ignored), for a regression model every target's value
        (``[{"target": name, "value": v}, ...]``, in the targets' units)."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        names = self.info.classes
        if self.task == "regress":
            return [[{"target": n, "value": float(v)} for n, v in zip(names, row)] for row in logits.tolist()]
        if self.task == "multilabel":
            probs = torch.sigmoid(logits.double())
            return [
                sorted(
                    ({"class": names[k], "prob": float(p)} for k, p in enumerate(row) if p >= self.threshold),
                    key=lambda t: -t["prob"],
                )
                for row in probs.tolist()
            ]
        probs = torch.softmax(logits.double(), dim=1)
        values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
        return [
            [{"class": names[int(i)], "prob": float(v)} for v, i in zip(vs, ix)]
            for vs, ix in zip(values.tolist(), indices.tolist())
        ]

    def predict(
        self, images: Sequence[ImageLike] | ImageLike | torch.Tensor, top_k: int = 5
    ) -> list[list[dict[str, Any]]]:
        """Top-k predictions for PIL images, arrays (any sizes) or a tensor batch.

        Example:
            >>> p.predict([Image.open("a.png")], top_k=2)  # doctest: +SKIP
            [[{'class': 'cat', 'prob': 0.91}, {'class': 'dog', 'prob': 0.07}]]
        """
        return self.top(self.logits(images), top_k)

    def predict_files(
        self,
        paths: Sequence[str | os.PathLike[str]],
        top_k: int = 5,
        batch_size: int = 32,
        progress: bool = True,
    ) -> list[dict[str, Any]]:
        """Predict image files in batches; a file that cannot be decoded is reported, the others go on
        (when none can be read, that is an error).

        Returns one dict per path, in order: ``{"path", "top": [{"class", "prob"}, ...]}`` or
        ``{"path", "error": "cannot read image ..."}``.

        Example:
            >>> p.predict_files(["a.png", "broken.jpg"], top_k=1, progress=False)  # doctest: +SKIP
            [{'path': 'a.png', 'top': [...]}, {'path': 'broken.jpg', 'error': "cannot read image ..."}]
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        results: list[dict[str, Any]] = [{"path": str(p)} for p in paths]
        pending: list[tuple[int, torch.Tensor]] = []

        def flush() -> None:
            if pending:
                tops = self.top(self._forward_prepared([t for _, t in pending]), top_k)
                for (i, _), top in zip(pending, tops):
                    results[i]["top"] = top
                pending.clear()

        with tqdm(
            total=len(results), unit="img", desc="predict", disable=not progress, dynamic_ncols=True
        ) as bar:
            for i, p in enumerate(paths):
                try:
                    pending.append((i, self._prepare(read_image(p))))
                except BadImageError as exc:
                    results[i]["error"] = str(exc)
                except (OSError, ValueError) as exc:  # a decoded image that still cannot be converted
                    results[i]["error"] = f"cannot read image {str(p)!r}: {type(exc).__name__}: {exc}"
                if len(pending) >= batch_size:
                    flush()
                bar.update(1)
            flush()
        bad = [r["error"] for r in results if "error" in r]
        if results and len(bad) == len(results):
            raise FeatcacheError(f"none of the {len(results)} files could be read (first: {bad[0]})")
        return results


def _torch_runner(module: torch.nn.Module, device: torch.device, program: bool = False) -> Runner:
    # A torch.export program's module is traced in eval mode already (and refuses .eval()).
    module = module.to(device) if program else module.to(device).eval()

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x.to(device))  # type: ignore[no-any-return]

    return run


def _onnx_runner(path: Path, device: torch.device) -> Runner:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise FeatcacheError(
            "running an .onnx model needs onnxruntime: pip install 'featcache[onnx]'"
        ) from exc
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), providers=providers)
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0])

    return run


def _onnx_info(path: Path) -> ExportInfo:
    if sidecar_path(path).is_file():
        return read_info(path)
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    if "featcache" not in meta:
        raise FileNotFoundError(
            f"{str(sidecar_path(path))!r} not found and {str(path)!r} has no featcache metadata"
        )
    return ExportInfo.from_dict(json.loads(meta["featcache"]))


def _pt2(path: Path, device: torch.device) -> tuple[Runner, ExportInfo]:
    extra = {"featcache.json": ""}
    program = torch.export.load(str(path), extra_files=extra)
    info = (
        read_info(path)
        if sidecar_path(path).is_file()
        else ExportInfo.from_dict(json.loads(extra["featcache.json"]))
    )
    return _torch_runner(program.module(), device, program=True), info


def _torchscript(path: Path, device: torch.device) -> tuple[Runner, ExportInfo]:
    extra = {"featcache.json": ""}
    with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    info = (
        read_info(path)
        if sidecar_path(path).is_file()
        else ExportInfo.from_dict(json.loads(extra["featcache.json"]))
    )
    return _torch_runner(module, device), info


def load_predictor(
    path: str | os.PathLike[str], device: str = "auto", backbone: ModuleArg = None
) -> Predictor:
    """A :class:`Predictor` for an exported file (``.ts``, ``.pt2``, ``.onnx``, ``.safetensors`` or an older
    version's ``.pt``) or a run folder.

    Args:
        path: exported model file, or a run or sweep folder (the model is then built in memory, as export
            does).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        backbone: for a run made from an ``nn.Module`` passed from Python (a run folder, or its
            ``safetensors`` export), that module: featcache cannot rebuild it from its name.

    Example:
        >>> p = load_predictor("runs/mnist")  # doctest: +SKIP
        >>> p.predict_files(["seven.png"], top_k=1)  # doctest: +SKIP
    """

    p = Path(path)
    dev = resolve_device(device)
    if p.is_dir():
        model, info = build_model(p, backbone=backbone)
        return Predictor(_torch_runner(model, dev), info, dev)
    if not p.is_file():
        raise FileNotFoundError(f"{str(p)!r} is neither an exported model file nor a run folder")
    kind = _sniff(p)
    if kind == "onnx":
        predictor = Predictor(_onnx_runner(p, dev), _onnx_info(p), dev, uint8_only=True)
    elif kind == "torchscript":
        runner, info = _torchscript(p, dev)
        predictor = Predictor(runner, info, dev)
    elif kind == "pt2":
        runner, info = _pt2(p, dev)
        predictor = Predictor(runner, info, dev, fixed_size=True)
    else:
        model, info = load_safetensors(p, backbone)
        predictor = Predictor(_torch_runner(model, dev), info, dev)
    for note in predictor.info.notes:
        if "unfinished" in note:  # exported from an interrupted run: say how to finish it
            log.warning("exported from an unfinished run: %s", note)
    return predictor


def _sniff(path: Path) -> str:
    """One of :data:`~featcache.export.config.FORMATS`: from the sidecar, else the file's bytes (an older
    version's ``pt`` is ``safetensors``)."""
    side = Path(f"{path}.json")
    if side.is_file():
        fmt = str(json.loads(side.read_text()).get("format", ""))
        if fmt in (*FORMATS, "pt"):
            return "safetensors" if fmt == "pt" else fmt
    with path.open("rb") as f:
        head = f.read(16)
    if head.startswith(b"PK"):  # a zip: torch.export's archive, or TorchScript's
        with zipfile.ZipFile(path) as z:
            return "pt2" if any(n.endswith("/archive_format") for n in z.namelist()) else "torchscript"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if path.suffix == ".onnx":
        return "onnx"
    raise FeatcacheError(
        f"cannot tell the format of {str(path)!r}: expected a featcache export (.ts, .pt2, .onnx, or "
        ".safetensors with its .json sidecar); export one with `featcache export RUN --format "
        f"{'|'.join(FORMATS)}`"
    )
