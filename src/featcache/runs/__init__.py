"""Runs: the jobs behind ``featcache train | finetune | sweep | probe`` and their run folders."""

from .finetune import FinetuneConfig, finetune_run
from .folder import Run, RunFolder, RunRecord, load_run
from .knn import KnnConfig, knn_eval, knn_run
from .probe import ProbeConfig, probe_run
from .spec import RunSpec
from .sweep import SweepGrid, SweepResult, sweep_run
from .train import train_run

__all__ = [
    "FinetuneConfig",
    "KnnConfig",
    "ProbeConfig",
    "Run",
    "RunFolder",
    "RunRecord",
    "RunSpec",
    "SweepGrid",
    "SweepResult",
    "finetune_run",
    "knn_eval",
    "knn_run",
    "load_run",
    "probe_run",
    "sweep_run",
    "train_run",
]
