"""``RunSpec``: the settings every job shares (model, data, extraction, training, output), given once.

Settings only: a run opens its parts (folder, backbone, splits, cache, layers) once from the spec as a
:class:`~featcache.runs.job.Job`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import FeatcacheError
from ..data.config import DataConfig
from ..extraction.config import ExtractConfig, Views
from ..train.config import TrainConfig
from .logger import check_logger

# No torch at import: the command line builds and checks a RunSpec before loading any model.
if TYPE_CHECKING:
    from ..backbones.registry import Backbone
    from .record import RunRecord


@dataclass(frozen=True)
class RunSpec:
    """One job's shared settings; each verb adds its own part (a layer and head, a fine-tuning plan, a
    sweep grid, a probe config).

    Attributes:
        model: a backbone spec (``torchvision:resnet18``, ``timm:NAME``, ``efficientnet-lite0``, ...) or
            a loaded :class:`~featcache.backbones.Backbone`.
        data: the dataset and how it is split.
        out: the run folder (optional for ``probe``).
        weights: left out (None): the source's pretrained weights; ``"none"``: random init; a tag
            (torchvision's ``IMAGENET1K_V1``) or a path.
        extract: how the frozen backbone's activations are extracted and cached.
        train: the trainer's settings.
        views: cached augmented views of the training split (None: no augmentation).
        cache_dir: cache root (else ``$FEATCACHE_HOME`` or the XDG cache folder).
        progress: show progress bars.
        resume: continue the interrupted run in ``out``.
        overwrite: replace the run in ``out``.
        logger: none, or tensorboard: each epoch's row of history.csv also as TensorBoard scalars, live,
            in the run folder's tensorboard/ (needs featcache[tensorboard]).

    Example:
        >>> spec = RunSpec("efficientnet-lite0", DataConfig("mnist-5k"), out="runs/mnist",
        ...                extract=ExtractConfig(input_size=(64, 64)), train=TrainConfig(epochs=10))
        >>> run = train_run(spec, "penultimate")  # doctest: +SKIP
    """

    model: str | Backbone
    data: DataConfig
    out: str | Path | None = None
    weights: str | None = field(default=None, metadata={"shown": "pretrained"})
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    views: Views | None = None
    cache_dir: str | None = None
    progress: bool = True
    resume: bool = False
    overwrite: bool = False
    logger: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.data, str):  # a bare dataset spec is the common case from Python
            object.__setattr__(self, "data", DataConfig(self.data))
        check_logger(self.logger)  # an unknown one, or tensorboard not installed: before any work

    @classmethod
    def from_run(cls, out: str | Path, **given: Any) -> tuple[RunSpec, RunRecord]:
        """The spec of the run in ``out``, read from its ``config.json``, to resume it with nothing
        retyped; ``given`` fields win (the job still checks them against the run when it resumes).

        Returns the spec (with ``resume``) and the run's record (its layer, head, fine-tuning plan).

        Example:
            >>> spec, record = RunSpec.from_run("runs/mnist")  # doctest: +SKIP
            >>> run = train_run(spec, record.layer, record.head)  # doctest: +SKIP
        """
        from .folder import RunFolder

        record = RunFolder(out).read_config()
        ex = record.extract
        spec = cls(
            record.model,
            record.data,
            out,
            record.weights_arg,
            ex.config,
            record.train or TrainConfig(),
            Views(ex.views, ex.augment or "") if ex.views else None,
            cache_dir=record.cache_dir,
            resume=True,
            logger=record.logger,  # a resumed run goes on logging as it did
        )
        return replace(spec, **given), record

    def no_resume(self, verb: str) -> None:
        """Verbs that restart from scratch refuse ``resume`` instead of ignoring it."""
        if self.resume:
            raise FeatcacheError(f"{verb} does not resume; run it again (with --overwrite) instead")
