"""``export_run``: write a run as a TorchScript, ``torch.export`` (.pt2), ONNX or safetensors model with a
JSON sidecar, verified against predict; :func:`load_hint` says how to load each without featcache.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .._util import FeatcacheError, default_mode, unknown, write_json
from ..backbones.preprocessing import Preprocessing
from ..runs.folder import RunFolder
from .build import (
    INPUT_CONVENTION,
    ONNX_INPUT_CONVENTION,
    PT2_INPUT_CONVENTION,
    SUFFIXES,
    ExportInfo,
    ModuleArg,
    _Dispatch,
    _Entry,
    build_model,
    sidecar_path,
)
from .config import FORMATS
from .model import ExportedModel, Preprocess
from .predict import load_predictor


def _example(pre: Preprocessing, extra: tuple[int, int] = (7, 5)) -> Tensor:
    """Two random uint8 NHWC images slightly larger than the input size (tracing / verification input)."""
    size = (2, pre.input_size[0] + extra[0], pre.input_size[1] + extra[1], pre.channels)
    return torch.randint(0, 256, size, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _save_torchscript(model: ExportedModel, info: ExportInfo, out: Path) -> None:
    u8 = _example(info.preprocessing)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced_net = torch.jit.trace(model.network, model.preprocess(u8))
        traced_u8 = torch.jit.trace(_Entry(model, True).eval(), u8)
        traced_f = torch.jit.trace(_Entry(model, False).eval(), u8.permute(0, 3, 1, 2).float() / 255.0)
        scripted = torch.jit.script(_Dispatch(traced_u8, traced_f, traced_net, list(info.classes)).eval())
        torch.jit.save(scripted, str(out), _extra_files={"featcache.json": json.dumps(info.to_dict())})


def fixed_size_model(model: ExportedModel, pre: Preprocessing) -> ExportedModel:
    """The model for inputs already at the input size (resized and cropped as ``pre`` says): its resize
    is the identity, so a program with fixed height and width (``torch.export``) runs it."""
    return ExportedModel(
        Preprocess(pre.with_input_size(*pre.input_size)), model.network, model.classes
    ).eval()


def _save_pt2(model: ExportedModel, info: ExportInfo, out: Path) -> None:
    pre = info.preprocessing
    example = _example(pre, extra=(0, 0))
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.export.export(
                fixed_size_model(model, pre), (example,), dynamic_shapes=({0: batch},)
            )
    except Exception as exc:  # torch.export refuses what it cannot capture whole (any exception type)
        raise FeatcacheError(
            f"this model does not export with torch.export ({type(exc).__name__}: "
            f"{(str(exc).splitlines() or [''])[0][:200]}); use "
            "--format torchscript (the default) or onnx, which also load without featcache"
        ) from exc
    torch.export.save(program, str(out), extra_files={"featcache.json": json.dumps(info.to_dict())})


def _save_onnx(model: ExportedModel, info: ExportInfo, out: Path) -> None:
    import onnx

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            nn.Sequential(_Entry(model, True), model.network).eval(),
            (_example(info.preprocessing),),
            str(out),
            dynamo=False,
            input_names=["images"],
            output_names=["logits"],
            opset_version=17,
            dynamic_axes={"images": {0: "batch", 1: "height", 2: "width"}, "logits": {0: "batch"}},
        )
    proto = onnx.load(str(out))
    onnx.helper.set_model_props(
        proto, {"featcache": json.dumps(info.to_dict()), "classes": json.dumps(list(info.classes))}
    )
    onnx.save(proto, str(out))


def _convention(format: str, info: ExportInfo) -> str:
    """What the exported file takes and returns."""
    if format == "onnx":
        return ONNX_INPUT_CONVENTION
    if format == "pt2":
        pre = info.preprocessing
        resize = pre.describe().split(" (")[0]
        h, w = pre.input_size
        return PT2_INPUT_CONVENTION.format(h=h, w=w, c=pre.channels, resize=resize)
    return INPUT_CONVENTION


def load_hint(path: str | Path, info: ExportInfo) -> str:
    """One line: how to load the exported file (without featcache where the format allows) and what it
    takes.

    Example:
        >>> print(load_hint("model.onnx", read_info("model.onnx")))  # doctest: +SKIP
        load with onnxruntime alone: onnxruntime.InferenceSession('model.onnx').run(None, ...
    """
    p = str(path)
    how = {
        "torchscript": f"load with torch alone: `torch.jit.load({p!r})(x)` (class names: its .classes)",
        "pt2": f"load with torch alone: `torch.export.load({p!r}).module()(x)`",
        "onnx": "load with onnxruntime alone: "
        f"`onnxruntime.InferenceSession({p!r}).run(None, {{'images': x}})[0]` (x a numpy array)",
        "safetensors": f"featcache's own format: `featcache.load_predictor({p!r}).logits(x)`",
    }[info.format]
    return f"{how}; x: {info.input_convention}; class names in {p}.json"


def export_run(
    run_dir: str | Path,
    format: str = "torchscript",
    out: str | Path | None = None,
    weights: str | None = None,
    verify: bool = True,
    backbone: ModuleArg = None,
) -> Path:
    """Export a run as one model for raw images: preprocessing, truncated backbone, pooling and head.

    Args:
        run_dir: a run folder (``featcache train``, ``finetune``, ``probe --out``), or a sweep folder (its
            chosen run).
        format: ``torchscript`` (loads with torch alone, any image size), ``pt2`` (``torch.export``, loads
            with torch alone, images at the input size), ``onnx`` (ONNX Runtime alone) or ``safetensors``
            (featcache's own, loads with featcache, no pickle). :func:`load_hint` says how to load each.
        out: output file (default ``RUN/model.ts|.pt2|.onnx|.safetensors``); the sidecar is ``<out>.json``.
        weights: see :func:`build_model`.
        verify: load the written file back and check it gives the in-memory model's logits.
        backbone: the ``nn.Module`` (or :class:`~featcache.backbones.Backbone`) a run was made from when it
            was passed from Python: featcache cannot rebuild ``module:ClassName`` from the name. Its
            weights must be the run's (checked by hash).

    Returns:
        The path of the exported file.

    Example:
        >>> export_run("runs/mnist", "onnx", "mnist.onnx")  # doctest: +SKIP
        PosixPath('mnist.onnx')
        >>> export_run("runs/mine", "onnx", backbone=my_module)  # from an nn.Module  # doctest: +SKIP
        PosixPath('runs/mine/model.onnx')
    """
    if format == "pt":
        raise FeatcacheError(
            "--format pt was featcache's own safetensors file, which loads nowhere else; it is now named "
            "--format safetensors (format='safetensors'). For a file that loads with torch alone: "
            "--format torchscript (the default) or --format pt2"
        )
    if format not in FORMATS:
        raise unknown("export format", format, FORMATS, f"Use --format {'|'.join(FORMATS)}.")
    model, info = build_model(run_dir, weights, backbone)
    path = Path(out) if out is not None else RunFolder.resolve(run_dir)[0].path / f"model{SUFFIXES[format]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    notes = info.notes
    if info.method == "hooks" and format != "safetensors":
        notes += ("traced through hooks: data-dependent control flow follows the example input's path",)
    info = replace(info, format=format, input_convention=_convention(format, info), notes=notes)
    if format == "safetensors":
        from safetensors.torch import save_model

        save_model(model, str(path), metadata={"featcache": json.dumps(info.to_dict())})
    elif format == "torchscript":
        _save_torchscript(model, info, path)
    elif format == "pt2":
        _save_pt2(model, info, path)
    else:
        _save_onnx(model, info, path)
    default_mode(path)
    model.eval()  # exporters may leave wrappers (and so the model) in training mode
    write_json(sidecar_path(path), info.to_dict())
    if verify:
        _verify(model, path, info, backbone)
    return path


def _verify(model: ExportedModel, path: Path, info: ExportInfo, backbone: ModuleArg) -> None:
    x = _example(info.preprocessing, extra=(11, 3))
    with torch.inference_mode():
        want = model(x)
    got = load_predictor(path, device="cpu", backbone=backbone).logits(x)
    tol = 1e-3 * max(1.0, float(want.abs().max()))
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-3, atol=tol):
        diff = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
        raise FeatcacheError(
            f"the exported {info.format} file {str(path)!r} does not reproduce the model (max logit "
            f"difference {diff:.3g}): this backbone does not rebuild faithfully in this format; try another"
        )
