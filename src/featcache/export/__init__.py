"""Export: the backbone (cut at the trained layer) and the head as one model for raw images, and predict.

The names below are imported on first use (PEP 562).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

# name -> the module that defines it (relative to this package)
_HOMES = {
    "ExportInfo": "build",
    "ExportedModel": "model",
    "Predictor": "predict",
    "Preprocessing": ".backbones.preprocessing",  # featcache.backbones.preprocessing
    "build_model": "build",
    "export_run": "save",
    "load_hint": "save",
    "load_predictor": "predict",
}

__all__ = sorted(_HOMES)

if TYPE_CHECKING:  # what type checkers see; at run time, __getattr__ imports on demand
    from ..backbones.preprocessing import Preprocessing  # noqa: F401
    from .build import ExportInfo, build_model  # noqa: F401
    from .model import ExportedModel  # noqa: F401
    from .predict import Predictor, load_predictor  # noqa: F401
    from .save import export_run, load_hint  # noqa: F401

__getattr__, __dir__ = lazy_names(__name__, _HOMES)
