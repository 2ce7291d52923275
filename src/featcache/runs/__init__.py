"""Runs: the jobs behind ``featcache train | finetune | sweep | probe`` and their run folders."""

from .finetune import FinetuneConfig, finetune_run
from .folder import Run, load_run
from .probe import ProbeConfig, probe_run
from .sweep import sweep_run
from .train import train_run

__all__ = [
    "FinetuneConfig",
    "ProbeConfig",
    "Run",
    "finetune_run",
    "load_run",
    "probe_run",
    "sweep_run",
    "train_run",
]
