"""The zoo: every layer ``featcache layers`` lists, on architectures across torchvision and timm, either
extracts equal to plain forward hooks on the same model (pooled and unpooled, channel statistics,
hooks and FX) or is refused with a FeatcacheError that says why.

Random init, small inputs, three images in batches that straddle shard boundaries. The references are
written here, independently of featcache: forward hooks on every module, the classifier replaced by
``nn.Identity`` (torchvision) or timm's ``forward_head(pre_logits=True)`` for ``penultimate``,
``model(x)`` for ``logits``, and the axes that grow with the input for each layout.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.feature_extraction import get_graph_node_names

from conftest import random_image
from featcache._util import FeatcacheError
from featcache.backbones.layers import list_layers, tracer_kwargs
from featcache.backbones.registry import Backbone, load_backbone
from featcache.data.preprocess import to_model_input
from featcache.data.samples import ArraySamples
from featcache.extraction import ExtractConfig, extract

pytestmark = pytest.mark.slow

# spec -> input size. Convolutional, ViT, Swin/hierarchical, MobileViT-style hybrids, distilled two-head,
# multi-branch (hrnet), NHWC-inside (edgenext, mambaout), 1x1-conv classifiers (dla, dpn).
ZOO: dict[str, int] = {
    "torchvision:resnet18": 64,
    "torchvision:mobilenet_v3_small": 64,
    "torchvision:efficientnet_b0": 64,
    "torchvision:swin_t": 64,
    "torchvision:swin_v2_t": 64,
    "torchvision:convnext_tiny": 64,
    "torchvision:regnet_y_400mf": 64,
    "torchvision:densenet121": 64,
    "torchvision:shufflenet_v2_x0_5": 64,
    "torchvision:squeezenet1_0": 64,
    "torchvision:googlenet": 64,
    "timm:vit_tiny_patch16_224": 64,
    "timm:deit_tiny_distilled_patch16_224": 64,
    "timm:levit_128s": 64,
    "timm:efficientformer_l1": 224,
    "timm:crossvit_tiny_240": 120,
    "timm:mobilevit_xxs": 64,
    "timm:hrnet_w18_small": 64,
    "timm:dla34": 64,
    "timm:dpn68": 64,
    "timm:mambaout_femto": 64,
    "timm:edgenext_xx_small": 64,
    "timm:convnext_atto": 64,
    "timm:swin_tiny_patch4_window7_224": 64,
    "timm:pvt_v2_b0": 64,
    "timm:efficientvit_b0": 64,
    "timm:regnetx_002": 64,
    "timm:mixer_s16_224": 64,
    "timm:coatnet_nano_rw_224": 64,
}

# Layouts known from the architectures' code, checked against what featcache records.
KNOWN = {
    "torchvision:resnet18": {"layer4": "NCHW", "penultimate": "NC"},
    "torchvision:swin_t": {"features.5": "NHWC", "features.6": "NHWC", "norm": "NHWC", "permute": "NCHW"},
    "timm:swin_tiny_patch4_window7_224": {"layers.1": "NHWC", "norm": "NHWC"},
    "timm:mambaout_femto": {"stages.1": "NHWC", "stem": "NHWC"},
    "timm:edgenext_xx_small": {"stages.1": "NCHW", "stages.0.blocks.0.norm": "NHWC"},
    "timm:vit_tiny_patch16_224": {"blocks.1": "NLD", "norm": "NLD", "patch_embed.proj": "NCHW"},
    "timm:levit_128s": {"stem": "NCHW", "stages.1": "NLD", "penultimate": "NC"},
    "timm:deit_tiny_distilled_patch16_224": {"penultimate": "NC", "blocks.11": "NLD"},
    "timm:dla34": {"penultimate": "NC"},
}

IMAGES, BATCH, SHARD = 3, 3, 2  # one batch across two shards


def _positions(layout: str) -> tuple[int, ...]:
    """Axes of a batch that are positions: the letters other than N and the channel letter."""
    channel = "D" if layout == "NLD" else "C"
    return tuple(i for i, letter in enumerate(layout) if letter not in ("N", channel))


def _classifier_removed(bb: Backbone) -> nn.Module:
    model = copy.deepcopy(bb.model)
    parent, _, last = str(bb.cfg.classifier).rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, last, nn.Identity())
    return model


def _first(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((t for t in map(_first, value) if t is not None), None)
    return None


def _reference(bb: Backbone, x: torch.Tensor, names: list[str]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Plain forward hooks on every listed module (first call, first tensor), penultimate and logits;
    and the modules that return several tensors or run more than once (no single graph node is theirs)."""
    out: dict[str, torch.Tensor] = {}
    several: set[str] = set()
    modules = dict(bb.model.named_modules())
    handles = []
    for name in names:
        if name in modules:

            def hook(_m: nn.Module, _i: Any, o: Any, name: str = name) -> None:
                t = _first(o)
                if not isinstance(o, torch.Tensor) or name in out:
                    several.add(name)
                if t is not None and name not in out:
                    out[name] = t.detach().clone()

            handles.append(modules[name].register_forward_hook(hook))
    with torch.inference_mode():
        try:
            out["logits"] = _first(bb.model(x)).clone()  # type: ignore[union-attr]
        finally:
            for h in handles:
                h.remove()
        if "penultimate" in names:
            if bb.cfg.spec.startswith("timm:"):
                pre = bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)
            else:
                pre = _classifier_removed(bb)(x)
            out["penultimate"] = pre.flatten(1)
    return out, several


