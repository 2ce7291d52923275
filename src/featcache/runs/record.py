"""What a run folder's JSON files hold, typed: the run's record (``config.json``) and its verb's part.

:class:`RunRecord` is the part every run shares (model, data, extraction, cache keys ...) plus one
*part* of its verb's own, a small frozen dataclass per run kind (:class:`TrainPart`,
:class:`FoldsPart`, :class:`ProbePart`, :class:`FinetunePart`, :class:`SweepPart`,
:class:`SweepRunPart`). Both go through the project's one JSON codec (:mod:`featcache._config`); the
part's keys sit at the top level of the file, beside ``format`` (:data:`RUN_FORMAT`), which a reader
checks first: a run folder of another format is refused with the fix, never half read.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, TypeVar, Union

import torch
import torchvision

from .._config import from_json, to_json
from .._util import FeatcacheError
from .._version import __version__
from ..backbones.registry import BackboneCfg
from ..data.config import DataConfig
from ..extraction.config import ExtractConfig
from ..train.config import HeadSpec, TrainConfig
from ..train.freeze import FreezePlan
from .config import FinetuneConfig, ProbeConfig, SweepGrid

#: the layout of a run folder's JSON files; bumped whenever a field changes meaning or goes
RUN_FORMAT = 2
#: the last featcache release that reads each older run format (``featcache==VERSION``)
READ_BY = {1: "0.1.0"}


def environment() -> dict[str, Any]:
    """Versions and hardware, recorded with every run and benchmark."""
    return {
        "featcache": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _required(cls: type[Any]) -> set[str]:
    """The fields of dataclass ``cls`` without a default."""
    missing = dataclasses.MISSING
    return {f.name for f in fields(cls) if f.default is missing and f.default_factory is missing}


KINDS: tuple[str, ...] = ("train", "finetune", "probe", "sweep")

#: the keys a run's ``extract`` object holds beside its :class:`ExtractConfig`'s
_RUN_EXTRACT_KEYS = ("layers", "augment", "views")


@dataclass(frozen=True)
class RunExtraction:
    """The extraction a run read its features from: the settings, the layers, its cached views.

    Stored as one flat JSON object: the settings' fields, then ``layers``, ``augment`` and ``views``
    (the views' augmentation and count; ``views`` 0 and ``augment`` None for a run without them).

    Example:
        >>> RunExtraction(ExtractConfig(), ("penultimate",)).to_json()["layers"]
        ['penultimate']
    """

    config: ExtractConfig
    layers: tuple[str, ...]
    views: int = 0
    augment: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))

    def to_json(self) -> dict[str, Any]:
        """The flat JSON object of ``config.json``'s ``extract``."""
        return {
            **to_json(self.config),
            "layers": list(self.layers),
            "augment": self.augment,
            "views": self.views,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RunExtraction:
        """Read :meth:`to_json`'s object; a key of neither part, or one of the run's own missing, is
        refused by name."""
        if not isinstance(d, Mapping):
            raise FeatcacheError(f"a run's extract record is a JSON object, got {type(d).__name__} {d!r}")
        lacking = [k for k in _RUN_EXTRACT_KEYS if k not in d]
        if lacking:
            raise FeatcacheError(f"a run's extract record lacks {lacking}: not written by this featcache")
        config = from_json(ExtractConfig, {k: v for k, v in d.items() if k not in _RUN_EXTRACT_KEYS})
        views, augment = d["views"], d["augment"]
        if (
            not isinstance(views, int)
            or isinstance(views, bool)
            or not (augment is None or isinstance(augment, str))
        ):
            raise FeatcacheError(f"a run's extract record holds views {views!r} and augment {augment!r}")
        return cls(config, tuple(map(str, d["layers"])), views, augment)


@dataclass(frozen=True)
class TrainPart:
    """``featcache train``'s own part.

    Attributes:
        split_contents: each split's images and labels as trained on
            (:func:`~featcache.runs.contents.split_contents`), so a resume names what changed.
    """

    split_contents: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class FoldsPart:
    """``train --folds K`` or ``probe --folds K`` (the folds folder), or one fold's run inside it.

    Attributes:
        folds: K.
        fold: this fold's index, in a fold's own run folder (None: the folds folder).
        probe: the probe's settings, for ``probe --folds`` (None: ``train --folds``).
    """

    folds: int
    fold: int | None = None
    probe: ProbeConfig | None = None


@dataclass(frozen=True)
class ProbePart:
    """``featcache probe``'s own part: its settings."""

    probe: ProbeConfig


@dataclass(frozen=True)
class FinetunePart:
    """``featcache finetune``'s own part.

    Attributes:
        finetune: what was asked (what trains, BN policy, views ...).
        plan: what trained (re-applied identically on resume, and by ``export``).
        mode: ``cached-prefix`` or ``live``; ``mode_reason``: why live, when it is.
        split_contents: as :attr:`TrainPart.split_contents`.
    """

    finetune: FinetuneConfig
    plan: FreezePlan
    mode: Literal["cached-prefix", "live"]
    mode_reason: str | None
    split_contents: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class SweepPart:
    """A sweep folder's own part: its grid (``sweep --resume`` needs nothing retyped)."""

    grid: SweepGrid


@dataclass(frozen=True)
class SweepRunPart:
    """One combination of a sweep: the sweep folder it belongs to."""

    sweep: str


RunPart = Union[TrainPart, FoldsPart, ProbePart, FinetunePart, SweepPart, SweepRunPart]  # noqa: UP007
#: the parts a run of each kind may hold
PARTS: dict[str, tuple[type[Any], ...]] = {
    "train": (TrainPart, FoldsPart),
    "probe": (ProbePart, FoldsPart),
    "finetune": (FinetunePart,),
    "sweep": (SweepPart, SweepRunPart),
}
P = TypeVar("P")


def part_class(kind: str, keys: set[str]) -> type[Any]:
    """The part of a ``kind`` run whose fields are ``keys``: every key one of its fields, every field
    without a default among them."""
    for cls in PARTS[kind]:
        names = {f.name for f in fields(cls)}
        if _required(cls) <= keys <= names:
            return cls
    wanted = "; ".join(f"{c.__name__}: {', '.join(f.name for f in fields(c))}" for c in PARTS[kind])
    raise FeatcacheError(
        f"a {kind} run's record holds the keys {sorted(keys)}, which are no {kind} run's part ({wanted})"
    )


#: the record's typed configs; the optional ones may be None
_TYPED: dict[str, type[Any]] = {
    "data": DataConfig,
    "extract": RunExtraction,
    "head": HeadSpec,
    "train": TrainConfig,
}
_OPTIONAL = ("head", "train")


def _stored(value: Any) -> Any:
    """A record field as ``config.json`` holds it (a :class:`RunExtraction` is one flat object)."""
    return value.to_json() if isinstance(value, RunExtraction) else to_json(value)


def _read(cls: type[Any], data: Any) -> Any:
    """A typed config of the record from what ``config.json`` holds."""
    return cls.from_json(data) if cls is RunExtraction else from_json(cls, data)


def _reread(value: Any) -> Any:
    """A config as ``config.json`` gives it back (a list given for a tuple field comes back a tuple), so
    a record equals its reread self."""
    return _read(type(value), json.loads(json.dumps(_stored(value))))


@dataclass(frozen=True)
class RunRecord:
    """What ``config.json`` holds: the shared part of every run, typed, and the verb's own part.

    Attributes:
        kind: ``train``, ``finetune``, ``probe`` or ``sweep`` (one run of a sweep, or the sweep's own
            folder: that one's part holds its ``grid``).
        model: the backbone spec as resolved (``torchvision:resnet18``).
        backbone_cfg: :meth:`BackboneCfg.to_dict` of the backbone (preprocessing, weights id, ...).
        data: the run's :class:`~featcache.data.DataConfig`.
        extract: the extraction settings with the run's layers and views (:class:`RunExtraction`).
        classes: class names, in label order (regress: the targets' names).
        part: the verb's own part (:data:`RunPart`), written at the top level of ``config.json``.
        task: what the run learnt: ``classify``, ``multilabel`` or ``regress`` (never part of a cache key).
        weights: the weights' name; ``weights_arg``: what was passed (to rebuild the backbone).
        layer: the layer a head trained on (None for a fine-tuned network); ``layer_layout``: its
            layout (what pooling averaged over; export pools the same way).
        cache_keys / view_keys: the feature tables the run read; ``split_keys``: each split as read
            (the table, the rows' content digests in order, labels and classes).
        cache_dir: the cache root given to the run (None: the default one).
        head / train: the head's :class:`HeadSpec` and the :class:`TrainConfig` (None where the run has
            none: a probe trains no epochs, a fine-tuned network has no separate head).
        logger: ``none`` or ``tensorboard`` (a resumed run goes on logging as it did).

    Example:
        >>> record = RunFolder("runs/mnist").read_config()  # doctest: +SKIP
        >>> record.kind, record.layer, record.part  # doctest: +SKIP
        ('train', 'penultimate', TrainPart(split_contents={...}))
    """

    kind: str
    model: str
    backbone_cfg: dict[str, Any]
    data: DataConfig
    extract: RunExtraction
    classes: tuple[str, ...]
    part: RunPart
    weights: str | None = None
    weights_arg: str | None = None
    layer: str | None = None
    layer_layout: str | None = None
    cache_keys: dict[str, str] = field(default_factory=dict)
    split_keys: dict[str, str] = field(default_factory=dict)
    view_keys: tuple[str, ...] = ()
    cache_dir: str | None = None
    head: HeadSpec | None = None
    train: TrainConfig | None = None
    logger: str = "none"
    featcache_version: str = __version__
    environment: dict[str, Any] = field(default_factory=environment)
    task: str = "classify"

    def __repr__(self) -> str:
        return (
            f"RunRecord(kind={self.kind!r}, model={self.model!r}, layer={self.layer!r}, "
            f"part={type(self.part).__name__}, classes={len(self.classes)}, "
            f"cache_keys={len(self.cache_keys)})"
        )

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FeatcacheError(f"unknown run kind {self.kind!r}: one of {', '.join(KINDS)}")
        if not isinstance(self.part, PARTS[self.kind]):
            shown = ", ".join(c.__name__ for c in PARTS[self.kind])
            raise FeatcacheError(
                f"a {self.kind} run's part is a {type(self.part).__name__}; a {self.kind} run holds one of "
                f"{shown}"
            )
        for name, cls in _TYPED.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if not isinstance(value, cls):
                raise TypeError(
                    f"RunRecord.{name} must be a {cls.__name__}, got {type(value).__name__} {value!r}"
                )
            object.__setattr__(self, name, _reread(value))
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "view_keys", tuple(self.view_keys))
        # The dict parts as config.json holds them (tuples as lists), so a record equals its reread self.
        for name in ("backbone_cfg", "cache_keys", "split_keys", "environment"):
            object.__setattr__(self, name, json.loads(json.dumps(getattr(self, name))))

    @property
    def backbone(self) -> BackboneCfg:
        """The backbone config the run was made with."""
        return BackboneCfg.from_dict(self.backbone_cfg)

    def extract_config(self) -> ExtractConfig:
        """The extraction settings of the run (its layers and views are the run's, not the settings')."""
        return self.extract.config

    def part_as(self, cls: type[P], what: str) -> P:
        """The verb's part, which ``what`` (a command) needs to be a ``cls``.

        Example:
            >>> record.part_as(SweepPart, "sweep --resume").grid.layers  # doctest: +SKIP
            ('blocks.4', 'penultimate')
        """
        if not isinstance(self.part, cls):
            raise FeatcacheError(
                f"{what} needs a run whose record holds a {cls.__name__}; this {self.kind} run holds a "
                f"{type(self.part).__name__}"
            )
        return self.part

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``config.json``: its format, the shared part, the verb's part's keys."""
        # in field order, as config.json has always had its keys
        shared = {f.name: _stored(getattr(self, f.name)) for f in fields(self) if f.name != "part"}
        return {"format": RUN_FORMAT, **shared, **to_json(self.part)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RunRecord:
        """Read ``config.json`` of this featcache's :data:`RUN_FORMAT` (:func:`check_format` first);
        keys that are not shared fields are the verb's part."""
        check_format(d)
        names = {f.name for f in fields(cls)} - {"part"}
        shared = {k: v for k, v in d.items() if k in names}
        missing = sorted(_required(cls) - {"part"} - set(shared))
        if missing:
            raise FeatcacheError(f"a run's record lacks {missing}: not written by featcache")
        kind = str(shared["kind"])
        if kind not in KINDS:
            raise FeatcacheError(f"unknown run kind {kind!r}: one of {', '.join(KINDS)}")
        own = {k: v for k, v in d.items() if k not in names and k != "format"}
        part = from_json(part_class(kind, set(own)), own)
        for name, config in _TYPED.items():
            if name not in _OPTIONAL or shared.get(name) is not None:
                shared[name] = _read(config, shared[name])
        return cls(**shared, part=part)


class RunFormatError(FeatcacheError):
    """A run folder written in another run format than this featcache's (:data:`RUN_FORMAT`)."""


def check_format(d: Mapping[str, Any]) -> None:
    """Refuse a record of another :data:`RUN_FORMAT` (no ``format`` key: the first, featcache 0.1.0),
    saying which featcache reads it. The caller names the folder.

    Example:
        >>> check_format({"format": RUN_FORMAT})
    """
    found = d.get("format", 1)  # featcache 0.1.0 wrote no format: that absence is format 1
    if found == RUN_FORMAT:
        return
    if isinstance(found, int) and not isinstance(found, bool) and found in READ_BY:
        raise RunFormatError(
            f"run format {found}, written by an older featcache; this featcache {__version__} reads format "
            f"{RUN_FORMAT}: re-run it, or use featcache {READ_BY[found]} (pip install "
            f"'featcache=={READ_BY[found]}') to read it"
        )
    raise RunFormatError(
        f"run format {found!r}, which this featcache {__version__} does not know (it reads format "
        f"{RUN_FORMAT}): written by a newer featcache? upgrade featcache to read it, or re-run it"
    )
