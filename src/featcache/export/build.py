"""Export a run: preprocessing + the backbone truncated at the run's layer + pooling + the head, as ONE model.

The exported model takes raw images and returns logits. Its input (see :data:`INPUT_CONVENTION`):

- ``uint8`` images ``(N, H, W, C)`` (RGB, 0-255, any ``H``/``W``): resized (+ centre-cropped) to the
  run's input size exactly as :func:`featcache.data.to_model_input` resizes a uint8 image (torch's
  fixed-point uint8 kernel, emulated bit for bit), then scaled and normalised;
- ``float`` images ``(N, C, H, W)`` in ``[0, 1]``: resized as ``interpolate(antialias=True)``, normalised.

Formats (:data:`~featcache.export.config.FORMATS`): ``torchscript`` (the default) and ``pt2``
(``torch.export``) load with torch alone, ``onnx`` with ONNX Runtime alone (the uint8 convention only);
``pt2`` takes images already resized to the input size (its program has fixed height and width);
``safetensors`` is featcache's own (the truncated weights + a JSON sidecar; loading rebuilds the
structure with featcache, no pickle). Every file gets a sidecar ``<file>.json`` with the class names,
preprocessing, layer, pooling and versions.
"""

from __future__ import annotations

import copy
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
from ..backbones.registry import Backbone, BackboneCfg, load_backbone, parse_spec
from ..backbones.tokens import pool_prefix
from ..extraction.nodes import FeatureExtractor
from ..extraction.truncate import truncate
from ..runs.finetune import load_finetuned
from ..runs.folder import RunFolder, RunRecord
from ..train.heads import HeadInfo
from .model import ExportedModel, Network, Preprocess

log = logging.getLogger(__name__)

#: export formats, the default first: files that load with torch alone (TorchScript, torch.export),
#: ONNX Runtime, and featcache's own (safetensors weights, rebuilt by featcache without pickle)
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


#: what a run made from a model passed from Python (not a name featcache rebuilds) is exported with
ModuleArg = nn.Module | Backbone | None