def _fx_names(bb: Backbone, names: list[str], several: set[str]) -> list[str] | None:
    """The modules torch.fx gives as a graph node in train and eval mode (None: the model does not trace).

    A module inside a leaf of the tracer (timm's BatchNormAct2d, torchvision's Conv2dNormActivation)
    has no node; nor does a module that returns several tensors or runs twice have one of its own.
    """
    try:
        graphs = get_graph_node_names(
            copy.deepcopy(bb.model), tracer_kwargs=tracer_kwargs(), suppress_diff_warning=True
        )
    except Exception:
        return None

    def has(nodes: list[str], n: str) -> bool:
        return n in nodes or any(m.startswith(n + ".") for m in nodes)

    return [n for n in names if n not in several and all(has(nodes, n) for nodes in graphs)]


def _grown_axes(bb: Backbone, names: list[str], size: int) -> dict[str, set[int]] | None:
    """For each module, the axes (batch excluded) whose size changes when the input doubles."""
    shapes: dict[int, dict[str, tuple[int, ...]]] = {1: {}, 2: {}}
    for k in (1, 2):
        handles = []
        for name, m in bb.model.named_modules():
            if name in names:

                def hook(_m: nn.Module, _i: Any, o: Any, name: str = name, k: int = k) -> None:
                    t = _first(o)
                    if t is not None:
                        shapes[k].setdefault(name, tuple(t.shape))

                handles.append(m.register_forward_hook(hook))
        try:
            with torch.inference_mode():
                bb.model(torch.zeros(1, 3, k * size, k * size))
        except Exception:
            return None  # a model built for one input size
        finally:
            for h in handles:
                h.remove()
    return {
        n: {i for i in range(1, len(s)) if s[i] != shapes[2][n][i]}
        for n, s in shapes[1].items()
        if n in shapes[2] and len(shapes[2][n]) == len(s)
    }


def _rel(a: np.ndarray, b: torch.Tensor) -> float:
    got, want = torch.from_numpy(np.array(a, dtype=np.float32)), b.float()
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / (scale if scale > 0 else 1.0)


def _extract(bb: Backbone, samples: ArraySamples, layers: list[str], root: Path, **kw: Any) -> Any:
    config = ExtractConfig(input_size=kw.pop("size"), batch_size=BATCH, shard_rows=SHARD, device="cpu", **kw)
    return extract(bb, samples, layers, config, cache_dir=str(root), progress=False)


@pytest.fixture
def zoo_cache(tmp_path: Path) -> Iterator[Path]:
    """A cache root in memory where there is one: hundreds of layers a model make the cache's fsyncs
    (crash safety, tested elsewhere) most of this test's time on a disk."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    root = Path(tempfile.mkdtemp(prefix="featcache-zoo-", dir=shm))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("spec", list(ZOO))
def test_every_listed_layer_extracts_equal_to_hooks_or_is_refused(spec: str, zoo_cache: Path) -> None:
    t0, tmp_path = time.perf_counter(), zoo_cache
    size = ZOO[spec]
    bb = load_backbone(spec, weights="none", input_size=(size, size))
    rng = np.random.default_rng(0)
    images = np.stack([np.asarray(random_image(rng, (size + 8, size))) for _ in range(IMAGES)])
    samples = ArraySamples(images, np.arange(IMAGES) % 2, ["a", "b"], name=f"zoo-{size}")
    cfg = bb.cfg.with_input_size(size, size)
    x = torch.stack([to_model_input(samples.load(i), cfg) for i in range(IMAGES)])

    rows = list_layers(bb, (size, size))
    listed = [r for r in rows if r.shape is not None]
    ok = [r.name for r in listed if r.refused is None]
    refused = [r.name for r in listed if r.refused is not None]
    ref, several = _reference(bb, x, ok)
    assert set(ok) <= set(ref), set(ok) - set(ref)
    fx_names = _fx_names(bb, [n for n in ok if n not in ("penultimate", "logits")], several)

    layouts: dict[str, str | None] = {}
    for method in ("hooks", "fx"):
        names = ok if method == "hooks" else fx_names or [n for n in ok if n not in ("penultimate", "logits")]
        feats = _extract(bb, samples, names, tmp_path / method, size=(size, size), pool="none", method=method)
        layouts = {**feats.manifest["layer_layouts"], **layouts}
        # FX where the model traces (each name its own node, checked against hooks), else hooks
        assert feats.manifest["method"] == ("fx" if method == "fx" and fx_names is not None else "hooks")
        for name in names:
            assert _rel(feats.features[name], ref[name]) <= 1e-5, (method, name)
            layout = feats.layouts[name]
            stats = feats.channel_stats.get(name)
            assert (stats is not None) == (layout not in (None, "NC")), (name, layout)
            if stats is not None:
                var, mean = torch.var_mean(ref[name].float(), dim=_positions(str(layout)), correction=0)
                assert _rel(stats.mean, mean) <= 1e-5 and _rel(stats.var, var) <= 1e-4, (method, name)
        # Pooling: every layer with a known layout, against the reference's mean over its positions.
        poolable = [n for n in names if layouts[n] is not None]
        pooled = _extract(bb, samples, poolable, tmp_path / f"{method}-avg", size=(size, size), method=method)
        for name in poolable:
            layout = str(layouts[name])
            want = ref[name].flatten(1) if layout == "NC" else ref[name].float().mean(_positions(layout))
            assert _rel(pooled.features[name], want) <= 1e-5, (method, name, layout)
        assert pooled.manifest["record"]["method"] == "hooks"

    # Unknown layouts are stored as is but not pooled; refused layers are refused; both say why.
    for name in [n for n in ok if layouts[n] is None][:8]:
        with pytest.raises(FeatcacheError, match="its layout is"):
            _extract(bb, samples, [name], tmp_path / "unknown", size=(size, size))
    for name in refused[:: max(1, len(refused) // 8)]:
        with pytest.raises(FeatcacheError, match="cannot be extracted: its first axis is not the batch"):
            _extract(bb, samples, [name], tmp_path / "refused", size=(size, size), pool="none")

    # The recorded layouts: those known from the code, and the axes that grow with the input.
    for name, layout in KNOWN.get(spec, {}).items():
        assert layouts[name] == layout, (name, layouts[name])
    grown = _grown_axes(bb, ok, size)
    for name, axes in (grown or {}).items():
        if axes and layouts.get(name) not in (None, "NC"):
            assert axes <= set(_positions(str(layouts[name]))), (name, layouts[name], axes)
    print(
        f"{spec}: {len(listed)} listed, {len(ok)} extracted, {sum(v is not None for v in layouts.values())} "
        f"pooled, {len(refused)} refused, fx on {len(fx_names or [])}, {time.perf_counter() - t0:.1f}s"
    )


class _WithMHA(nn.Module):
    """A token model whose attention is an ``nn.MultiheadAttention`` (a leaf of torch.fx returning a
    tuple: its output and its attention weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 8, 8)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t)[0]
        return self.head(t.mean(1))


