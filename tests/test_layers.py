"""Named layers: the multi-layer extractor against torchvision's FX extractor and the model's own forward."""

from __future__ import annotations

import contextlib
import copy
from collections import Counter
from typing import Any

import pytest
import timm.models
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from featcache._util import FeatcacheError
from featcache.backbones.layers import count_macs, list_layers
from featcache.backbones.registry import Backbone, load_backbone
from featcache.cli import main
from featcache.extraction.config import parse_layers
from featcache.extraction.nodes import FeatureExtractor

# spec -> (layers to extract together, classifier module)
MODELS = {
    "torchvision:resnet18": ["layer1.0.bn1", "layer2", "layer3.1.conv2", "layer4", "avgpool"],
    "timm:resnet18": ["layer1.0.bn1", "layer2", "layer3", "layer4.1.conv1", "global_pool"],
    "efficientnet-lite0": ["blocks.1", "blocks.3.0.bn1", "blocks.5", "conv_head"],
}


def _load(spec: str) -> Backbone:
    return load_backbone(spec, weights=None if spec == "efficientnet-lite0" else "none")


def _without_inplace(model: nn.Module) -> nn.Module:
    """A deep copy whose in-place activations write new tensors.

    FX extractors return a node's tensor *after* a following ``ReLU(inplace=True)`` has
    overwritten it; on this copy the returned values are the nodes' true outputs.
    """
    model = copy.deepcopy(model)
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    return model


def reference(spec: str, model: nn.Module, layers: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """torchvision's ``create_feature_extractor`` (through timm's wrapper, which adds timm's leaf modules)."""
    clean = _without_inplace(model)
    build = (
        create_feature_extractor if spec.startswith("torchvision") else timm.models.create_feature_extractor
    )
    with torch.inference_mode():
        return dict(build(clean, return_nodes={n: n for n in layers})(x))


def traces(spec: str, model: nn.Module) -> bool:
    """Whether the reference's tracer (torchvision's, with timm's no-trace lists for timm models) traces."""
    names = get_graph_node_names if spec.startswith("torchvision") else timm.models.get_graph_node_names
    try:
        names(copy.deepcopy(model))  # a failed trace leaves the model in train mode
    except Exception:
        return False
    return True


def _x(size: int = 64, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _count_calls(model: nn.Module, prefixes: tuple[str, ...]) -> tuple[Counter[str], list[Any]]:
    """Count forward calls of every *leaf* module under the given names (leaves also run under FX)."""
    calls: Counter[str] = Counter()
    handles = []
    for name, m in model.named_modules():
        if any(name == p or name.startswith(p + ".") for p in prefixes) and not list(m.children()):

            def hook(_m: nn.Module, _i: Any, name: str = name) -> None:
                calls[name] += 1

            handles.append(m.register_forward_pre_hook(hook))
    return calls, handles


# --------------------------------------------------------------------------- contract with the references


@pytest.mark.parametrize("spec", list(MODELS))
@pytest.mark.parametrize("method", ["hooks", "fx"])
def test_features_equal_create_feature_extractor(spec: str, method: str) -> None:
    bb = _load(spec)
    layers = MODELS[spec]
    x = _x()
    ref = reference(spec, bb.model, layers, x)
    ext = FeatureExtractor(bb.model, layers, method=method)
    # fx is used exactly where the reference's tracer traces the model; otherwise hooks
    assert ext.method == ("fx" if method == "fx" and traces(spec, bb.model) else "hooks")
    with torch.inference_mode():
        out = ext(x)
    assert list(out) == layers
    for name in layers:
        assert _max_diff(out[name], ref[name]) <= 1e-5, name


def test_timm_fx_path_is_exercised() -> None:
    # the contract above must cover the FX path for torchvision and timm models, EfficientNet-Lite too
    for spec in MODELS:
        assert traces(spec, _load(spec).model), spec


@pytest.mark.parametrize("spec", list(MODELS))
def test_penultimate_and_logits_equal_the_models_own_forward(spec: str) -> None:
    bb = _load(spec)
    x = _x()
    with torch.inference_mode():
        logits = bb.model(x)
        headless = copy.deepcopy(bb.model)
        setattr(headless, bb.cfg.classifier, nn.Identity())
        pen = headless(x)
        out = FeatureExtractor(
            bb.model, [MODELS[spec][1], "penultimate", "logits"], classifier=bb.cfg.classifier
        )(x)
    assert list(out) == [MODELS[spec][1], "penultimate", "logits"]
    assert _max_diff(out["penultimate"], pen) <= 1e-5
    assert _max_diff(out["logits"], logits) <= 1e-5
    ref = reference(spec, bb.model, [MODELS[spec][1]], x)
    assert _max_diff(out[MODELS[spec][1]], ref[MODELS[spec][1]]) <= 1e-5


def test_outputs_overwritten_in_place_are_captured_before(resnet18: Backbone) -> None:
    """``layer1.0.bn1`` is followed by ``ReLU(inplace=True)``: both paths return the BatchNorm output."""
    m = resnet18.model
    x = _x()
    with torch.inference_mode():
        stem = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        bn1 = m.layer1[0].bn1(m.layer1[0].conv1(stem))
        block = m.layer1[0]
        pre_relu = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(stem))))) + stem
        assert bn1.min() < 0 and pre_relu.min() < 0  # would be 0 after the ReLU
        for method in ("hooks", "fx"):
            out = FeatureExtractor(m, ["layer1.0.bn1", "layer1.0.relu", "layer2"], method=method)(x)
            assert _max_diff(out["layer1.0.bn1"], bn1) <= 1e-5, method
            assert _max_diff(out["layer1.0.relu"], bn1.relu()) <= 1e-5, method
        # a graph node that is not a module goes through FX: the residual sum before the ReLU
        ext = FeatureExtractor(m, ["layer1.0.add", "layer1.1"])
        assert ext.method == "fx"
        out = ext(x)
    assert _max_diff(out["layer1.0.add"], pre_relu) <= 1e-5
    assert _max_diff(out["layer1.1"], reference("torchvision", m, ["layer1.1"], x)["layer1.1"]) <= 1e-5


