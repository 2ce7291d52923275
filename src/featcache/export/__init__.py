"""Export: the backbone (cut at the trained layer) and the head as one model for raw images, and predict."""

from ..backbones.preprocessing import Preprocessing
from .build import ExportInfo, build_model
from .model import ExportedModel
from .predict import Predictor, load_predictor
from .save import export_run, load_hint

__all__ = [
    "ExportInfo",
    "ExportedModel",
    "Predictor",
    "Preprocessing",
    "build_model",
    "export_run",
    "load_hint",
    "load_predictor",
]
