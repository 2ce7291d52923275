"""``FeatureExtractor``: several named layers from one forward pass, by forward hooks or torch.fx,
without copying the model.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from .._util import FeatcacheError, unknown
from ..backbones.hooks import (
    INPUT_PREFIX,
    LOGITS,
    PENULTIMATE,
    SHORTHANDS,
    first_tensor,
    hooked_forward,
    module_names,
)
from ..backbones.layers import tracer_kwargs

log = logging.getLogger(__name__)


def _check_names(
    model: nn.Module, layers: Sequence[str], classifier: str | Sequence[str] | None, spec: str
) -> list[str]:
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


def _resolve(nodes: Sequence[str], name: str) -> str | None:
    """The graph node that holds module ``name``'s output: the node itself (a leaf module or a function),
    else the last node inside the module."""
    if name in nodes:
        return name
    inside = [n for n in nodes if n.startswith(name + ".")]
    return inside[-1] if inside else None


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b| (inf when the shapes differ).

    Example:
        >>> max_rel_diff(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]))
        0.5
    """
    if a.shape != b.shape:
        return float("inf")
    scale = b.float().abs().max().item() if b.numel() else 0.0
    diff = (a.float() - b.float()).abs().max().item() if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


def defining_method(model: nn.Module, layers: Sequence[str], method: str) -> str:
    """The method whose values the arrays are: ``hooks`` when every name is a module or shorthand (the
    FX path is only used where it gives exactly those values), ``fx`` when a name is a graph node
    that only torch.fx can give. Part of the cache record.

    Example:
        >>> net = torchvision.models.resnet18()  # doctest: +SKIP
        >>> defining_method(net, ["layer3"], "fx"), defining_method(net, ["flatten"], "fx")  # doctest: +SKIP
        ('hooks', 'fx')
    """
    modules = set(module_names(model))
    plain = all(n in modules or n in SHORTHANDS or n.startswith(INPUT_PREFIX) for n in layers)
    return "hooks" if plain else "fx"


