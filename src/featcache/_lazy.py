"""Names a package imports on first use (PEP 562), so importing it costs only what is used: the parser
reads the torch-free configs of ``featcache.train`` without loading the trainer, and
``torchvision:resnet18`` loads no timm. Packages list ``{name: module}`` and hand the lookup to
:func:`attribute`, as ``featcache`` and ``featcache.cache`` do it themselves."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from typing import Any


def attribute(package: str, homes: Mapping[str, str], name: str) -> Any:
    """A package's ``__getattr__``: ``name`` from its module in ``homes``, kept as a plain attribute.

    Example:
        >>> attribute("featcache.train", {"TrainConfig": "config"}, "TrainConfig").__name__
        'TrainConfig'
    """
    if name not in homes:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{homes[name]}", package), name)
    setattr(sys.modules[package], name, value)  # the next lookup is a plain attribute
    return value