def test_duplicate_layer_names_are_extracted_once(resnet18: Backbone) -> None:
    with torch.inference_mode():
        out = FeatureExtractor(resnet18.model, ["layer3", "layer2", "layer3"])(_x())
    assert list(out) == ["layer3", "layer2"]


def test_training_mode_is_left_alone(resnet18: Backbone) -> None:
    FeatureExtractor(resnet18.model, ["layer2"], method="fx")
    assert not resnet18.model.training
    net = torchvision.models.resnet18().train()
    FeatureExtractor(net, ["layer2"], method="fx")
    assert net.training


# --------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("method", ["hooks", "fx"])
def test_forward_stops_after_the_deepest_requested_layer(resnet18: Backbone, method: str) -> None:
    m = resnet18.model
    calls, handles = _count_calls(m, ("layer3", "layer4", "avgpool", "fc"))
    try:
        ext = FeatureExtractor(m, ["layer2", "layer3"], method=method)
        assert ext.method == method
        with torch.inference_mode():
            ext(_x())
    finally:
        for h in handles:
            h.remove()
    ran = {n for n, c in calls.items() if c}
    assert any(n.startswith("layer3.") for n in ran)
    assert not {n for n in ran if n.startswith(("layer4", "avgpool", "fc"))}, ran
    # and everything runs when the logits are asked for
    calls, handles = _count_calls(m, ("layer4", "fc"))
    try:
        with torch.inference_mode():
            FeatureExtractor(m, ["layer3", "logits"])(_x())
    finally:
        for h in handles:
            h.remove()
    assert calls["fc"] == 1 and calls["layer4.1.conv2"] == 1