class FeatureExtractor(nn.Module):
    """Return ``{name: activation}`` for several layers in one forward pass, without copying the model.

    The forward pass stops right after the deepest requested layer: for ``layer3`` of a ResNet,
    ``layer4`` and ``fc`` never run. ``method="hooks"`` uses forward hooks (works on any model);
    ``"fx"`` uses torchvision's ``create_feature_extractor``, each name given its own graph node
    (a module's last node; a module and its child may share one); ``"auto"`` picks hooks when every
    name is a module and FX otherwise. FX falls back to hooks when tracing fails, and it is checked
    layer by layer against the hooks on the first batch (or :meth:`verify`): a layer whose graph
    node differs from its module's hooked output (a module that returns a list, or that runs twice)
    sends every layer through hooks, or, when a graph node only FX can give is among them, raises.
    ``self.method`` tells which path is in use.

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
        classifier: str | Sequence[str] | None = None,
        spec: str = "MODEL",
    ) -> None:
        super().__init__()
        if method not in ("auto", "hooks", "fx"):
            raise unknown("extraction method", method, ["auto", "hooks", "fx"], "")
        self.model = model
        self.layers = list(dict.fromkeys(layers))
        self.classifier = classifier
        self.spec = spec
        self.graph_nodes = _check_names(model, self.layers, classifier, spec)
        self.method = "hooks"
        self.verified = True
        self._fx: nn.Module | None = None
        self._node_of: dict[str, str] = {}
        if method == "fx" or self.graph_nodes:
            self._try_fx()
        log.info("extracting %s with %s", self.layers, self.method)

    def _try_fx(self) -> None:
        special = [n for n in self.layers if n in SHORTHANDS or n.startswith(INPUT_PREFIX)]
        if special:
            if self.graph_nodes:
                raise FeatcacheError(
                    f"graph nodes {self.graph_nodes} go through torch.fx, which does not give {special} "
                    "in the same pass; extract them in two calls"
                )
            log.info("%s go through forward hooks", special)
            return
        try:
            self._fx, self._node_of = self._build_fx()
            self.method, self.verified = "fx", False
        except FeatcacheError:
            raise
        except Exception as exc:
            if self.graph_nodes:
                names = module_names(self.model) + list(SHORTHANDS)
                raise unknown(
                    "layer",
                    self.graph_nodes[0],
                    names,
                    f"Run `featcache layers {self.spec}` to see them all.",
                ) from exc
            log.info("torch.fx could not trace %s (%s); using forward hooks", type(self.model).__name__, exc)

    def _build_fx(self) -> tuple[nn.Module, dict[str, str]]:
        # Tracing switches the model to train mode and leaves it there when it fails: restore the
        # mode (a frozen backbone left in train mode would normalise with batch statistics).
        was_training = self.model.training
        try:
            train_nodes, eval_nodes = get_graph_node_names(
                self.model, tracer_kwargs=tracer_kwargs(), suppress_diff_warning=True
            )
            for name in self.graph_nodes:
                if name not in eval_nodes:
                    choices = module_names(self.model) + list(eval_nodes) + list(SHORTHANDS)
                    raise unknown(
                        "layer", name, choices, f"Run `featcache layers {self.spec}` to see them all."
                    )
            # One node per name, named exactly: torchvision matches a name by prefix and gives each
            # node to one name only, so ``layer4`` with ``layer4.1`` handed the child an earlier node.
            eval_of = {n: _resolve(eval_nodes, n) for n in self.layers}
            train_of = {n: _resolve(train_nodes, n) for n in self.layers}
            missing = [n for n, node in {**eval_of, **train_of}.items() if node is None]
            if missing:
                raise RuntimeError(f"no graph node for {missing}")
            eval_return = {str(v): str(v) for v in eval_of.values()}
            train_return = {str(train_of[n]): str(eval_of[n]) for n in reversed(self.layers)}
            fx = create_feature_extractor(
                self.model.eval(),
                train_return_nodes=train_return,
                eval_return_nodes=eval_return,
                tracer_kwargs=tracer_kwargs(),
                suppress_diff_warning=True,
            )
        finally:
            self.model.train(was_training)
        _copy_returned_nodes(fx)
        return fx, {n: str(v) for n, v in eval_of.items()}

    def verify(self, x: torch.Tensor, tolerance: float = 1e-5) -> list[str]:
        """Check the FX path against forward hooks on ``x``, layer by layer (once); return the layers
        that differed, after falling back to hooks for them all (or raising, see the class).

        Example:
            >>> ext = FeatureExtractor(model, ["layer4", "layer4.1"], "fx")  # doctest: +SKIP
            >>> ext.verify(torch.rand(2, 3, 64, 64))  # doctest: +SKIP
            []
        """
        if self.verified or self._fx is None:
            return []
        self.verified = True
        try:  # torch.fx prints the failing graph's code to stderr: the one-line note below says it
            with contextlib.redirect_stderr(io.StringIO()):
                got = self._fx_forward(x)
        except FeatcacheError:
            raise
        except Exception as exc:  # a traced graph that does not run (timm's Hiera): as a failed check
            why = f"{type(exc).__name__}: {str(exc)[:120]}"
            self._fall_back(f"torch.fx traced {self.spec} into a graph that fails to run ({why})", exc)
            return list(self.layers)
        checkable = [n for n in self.layers if n not in self.graph_nodes]
        want = self._hooked_forward(x, checkable) if checkable else {}
        differ = [n for n in checkable if max_rel_diff(got[n], want[n]) > tolerance]
        if differ and self.graph_nodes:
            raise FeatcacheError(
                f"torch.fx gives {differ} of {self.spec} other values than their modules' forward hooks "
                f"(a module that returns a list, or runs twice); graph nodes {self.graph_nodes} need "
                "torch.fx: extract them in a call of their own, and the others with --method hooks"
            )
        if differ:
            log.warning(
                "torch.fx gives %s of %s other values than their modules' forward hooks (a module that "
                "returns a list, or runs twice); extracting with forward hooks",
                differ,
                self.spec,
            )
            self._fx, self._node_of, self.method = None, {}, "hooks"
        return differ

    def _fall_back(self, why: str, exc: Exception) -> None:
        """Extract every layer with forward hooks from now on, saying why in one line; a graph node only
        torch.fx gives cannot fall back: that raises, naming the layers and the fix."""
        if self.graph_nodes:
            raise FeatcacheError(
                f"{why}; graph nodes {self.graph_nodes} need torch.fx: name modules instead (`featcache "
                f"layers {self.spec}` lists them) to extract with forward hooks"
            ) from exc
        log.warning("%s; extracting %s with forward hooks", why, self.layers)
        self._fx, self._node_of, self.method = None, {}, "hooks"

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._fx is not None and not self.verified:
            self.verify(x)
        if self._fx is not None:
            return self._fx_forward(x)
        return self._hooked_forward(x, self.layers)

    def _fx_forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._fx is None:
            raise FeatcacheError("the FX path is not in use")
        self._fx.train(self.model.training)
        out = self._fx(x)
        got = {n: first_tensor(out[self._node_of[n]]) for n in self.layers}  # as hooks take a module's
        odd = [n for n, t in got.items() if t is None]  # output: a tuple's (MultiheadAttention) first tensor
        if odd:
            raise FeatcacheError(
                f"the graph nodes of {odd} hold no tensor in {self.spec}; extract modules instead "
                f"(`featcache layers {self.spec}` lists them)"
            )
        return got  # type: ignore[return-value]

    def _hooked_forward(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        # The pass stops once the last requested value is in, unless the logits (the end) are wanted.
        stop_early = LOGITS not in layers

        def keep(name: str, t: torch.Tensor) -> bool:
            # Later in-place ops (ReLU(inplace=True)) would overwrite an earlier capture.
            last = len(captured) == len(layers) - 1
            captured[name] = t if (last and stop_early) or name == LOGITS else t.clone()
            return stop_early and len(captured) == len(layers)

        hooked_forward(self.model, x, layers, keep, self.classifier)
        missing = [n for n in layers if n not in captured]
        if missing:
            raise FeatcacheError(f"layers {missing} were not called during the forward pass of this model")
        return {n: captured[n] for n in layers}