@pytest.mark.parametrize(
    ("spec", "layer", "method"),
    [
        ("torchvision:vit_b_16", "encoder.layers.encoder_layer_0.self_attention", "fx"),
        ("mha", "attn", "fx"),
        ("timm:hiera_tiny_224", "blocks.1", "hooks"),  # its traced graph fails to run: hooks, said once
    ],
)
def test_fx_on_a_tuple_returning_module_or_a_graph_that_fails_gives_the_hooks_arrays(
    spec: str, layer: str, method: str, zoo_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``method="fx"`` takes a tuple's first tensor, as hooks do (ViT's ``self_attention`` and any
    ``nn.MultiheadAttention``), and a traced graph that raises when run (timm's Hiera) falls back to
    forward hooks with a one-line note: never a raw exception, always the plain hooks' arrays."""
    from featcache.extraction.nodes import FeatureExtractor

    if spec == "mha":
        torch.manual_seed(0)
        bb = None
        model: nn.Module = _WithMHA().eval()
        x = torch.rand(3, 3, 32, 32)
    else:
        if spec.startswith("timm:hiera") and "hiera_tiny_224" not in __import__("timm").list_models("hiera*"):
            pytest.skip("this timm has no hiera_tiny_224")
        bb = load_backbone(spec, weights="none")
        model = bb.model
        rng = np.random.default_rng(0)
        images = np.stack([np.asarray(random_image(rng, (224, 224))) for _ in range(IMAGES)])
        samples = ArraySamples(images, np.arange(IMAGES) % 2, ["a", "b"], name="fx-224")
        cfg = bb.cfg.with_input_size(224, 224)
        x = torch.stack([to_model_input(samples.load(i), cfg) for i in range(IMAGES)])
    want: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _i: Any, o: Any) -> None:  # plain forward hooks: a module's first tensor
        want.setdefault(layer, _first(o).detach().clone())  # type: ignore[union-attr]

    handle = model.get_submodule(layer).register_forward_hook(hook)
    with torch.inference_mode():
        model(x)
    handle.remove()

    caplog.set_level("WARNING", logger="featcache")
    ext = FeatureExtractor(model, [layer], "fx", spec=spec)
    with torch.inference_mode():
        got = ext(x)[layer]
    assert ext.method == method and _rel(got.numpy(), want[layer]) <= 1e-5
    notes = [r.getMessage() for r in caplog.records if "forward hooks" in r.getMessage()]
    assert len(notes) == (method == "hooks"), notes
    if method == "hooks":
        assert "into a graph that fails to run (AttributeError" in notes[0] and "\n" not in notes[0]
    if bb is not None:  # the library's path: extraction with method="fx" into a cache
        feats = _extract(bb, samples, [layer], zoo_cache, size=(224, 224), pool="none", method="fx")
        assert feats.manifest["method"] == method and _rel(feats.features[layer], want[layer]) <= 1e-5
