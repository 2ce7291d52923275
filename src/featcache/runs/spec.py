"""``RunSpec``: the settings every job shares (model, data, extraction, training, output), given once."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._config import from_json, to_json
from .._errors import FeatcacheError
from ..cache.housekeeping import cache_root, dataset_name, swap_split_log
from ..data.config import DataConfig
from ..extraction.config import ExtractConfig, Views, parse_layers
from ..train.config import TrainConfig
from .logger import check_logger

# No torch at import: the command line builds and checks a RunSpec before loading any model; the
# methods that run jobs import what they use.
if TYPE_CHECKING:
    from ..backbones.registry import Backbone
    from ..cache.store import CachedFeatures
    from ..data.datasets import DatasetSplits
    from .folder import RunFolder
    from .record import RunPart, RunRecord

log = logging.getLogger(__name__)


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
            >>> run = train_run(spec, record.layer, HeadSpec(**record.head))  # doctest: +SKIP
        """
        from .folder import RunFolder

        record = RunFolder(out).read_config()
        ex = record.extract
        spec = cls(
            record.model,
            from_json(DataConfig, record.data),
            out,
            record.weights_arg,
            record.extract_config(),
            from_json(TrainConfig, record.train or {}),
            Views(int(ex["views"]), ex["augment"]) if ex["views"] else None,
            cache_dir=record.cache_dir,
            resume=True,
            logger=record.logger,  # a resumed run goes on logging as it did
        )
        return replace(spec, **given), record

    def backbone(self) -> Backbone:
        """The frozen backbone (loaded once per call; a given :class:`Backbone` is used as is)."""
        from ..backbones.registry import Backbone, load_backbone

        if isinstance(self.model, Backbone):
            return self.model
        # models built for one input size (timm ViT, Swin) are built for this one
        return load_backbone(self.model, self.weights, input_size=self.extract.input_size)

    def folder(self, verb: str) -> RunFolder:
        """The run folder, prepared under the resume/overwrite rules every verb shares."""
        from .folder import RunFolder

        if self.out is None:
            raise FeatcacheError(f"{verb} needs a run folder: pass --out DIR (RunSpec(out=...))")
        return RunFolder.prepare(
            self.out, self.resume, self.overwrite, resumable=verb in ("train", "finetune", "sweep")
        )

    def one_layer(self, backbone: Backbone, layer: str, verb: str) -> str:
        """The single layer a ``train`` or ``probe`` job trains on (a set like ``@blocks`` is refused)."""
        names = parse_layers(layer, backbone)
        if len(names) != 1:
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise FeatcacheError(
                f"{verb} trains on one layer, but {layer!r} names {len(names)} ({shown}); "
                f"`featcache sweep --layers {layer}` trains a head on each and chooses on val"
            )
        return names[0]

    def say(self, text: str) -> None:
        """A line for the user: on stderr (stdout stays the results') with progress, else logged."""
        if self.progress:
            print(text, file=sys.stderr, flush=True)
        else:
            log.info(text)

    def announce(
        self, verb: str, backbone: Backbone, splits: DatasetSplits, what: str, train: TrainConfig | None
    ) -> None:
        """The start-of-run line: model, input size and preprocessing, what trains, images and classes,
        and ``train``'s batch size with its steps per epoch (an automatic one decided for the split)."""
        from ..extraction.extractor import resolved_cfg

        pre = resolved_cfg(backbone, self.extract).preprocessing
        h, w = pre.input_size
        sizes = " / ".join(f"{len(s)} {n}" for n, s in splits.items())
        line = (
            f"{verb}: {backbone.cfg.spec} (weights {backbone.cfg.weights}), input {h}x{w}: "
            f"{pre.describe()}; {what}; {splits.spec}: {sizes} images, {len(splits.classes)} "
            + ("classes" if splits.task == "classify" else f"{_NOUNS[splits.task]} ({splits.task})")
        )
        if train is not None:
            rows = len(splits.train)
            auto = " (auto)" if train.batch_size is None else ""
            line += (
                f"; batch size {train.batch_for(rows)}{auto}, {train.steps_per_epoch(rows)} steps per epoch"
            )
        self.say(line)

    def no_resume(self, verb: str) -> None:
        """Verbs that restart from scratch refuse ``resume`` instead of ignoring it."""
        if self.resume:
            raise FeatcacheError(f"{verb} does not resume; run it again (with --overwrite) instead")

    def load_data(self) -> DatasetSplits:
        """The dataset's splits, digests read through the cache's memo (the seeded split places each
        image by its content digest, which extraction needs next anyway)."""
        return self.data.load(self.cache_dir)

    def note_data(
        self, folder: RunFolder | None, splits: DatasetSplits, feats: Mapping[str, CachedFeatures]
    ) -> None:
        """:meth:`note_skipped` and :meth:`record_splits`: what a run says, and writes, about its data."""
        self.note_skipped(folder, skipped_rows(feats))
        self.record_splits(folder, splits)

    def record_splits(self, folder: RunFolder | None, splits: DatasetSplits) -> list[dict[str, str]]:
        """Write ``splits.csv`` in the run folder, remember the membership in the cache for this data
        source, and say in one line how many images changed split since the folder's own ``splits.csv``
        or else since the last run on this data source in this cache. Returns the rows written."""
        rows = splits.membership()
        now = {r["digest"]: r["split"] for r in rows}
        before = folder.write_splits(rows) if folder is not None else {}
        record = {"seed": self.data.seed, "fractions": [self.data.val_fraction, self.data.test_fraction]}
        last = swap_split_log(
            cache_root(self.cache_dir), dataset_name(splits.spec), {**record, "splits": now}
        )
        for old, where in (
            (before, "this run folder's splits.csv"),
            ((last or {}).get("splits", {}), f"the last run on {splits.spec} in this cache"),
        ):
            common = [d for d in now if d in old]
            moved = sum(now[d] != old[d] for d in common)
            if moved:
                settings = _setting_change(last, record) if old is not before and last else ""
                print(  # even with -q: test figures before and after are on different images
                    f"note: {moved} of {len(common)} images changed split since {where}{settings} (the "
                    "seeded split places images by content: README 'Splits that stay put')",
                    file=sys.stderr,
                )
                break
        return rows

    def extract_all(
        self, backbone: Backbone, splits: DatasetSplits, layers: Sequence[str]
    ) -> tuple[dict[str, CachedFeatures], list[CachedFeatures]]:
        """Every split's ``layers`` in one pass (a cache hit runs none), and the training split's views."""
        from ..extraction.build import extract_splits, extract_views

        kw: dict[str, Any] = {"cache_dir": self.cache_dir, "progress": self.progress}
        feats = extract_splits(backbone, splits, layers, self.extract, **kw)
        views = (
            extract_views(backbone, splits.train, layers, self.views, self.extract, **kw)
            if self.views
            else []
        )
        return feats, views

    def note_skipped(self, folder: RunFolder | None, skipped: Sequence[Mapping[str, str]]) -> None:
        """Say how many images were skipped as unreadable (``{split, id, reason}`` rows, as
        :func:`skipped_rows` makes them) and the first few, and list them all in the run folder's
        ``skipped.csv`` (nothing when none were)."""
        rows = folder.write_skipped(skipped) if folder is not None else list(skipped)
        if rows:
            shown = ", ".join(f"{r['id']} ({r['split']})" for r in rows[:5])
            more = f", ... ({len(rows) - 5} more)" if len(rows) > 5 else ""
            where = f"; all listed in {folder.path / 'skipped.csv'}" if folder is not None else ""
            self.say(f"skipped {len(rows)} unreadable image(s): {shown}{more}{where}")

    def record(
        self,
        kind: str,
        backbone: Backbone,
        feats: Mapping[str, CachedFeatures],
        layers: Sequence[str],
        views: Sequence[CachedFeatures] = (),
        *,
        part: RunPart,
        **typed: Any,
    ) -> RunRecord:
        """The run's ``config.json`` record: the shared part from this spec, plus the verb's ``part``.

        ``typed`` may set ``layer``, ``head``, ``train`` and ``classes`` (fields of the record).
        """
        from .record import RunRecord

        classes = typed.pop("classes", None) or feats["train"].classes
        if "layer" in typed and "train" in feats:  # the layer's own layout: export pools the same way
            typed["layer_layout"] = feats["train"].manifest.get("layer_layouts", {}).get(typed["layer"])
        return RunRecord(
            kind=kind,
            model=backbone.cfg.spec,
            backbone_cfg=backbone.cfg.to_dict(),
            data=to_json(self.data),
            extract={
                **to_json(self.extract),
                "layers": list(layers),
                "augment": self.views.augment if self.views else None,
                "views": self.views.count if self.views else 0,
            },
            classes=tuple(classes),
            weights=backbone.cfg.weights,
            weights_arg=self.weights,
            cache_keys={k: v.key for k, v in feats.items()},
            split_keys={k: v.split_key for k, v in feats.items()},
            view_keys=tuple(v.key for v in views),
            part=part,
            logger=self.logger,
            cache_dir=str(Path(self.cache_dir).resolve()) if self.cache_dir else None,
            task=feats["train"].task if "train" in feats else "classify",
            **typed,
        )


#: what a task's classes are, in the start-of-run line
_NOUNS = {"multilabel": "labels", "regress": "targets"}


def _setting_change(last: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """`` (seed 0 -> 1)``: the split settings that differ from the last run's, or nothing."""
    diff = [f"{k} {last.get(k)} -> {v}" for k, v in now.items() if last.get(k) != v]
    return f" ({', '.join(diff)})" if diff else ""


def skipped_rows(feats: Mapping[str, CachedFeatures]) -> list[dict[str, str]]:
    """The images each split left out as unreadable (its manifest's ``skipped``), as ``{split, id,
    reason}`` rows.

    Example:
        >>> skipped_rows(feats)  # doctest: +SKIP
        [{'split': 'train', 'id': 'cats/broken.jpg', 'reason': 'OSError: ...'}]
    """
    return [
        {"split": split, "id": str(s["id"]), "reason": str(s["reason"])}
        for split, f in feats.items()
        for s in f.manifest.get("skipped", [])
    ]
