"""``FeatureExtractor``: several named layers from one forward pass, by forward hooks or torch.fx,
without copying the model.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from .._util import FeatcacheError, unknown
from ..backbones.layers import (
    INPUT_PREFIX,
    LOGITS,
    PENULTIMATE,
    SHORTHANDS,
    first_tensor,
    module_names,
    tracer_kwargs,
)

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by the last hook to stop the forward pass after the deepest requested layer."""


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