def build_model(
    run_dir: str | Path, weights: str | None = None, backbone: ModuleArg = None
) -> tuple[ExportedModel, ExportInfo]:
    """Build the exported model of a run folder in memory (eval mode, on the CPU).

    Args:
        run_dir: a folder written by :func:`featcache.runs.train_run` (or ``finetune_run``, ``probe_run``),
            or a sweep folder (its chosen run).
        weights: weights to rebuild the backbone with (a tag or path) when the run's own
            ``weights_arg`` cannot; default: the run's.
        backbone: the ``nn.Module`` (or :class:`~featcache.backbones.Backbone`) the run was made from,
            for a run whose model was passed from Python rather than named: featcache cannot rebuild
            it from the name ``module:ClassName``. Its weights must be those the run was trained on.

    Raises:
        FeatcacheError: the rebuilt (or given) backbone's weights differ from those the head was trained on.

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
    if record.kind == "finetune":
        model, info = _build_finetuned(folder, weights, backbone)
    else:
        model, info = _build_head_run(folder, weights, backbone)
    notes = tuple(n for n in (chosen, unfinished) if n)
    return model, replace(info, notes=(*info.notes, *notes)) if notes else info


def from_python_only(model: str, where: str) -> str:
    """The fix for a model featcache cannot rebuild from its name: a module passed from Python
    (``module:Name``) or a source registered in Python only; "" for a name it can rebuild.

    Example:
        >>> from_python_only("module:TinyNet", "runs/tiny").split(":")[0]
        'run runs/tiny was made from an nn.Module passed from Python (module'
    """
    registered = ""
    if model.startswith("module:"):
        what = f"an nn.Module passed from Python ({model})"
    else:
        try:
            parse_spec(model)
            return ""
        except FeatcacheError as exc:
            what = f"{model!r}, which is not a model this process knows ({exc})"
            registered = " (or register its source with register_source first, then export by name)"
    return (
        f"run {where} was made from {what}; featcache cannot rebuild it from a name. Export it from Python "
        f"with the same module: featcache.export_run({where!r}, format='onnx', backbone=module){registered}, "
        f"and predict with featcache.load_predictor({where!r}, backbone=module), or `featcache predict` on "
        "the exported .ts or .onnx file, which needs no module"
    )


def _given_backbone(backbone: nn.Module | Backbone, record: RunRecord) -> Backbone:
    """The backbone passed from Python, checked against the run: its weights are those the head was
    trained on (hashed as the cache hashed them)."""
    given = backbone if isinstance(backbone, Backbone) else load_backbone(backbone, cfg=record.backbone)
    if given.cfg.weights_id != record.backbone.weights_id:
        raise FeatcacheError(
            f"the backbone passed has weights id {given.cfg.weights_id[:12]}, but the run was trained on "
            f"{record.backbone.weights_id[:12]} ({record.model}); pass the module the run was made from, "
            "with its weights unchanged"
        )
    return given


def _rebuilt_backbone(
    folder: RunFolder, record: RunRecord, weights: str | None, backbone: ModuleArg
) -> Backbone:
    """The run's backbone: the one passed from Python, else rebuilt from the run's spec and weights."""
    if backbone is not None:
        return _given_backbone(backbone, record)
    python_only = from_python_only(record.model, str(folder.path))
    if python_only:
        raise FeatcacheError(python_only)
    weights_arg = weights if weights is not None else record.weights_arg
    try:
        size = record.extract.get("input_size")
        rebuilt = load_backbone(record.model, weights_arg, input_size=tuple(size) if size else None)
    except (FeatcacheError, FileNotFoundError) as exc:
        raise FeatcacheError(
            f"cannot rebuild the backbone of run {str(folder.path)!r} ({record.model}, weights="
            f"{weights_arg!r}): {exc}. Pass the tag or file the run used: --weights TAG|PATH "
            "(export_run(..., weights=...))"
        ) from exc
    if rebuilt.cfg.weights_id != record.backbone.weights_id:
        run_cfg = record.backbone
        raise FeatcacheError(
            f"backbone {record.model} rebuilt with weights={weights_arg!r} has weights id "
            f"{rebuilt.cfg.weights_id[:12]}, but run {str(folder.path)!r} was trained on "
            f"{run_cfg.weights_id[:12]} ({run_cfg.weights}); the head would not match. "
            "Pass the tag or file the run used: --weights TAG|PATH (export_run(..., weights=...))"
        )
    return rebuilt


def _build_head_run(
    folder: RunFolder, weights: str | None, given: ModuleArg = None
) -> tuple[ExportedModel, ExportInfo]:
    """A head run: the backbone cut at the run's layer, the extraction's pooling, the trained head."""
    record, run_dir = folder.read_config(), folder.path
    if record.layer is None:
        raise FeatcacheError(f"run config of {str(run_dir)!r} names no layer; export needs a head run")
    run_cfg = record.backbone
    backbone = _rebuilt_backbone(folder, record, weights, given)
    extract = record.extract
    # runs recorded before the backbone carried its input size hold the source's own preprocessing
    cfg = run_cfg.with_input_size(*extract["input_size"]) if extract.get("input_size") else run_cfg
    backbone = Backbone(backbone.model, replace(cfg, classifier=cfg.classifier or backbone.cfg.classifier))
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


def _build_finetuned(
    folder: RunFolder, weights: str | None, given: ModuleArg = None
) -> tuple[ExportedModel, ExportInfo]:
    """A fine-tuned run exports whole: preprocessing -> the fine-tuned network's logits (nothing is cut)."""
    run_dir = folder.path
    record = folder.read_config()
    python_only = from_python_only(record.model, str(run_dir)) if given is None else ""
    if python_only:
        raise FeatcacheError(python_only)
    backbone, record = load_finetuned(run_dir, weights, given)
    finetune = record.verb["finetune"]["train"]
    pre = backbone.cfg.preprocessing  # load_finetuned built it for the run's input size
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
        head={
            "finetune": finetune,
            "classifier": record.verb["plan"]["classifier"],
            "task": record.task,
            **({"threshold": _finetuned_threshold(folder)} if record.task == "multilabel" else {}),
        },
        method="full",
        return_nodes=None,
        truncated=False,
        run=str(run_dir),
        notes=(f"fine-tuned run ({finetune}): the whole network is exported", *_task_notes(record)),
        weights_sha256=hash_tensors(model.state_dict()),
    )
    return model, info


