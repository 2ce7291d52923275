"""The layout probe: for each layer, its output shape, its layout (NC, NCHW, NHWC, NLD, NCL, see
:mod:`featcache.layout`) and whether its first axis is the batch.

Three sources decide a layout, and when they disagree the layer's layout is *ambiguous* (None, with
the reason), never guessed:

* the **input-size probe**: the model runs on one image at the input size and on two at twice the
  size; the axes that grow are the positions (4-D: NCHW or NHWC; 3-D: NLD or NCL). A position axis
  of size 1 at both sizes is a 1x1 map;
* the **module type**: ``*2d`` modules (Conv2d, BatchNorm2d, pools, timm's LayerNorm2d) and
  GroupNorm put channels first, ``*1d`` modules give (N, C, L), Linear and LayerNorm put them last;
* **timm's metadata**: the modules of ``feature_info`` of a model that declares ``output_fmt``.

Where none of them speaks (a block of a model that runs at one input size only), the layer takes the
layout of the last module that finished inside it (a container) or right before it (an elementwise
leaf) with the same output shape. A layer whose first axis is not the batch (window attention,
MobileViT's patches, BatchNorm over batch x tokens) is refused, with that reason.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .._util import FeatcacheError
from ..layout import NC, NCHW, NCL, NHWC, NLD
from .hooks import INPUT_PREFIX, LOGITS, PENULTIMATE, heads, hooked_forward, module_names
from .registry import Backbone

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerShape:
    """What the probe learnt about one layer.

    Attributes:
        shape: the output shape for one image (batch axis included), None when the layer never runs.
        layout: NC / NCHW / NHWC / NLD / NCL, or None when unknown or ambiguous (``how`` says why).
        how: which source decided the layout, or why none could.
        refused: why the layer cannot be extracted (its first axis is not the batch), else None.

    Example:
        >>> swin = load_backbone("torchvision:swin_t", weights="none")  # doctest: +SKIP
        >>> layer_shapes(swin, ["features.5"], (64, 64))["features.5"]  # doctest: +SKIP
        LayerShape(shape=(1, 4, 4, 384), layout='NHWC', how='input-size probe', refused=None)
    """

    shape: tuple[int, ...] | None
    layout: str | None
    how: str
    refused: str | None = None


@dataclass
class _Run:
    """Shapes seen in one forward pass, with the order modules started and finished (first calls)."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    start: dict[str, int] = field(default_factory=dict)
    end: dict[str, int] = field(default_factory=dict)


def _forward(backbone: Backbone, names: Sequence[str], size: tuple[int, int], batch: int) -> _Run:
    model, run, tick = backbone.model, _Run(), [0]

    def keep(name: str, t: torch.Tensor) -> bool:
        run.shapes.setdefault(name, tuple(t.shape))
        return False

    def started(name: str) -> None:
        if name not in run.start:
            run.start[name] = tick[0]
            tick[0] += 1

    def ended(name: str) -> None:
        if name not in run.end:
            run.end[name] = tick[0]
            tick[0] += 1

    p = next(model.parameters(), None)
    x = torch.zeros(batch, backbone.cfg.channels, *size, device=p.device if p is not None else None)
    with _own_hooks_only(model):
        handles = []
        for name, m in model.named_modules():
            if name:
                handles.append(m.register_forward_pre_hook(lambda *_, name=name: started(name)))
                handles.append(m.register_forward_hook(lambda *_, name=name: ended(name)))
        try:
            with torch.inference_mode():
                hooked_forward(model, x, names, keep, backbone.cfg.classifier)
        finally:
            for h in handles:
                h.remove()
    return run


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")


@contextlib.contextmanager
def _own_hooks_only(model: nn.Module) -> Iterator[None]:
    """The model's forward hooks set aside while a probe runs on zeros: a user's counter or logger sees
    the images extracted, not the probe (output shapes never depend on them). Hooks registered inside
    go to fresh dicts that their handles empty."""
    saved = [(m, {k: getattr(m, k) for k in _HOOK_DICTS}) for m in model.modules()]
    try:
        for m, _ in saved:
            for k in _HOOK_DICTS:
                setattr(m, k, OrderedDict())
        yield
    finally:
        for m, dicts in saved:
            for k, d in dicts.items():
                setattr(m, k, d)


