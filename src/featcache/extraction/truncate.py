"""The backbone cut after one layer (a GraphModule holding only what the layer needs), for exported models."""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor

from .._util import FeatcacheError
from ..backbones.hooks import LOGITS, PENULTIMATE, heads, module_names
from ..backbones.layers import tracer_kwargs
from ..backbones.registry import Backbone
from .nodes import FeatureExtractor

log = logging.getLogger(__name__)


def _classifier_input(model: nn.Module, classifier: str, training: bool) -> str:
    """The FX node name whose value enters ``classifier`` (what ``penultimate`` means)."""

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

    model, cfg = backbone.model, backbone.cfg
    if layer == LOGITS:
        return FeatureExtractor(model, [LOGITS], "hooks", cfg.classifier, cfg.spec), LOGITS, "full", None, []
    if layer == PENULTIMATE and len(heads(cfg.classifier)) > 1:  # timm's pre-logits: no single graph node
        hooked = FeatureExtractor(model, [layer], "hooks", cfg.classifier, cfg.spec)
        return (
            hooked,
            layer,
            "hooks",
            None,
            [f"{cfg.spec} has several classifier heads: hooks give 'penultimate'"],
        )
    if layer != PENULTIMATE and layer not in module_names(model) and return_nodes is None:
        return_nodes = (layer, layer)  # an FX graph-node name such as ``flatten`` or ``add_1``
    hooks = None if return_nodes else FeatureExtractor(model, [layer], "hooks", cfg.classifier, cfg.spec)
    try:
        if return_nodes is None:
            if layer == PENULTIMATE:
                if not isinstance(cfg.classifier, str):  # FeatureExtractor above raised already
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
