"""``Job``: one run's parts, opened once from a :class:`~featcache.runs.spec.RunSpec` (the settings).

A job opens, in this order, the run folder (under the resume/overwrite rules), the backbone (its
preprocessing resolved for the input size), the layers, the dataset's splits and the feature cache;
every step of the run then reads them from the job instead of loading, parsing or scanning again:
one table record, one check of each layer's row shape and layout, one cache object whose tables are
parsed once.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import FeatcacheError
from ..backbones.registry import Backbone, load_backbone
from ..cache.housekeeping import dataset_name, swap_split_log
from ..cache.identity import TableRecord
from ..cache.splits import CachedFeatures
from ..cache.store import FeatureCache
from ..data.datasets import DatasetSplits
from ..extraction.build import cache_record, extract_table, extract_views
from ..extraction.config import parse_layers
from ..extraction.extractor import Extractor
from ..train.config import HeadSpec, TrainConfig
from .folder import RunFolder
from .record import RunExtraction, RunPart, RunRecord
from .spec import RunSpec

log = logging.getLogger(__name__)

#: the verbs whose run folder an interrupted run continues (``--resume``)
RESUMABLE = ("train", "finetune", "sweep")


@dataclass
class Job:
    """One run's opened parts: each is loaded, parsed or checked once, when the job opens or first asks.

    Attributes:
        spec: the run's settings.
        verb: ``train``, ``finetune``, ``sweep``, ``probe`` or ``knn`` (said in messages, kept in the record).
        backbone: the frozen backbone, its ``cfg`` resolved for ``spec.extract.input_size``.
        splits: the dataset's splits (digests read through the cache's memo).
        folder: the run folder, or None for a job that writes none.
        cache: the feature cache (this process's one object for its root).
        layers: the layers the job extracts, ``@`` sets expanded (empty for ``finetune``).

    Example:
        >>> job = Job.open(RunSpec("torchvision:resnet18", "digits", weights="none"), "knn", "layer4",
        ...                folder=False)  # doctest: +SKIP
        >>> job.row_shape("layer4")  # doctest: +SKIP
        ((512,), 'NC')
    """

    spec: RunSpec
    verb: str
    backbone: Backbone
    splits: DatasetSplits
    folder: RunFolder | None
    cache: FeatureCache
    layers: tuple[str, ...] = ()
    _tables: dict[tuple[str, ...], TableRecord] = field(default_factory=dict, repr=False)
    _shapes: dict[str, tuple[tuple[int, ...], str | None]] = field(default_factory=dict, repr=False)

    @classmethod
    def open(
        cls,
        spec: RunSpec,
        verb: str,
        layers: str | Sequence[str] | None = None,
        *,
        folder: bool | None = True,
        one_layer: bool = False,
    ) -> Job:
        """Open the run's parts: the folder (``folder`` True: required; None: when ``spec.out`` is given;
        False: none), the backbone, ``layers`` (``one_layer``: exactly one, as ``train`` and ``probe``
        take), the splits and the cache.

        Example:
            >>> job = Job.open(spec, "train", "penultimate", one_layer=True)  # doctest: +SKIP
        """
        opened = open_folder(spec, verb) if folder or (folder is None and spec.out is not None) else None
        backbone = open_backbone(spec)
        names = parse_layers(layers, backbone) if layers is not None else ()
        if one_layer:
            names = (_one_layer(names, layers, verb),)
        splits = spec.data.load(spec.cache_dir)
        cache = FeatureCache.shared(spec.cache_dir, spec.extract.verify)
        return cls(spec, verb, backbone, splits, opened, cache, tuple(names))

    @property
    def run_folder(self) -> RunFolder:
        """The run folder of a job that writes one (``train``, ``finetune``, ``sweep`` always do)."""
        if self.folder is None:
            raise FeatcacheError(f"{self.verb} needs a run folder: pass --out DIR (RunSpec(out=...))")
        return self.folder

    @property
    def layer(self) -> str:
        """The one layer of a ``train``, ``probe`` or ``knn`` job."""
        if len(self.layers) != 1:
            raise FeatcacheError(f"{self.verb} has {len(self.layers)} layers, not one: {list(self.layers)}")
        return self.layers[0]

    def table(self, layers: Sequence[str] | None = None) -> TableRecord:
        """The record of the table that holds ``layers`` (default: the job's), built once per job."""
        names = tuple(layers) if layers is not None else self.layers
        if names not in self._tables:
            self._tables[names] = cache_record(self.backbone, names, self.spec.extract)
        return self._tables[names]

    def row_shape(self, layer: str) -> tuple[tuple[int, ...], str | None]:
        """A layer's cached row shape and stored layout, checked once per job: read from a table that
        holds the layer, else from one blank image through the backbone (the extractor's check of the
        layer: its name, its first axis the batch, its layout)."""
        if layer not in self._shapes:
            found = self.cache.row_shape(self.table(), layer) if layer in self.layers else None
            if found is None:
                ex = Extractor(self.backbone, [layer], self.spec.extract)
                found = ex.row_shapes()[layer], ex.stored_layouts()[layer]
            self._shapes[layer] = found
        return self._shapes[layer]

    def say(self, text: str) -> None:
        """A line for the user: on stderr (stdout stays the results') with progress, else logged."""
        say(self.spec.progress, text)

    def announce(self, what: str, train: TrainConfig | None) -> None:
        """The start-of-run line: model, input size and preprocessing, what trains, images and classes,
        and ``train``'s batch size with its steps per epoch (an automatic one decided for the split)."""
        backbone, splits = self.backbone, self.splits
        pre = backbone.cfg.preprocessing
        h, w = pre.input_size
        sizes = " / ".join(f"{len(s)} {n}" for n, s in splits.items())
        line = (
            f"{self.verb}: {backbone.cfg.spec} (weights {backbone.cfg.weights}), input {h}x{w}: "
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

    def extract_all(self) -> tuple[dict[str, CachedFeatures], list[CachedFeatures]]:
        """Every split's layers in one pass (a cache hit runs none), and the training split's views."""
        spec = self.spec
        feats = extract_table(
            self.backbone,
            self.splits,
            self.layers,
            spec.extract,
            self.table(),
            self.cache,
            progress=spec.progress,
        )
        views = (
            extract_views(
                self.backbone,
                self.splits.train,
                self.layers,
                spec.views,
                spec.extract,
                cache_dir=spec.cache_dir,
                progress=spec.progress,
            )
            if spec.views
            else []
        )
        return feats, views

    def note_data(self, feats: Mapping[str, CachedFeatures]) -> None:
        """:meth:`note_skipped` and :meth:`record_splits`: what a run says, and writes, about its data."""
        self.note_skipped(skipped_rows(feats))
        self.record_splits()

    def record_splits(self) -> list[dict[str, str]]:
        """Write ``splits.csv`` in the run folder, remember the membership in the cache for this data
        source, and say in one line how many images changed split since the folder's own ``splits.csv``
        or else since the last run on this data source in this cache. Returns the rows written."""
        folder, splits, data = self.folder, self.splits, self.spec.data
        rows = splits.membership()
        now = {r["digest"]: r["split"] for r in rows}
        before = folder.write_splits(rows) if folder is not None else {}
        record = {"seed": data.seed, "fractions": [data.val_fraction, data.test_fraction]}
        last = swap_split_log(self.cache.root, dataset_name(splits.spec), {**record, "splits": now})
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

    def note_skipped(self, skipped: Sequence[Mapping[str, str]]) -> None:
        """Say how many images were skipped as unreadable (``{split, id, reason}`` rows, as
        :func:`skipped_rows` makes them) and the first few, and list them all in the run folder's
        ``skipped.csv`` (nothing when none were)."""
        folder = self.folder
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
        layer: str | None = None,
        head: HeadSpec | None = None,
        train: TrainConfig | None = None,
        classes: Sequence[str] | None = None,
    ) -> RunRecord:
        """The run's ``config.json`` record: the shared part from the spec, plus the verb's ``part``;
        ``layer`` (a head's), ``head``, ``train`` (the trainer settings as resolved) and ``classes``
        (default: the train split's) where the run has them."""
        spec = self.spec
        layout = None
        if layer is not None and "train" in feats:  # the layer's own layout: export pools the same way
            layout = feats["train"].result.layer_layouts.get(layer)
        return RunRecord(
            kind=kind,
            model=backbone.cfg.spec,
            backbone_cfg=backbone.cfg.to_dict(),
            data=spec.data,
            extract=RunExtraction(
                spec.extract,
                tuple(layers),
                spec.views.count if spec.views else 0,
                spec.views.augment if spec.views else None,
            ),
            classes=tuple(classes or feats["train"].classes),
            weights=backbone.cfg.weights,
            weights_arg=spec.weights,
            cache_keys={k: v.key for k, v in feats.items()},
            split_keys={k: v.split_key for k, v in feats.items()},
            view_keys=tuple(v.key for v in views),
            part=part,
            logger=spec.logger,
            cache_dir=str(Path(spec.cache_dir).resolve()) if spec.cache_dir else None,
            task=feats["train"].task if "train" in feats else "classify",
            layer=layer,
            layer_layout=layout,
            head=head,
            train=train,
        )


def open_backbone(spec: RunSpec) -> Backbone:
    """The frozen backbone of ``spec``, resolved for its input size (a given :class:`Backbone`: the same
    model object; models built for one input size, timm's ViT and Swin, are built for this one)."""
    if isinstance(spec.model, Backbone):
        return spec.model.at_input_size(spec.extract.input_size)
    return load_backbone(spec.model, spec.weights, input_size=spec.extract.input_size)


def open_folder(spec: RunSpec, verb: str) -> RunFolder:
    """The run folder, prepared under the resume/overwrite rules every verb shares."""
    if spec.out is None:
        raise FeatcacheError(f"{verb} needs a run folder: pass --out DIR (RunSpec(out=...))")
    return RunFolder.prepare(spec.out, spec.resume, spec.overwrite, resumable=verb in RESUMABLE)


def _one_layer(names: Sequence[str], given: str | Sequence[str] | None, verb: str) -> str:
    """The single layer a ``train`` or ``probe`` job trains on (a set like ``@blocks`` is refused)."""
    if len(names) != 1:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise FeatcacheError(
            f"{verb} trains on one layer, but {given!r} names {len(names)} ({shown}); "
            f"`featcache sweep --layers {given}` trains a head on each and chooses on val"
        )
    return names[0]


def say(progress: bool, text: str) -> None:
    """A line for the user: on stderr (stdout stays the results') with progress, else logged."""
    if progress:
        print(text, file=sys.stderr, flush=True)
    else:
        log.info(text)


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
        {"split": split, "id": sample_id, "reason": reason}
        for split, f in feats.items()
        for sample_id, reason in f.result.skipped
    ]