def _finetuned_threshold(folder: RunFolder) -> float:
    """A multi-label fine-tuned run's threshold, chosen on val after training (metrics.json)."""
    return float(folder.read_metrics().get("threshold", 0.5))


def _task_notes(record: RunRecord) -> tuple[str, ...]:
    """What the outputs of a fine-tuned multi-label or regression network are."""
    if record.task == "multilabel":
        return ("multi-label: an output per class is a logit; a class is predicted where its sigmoid "
                "reaches head.threshold (chosen on val)",)  # fmt: skip
    if record.task == "regress":
        return (f"regression: the outputs are the values of {', '.join(record.classes)}, in their units",)
    return ()


def rebuild_model(info: ExportInfo, backbone: ModuleArg = None) -> ExportedModel:
    """The structure of an exported ``safetensors`` model with random weights (load its state dict next).

    Args:
        info: the export's sidecar.
        backbone: for a model passed from Python (``module:Name``), a module of the same structure; a
            copy of it is used, so loading the file's weights leaves the module passed unchanged.

    Example:
        >>> model = rebuild_model(read_info("model.safetensors"))  # doctest: +SKIP
    """
    pre = info.preprocessing
    if backbone is not None:
        module = backbone.model if isinstance(backbone, Backbone) else backbone
        bb = load_backbone(copy.deepcopy(module), cfg=BackboneCfg(spec=info.model))
    elif info.model.startswith("module:"):
        raise FeatcacheError(
            f"{info.run or 'this export'} holds a network made from an nn.Module passed from Python "
            f"({info.model}): its safetensors file loads with featcache.load_predictor(path, "
            "backbone=module); the TorchScript and ONNX exports load without the module"
        )
    else:
        bb = load_backbone(info.model, "none", input_size=pre.input_size)
    if info.method == "full":  # a fine-tuned network, exported whole
        from ..train.freeze import replace_classifier

        replace_classifier(bb.model, info.head["classifier"], len(info.classes))
        whole = FeatureExtractor(bb.model, [LOGITS], "hooks", None, info.model)
        return ExportedModel(
            Preprocess(pre), Network(whole, LOGITS, "none", "float32", nn.Identity()), list(info.classes)
        )
    bb.cfg = replace(bb.cfg, preprocessing=pre)
    if info.method == "hooks":
        net: nn.Module = FeatureExtractor(bb.model, [info.layer], "hooks", bb.cfg.classifier, info.model)
        key = info.layer
    else:
        net, key, _, _, _ = truncate(bb, info.layer, info.return_nodes)
    head = HeadInfo.from_dict(info.head).build()
    return ExportedModel(
        Preprocess(pre),
        Network(net, key, info.pool, info.storage_dtype, head, info.layout, pool_prefix(bb.model, info.pool)),
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


def load_safetensors(path: str | Path, backbone: ModuleArg = None) -> tuple[ExportedModel, ExportInfo]:
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
    model = rebuild_model(info, backbone)
    load_model(model, str(path), strict=True)
    if info.weights_sha256 and hash_tensors(model.state_dict()) != info.weights_sha256:
        raise FeatcacheError(f"{str(path)!r} does not hold the weights its sidecar describes (hash mismatch)")
    return model.eval(), info
