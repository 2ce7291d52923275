"""Runs: the jobs behind ``featcache train | finetune | sweep | probe`` and their run folders.

The names below are imported on first use (PEP 562): the jobs' configs come without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

# name -> the module of this package that defines it
_HOMES = {
    "FinetuneConfig": "config",
    "Job": "job",
    "KnnConfig": "config",
    "ProbeConfig": "config",
    "Run": "folder",
    "RunFolder": "folder",
    "RunRecord": "folder",
    "RunSpec": "spec",
    "SweepGrid": "config",
    "SweepResult": "sweep",
    "finetune_run": "finetune",
    "folds_run": "folds",
    "knn_eval": "knn",
    "knn_run": "knn",
    "load_run": "folder",
    "probe_run": "probe",
    "sweep_run": "sweep",
    "train_run": "train",
}

__all__ = sorted(_HOMES)

if TYPE_CHECKING:  # what type checkers see; at run time, __getattr__ imports on demand
    from .config import FinetuneConfig, KnnConfig, ProbeConfig, SweepGrid  # noqa: F401
    from .finetune import finetune_run  # noqa: F401
    from .folder import Run, RunFolder, RunRecord, load_run  # noqa: F401
    from .folds import folds_run  # noqa: F401
    from .job import Job  # noqa: F401
    from .knn import knn_eval, knn_run  # noqa: F401
    from .probe import probe_run  # noqa: F401
    from .spec import RunSpec  # noqa: F401
    from .sweep import SweepResult, sweep_run  # noqa: F401
    from .train import train_run  # noqa: F401

__getattr__, __dir__ = lazy_names(__name__, _HOMES)
