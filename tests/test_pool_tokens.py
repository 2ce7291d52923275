"""``--pool cls`` and ``--pool avg-tokens`` on ViT token layers, against the models' own code: timm's
``forward_head(..., pre_logits=True)`` (class and register tokens), torchvision's ``VisionTransformer``
(what its ``heads`` receive), through the cache and the key; and the refusals."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torchvision.models import VisionTransformer

from featcache._util import FeatcacheError
from featcache.backbones.preprocessing import Preprocessing
from featcache.backbones.registry import Backbone, BackboneCfg, freeze
from featcache.backbones.tokens import model_tokens
from featcache.cache.store import cache_key
from featcache.data.preprocess import to_model_input
from featcache.data.samples import ArraySamples
from featcache.extraction.build import cache_record, extract
from featcache.extraction.config import ExtractConfig
from featcache.extraction.extractor import Extractor

SIZE = (32, 32)


def _backbone(model: nn.Module, name: str, classifier: str | None = "head") -> Backbone:
    pre = Preprocessing(SIZE, resize_size=0)
    return Backbone(freeze(model), BackboneCfg(f"tokentest:{name}", pre, classifier=classifier))


def _timm_vit(**kw: object) -> Backbone:
    torch.manual_seed(0)
    args = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2, **kw}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, **args)
    return _backbone(model, "vit-" + "-".join(f"{k}{v}" for k, v in kw.items()))


def _pooled(bb: Backbone, layers: list[str], pool: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
    return Extractor(bb, layers, ExtractConfig(pool=pool, device="cpu")).__call__(x)


def _x(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, *SIZE, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_cls_is_timm_token_pooling_pre_logits(reg_tokens: int) -> None:
    """``cls`` on the final norm is what ``global_pool='token'`` pools: token 0, register tokens after it."""
    bb = _timm_vit(reg_tokens=reg_tokens, global_pool="token")
    assert model_tokens(bb.model).prefix == bb.model.num_prefix_tokens == 1 + reg_tokens  # type: ignore[union-attr]
    x = _x()
    with torch.no_grad():
        want = bb.model.forward_head(bb.model.forward_features(x), pre_logits=True)  # type: ignore[operator]
    got = _pooled(bb, ["norm", "penultimate"], "cls", x)
    torch.testing.assert_close(got["norm"], want, rtol=0, atol=0)
    torch.testing.assert_close(got["penultimate"], want)  # penultimate: the head's input, unchanged


@pytest.mark.parametrize("reg_tokens", [0, 4])
@pytest.mark.parametrize("class_token", [True, False])
def test_avg_tokens_is_timm_avg_pooling_without_prefix_tokens(reg_tokens: int, class_token: bool) -> None:
    """``avg-tokens`` on the final norm is ``global_pool='avg'``'s mean (prefix tokens left out); with timm's
    default ``fc_norm`` (the norm after pooling) the model's ``fc_norm`` of it is its pre-logits."""
    x = _x()
    for fc_norm in (False, None):
        bb = _timm_vit(reg_tokens=reg_tokens, class_token=class_token, global_pool="avg", fc_norm=fc_norm)
        model = bb.model
        with torch.no_grad():
            want = model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
            got = _pooled(bb, ["norm"], "avg-tokens", x)["norm"]
            if fc_norm is None:  # timm puts a norm after the mean: ours is the mean it normalises
                got = model.fc_norm(got)  # type: ignore[operator]
            every = _pooled(bb, ["norm"], "avg", x)["norm"]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if reg_tokens or class_token:  # plain avg includes the prefix tokens: another value
            assert not torch.allclose(model.fc_norm(every) if fc_norm is None else every, want, atol=1e-3)  # type: ignore[operator]


def _tv_vit() -> Backbone:
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    )
    return _backbone(model, "tv-vit", "heads.head")


def test_torchvision_vit_cls_is_what_the_heads_receive() -> None:
    bb = _tv_vit()
    model = bb.model
    seen: list[torch.Tensor] = []
    handle = model.heads.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
    x = _x()
    with torch.no_grad():
        model(x)
        handle.remove()
        # the patch tokens of the encoder's output, from the model's own steps
        z = model._process_input(x)  # type: ignore[operator]
        z = torch.cat([model.class_token.expand(len(x), -1, -1), z], 1)  # type: ignore[union-attr]
        patches = model.encoder(z)[:, 1:]
    got = _pooled(bb, ["encoder", "encoder.layers.encoder_layer_1"], "cls", x)
    torch.testing.assert_close(got["encoder"], seen[0], rtol=0, atol=0)
    assert not torch.allclose(got["encoder.layers.encoder_layer_1"], seen[0])  # before the final ln
    avg = _pooled(bb, ["encoder"], "avg-tokens", x)["encoder"]
    torch.testing.assert_close(avg, patches.mean(1))


