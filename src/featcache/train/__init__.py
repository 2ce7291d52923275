"""Training on cached features: heads, the fast trainer, and freezing plans for fine-tuning."""

from .config import TrainConfig
from .fit import FitResult, TrainingDiverged, TrainingInterrupted, evaluate, fit
from .heads import Head, HeadInfo, HeadSpec, build_head

__all__ = [
    "FitResult",
    "Head",
    "HeadInfo",
    "HeadSpec",
    "TrainConfig",
    "TrainingDiverged",
    "TrainingInterrupted",
    "build_head",
    "evaluate",
    "fit",
]