@pytest.mark.parametrize("spec", list(MODELS))
def test_a_failed_trace_leaves_the_backbone_frozen(spec: str) -> None:
    bb = _load(spec)
    state = {k: v.clone() for k, v in bb.model.state_dict().items()}
    x = _x()
    with torch.inference_mode():
        expected = bb.model(x)
        for layers in ([MODELS[spec][0]], ["no_such_layer"]):
            with contextlib.suppress(FeatcacheError):  # the unknown name raises
                FeatureExtractor(bb.model, layers, method="fx")(x)
            assert not any(m.training for m in bb.model.modules()), layers
        assert _max_diff(bb.model(x), expected) == 0
    for k, v in bb.model.state_dict().items():
        assert torch.equal(v, state[k]), k  # BatchNorm running statistics untouched


def test_fx_extraction_of_a_timm_model_runs_nothing_after_the_layer(lite0: Backbone) -> None:
    # EfficientNet-Lite traces only with timm's no-trace lists (its "same" padding helpers)
    calls, handles = _count_calls(lite0.model, ("blocks.2", "blocks.3", "conv_head", "classifier"))
    try:
        with torch.inference_mode():
            ext = FeatureExtractor(lite0.model, ["blocks.2"], method="fx")
            out = ext(_x())
    finally:
        for h in handles:
            h.remove()
    assert ext.method == "fx"
    assert out["blocks.2"].shape[1] == 40
    assert any(n.startswith("blocks.2.") for n, c in calls.items() if c)
    assert not [n for n, c in calls.items() if c and not n.startswith("blocks.2.")]


# --------------------------------------------------------------------------- untraceable models


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:
            y = -y
        y = self.pool(self.act(y)).flatten(1)
        return self.fc(y)


@pytest.mark.parametrize("method", ["auto", "fx", "hooks"])
def test_untraceable_model_falls_back_to_hooks(method: str) -> None:
    torch.manual_seed(0)
    model = Branchy().eval()
    assert not traces("timm:custom", model)
    x = _x(16)
    ext = FeatureExtractor(model, ["conv", "act", "penultimate", "logits"], method=method, classifier="fc")
    assert ext.method == "hooks"
    with torch.inference_mode():
        out = ext(x)
        conv = model.conv(x)
        act = (-conv if conv.sum() > 0 else conv).relu()
        logits = model(x)
    assert _max_diff(out["conv"], conv) <= 1e-6
    assert _max_diff(out["act"], act) <= 1e-6
    assert _max_diff(out["penultimate"], act.mean((2, 3))) <= 1e-6
    assert _max_diff(out["logits"], logits) <= 1e-6


def test_untraceable_model_unknown_name_suggests() -> None:
    with pytest.raises(FeatcacheError, match="'conv'"):
        FeatureExtractor(Branchy(), ["conv1"])


# --------------------------------------------------------------------------- listing layers


def _hooked_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(m: nn.Module, _i: Any, out: Any) -> None:
        name = names[m]
        if name not in shapes and isinstance(out, torch.Tensor):
            shapes[name] = tuple(out.shape)

    names = {m: n for n, m in model.named_modules() if n}
    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return shapes


@pytest.mark.parametrize("spec", ["torchvision:resnet18", "efficientnet-lite0"])
def test_list_layers_match_a_real_forward(spec: str) -> None:
    bb = _load(spec)
    rows = list_layers(bb, (64, 48))
    by_name = {r.name: r for r in rows}
    modules = dict(bb.model.named_modules())
    expected = _hooked_shapes(bb.model, torch.zeros(1, 3, 64, 48))
    assert [r.name for r in rows[:-2]] == [n for n in modules if n]
    for name, shape in expected.items():
        assert by_name[name].shape == shape, name
        assert by_name[name].type == type(modules[name]).__name__
        assert by_name[name].params == sum(p.numel() for p in modules[name].parameters())
        assert by_name[name].trainable == 0  # frozen
    with torch.inference_mode():
        logits = bb.model(torch.zeros(1, 3, 64, 48))
        headless = copy.deepcopy(bb.model)
        setattr(headless, bb.cfg.classifier, nn.Identity())
        pen = headless(torch.zeros(1, 3, 64, 48))
    assert [r.name for r in rows[-2:]] == ["penultimate", "logits"]
    assert by_name["penultimate"].shape == tuple(pen.shape)
    assert by_name["logits"].shape == tuple(logits.shape)


