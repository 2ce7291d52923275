"""Named layers: list them with output shapes, summarise a model, and extract several at once.

Layer names are what ``model.named_modules()`` shows (``layer3``, ``layer4.1.conv2``) plus two
shorthands: ``penultimate`` (the input of the classifier, what ``model.fc = Identity()`` returns)
and ``logits`` (the model's output). Graph-node names that are not modules (``flatten``, ``add_1``)
work through torch.fx where the model traces.
"""

from __future__ import annotations

import inspect
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._util import FeatcacheError, unknown
from .backbones import Backbone

log = logging.getLogger(__name__)

PENULTIMATE = "penultimate"
LOGITS = "logits"
SHORTHANDS = (PENULTIMATE, LOGITS)
INPUT_PREFIX = "input:"  # ``input:layer4.1``: the input of a module (where a cached prefix ends)


@dataclass(frozen=True)
class LayerInfo:
    """One row of ``featcache layers``: name, module type, output shape (batch 1) and parameters."""

    name: str
    type: str
    shape: tuple[int, ...] | None
    params: int
    trainable: int
    depth: int


class _Stop(Exception):
    """Raised by the last hook to stop the forward pass after the deepest requested layer."""


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor in a module output (tensor, tuple/list, dict or a transformers ModelOutput)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for v in value:
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def module_names(model: nn.Module) -> list[str]:
    """All non-root module names in registration order."""
    return [n for n, _ in model.named_modules() if n]