def test_token_pools_through_the_cache_change_the_key(tmp_path: Path) -> None:
    """Extracted and cached, the rows are the model's own class token / patch-token mean, each pool is
    its own table (key), and reading the cache back serves them without the backbone."""
    bb = _timm_vit(reg_tokens=4, global_pool="token")
    images = (np.random.default_rng(0).random((5, 32, 32, 3)) * 255).astype(np.uint8)
    samples = ArraySamples(images, [0, 1, 2, 0, 1])
    cfg = ExtractConfig(input_size=SIZE, device="cpu", batch_size=4)
    x = torch.stack([to_model_input(samples.load(i), bb.cfg.preprocessing) for i in range(5)])
    with torch.no_grad():
        tokens = bb.model.norm(bb.model.blocks(bb.model._pos_embed(bb.model.patch_embed(x))))  # type: ignore[operator]
    want = {"cls": tokens[:, 0], "avg-tokens": tokens[:, 5:].mean(1), "avg": tokens.mean(1)}
    keys = set()
    for pool, ref in want.items():
        c = replace(cfg, pool=pool)
        keys.add(cache_key(cache_record(bb, ["norm"], c)))
        got = extract(bb, samples, ["norm"], c, cache_dir=str(tmp_path), progress=False)
        np.testing.assert_allclose(np.asarray(got.features["norm"]), ref.numpy(), rtol=1e-4, atol=1e-5)
        again = extract(bb, samples, ["norm"], c, cache_dir=str(tmp_path), progress=False)
        assert again.extracted == 0
    assert len(keys) == 3


def test_token_pools_are_refused_with_the_reason() -> None:
    x = _x(1)
    no_cls = _timm_vit(class_token=False, global_pool="avg")
    with pytest.raises(FeatcacheError, match=r"cls: tokentest:vit-class_tokenF.*no class token.*avg-tokens"):
        _pooled(no_cls, ["norm"], "cls", x)
    assert _pooled(no_cls, ["norm"], "avg-tokens", x)["norm"].shape == (1, 48)
    vit = _timm_vit(reg_tokens=4)
    with pytest.raises(FeatcacheError, match=r"'patch_embed'.*unknown layout: use --pool none"):
        _pooled(vit, ["patch_embed"], "cls", x)
    with pytest.raises(FeatcacheError, match=r"'patch_embed.proj'.* is NCHW: use --pool avg"):
        _pooled(vit, ["patch_embed.proj"], "avg-tokens", x)

    class Tokens(nn.Module):  # tokens from a family featcache knows no prefix tokens of
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Linear(3, 8), nn.Linear(8, 2)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(t.flatten(2).transpose(1, 2)).mean(1))

    unknown = _backbone(Tokens(), "tokens")
    with pytest.raises(FeatcacheError, match=r"tokentest:tokens start with .*--pool avg"):
        _pooled(unknown, ["embed"], "cls", x)
    assert _pooled(unknown, ["penultimate"], "cls", x)["penultimate"].shape == (1, 8)  # vectors as they are
    with pytest.raises(FeatcacheError, match="avg-tokens"):
        ExtractConfig(pool="tokens")


def test_hugging_face_vit_cls_is_its_last_hidden_state_token_0() -> None:
    transformers = pytest.importorskip("transformers")
    from featcache.backbones.hf import _tensor_forward

    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    x = _x(2)
    with torch.no_grad():
        hidden = model(pixel_values=x).last_hidden_state
    bb = _backbone(_tensor_forward(model), "hf-vit", None)
    assert model_tokens(bb.model).prefix == 1  # type: ignore[union-attr]
    torch.testing.assert_close(_pooled(bb, ["layernorm"], "cls", x)["layernorm"], hidden[:, 0])
    avg = _pooled(bb, ["layernorm"], "avg-tokens", x)["layernorm"]
    torch.testing.assert_close(avg, hidden[:, 1:].mean(1))


def test_a_probe_on_avg_tokens_exports_with_the_same_pooling(tmp_path: Path) -> None:
    """The exported model pools as the extraction did (the prefix tokens left out): its logits on the
    run's images are the head's on the cached rows."""
    from featcache.data.config import DataConfig
    from featcache.export.build import build_model
    from featcache.runs.job import Job
    from featcache.runs.probe import ProbeConfig, probe_run
    from featcache.runs.spec import RunSpec
    from featcache.train.fit import predict_logits
    from featcache.train.sources import source_for

    spec = RunSpec(
        "timm:vit_tiny_patch16_224",
        DataConfig("digits", limit=60),
        tmp_path / "run",
        weights="none",
        extract=ExtractConfig(pool="avg-tokens", input_size=SIZE, device="cpu", batch_size=32),
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    res = probe_run(spec, "norm", ProbeConfig(strengths=(1e-2,)))
    model, info = build_model(tmp_path / "run")
    assert info.pool == "avg-tokens" and model.network.prefix == 1
    job = Job.open(spec, "probe", "norm", folder=False)
    backbone, splits = job.backbone, job.splits
    feats, _ = job.extract_all()
    test = feats["test"]
    want = predict_logits(res.head, source_for(test, "norm"))
    pre = backbone.cfg.with_input_size(*SIZE).preprocessing
    images = torch.stack([to_model_input(splits.test.load(i), pre) for i in range(len(splits.test))])
    with torch.no_grad():
        got = model.network(images)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