def test_list_layers_defaults_to_the_backbone_input_size(resnet18: Backbone) -> None:
    rows = {r.name: r.shape for r in list_layers(resnet18)}
    assert (
        rows["layer4"] == (1, 512, 7, 7) and rows["penultimate"] == (1, 512) and rows["logits"] == (1, 1000)
    )


def test_count_macs_matches_torchvision_metadata(resnet18: Backbone) -> None:
    published = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["_ops"]  # GMACs at 224
    macs = count_macs(resnet18)
    assert macs is not None
    assert macs / 1e9 == pytest.approx(published, rel=0.01)


# --------------------------------------------------------------------------- errors


def test_unknown_layer_suggests_the_closest_and_the_command(resnet18: Backbone) -> None:
    with pytest.raises(ValueError) as info:
        FeatureExtractor(resnet18.model, ["layer5"], spec="torchvision:resnet18")
    msg = str(info.value)
    assert "'layer5'" in msg and "layer4" in msg and "featcache layers" in msg
    for method in ("hooks", "fx"):
        with pytest.raises(ValueError, match="layer4"):
            FeatureExtractor(resnet18.model, ["layer2", "layer5"], method=method)


def test_other_extractor_errors(resnet18: Backbone) -> None:
    with pytest.raises(ValueError, match="fx"):
        FeatureExtractor(resnet18.model, ["layer2"], method="fxx")
    with pytest.raises(ValueError, match="no layers"):
        FeatureExtractor(resnet18.model, [])
    headless = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="classifier"):
        FeatureExtractor(headless, ["penultimate"])

    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.spare = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    with pytest.raises(FeatcacheError, match="not called"):
        FeatureExtractor(Unused(), ["used", "spare"])(_x(8))


# --------------------------------------------------------------------------- nested names, lists, FX checks


def test_nested_names_each_get_their_own_graph_node(resnet18: Backbone) -> None:
    """``layer4`` with ``layer4.1`` (a module and its last child) and ``layer4.1`` with its last graph
    node: torchvision's prefix matching gave the child an earlier node, or lost an output."""
    m, x = resnet18.model, _x()
    names = ["layer4", "layer4.1", "layer4.1.conv2", "layer4.0"]
    clean, ref = _without_inplace(m), {}
    handles = [
        clean.get_submodule(n).register_forward_hook(lambda _m, _i, o, n=n: ref.setdefault(n, o))
        for n in names
    ]
    with torch.inference_mode():
        clean(x)
        for h in handles:
            h.remove()
        for layers in (names, ["layer4.1", "layer4.1.relu_1"], ["flatten", "layer4", "layer4.1"]):
            ext = FeatureExtractor(m, layers, method="fx")
            out = ext(x)
            assert ext.method == "fx" and list(out) == layers
            for name in layers:
                want = ref["layer4.1"] if name == "layer4.1.relu_1" else ref.get(name)
                if want is not None:
                    assert _max_diff(out[name], want) <= 1e-6, (layers, name)