def dummy_input(
    backbone: Backbone, input_size: tuple[int, int] | None = None, batch: int = 1
) -> torch.Tensor:
    """A zero batch at the backbone's (or the given) input size, on the model's device."""
    h, w = input_size or backbone.cfg.input_size
    p = next(backbone.model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    return torch.zeros(batch, backbone.cfg.channels, h, w, device=device)


def list_layers(backbone: Backbone, input_size: tuple[int, int] | None = None) -> list[LayerInfo]:
    """Every named module with its output shape for one image at ``input_size`` and its parameters.

    Example:
        >>> from featcache.backbones import load_backbone
        >>> rows = list_layers(load_backbone("torchvision:resnet18", weights="none"), (64, 64))
        >>> next(r.shape for r in rows if r.name == "layer3")
        (1, 256, 4, 4)
    """
    model = backbone.model
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, mod in model.named_modules():
        if not name:
            continue

        def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            t = first_tensor(out)
            if t is not None and name not in shapes:
                shapes[name] = tuple(t.shape)

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            out = model(dummy_input(backbone, input_size))
    except RuntimeError as exc:  # e.g. an input too small for the network's pooling
        raise FeatcacheError(
            f"{backbone.cfg.spec} cannot run on a {input_size or backbone.cfg.input_size} input: {exc}"
        ) from exc
    finally:
        for h in handles:
            h.remove()
    rows = []
    for name, mod in model.named_modules():
        if not name:
            continue
        params = list(mod.parameters())
        rows.append(
            LayerInfo(
                name=name,
                type=type(mod).__name__,
                shape=shapes.get(name),
                params=sum(p.numel() for p in params),
                trainable=sum(p.numel() for p in params if p.requires_grad),
                depth=name.count(".") + 1,
            )
        )
    cls = backbone.cfg.classifier
    if cls and cls in shapes:
        pen = _capture_input(model, cls, dummy_input(backbone, input_size))
        rows.append(LayerInfo(PENULTIMATE, f"input of {cls}", tuple(pen.shape), 0, 0, 0))
    logits = first_tensor(out)
    if logits is not None:
        rows.append(LayerInfo(LOGITS, "model output", tuple(logits.shape), 0, 0, 0))
    return rows


def _capture_input(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    ext = FeatureExtractor(model, [PENULTIMATE], classifier=name)
    with torch.inference_mode():
        return ext(x)[PENULTIMATE]


def count_macs(backbone: Backbone, input_size: tuple[int, int] | None = None) -> int | None:
    """Multiply-accumulates of one forward pass (torch's FlopCounterMode, FLOPs / 2), or None."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # pragma: no cover - torch < 2.1
        return None
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        backbone.model(dummy_input(backbone, input_size))
    return int(counter.get_total_flops() // 2)


def _check_names(model: nn.Module, layers: Sequence[str], classifier: str | None, spec: str) -> list[str]:
    """Return names that are neither modules nor shorthands (candidates for FX graph nodes)."""
    modules = set(module_names(model))
    if not layers:
        raise FeatcacheError(f"no layers requested; run `featcache layers {spec}` to list them")
    not_modules = []
    for name in layers:
        if name == PENULTIMATE and not classifier:
            raise FeatcacheError(
                f"'penultimate' needs a classifier module and {spec} has none; name a layer instead "
                f"(`featcache layers {spec}`)"
            )
        if name.startswith(INPUT_PREFIX) and name[len(INPUT_PREFIX) :] not in modules:
            raise unknown("module", name[len(INPUT_PREFIX) :], modules, f"`{name}` names a module's input.")
        if name not in modules and name not in SHORTHANDS and not name.startswith(INPUT_PREFIX):
            not_modules.append(name)
    return not_modules


def _copy_if_tensor(value: Any) -> Any:
    """A copy of a tensor (anything else as is): used inside traced graphs."""
    return value.clone() if isinstance(value, torch.Tensor) else value


def _copy_returned_nodes(gm: torch.fx.GraphModule) -> None:
    """Return copies of nodes that later ops also read, so an in-place op cannot overwrite them.

    torchvision's ``create_feature_extractor`` returns ``layer1.0.bn1`` or ``layer4.1.add`` as
    the tensor that the following ``ReLU(inplace=True)`` then rectifies in place; the hook path
    clones for the same reason.
    """
    graphs = [getattr(gm, "train_graph", None), getattr(gm, "eval_graph", None)]
    unique = {id(g): g for g in [*graphs, gm.graph] if g is not None}
    for graph in unique.values():
        output = next(n for n in graph.nodes if n.op == "output")
        for node in list(output.all_input_nodes):
            if len(node.users) > 1:
                with graph.inserting_after(node):
                    copy = graph.call_function(_copy_if_tensor, (node,))
                output.replace_input_with(node, copy)
        graph.lint()
    gm.recompile()


class FeatureExtractor(nn.Module):
    """Return ``{name: activation}`` for several layers in one forward pass, without copying the model.

    The forward pass stops right after the deepest requested layer: for ``layer3`` of a ResNet,
    ``layer4`` and ``fc`` never run. ``method="hooks"`` uses forward hooks (works on any model);
    ``"fx"`` uses torchvision's ``create_feature_extractor`` (graph nodes that are not modules);
    ``"auto"`` picks hooks when every name is a module and FX otherwise, and falls back to hooks
    when tracing fails. ``self.method`` tells which path is in use.

    Example:
        >>> from featcache.backbones import load_backbone
        >>> bb = load_backbone("torchvision:resnet18", weights="none")
        >>> ext = FeatureExtractor(bb.model, ["layer2", "layer3"])
        >>> {k: tuple(v.shape) for k, v in ext(torch.zeros(1, 3, 64, 64)).items()}
        {'layer2': (1, 128, 8, 8), 'layer3': (1, 256, 4, 4)}
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        method: str = "auto",
        classifier: str | None = None,
        spec: str = "MODEL",
    ) -> None:
        super().__init__()
        if method not in ("auto", "hooks", "fx"):
            raise unknown("extraction method", method, ["auto", "hooks", "fx"], "")
        self.model = model
        self.layers = list(dict.fromkeys(layers))
        self.classifier = classifier
        self.spec = spec
        not_modules = _check_names(model, self.layers, classifier, spec)
        self.method = "hooks"
        self._fx: nn.Module | None = None
        if method == "fx" or not_modules:
            try:
                self._fx = self._build_fx(not_modules or [])
                self.method = "fx"
            except FeatcacheError:
                raise
            except Exception as exc:
                if not_modules:
                    names = module_names(model) + list(SHORTHANDS)
                    raise unknown(
                        "layer", not_modules[0], names, f"Run `featcache layers {spec}` to see them all."
                    ) from exc
                log.info("torch.fx could not trace %s (%s); using forward hooks", type(model).__name__, exc)
        log.info("extracting %s with %s", self.layers, self.method)

    def _build_fx(self, not_modules: list[str]) -> nn.Module:
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        if any(n in SHORTHANDS or n.startswith(INPUT_PREFIX) for n in self.layers):
            raise RuntimeError("shorthands go through hooks")
        # Tracing switches the model to train mode and leaves it there when it fails: restore the
        # mode (a frozen backbone left in train mode would normalise with batch statistics).
        was_training = self.model.training
        try:
            _, eval_nodes = get_graph_node_names(self.model, tracer_kwargs=tracer_kwargs())
            for name in not_modules:
                if name not in eval_nodes:
                    choices = module_names(self.model) + list(eval_nodes) + list(SHORTHANDS)
                    raise unknown(
                        "layer", name, choices, f"Run `featcache layers {self.spec}` to see them all."
                    )
            fx = create_feature_extractor(
                self.model.eval(), return_nodes={n: n for n in self.layers}, tracer_kwargs=tracer_kwargs()
            )
        finally:
            self.model.train(was_training)
        _copy_returned_nodes(fx)
        return fx

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._fx is not None:
            self._fx.train(self.model.training)
            return dict(self._fx(x))
        return self._hooked_forward(x)

    def _hooked_forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        wanted = [n for n in self.layers if n != LOGITS]
        captured: dict[str, torch.Tensor] = {}
        modules = dict(self.model.named_modules())
        stop_early = LOGITS not in self.layers

        def keep(name: str, value: Any) -> None:
            t = first_tensor(value)
            if t is None or name in captured:
                return
            # Later in-place ops (ReLU(inplace=True)) would overwrite an earlier capture.
            last = len(captured) == len(wanted) - 1
            captured[name] = t if (last and stop_early) else t.clone()
            if stop_early and len(captured) == len(wanted):
                raise _Stop

        handles = []
        for name in wanted:
            if name == PENULTIMATE or name.startswith(INPUT_PREFIX):
                target = self.classifier if name == PENULTIMATE else name[len(INPUT_PREFIX) :]
                if target is None:  # _check_names refused this already; keeps the type checker informed
                    raise FeatcacheError(f"{name!r} needs a classifier module")
                handles.append(
                    modules[target].register_forward_pre_hook(lambda _m, inp, name=name: keep(name, inp))
                )
            else:
                handles.append(
                    modules[name].register_forward_hook(lambda _m, _i, out, name=name: keep(name, out))
                )
        out = None
        try:
            out = self.model(x)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        if LOGITS in self.layers:
            captured[LOGITS] = first_tensor(out)  # type: ignore[assignment]
        missing = [n for n in self.layers if n not in captured]
        if missing:
            raise FeatcacheError(f"layers {missing} were not called during the forward pass of this model")
        return {n: captured[n] for n in self.layers}


def timm_notrace() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    """timm's registered no-trace modules and functions (padding helpers, ...), if timm is installed."""
    try:
        import timm.models  # noqa: F401  (importing registers them)
        from timm.layers._fx import get_notrace_functions, get_notrace_modules
    except ImportError:
        return (), ()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


def tracer_kwargs() -> dict[str, Any]:
    """torchvision's defaults (its ops as leaves) plus what timm marks as not traceable.

    Every torch.fx trace in featcache (layer listing, extraction, export) uses these, so graph-node
    names agree between them.
    """
    import torchvision

    ops = [m for _, m in inspect.getmembers(torchvision.ops, inspect.isclass) if issubclass(m, nn.Module)]
    modules, functions = timm_notrace()
    return {
        "autowrap_modules": (math, torchvision.ops),
        "autowrap_functions": functions,
        "leaf_modules": [*ops, *modules],
    }


def _classifier_input(model: nn.Module, classifier: str, training: bool) -> str:
    """The FX node name whose value enters ``classifier`` (what ``penultimate`` means)."""
    from torchvision.models.feature_extraction import NodePathTracer

    was = model.training
    try:
        tracer = NodePathTracer(**tracer_kwargs())
        graph = tracer.trace(model.train(training))
    finally:
        model.train(was)
    for node in graph.nodes:
        if node.op == "call_module" and node.target == classifier and node.args:
            name = tracer.node_to_qualname.get(node.args[0])  # type: ignore[arg-type]
            if name:
                return str(name)
    raise FeatcacheError(f"classifier {classifier!r} is not called on a named graph node")


def truncate(
    backbone: Backbone, layer: str, return_nodes: tuple[str, str] | None = None
) -> tuple[nn.Module, str, str, tuple[str, str] | None, list[str]]:
    """The backbone cut after ``layer``: a GraphModule holding only what the layer needs, else hooks.

    Returns ``(module, output_key, method, return_nodes, notes)``; ``module(x)[output_key]`` is the
    layer's activation.

    Example:
        >>> net, key, method, nodes, _ = truncate(load_backbone("resnet18", weights="none"), "layer3")
        >>> method, "layer4.0.conv1.weight" in net.state_dict()
        ('fx', False)
    """
    from torchvision.models.feature_extraction import create_feature_extractor

    model, cfg = backbone.model, backbone.cfg
    if layer == LOGITS:
        return FeatureExtractor(model, [LOGITS], "hooks", cfg.classifier, cfg.spec), LOGITS, "full", None, []
    if layer != PENULTIMATE and layer not in module_names(model) and return_nodes is None:
        return_nodes = (layer, layer)  # an FX graph-node name such as ``flatten`` or ``add_1``
    hooks = None if return_nodes else FeatureExtractor(model, [layer], "hooks", cfg.classifier, cfg.spec)
    try:
        if return_nodes is None:
            if layer == PENULTIMATE:
                if cfg.classifier is None:  # FeatureExtractor above raised already
                    raise FeatcacheError(f"'penultimate' needs a classifier module and {cfg.spec} has none")
                return_nodes = (
                    _classifier_input(model, cfg.classifier, True),
                    _classifier_input(model, cfg.classifier, False),
                )
            else:
                return_nodes = (layer, layer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = create_feature_extractor(
                model,
                train_return_nodes={return_nodes[0]: "features"},
                eval_return_nodes={return_nodes[1]: "features"},
                tracer_kwargs=tracer_kwargs(),
                suppress_diff_warning=True,
            )
        gm.eval()
        if hooks is not None:  # the graph must give exactly what the cache stored
            probe = torch.rand(2, cfg.channels, *cfg.input_size, generator=torch.Generator().manual_seed(0))
            with torch.inference_mode():
                a, b = gm(probe)["features"], hooks(probe)[layer]
            if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
                raise FeatcacheError(f"the traced graph's {layer!r} differs from the hooked forward pass")
        return gm, "features", "fx", return_nodes, []
    except Exception as exc:
        if hooks is None:
            raise FeatcacheError(
                f"cannot rebuild the truncated graph at {return_nodes} for {cfg.spec}: {exc}"
            ) from exc
        note = (
            f"torch.fx could not truncate {cfg.spec} at {layer!r} ({type(exc).__name__}: {exc}); "
            "the whole model is kept and its forward pass stops at the layer via hooks"
        )
        log.warning(note)
        return hooks, layer, "hooks", None, [note]