def _type_layout(module: nn.Module, ndim: int) -> str | None:
    """The layout a module's type implies for its ``ndim``-D output (or input), if any."""
    kind = type(module).__name__
    if kind.endswith("2d") or isinstance(module, (nn.GroupNorm, nn.LocalResponseNorm)):
        return {4: NCHW, 3: NCL if isinstance(module, nn.GroupNorm) else None}.get(ndim)
    if kind.endswith("1d"):
        return NCL if ndim == 3 else None
    if isinstance(module, (nn.Linear, nn.LayerNorm)) or kind in ("RmsNorm", "RMSNorm"):
        return {4: NHWC, 3: NLD}.get(ndim)
    return None


def _size_layout(small: tuple[int, ...], large: tuple[int, ...] | None) -> str | None:
    """The layout implied by which axes grew when the input doubled (None when that does not tell)."""
    if large is None or len(large) != len(small) or len(small) not in (3, 4):
        return None
    grew = {i for i in range(1, len(small)) if small[i] != large[i]}
    ones = {i for i in range(1, len(small)) if small[i] == 1 == large[i]}
    for layout, positions in ((NCHW, {2, 3}), (NHWC, {1, 2}), (NLD, {1}), (NCL, {2})):
        if len(layout) == len(small) and grew and grew | (positions & ones) == positions:
            return layout
    if not grew and len(small) == 4 and small[2:] == (1, 1) != small[1:3]:
        return NCHW  # a 1x1 map
    if not grew and len(small) == 4 and small[1:3] == (1, 1) != small[2:]:
        return NHWC
    return None


class _Decider:
    """Decides each layer's layout from the probe runs, in the order the layers finished.

    ``one``: one image at the input size; ``sized``: two at twice the size (None when the model takes
    no other size); ``two``: a run with two images (``sized``, else two at the input size).
    """

    def __init__(self, backbone: Backbone | None, one: _Run, sized: _Run | None, two: _Run) -> None:
        self.one, self.sized, self.two = one, sized, two
        model = backbone.model if backbone is not None else nn.Identity()
        self.modules = dict(model.named_modules())
        fmt = getattr(model, "output_fmt", None)
        fmt = getattr(fmt, "value", fmt)  # timm's Format enum, or a string
        info = getattr(model, "feature_info", None)
        listed = info if isinstance(info, list) and fmt in (NCHW, NHWC) else []
        self.timm = {f["module"]: str(fmt) for f in listed if isinstance(f, dict)}
        self.decided: dict[str, str] = {}
        self.by_end = sorted(one.end, key=one.end.__getitem__)

    def votes(self, name: str, shape: tuple[int, ...]) -> dict[str, str]:
        out: dict[str, str] = {}
        sized = _size_layout(shape, self.sized.shapes.get(name) if self.sized else None)
        if sized:
            out["input-size probe"] = sized
        target = name[len(INPUT_PREFIX) :] if name.startswith(INPUT_PREFIX) else name
        typed = _type_layout(self.modules[target], len(shape)) if target in self.modules else None
        if typed:
            out["module type"] = typed
        if name in self.timm and len(shape) == 4:
            out["timm feature_info"] = self.timm[name]
        return out

    def inherited(self, name: str, shape: tuple[int, ...]) -> tuple[str, str] | None:
        """The layout of the module that finished last inside ``name`` (a container), or right before
        it started (a leaf, or a module's input), with the same shape."""
        one = self.one
        target = name[len(INPUT_PREFIX) :] if name.startswith(INPUT_PREFIX) else name
        if target not in one.start:
            return None
        inside = name == target and any(True for _ in self.modules[name].children())
        lo, hi = (one.start[name], one.end[name]) if inside else (-1, one.start[target])
        before = [n for n in self.by_end if lo < one.end[n] < hi]
        for cand in reversed(before) if inside else before[-1:]:
            if one.shapes.get(cand) == shape and cand in self.decided:
                return self.decided[cand], f"inherited from {cand}"
        return None

    def decide(self, name: str) -> LayerShape:
        shape = self.one.shapes.get(name)
        if shape is None:
            return LayerShape(None, None, "not called", "it is not called during the forward pass")
        refused = self.refusal(name, shape)
        layout: str | None
        if len(shape) <= 2:
            layout, how = NC, "vectors"
        elif len(shape) > 4:
            layout, how = None, f"unknown: a {len(shape)}-D output"
        else:
            votes = self.votes(name, shape)
            if len(set(votes.values())) > 1:
                layout, how = None, "ambiguous: " + ", ".join(f"the {k} says {v}" for k, v in votes.items())
            elif votes:
                layout, how = next(iter(votes.values())), " + ".join(votes)
            else:
                got = self.inherited(name, shape)
                layout, how = (
                    got if got else (None, "unknown: neither its type nor an input-size probe tells")
                )
        if layout is not None and refused is None:
            self.decided[name] = layout
        return LayerShape(shape, layout, how, refused)

    def refusal(self, name: str, shape: tuple[int, ...]) -> str | None:
        """Why the layer is not one value per image (None when it is)."""
        if len(shape) == 0:
            return "it is a scalar, not one value per image"
        two = self.two.shapes.get(name)
        if shape[0] == 1 and two is not None and two[0] == 2:
            return None
        seen = f"{shape[0]} for one image" + (f" and {two[0]} for two" if two is not None else "")
        return (
            f"its first axis is not the batch ({seen}): window attention, patches or a BatchNorm over "
            "batch x tokens fold positions into it"
        )


