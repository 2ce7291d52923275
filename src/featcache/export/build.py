"""Export a run: preprocessing + the backbone truncated at the run's layer + pooling + the head, as ONE model.

The exported model takes raw images and returns logits. Its input (see :data:`INPUT_CONVENTION`):

- ``uint8`` images ``(N, H, W, C)`` (RGB, 0-255, any ``H``/``W``): resized (+ centre-cropped) to the
  run's input size exactly as :func:`featcache.data.to_model_input` resizes a uint8 image (torch's
  fixed-point uint8 kernel, emulated bit for bit), then scaled and normalised;
- ``float`` images ``(N, C, H, W)`` in ``[0, 1]``: resized as ``interpolate(antialias=True)``, normalised.

Formats (:data:`FORMATS`): ``torchscript`` (the default) and ``pt2`` (``torch.export``) load with torch
alone, ``onnx`` with ONNX Runtime alone (the uint8 convention only); ``pt2`` takes images already resized
to the input size (its program has fixed height and width); ``safetensors`` is featcache's own (the
truncated weights + a JSON sidecar; loading rebuilds the structure with featcache, no pickle). Every file
gets a sidecar ``<file>.json`` with the class names, preprocessing, layer, pooling and versions.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model
from torch import Tensor, nn

from .._config import from_json, to_json
from .._util import FeatcacheError, hash_tensors
from .._version import __version__
from ..backbones.layers import LOGITS
from ..backbones.preprocessing import Preprocessing
from ..backbones.registry import load_backbone
from ..backbones.tokens import pool_prefix
from ..extract.nodes import FeatureExtractor
from ..extract.truncate import truncate
from ..runs.finetune import load_finetuned
from ..runs.folder import RunFolder
from ..train.heads import HeadInfo
from .model import ExportedModel, Network, Preprocess

log = logging.getLogger(__name__)

#: export formats, the default first: files that load with torch alone (TorchScript, torch.export),
#: ONNX Runtime, and featcache's own (safetensors weights, rebuilt by featcache without pickle)
FORMATS = ("torchscript", "pt2", "onnx", "safetensors")
SUFFIXES = {"torchscript": ".ts", "pt2": ".pt2", "onnx": ".onnx", "safetensors": ".safetensors"}
INPUT_CONVENTION = (
    "uint8 (N, H, W, C) RGB 0-255 or float32 (N, C, H, W) in [0, 1], any H and W; returns logits (N, classes)"
)
ONNX_INPUT_CONVENTION = "uint8 (N, H, W, C) RGB 0-255, any N, H and W; returns logits (N, classes)"
PT2_INPUT_CONVENTION = (
    "uint8 (N, {h}, {w}, {c}) RGB 0-255, images already resized as the run's preprocessing says ({resize}); "
    "any N; returns logits (N, classes)"
)


@dataclass(frozen=True)
class ExportInfo:
    """Everything that travels with an exported model (the JSON sidecar and the file's metadata).

    Attributes:
        format: one of :data:`FORMATS` (``memory`` for a model built from a run folder; ``pt`` in files
            written before the formats were named for what they are: ``safetensors``).
        model: backbone spec; ``weights``/``weights_id``: the weights the head was trained on.
        layer: the cached layer; ``pool``: pooling at extraction; ``storage_dtype``: the cache dtype.
        classes: class names, in logit order.
        preprocessing: the backbone's :class:`~featcache.backbones.Preprocessing` the features were
            cached with (resize, crop, normalisation).
        head: :meth:`featcache.train.heads.HeadInfo.to_dict` of the head.
        method: ``fx`` (truncated graph), ``hooks`` (whole model, forward stopped by hooks) or ``full``.
        return_nodes: FX (train, eval) node names returned by the truncated graph, for ``fx``.
        truncated: whether the saved weights hold only what the layer needs.
        weights_sha256: hash of the exported state dict (checked when a ``pt`` file loads).
        layout: the layer's layout (:mod:`featcache.layout`), which pooling follows; None for runs
            from before featcache recorded it (maps NCHW, tokens NLD).
    """

    format: str
    model: str
    weights: str
    weights_id: str
    layer: str
    pool: str
    storage_dtype: str
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    head: dict[str, Any] = field(hash=False)
    method: str
    return_nodes: tuple[str, str] | None
    truncated: bool
    input_convention: str = INPUT_CONVENTION
    featcache_version: str = __version__
    run: str = ""
    notes: tuple[str, ...] = ()
    weights_sha256: str = ""
    layout: str | None = None

    def __repr__(self) -> str:
        return (
            f"ExportInfo(format={self.format!r}, model={self.model!r}, layer={self.layer!r}, "
            f"classes={len(self.classes)}, input {'x'.join(map(str, self.preprocessing.input_size))})"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples as lists): :func:`featcache._config.to_json`."""
        return dict(to_json(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExportInfo:
        """Inverse of :meth:`to_dict`: :func:`featcache._config.from_json`."""
        return from_json(cls, d)


# --------------------------------------------------------------------------- export modules


class _Entry(nn.Module):
    """One input convention's preprocessing, to trace (uint8 NHWC for ONNX; both for TorchScript)."""

    def __init__(self, model: ExportedModel, uint8: bool) -> None:
        super().__init__()
        self.preprocess, self.uint8 = model.preprocess, uint8

    def forward(self, x: Tensor) -> Tensor:
        return self.preprocess.from_uint8(x) if self.uint8 else self.preprocess.from_float(x)


class _Dispatch(nn.Module):
    """Scripted top level of the TorchScript export: picks the input convention by dtype."""

    def __init__(self, from_uint8: nn.Module, from_float: nn.Module, network: nn.Module, classes: list[str]):
        super().__init__()
        self.from_uint8, self.from_float, self.network = from_uint8, from_float, network
        self.classes: list[str] = list(classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError("expected a batch (N, H, W, C) uint8 or (N, C, H, W) float")
        if x.dtype == torch.uint8:
            if x.shape[-1] == 1:
                x = x.expand(-1, -1, -1, 3)
            return self.network(self.from_uint8(x))
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.network(self.from_float(x.float()))


# --------------------------------------------------------------------------- building


def build_model(run_dir: str | Path, weights: str | None = None) -> tuple[ExportedModel, ExportInfo]:
    """Build the exported model of a run folder in memory (eval mode, on the CPU).

    Args:
        run_dir: a folder written by :func:`featcache.runs.train_run` (or ``finetune_run``, ``probe_run``),
            or a sweep folder (its chosen run).
        weights: weights to rebuild the backbone with (a tag or path) when the run's own
            ``weights_arg`` cannot (e.g. the run got a ``Backbone`` object); default: the run's.

    Raises:
        FeatcacheError: the rebuilt backbone's weights differ from those the head was trained on.

    Example:
        >>> model, info = build_model("runs/mnist")  # doctest: +SKIP
        >>> info.classes[:3]  # doctest: +SKIP
        ('0', '1', '2')
    """
    folder, chosen = RunFolder.resolve(run_dir)  # a sweep folder: the run it chose
    record = folder.read_config()
    unfinished = folder.unfinished()
    if unfinished:  # usable (the best finished epoch), but say so, and how to finish it
        log.warning(unfinished)
    build = _build_finetuned if record.kind == "finetune" else _build_head_run
    model, info = build(folder, weights)
    notes = tuple(n for n in (chosen, unfinished) if n)
    return model, replace(info, notes=(*info.notes, *notes)) if notes else info


def _build_head_run(folder: RunFolder, weights: str | None) -> tuple[ExportedModel, ExportInfo]:
    """A head run: the backbone cut at the run's layer, the extraction's pooling, the trained head."""
    record, run_dir = folder.read_config(), folder.path
    if record.layer is None:
        raise FeatcacheError(f"run config of {str(run_dir)!r} names no layer; export needs a head run")
    run_cfg = record.backbone
    weights_arg = weights if weights is not None else record.weights_arg
    try:
        size = record.extract.get("input_size")
        backbone = load_backbone(record.model, weights_arg, input_size=tuple(size) if size else None)
    except (FeatcacheError, FileNotFoundError) as exc:
        raise FeatcacheError(
            f"cannot rebuild the backbone of run {str(run_dir)!r} ({record.model}, weights="
            f"{weights_arg!r}): {exc}. Pass the tag or file the run used: --weights TAG|PATH "
            "(export_run(..., weights=...))"
        ) from exc
    if backbone.cfg.weights_id != run_cfg.weights_id:
        raise FeatcacheError(
            f"backbone {record.model} rebuilt with weights={weights_arg!r} has weights id "
            f"{backbone.cfg.weights_id[:12]}, but run {str(run_dir)!r} was trained on "
            f"{run_cfg.weights_id[:12]} ({run_cfg.weights}); the head would not match. "
            "Pass the tag or file the run used: --weights TAG|PATH (export_run(..., weights=...))"
        )
    extract = record.extract
    cfg = run_cfg.with_input_size(*extract["input_size"]) if extract.get("input_size") else run_cfg
    backbone.cfg = replace(cfg, classifier=cfg.classifier or backbone.cfg.classifier)
    layer, pool = record.layer, str(extract.get("pool", "avg"))
    dtype = str(extract.get("dtype", "float32"))
    net, key, method, nodes, notes = truncate(backbone, layer)
    head, head_info = folder.load_head()
    pre = cfg.preprocessing
    layout = record.layer_layout  # None in runs from before layouts were recorded
    model = ExportedModel(
        Preprocess(pre),
        Network(net, key, pool, dtype, head, layout, pool_prefix(backbone.model, pool)),
        list(record.classes),
    ).eval()
    on_gpu = bool(record.environment.get("cuda")) and extract.get("device") != "cpu"
    if extract.get("amp") or (extract.get("amp") is None and on_gpu):
        notes.append("features were extracted under bf16 autocast; the exported model runs in float32")
    if head_info.task == "multilabel":
        notes.append(
            f"multi-label: an output per class is a logit; a class is predicted where its sigmoid reaches "
            f"{head_info.threshold if head_info.threshold is not None else 0.5:g} "
            "(head.threshold, chosen on val)"
        )
    elif head_info.task == "regress":
        notes.append(f"regression: the outputs are the values of {', '.join(record.classes)}, in their units")
    info = ExportInfo(
        format="memory",
        model=record.model,
        weights=run_cfg.weights,
        weights_id=run_cfg.weights_id,
        layer=layer,
        pool=pool,
        storage_dtype=dtype,
        classes=record.classes,
        preprocessing=pre,
        head=head_info.to_dict(),
        method=method,
        return_nodes=nodes,
        truncated=method == "fx",
        run=str(run_dir),
        notes=tuple(notes),
        weights_sha256=hash_tensors(model.state_dict()),
        layout=layout,
    )
    return model, info


def _build_finetuned(folder: RunFolder, weights: str | None) -> tuple[ExportedModel, ExportInfo]:
    """A fine-tuned run exports whole: preprocessing -> the fine-tuned network's logits (nothing is cut)."""
    run_dir = folder.path

    backbone, record = load_finetuned(run_dir, weights)
    extract, finetune = record.extract, record.verb["finetune"]["train"]
    cfg = backbone.cfg.with_input_size(*extract["input_size"]) if extract.get("input_size") else backbone.cfg
    pre = cfg.preprocessing
    net = FeatureExtractor(backbone.model, [LOGITS], "hooks", None, backbone.cfg.spec)
    model = ExportedModel(
        Preprocess(pre), Network(net, LOGITS, "none", "float32", nn.Identity()), list(record.classes)
    ).eval()
    info = ExportInfo(
        format="memory",
        model=record.model,
        weights=backbone.cfg.weights,
        weights_id=backbone.cfg.weights_id,
        layer=LOGITS,
        pool="none",
        storage_dtype="float32",
        classes=record.classes,
        preprocessing=pre,
        head={"finetune": finetune, "classifier": record.verb["plan"]["classifier"]},
        method="full",
        return_nodes=None,
        truncated=False,
        run=str(run_dir),
        notes=(f"fine-tuned run ({finetune}): the whole network is exported",),
        weights_sha256=hash_tensors(model.state_dict()),
    )
    return model, info


def rebuild_model(info: ExportInfo) -> ExportedModel:
    """The structure of an exported ``safetensors`` model with random weights (load its state dict next).

    Example:
        >>> model = rebuild_model(read_info("model.safetensors"))  # doctest: +SKIP
    """
    pre = info.preprocessing
    backbone = load_backbone(info.model, "none", input_size=pre.input_size)
    if info.method == "full":  # a fine-tuned network, exported whole
        from ..train.freeze import replace_classifier

        replace_classifier(backbone.model, info.head["classifier"], len(info.classes))
        whole = FeatureExtractor(backbone.model, [LOGITS], "hooks", None, info.model)
        return ExportedModel(
            Preprocess(pre), Network(whole, LOGITS, "none", "float32", nn.Identity()), list(info.classes)
        )
    backbone.cfg = replace(backbone.cfg, preprocessing=pre)
    if info.method == "hooks":
        net: nn.Module = FeatureExtractor(
            backbone.model, [info.layer], "hooks", backbone.cfg.classifier, info.model
        )
        key = info.layer
    else:
        net, key, _, _, _ = truncate(backbone, info.layer, info.return_nodes)
    head = HeadInfo.from_dict(info.head).build()
    return ExportedModel(
        Preprocess(pre),
        Network(
            net, key, info.pool, info.storage_dtype, head, info.layout, pool_prefix(backbone.model, info.pool)
        ),
        list(info.classes),
    )


# --------------------------------------------------------------------------- files


def sidecar_path(path: str | Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``."""
    return Path(f"{path}.json")


def read_info(path: str | Path) -> ExportInfo:
    """The :class:`ExportInfo` of an exported file, from its JSON sidecar.

    Example:
        >>> read_info("runs/mnist/model.onnx").classes  # doctest: +SKIP
    """
    side = sidecar_path(path)
    if not side.is_file():
        raise FileNotFoundError(
            f"{str(side)!r} not found: an exported model's sidecar holds its classes and "
            f"preprocessing; export again with `featcache export`"
        )
    return ExportInfo.from_dict(json.loads(side.read_text()))


def load_safetensors(path: str | Path) -> tuple[ExportedModel, ExportInfo]:
    """Load a ``safetensors`` export (or a ``model.pt`` of older versions, the same content): rebuild the
    structure with featcache, then load the weights strictly.

    Example:
        >>> model, info = load_safetensors("runs/mnist/model.safetensors")  # doctest: +SKIP
    """

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model {str(path)!r} does not exist")
    if sidecar_path(path).is_file():
        info = read_info(path)
    else:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("featcache")
        if not meta:
            raise FileNotFoundError(
                f"{str(sidecar_path(path))!r} not found and {str(path)!r} has no featcache metadata"
            )
        info = ExportInfo.from_dict(json.loads(meta))
    model = rebuild_model(info)
    load_model(model, str(path), strict=True)
    if info.weights_sha256 and hash_tensors(model.state_dict()) != info.weights_sha256:
        raise FeatcacheError(f"{str(path)!r} does not hold the weights its sidecar describes (hash mismatch)")
    return model.eval(), info
