"""Training on cached features: heads, the fast trainer, and freezing plans for fine-tuning.

The names below are imported on first use (PEP 562): the configs come without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

# name -> the module of this package that defines it
_HOMES = {
    "FitResult": "fit",
    "Head": "heads",
    "HeadInfo": "heads",
    "HeadSpec": "config",
    "TrainConfig": "config",
    "TrainingDiverged": "fit",
    "TrainingInterrupted": "fit",
    "build_head": "heads",
    "evaluate": "fit",
    "fit": "fit",
}

__all__ = sorted(_HOMES)

if TYPE_CHECKING:  # what type checkers see; at run time, __getattr__ imports on demand
    from .config import HeadSpec, TrainConfig  # noqa: F401
    from .fit import FitResult, TrainingDiverged, TrainingInterrupted, evaluate, fit  # noqa: F401
    from .heads import Head, HeadInfo, build_head  # noqa: F401

__getattr__, __dir__ = lazy_names(__name__, _HOMES)