def output_shapes(
    run: nn.Module,
    names: Sequence[str],
    channels: int,
    input_size: tuple[int, int],
    device: torch.device | None = None,
) -> dict[str, LayerShape]:
    """:func:`layer_shapes` for values no hook reaches (torch.fx graph nodes): ``run(x)`` returns them
    as a dict; the input-size probe alone decides the layout.

    Example:
        >>> output_shapes(FeatureExtractor(model, ["flatten"]), ["flatten"], 3, (64, 64))  # doctest: +SKIP
        {'flatten': LayerShape(shape=(1, 512), layout='NC', how='vectors', refused=None)}
    """
    h, w = input_size

    def shapes(batch: int, hh: int, ww: int) -> _Run:
        with torch.inference_mode(), _own_hooks_only(run):
            out = run(torch.zeros(batch, channels, hh, ww, device=device))
        return _Run(shapes={n: tuple(out[n].shape) for n in names})

    one = shapes(1, h, w)
    sized: _Run | None
    try:
        sized = shapes(2, 2 * h, 2 * w)
    except Exception as exc:  # a model built for one input size
        log.debug("no input-size probe (%s)", exc)
        sized = None
    decider = _Decider(None, one, sized, sized if sized is not None else shapes(2, h, w))
    return {n: decider.decide(n) for n in names}


def _run_or_explain(backbone: Backbone, names: Sequence[str], size: tuple[int, int], batch: int) -> _Run:
    try:
        return _forward(backbone, names, size, batch)
    except FeatcacheError:
        raise
    except Exception as exc:  # timm asserts the input size, others raise RuntimeError
        h, w = size
        raise FeatcacheError(
            f"{backbone.cfg.spec} cannot run on a {h}x{w} input ({type(exc).__name__}: {exc}). A model built "
            f"for one input size (timm's ViT, Swin, LeViT, ...) is loaded for another with "
            f"load_backbone(spec, input_size=({h}, {w})), as the CLI's --input-size does; else pick an "
            "input size the model takes"
        ) from exc


def layer_shapes(
    backbone: Backbone, names: Sequence[str] | None = None, input_size: tuple[int, int] | None = None
) -> dict[str, LayerShape]:
    """Shape, layout and batch-axis check of ``names`` (default: every module, ``penultimate``, ``logits``).

    Runs the model on zeros: one image at ``input_size`` and two at twice the size (two at the size
    itself when the model takes no other); raises :class:`FeatcacheError` when it cannot run at all.

    Example:
        >>> bb = load_backbone("torchvision:resnet18", weights="none")  # doctest: +SKIP
        >>> layer_shapes(bb, ["layer3"], (64, 64))["layer3"].layout  # doctest: +SKIP
        'NCHW'
    """
    h, w = input_size or backbone.cfg.input_size
    modules = module_names(backbone.model)
    if names is None:
        names = [*modules, *([PENULTIMATE] if heads(backbone.cfg.classifier) else []), LOGITS]
    known = set(modules)
    hooked = [*modules, *(n for n in dict.fromkeys(names) if n not in known)]
    one = _run_or_explain(backbone, hooked, (h, w), 1)
    sized: _Run | None
    try:
        sized = _forward(backbone, hooked, (2 * h, 2 * w), 2)
    except Exception as exc:  # a model built for one input size: the other sources decide
        log.debug("%s does not run at twice the input size (%s)", backbone.cfg.spec, exc)
        sized = None
    two = sized if sized is not None else _run_or_explain(backbone, hooked, (h, w), 2)
    decider = _Decider(backbone, one, sized, two)
    out = {name: decider.decide(name) for name in sorted(hooked, key=lambda n: one.end.get(n, 1 << 62))}
    return {n: out[n] for n in names}
