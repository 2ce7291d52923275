"""A feature table's identity: the typed record of everything that decides a row's values, its key,
and the cache format's version (one module for both, as Hugging Face datasets' ``fingerprint.py``).

Extraction builds a :class:`TableRecord` (:func:`featcache.extraction.build.cache_record`); the store
compares records typed (:meth:`TableRecord.same_setting`) and keys a table by :meth:`TableRecord.key`:
the SHA-256 of the record's canonical JSON and :data:`CACHE_VERSION`. Labels, splits, dataset names,
paths and row order are never part of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from .._util import stable_hash

#: Bumped whenever the stored format or the meaning of the stored numbers changes: part of every key.
#: 3: segments carry their own checksum. 4: digests as raw 32-byte records in ``<seg>.digests.npy``,
#: counts readable without them. Tables of another version are never read (``cache gc`` removes them).
CACHE_VERSION = 4
#: the file in a table's folder that holds its record and version (written once, when it is created)
TABLE_FILE = "table.json"


def _frozen(value: Any) -> Any:
    """A JSON value as an immutable, comparable one (lists become tuples, objects sorted pairs)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def _thawed(value: Any) -> Any:
    """The JSON form of a :func:`_frozen` value."""
    pairs = isinstance(value, tuple) and value
    if pairs and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in value):
        return {k: _thawed(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thawed(v) for v in value]
    return value


@dataclass(frozen=True)
class TableRecord:
    """Everything that decides a row's values, and nothing else.

    Attributes:
        backbone: the model spec (``torchvision:resnet18``).
        weights_id: SHA-256 of the weight tensors.
        preprocessing: the resolved preprocessing's canonical form, as sorted (field, value) pairs.
        layers: the layer names, sorted.
        pool: pooling of the stored rows (``avg``, ``none``...).
        dtype: the storage dtype.
        amp_bf16: whether the forward ran under bfloat16 autocast.
        view: the augmented view's index (0: the images as they are).
        method: how the layers were read where that decides values (``hooks``, ``fx``).
        layout_rules: the version of the rules that infer each layer's layout.
        augment: the augmentation of an augmented view (None otherwise).
        augment_version: the version of the augmentation code (None without augmentation).

    Example:
        >>> r = TableRecord("m:x", "ab", (), ("layer3",), "avg", "float32", False, 0, "hooks", 1)
        >>> r.key() == TableRecord.from_json(r.to_json()).key()
        True
    """

    backbone: str
    weights_id: str
    preprocessing: tuple[tuple[str, Any], ...]
    layers: tuple[str, ...]
    pool: str
    dtype: str
    amp_bf16: bool
    view: int
    method: str
    layout_rules: int
    augment: str | None = None
    augment_version: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as stored in ``table.json`` (augmentation fields only for an augmented view)."""
        out: dict[str, Any] = {
            "backbone": self.backbone,
            "weights_id": self.weights_id,
            "preprocessing": _thawed(self.preprocessing) if self.preprocessing else {},
            "layers": list(self.layers),
            "pool": self.pool,
            "dtype": self.dtype,
            "amp_bf16": self.amp_bf16,
            "view": self.view,
            "method": self.method,
            "layout_rules": self.layout_rules,
        }
        if self.augment is not None:
            out |= {"augment": self.augment, "augment_version": self.augment_version}
        return out

    @classmethod
    def from_json(cls, doc: Any) -> TableRecord:
        """A record read back from ``table.json``; raises ``TypeError``/``KeyError``/``ValueError`` for
        anything that is not a record this featcache writes."""
        if not isinstance(doc, Mapping):
            raise TypeError(f"a table record is a JSON object, not {type(doc).__name__}")
        names = {f.name for f in fields(cls)}
        extra = set(doc) - names
        if extra:
            raise ValueError(f"unknown fields {sorted(extra)} in a table record")
        values = {k: doc[k] for k in names if k in doc}
        typed = {"preprocessing": _frozen(doc["preprocessing"]), "layers": tuple(doc["layers"])}
        record = cls(**{**values, **typed})
        for f in fields(cls):
            want = {"str": str, "bool": bool, "int": int}.get(str(f.type))  # the optional ones: None too
            got = getattr(record, f.name)
            if want is not None and type(got) is not want:
                raise TypeError(f"field {f.name!r} of a table record is {got!r}, not a {want.__name__}")
        if not all(isinstance(x, str) for x in record.layers):
            raise TypeError(f"layers {record.layers!r} are not names")
        return record

    @staticmethod
    def from_json_preprocessing(doc: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
        """A preprocessing's canonical JSON form (``Preprocessing.key_record()``) as the record holds it."""
        frozen: tuple[tuple[str, Any], ...] = _frozen(doc)
        return frozen

    def key(self) -> str:
        """The table's key: SHA-256 of the record's canonical JSON with :data:`CACHE_VERSION`."""
        return table_key(self.to_json())

    def same_setting(self, other: TableRecord) -> bool:
        """Whether two records differ at most in their layers (a table of more layers serves fewer)."""
        return replace(self, layers=()) == replace(other, layers=())


def table_key(record: Mapping[str, Any] | TableRecord) -> str:
    """The key of a table record (typed or as stored): SHA-256 of its sorted JSON with ``CACHE_VERSION``.

    Example:
        >>> len(table_key({"layers": ["a"], "dtype": "float32"}))
        64
    """
    doc = record.to_json() if isinstance(record, TableRecord) else dict(record)
    return stable_hash({**doc, "cache_version": CACHE_VERSION})
