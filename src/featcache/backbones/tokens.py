"""The prefix tokens of a ViT-style model: the class, register and distillation tokens its token layers
(``NLD``) carry ahead of the patch tokens.

``--pool cls`` takes token 0 (the class token, what timm's ``global_pool='token'``, DINO's linear eval
and torchvision's ``heads`` read) and ``--pool avg-tokens`` averages the patch tokens only (timm's
``global_pool='avg'``). Both need to know how many tokens come first, which is a fact of the model
family, not of a tensor: timm models say it (``num_prefix_tokens``), torchvision's ``VisionTransformer``
always prepends one class token, and Hugging Face ViT / DeiT / DINOv2 say it in their config.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..layout import TOKEN_POOLS

# Hugging Face ``config.model_type`` -> class + distillation tokens (registers are added from the config)
_HF_PREFIX = {"vit": 1, "deit": 2, "dinov2": 1, "dinov2_with_registers": 1, "beit": 1, "data2vec-vision": 1}


@dataclass(frozen=True)
class Tokens:
    """How a model's token layers start.

    Attributes:
        prefix: tokens ahead of the patch tokens (class + register / distillation tokens).
        has_class_token: whether token 0 is a class token (timm ViTs built with ``class_token=False``
            have registers, or nothing, first).
        patch_module: the module whose output holds the patch tokens alone (before the prefix tokens are
            prepended), to check that a layer holds prefix + patch tokens; None when unknown.
        source: where the count comes from, for messages.

    Example:
        >>> Tokens(prefix=5, has_class_token=True, patch_module="patch_embed", source="timm").prefix
        5
    """

    prefix: int
    has_class_token: bool
    patch_module: str | None
    source: str


def _timm_tokens(model: nn.Module) -> Tokens | None:
    prefix = getattr(model, "num_prefix_tokens", None)
    if not isinstance(prefix, int) or isinstance(prefix, bool):
        return None
    has_cls = bool(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None))
    patch = "patch_embed" if isinstance(getattr(model, "patch_embed", None), nn.Module) else None
    return Tokens(prefix, has_cls and prefix > 0, patch, "timm num_prefix_tokens")


def _torchvision_tokens(model: nn.Module) -> Tokens | None:
    from torchvision.models import VisionTransformer

    if not isinstance(model, VisionTransformer):
        return None
    return Tokens(1, True, "conv_proj", "torchvision VisionTransformer")


def _hf_tokens(model: nn.Module) -> Tokens | None:
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in _HF_PREFIX:
        return None
    prefix = _HF_PREFIX[str(kind)] + int(getattr(config, "num_register_tokens", 0) or 0)
    patch = next((n for n, _ in model.named_modules() if n.endswith("embeddings.patch_embeddings")), None)
    return Tokens(prefix, True, patch, f"Hugging Face {kind} config")


def model_tokens(model: nn.Module) -> Tokens | None:
    """The prefix tokens of ``model``'s token layers, or None when featcache does not know the family.

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, reg_tokens=4)
        >>> model_tokens(vit).prefix
        5
    """
    for read in (_timm_tokens, _torchvision_tokens, _hf_tokens):
        found = read(model)
        if found is not None:
            return found
    return None


def pool_prefix(model: nn.Module, pool: str) -> int:
    """The tokens ``--pool pool`` skips ahead of the patch tokens of ``model``'s token layers (0 for the
    pools that read every position, and for models featcache knows no prefix tokens of).

    Example:
        >>> pool_prefix(torchvision.models.resnet18(), "avg")  # doctest: +SKIP
        0
    """
    tokens = model_tokens(model) if pool in TOKEN_POOLS else None
    return tokens.prefix if tokens is not None else 0