class Branches(nn.Module):
    """Returns a list: forward hooks give its first tensor, its last graph node is the second."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.a(x), self.b(x) * 2]


class TwoBranchNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.branches, self.fc = Branches(), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.branches(x)
        return self.fc(torch.relu(a + b).mean((2, 3)))


def test_fx_is_checked_against_hooks_and_falls_back(caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model, x = TwoBranchNet().eval(), _x(8)
    ext = FeatureExtractor(model, ["branches", "branches.b"], method="fx")
    assert ext.method == "fx"
    with torch.inference_mode():
        assert ext.verify(x) == ["branches"]
        out = ext(x)
        want = model.branches.a(x)
    assert ext.method == "hooks" and "other values than their modules' forward hooks" in caplog.text
    assert _max_diff(out["branches"], want) <= 1e-6
    # the first batch checks it when nobody called verify; a graph node among them cannot fall back
    with torch.inference_mode():
        lazy = FeatureExtractor(model, ["branches"], method="fx")
        assert _max_diff(lazy(x)["branches"], want) <= 1e-6 and lazy.method == "hooks"
        with pytest.raises(FeatcacheError, match=r"graph nodes \['relu'\] need torch.fx"):
            FeatureExtractor(model, ["branches", "relu"])(x)
    with pytest.raises(FeatcacheError, match="in two calls"):
        FeatureExtractor(model, ["relu", "logits"], classifier="fc")


# --------------------------------------------------------------------------- layouts, batch axis, model kinds


def _layers(spec: str, size: int = 64) -> dict[str, Any]:
    bb = load_backbone(spec, weights="none", input_size=(size, size))
    return {r.name: r for r in list_layers(bb, (size, size))}


def test_layouts_of_channels_last_maps_tokens_and_vectors() -> None:
    swin = _layers("torchvision:swin_t")
    assert (swin["features.5"].shape, swin["features.5"].layout) == ((1, 4, 4, 384), "NHWC")
    assert swin["permute"].layout == "NCHW" and swin["penultimate"].layout == "NC"
    mamba = _layers("timm:mambaout_femto")  # timm declares output_fmt NHWC for its stages
    assert mamba["stages.1"].layout == mamba["stages.1.blocks.0.fc1"].layout == "NHWC"
    assert mamba["stages.1.blocks.0.conv"].layout == "NCHW"  # permuted around its depthwise conv
    vit = _layers("timm:vit_tiny_patch16_224")  # one input size only: type and inheritance decide
    assert vit["blocks.1"].layout == vit["norm"].layout == "NLD"
    assert vit["blocks.1.attn.q_norm"].layout is None  # (N, heads, L, d): not a map


def test_layers_whose_first_axis_is_not_the_batch_are_marked() -> None:
    levit = _layers("timm:levit_128s")
    bn = levit["stages.0.blocks.0.attn.qkv.bn"]  # BatchNorm1d over (batch x tokens, C)
    assert bn.refused and "first axis is not the batch" in bn.refused
    assert levit["stages.0.blocks.0"].refused is None
    mobilevit = _layers("timm:mobilevit_xxs")
    assert sum(r.refused is not None for r in mobilevit.values()) == 195  # patches (N x P, L, D)


def test_two_head_models_have_a_penultimate_and_logits() -> None:
    bb = load_backbone("timm:levit_128s", weights="none", input_size=(64, 64))
    assert bb.cfg.classifier == ("head.linear", "head_dist.linear")
    rows = {r.name: r for r in list_layers(bb, (64, 64))}
    assert rows["penultimate"].shape == (1, 384) and rows["penultimate"].type.startswith("pre-logits")
    x = _x()
    with torch.inference_mode():
        out = FeatureExtractor(bb.model, ["stages.1", "penultimate", "logits"], classifier=bb.cfg.classifier)(
            x
        )
        pre = bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)
        logits = bb.model(x)
    assert _max_diff(out["penultimate"], pre) == 0 and _max_diff(out["logits"], logits) == 0


def test_a_one_by_one_conv_classifier_gives_vectors() -> None:
    bb = load_backbone("timm:dla34", weights="none")
    x = _x()
    with torch.inference_mode():
        out = FeatureExtractor(bb.model, ["penultimate"], classifier=bb.cfg.classifier)(x)
        pre = bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)
    assert out["penultimate"].shape == (2, 512) and _max_diff(out["penultimate"], pre.flatten(1)) == 0


def test_a_fixed_size_timm_model_is_built_for_the_input_size() -> None:
    bb = load_backbone("timm:vit_tiny_patch16_224", weights="none")
    with pytest.raises(
        FeatcacheError, match=r"cannot run on a 64x64 input \(AssertionError.*input_size=\(64, 64\)"
    ):
        list_layers(bb, (64, 64))
    small = load_backbone("timm:vit_tiny_patch16_224", weights="none", input_size=(64, 64))
    assert small.cfg.input_size == (64, 64) and small.cfg.weights_id != bb.cfg.weights_id
    assert {r.name: r.shape for r in list_layers(small, (64, 64))}["blocks.0"] == (1, 17, 192)
    same = load_backbone("timm:vit_tiny_patch16_224", weights="none", input_size=(224, 224))
    assert same.cfg.weights_id == bb.cfg.weights_id  # its own size: built as without input_size


def test_the_probe_runs_without_the_models_own_hooks(resnet18: Backbone) -> None:
    calls: list[int] = []
    handle = resnet18.model.conv1.register_forward_hook(lambda _m, _i, o: calls.append(len(o)))
    rows = list_layers(resnet18, (64, 64))
    assert calls == [] and next(r.layout for r in rows if r.name == "conv1") == "NCHW"
    with torch.inference_mode():
        resnet18.model(_x())
    handle.remove()
    assert calls == [2]  # and they are back afterwards


def test_summarize_totals_cover_the_whole_model_not_only_the_rows_shown(resnet18: Backbone) -> None:
    from featcache.backbones.layers import summarize

    s = summarize(resnet18, (32, 32), depth=1)
    assert s.params == sum(p.numel() for p in resnet18.model.parameters())
    assert s.trainable == 0  # featcache loads backbones frozen
    assert {r.name for r in s.rows} == {n for n, _ in resnet18.model.named_children()}
    assert s.macs and s.macs > 0 and s.input_size == (32, 32)
    with pytest.raises(ValueError, match="depth must be 1 or more"):
        summarize(resnet18, (32, 32), depth=0)


def test_layer_sets_expand_per_backbone_and_never_shadow_a_module(
    lite0: Backbone, tmp_path: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    resnet = load_backbone("torchvision:resnet18", weights="none")
    residual = [n for n, _ in resnet.model.named_modules() if n.count(".") == 1 and n.startswith("layer")]
    assert parse_layers("layer1, @blocks", resnet) == ("layer1", *residual, "penultimate")
    stages = [f"blocks.{i}" for i in range(len(lite0.model.blocks))]
    assert parse_layers("@blocks", lite0) == (*stages, "penultimate")
    assert parse_layers("blocks", lite0) == ("blocks",)  # the module named blocks, in every verb
    assert parse_layers("@blocks") == ("@blocks",)  # expanded only once a backbone is known
    with pytest.raises(FeatcacheError, match=r"unknown layer set '@block'.*'@blocks'"):
        parse_layers("@block", resnet)
    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path))
    argv = ["torchvision:resnet18", "digits", "--weights", "none", "--limit", "40", "--input-size", "32"]
    argv += ["32"]
    assert main(["extract", *argv, "--layers", "@blocks", "-q"]) == 0
    *lines, table = capsys.readouterr().out.splitlines()  # a line per split, then the table's path
    assert lines and all("layer1.0 [64]" in line and "penultimate [512]" in line for line in lines)
    assert table.startswith("cache table: ")
    assert main(["train", *argv, "--layer", "@blocks", "--out", str(tmp_path / "r"), "-q"]) == 2
    assert "train trains on one layer, but '@blocks' names 9" in capsys.readouterr().err
