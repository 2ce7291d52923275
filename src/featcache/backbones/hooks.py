"""What a layer name means, as forward hooks read it: a module's output, a module's input, the
classifier's input (``penultimate``) and the model's output (``logits``), each at its first call.

One implementation serves the layer listing, the layout probe and the hooks extractor, so a name
means the same thing in all three.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .._util import FeatcacheError
from .registry import Backbone

PENULTIMATE = "penultimate"
LOGITS = "logits"
SHORTHANDS = (PENULTIMATE, LOGITS)
INPUT_PREFIX = "input:"  # ``input:layer4.1``: the input of a module (where a cached prefix ends)


class _Stop(Exception):
    """Raised by a hook to stop the forward pass once every requested value is in."""


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


def heads(classifier: str | Sequence[str] | None) -> tuple[str, ...]:
    """The classifier module names of a config: none, one, or several (timm's distilled models).

    Example:
        >>> heads("fc"), heads(("head", "head_dist")), heads(None)
        (('fc',), ('head', 'head_dist'), ())
    """
    if classifier is None:
        return ()
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def penultimate_value(t: torch.Tensor) -> torch.Tensor:
    """The classifier's input as vectors: a 1x1 map (a 1x1-conv classifier's input) flattened to (N, C)."""
    return t.flatten(1) if t.dim() == 4 and tuple(t.shape[2:]) == (1, 1) else t


def _pre_logits_forward(model: nn.Module, x: torch.Tensor, emit: Callable[[str, Any], None]) -> Any:
    """timm's two-head models: ``forward_head(forward_features(x))``, emitting the pre-logits features
    (``forward_head(..., pre_logits=True)``, what both heads are built on) on the way."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise FeatcacheError(
            f"'penultimate' of a {type(model).__name__} with several classifier heads needs timm's "
            "forward_features/forward_head; name a layer instead"
        )
    forward_features: Callable[[torch.Tensor], Any] = model.forward_features  # type: ignore[assignment]
    forward_head: Callable[..., Any] = model.forward_head  # type: ignore[assignment]
    features = forward_features(x)
    emit(PENULTIMATE, forward_head(features, pre_logits=True))
    return forward_head(features)


def hooked_forward(
    model: nn.Module,
    x: torch.Tensor,
    names: Sequence[str],
    keep: Callable[[str, torch.Tensor], bool],
    classifier: str | Sequence[str] | None = None,
) -> Any:
    """Run ``model`` on ``x``, calling ``keep(name, tensor)`` with the first value of each name.

    Names are module names (the output's first tensor), ``input:M`` (the input of module ``M``),
    ``penultimate`` (the classifier's input; with several heads timm's pre-logits features) and
    ``logits`` (the model's output). ``keep`` returning True stops the pass there (the later layers
    never run). Returns the model's output, or None when stopped.

    Example:
        >>> shapes = {}
        >>> keep = lambda name, t: shapes.setdefault(name, t.shape) is None  # True: stop there
        >>> _ = hooked_forward(model, x, ["layer3"], keep)  # doctest: +SKIP
    """
    modules = dict(model.named_modules())
    seen: set[str] = set()
    heads_ = heads(classifier)

    def emit(name: str, value: Any) -> None:
        t = first_tensor(value)
        if t is None or name in seen:
            return
        seen.add(name)
        if name == PENULTIMATE:
            t = penultimate_value(t)
        if keep(name, t):
            raise _Stop

    handles = []
    for name in names:
        if name == LOGITS or (name == PENULTIMATE and len(heads_) != 1):
            continue
        if name == PENULTIMATE or name.startswith(INPUT_PREFIX):
            target = heads_[0] if name == PENULTIMATE else name[len(INPUT_PREFIX) :]
            hook = modules[target].register_forward_pre_hook(lambda _m, inp, name=name: emit(name, inp))
        else:
            hook = modules[name].register_forward_hook(lambda _m, _i, out, name=name: emit(name, out))
        handles.append(hook)
    try:
        if PENULTIMATE in names and len(heads_) > 1:
            out = _pre_logits_forward(model, x, emit)
        else:
            out = model(x)
    except _Stop:
        return None
    finally:
        for h in handles:
            h.remove()
    if LOGITS in names:
        t = first_tensor(out)
        if t is not None and LOGITS not in seen:
            seen.add(LOGITS)
            keep(LOGITS, t)
    return out
