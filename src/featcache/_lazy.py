"""The one lazy-import mechanism of the package: PEP 562 at the package tops. Each package lists
``{name: module}`` and takes its ``__getattr__``/``__dir__`` from :func:`lazy_names`, so importing it
costs only what is used: the parser reads the torch-free configs of ``featcache.train`` without loading
the trainer, and ``torchvision:resnet18`` loads no timm. Modules below the package tops import plainly."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
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


def lazy_names(
    package: str, homes: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of a package whose public names are imported on first use.

    Example:
        >>> __getattr__, __dir__ = lazy_names(__name__, {"TrainConfig": "config"})  # doctest: +SKIP
    """

    def getattr_(name: str) -> Any:
        return attribute(package, homes, name)

    def dir_() -> list[str]:
        return sorted({*vars(sys.modules[package]), *homes})

    return getattr_, dir_
