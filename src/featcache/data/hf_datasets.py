"""Hugging Face ``datasets`` as a dataset: a folder written by ``save_to_disk`` (a ``Dataset`` or a
``DatasetDict``), a hub id (``hf-dataset:beans``, ``hf-dataset:REPO:CONFIG``; needs internet or the
``datasets`` cache), or a ``datasets.Dataset``/``DatasetDict`` object from Python.

The image column is the one ``Image`` feature and the label column the one ``ClassLabel`` feature
(``image_column``/``label_column`` choose; with several and no choice the dataset is refused, naming
them). A ``DatasetDict``'s own ``train``/``validation``/``test`` splits are used.

A row's digest is the SHA-256 of the image's encoded bytes — the ``Image`` feature's stored ``bytes``,
or the bytes of the file it names when it stores a path — so a PNG in a dataset, in a folder and in a
tar shard is one row of the cache. The digests of stored bytes are memoised per dataset version (its
fingerprint and the versions of its Arrow files) under the cache root, so a re-run reads no image;
files named by path go through the per-file digest memo, as a folder's do.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .._util import FeatcacheError, flag
from .digests import DigestMemo, SampleChangedError, bytes_digest
from .samples import DEFAULT_MAX_PIXELS, SampleSet, decode_checked, decode_image
from .versions import VersionMemo, file_version
from .webdataset import bytes_problem, class_names

log = logging.getLogger(__name__)

HUB = "hf-dataset:"
INSTALL = "pip install 'featcache[datasets]'"
#: a DatasetDict's split names, as featcache names them
SPLIT_NAMES = {"train": "train", "validation": "val", "valid": "val", "val": "val", "test": "test"}
_BATCH = 256


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as exc:
        raise FeatcacheError(f"Hugging Face datasets need the datasets package: {INSTALL}") from exc
    return datasets


def is_saved_dataset(path: Path) -> bool:
    """Whether a folder was written by ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def is_hf_dataset(obj: object) -> bool:
    """Whether ``obj`` is a ``datasets.Dataset`` or ``DatasetDict`` (without importing ``datasets``)."""
    return type(obj).__module__.startswith("datasets.") and type(obj).__name__ in ("Dataset", "DatasetDict")


def open_hf(source: Any) -> dict[str, Any]:
    """``{featcache split name or "all": datasets.Dataset}`` of a saved folder, hub id or object.

    Example:
        >>> list(open_hf("data/digits-hf"))  # doctest: +SKIP
        ['train', 'test']
    """
    lib = _datasets()
    where = source if isinstance(source, str) else type(source).__name__
    if isinstance(source, str) and source.startswith(HUB):
        repo, _, config = source[len(HUB) :].partition(":")
        if not repo:
            raise FeatcacheError(f"dataset spec {source!r} names no dataset: use {HUB}REPO[:CONFIG]")
        try:
            source = lib.load_dataset(repo, config or None)
        except Exception as exc:  # the hub's own errors: offline, unknown repo, a config to choose
            raise FeatcacheError(
                f"cannot load {where!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); check "
                "the id (and the config after a second ':'), and that the machine is online or has it in "
                "the datasets cache"
            ) from exc
    elif isinstance(source, (str, Path)):
        source = lib.load_from_disk(str(source))
    if isinstance(source, lib.Dataset):
        return {"all": source}
    if not isinstance(source, lib.DatasetDict):
        raise TypeError(f"expected a datasets.Dataset or DatasetDict, got {type(source).__name__}")
    ignored = [s for s in source if s not in SPLIT_NAMES]
    if ignored:
        log.warning("%s: splits %s are not train/validation/test and are not used", where, ignored)
    parts = {SPLIT_NAMES[s]: d for s, d in source.items() if s in SPLIT_NAMES}
    if "train" not in parts:
        raise FeatcacheError(
            f"{where}: a DatasetDict without a 'train' split (it has {list(source)}); give it one "
            "(DatasetDict({'train': ...})), or pass the one Dataset to split it"
        )
    return parts


def choose_columns(
    features: Any, image_column: str | None, label_column: str | None, where: str
) -> tuple[str, str]:
    """The image and label columns: the chosen ones (checked), else the one ``Image`` and the one
    ``ClassLabel`` feature; several without a choice is an error naming them."""
    lib = _datasets()
    images = [n for n, f in features.items() if isinstance(f, lib.Image)]
    labels = [n for n, f in features.items() if isinstance(f, lib.ClassLabel)]
    every = ", ".join(f"{n} ({type(f).__name__})" for n, f in features.items())
    if image_column is not None:
        if not isinstance(features.get(image_column), lib.Image):
            raise FeatcacheError(
                f"{where}: {flag('image_column', image_column)} is not an Image column; its columns: {every}"
            )
        images = [image_column]
    if label_column is not None:
        if label_column not in features:
            raise FeatcacheError(
                f"{where}: no column {label_column!r} ({flag('label_column', label_column)}); its "
                f"columns: {every}"
            )
        labels = [label_column]
    for kind, found, option in (("Image", images, "image_column"), ("ClassLabel", labels, "label_column")):
        if len(found) != 1:
            what = f"{len(found)} {kind} columns ({', '.join(found)})" if found else f"no {kind} column"
            raise FeatcacheError(
                f"{where} has {what}; choose one with {flag(option, found[0] if found else 'NAME')} "
                f"(its columns: {every})"
            )
    return images[0], labels[0]


def _label_values(ds: Any, column: str, where: str) -> tuple[list[Any], list[str] | None]:
    """The label column's values and, for a ``ClassLabel``, its class names (else None)."""
    lib = _datasets()
    feature = ds.features[column]
    values = ds.with_format("arrow")[column].to_pylist()
    if isinstance(feature, lib.ClassLabel):
        return values, list(feature.names)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, str))]
    if bad or any(v is None for v in values):
        raise FeatcacheError(
            f"{where}: label column {column!r} holds {bad[0] if bad else None!r}; a label column holds "
            "integers or strings (a ClassLabel, an int or a string Value) on every row"
        )
    return values, None


class HFSamples(SampleSet):
    """The rows of a ``datasets.Dataset``; ids are row numbers (``000042``)."""

    def __init__(
        self,
        ds: Any,
        image_column: str,
        labels: np.ndarray,
        classes: Sequence[str],
        name: str,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        lib = _datasets()
        self.column = image_column
        # The encoded image ({"bytes", "path"}), never Pillow's decode by datasets: the bytes are the key.
        self.ds = ds.cast_column(image_column, lib.Image(decode=False)).with_format("arrow")
        self.max_pixels = max_pixels
        super().__init__([f"{i:06d}" for i in range(len(ds))], labels, classes, name)

    def describe(self, index: int) -> str:
        path = self._cell(index).get("path")
        return f"{self.name}[{index}]" + (f" ({path})" if path else "")

    def _cell(self, index: int) -> dict[str, Any]:
        return self.ds[index][self.column][0].as_py()  # type: ignore[no-any-return]

    def _bytes(self, index: int) -> bytes:
        cell = self._cell(index)
        if cell.get("bytes") is not None:
            return cell["bytes"]  # type: ignore[no-any-return]
        path = cell.get("path")
        if not path:
            raise SampleChangedError(f"{self.name}[{index}] has neither image bytes nor a path")
        try:
            return Path(path).read_bytes()
        except FileNotFoundError as exc:
            raise SampleChangedError(
                f"image {path!r} of {self.name}[{index}] vanished during this run; run the command again"
            ) from exc

    def load(self, index: int) -> Image.Image:
        return decode_image(io.BytesIO(self._bytes(index)), self.max_pixels, self.describe(index))

    def load_checked(self, index: int, digest: str) -> Image.Image:
        """Decode the image's bytes if they still hash to ``digest``."""
        return decode_checked(self._bytes(index), digest, self.describe(index), self.max_pixels)

    def _problem(self, index: int) -> str:
        return bytes_problem(self._bytes(index), self.max_pixels, self.describe(index))

    def _version(self) -> tuple[list[Any], int] | None:
        """The dataset's version (fingerprint, column, its Arrow files' versions) and their latest
        mtime; None for a dataset in memory, which has no files to vouch for it."""
        files = [f["filename"] for f in self.ds.cache_files]
        if not files:
            return None
        versions = [file_version(f) for f in files]
        return [self.ds._fingerprint, self.column, files, versions], max(v[1] for v in versions)

    def _content_digests(self, memo: DigestMemo | None, progress: bool) -> list[str]:
        store = VersionMemo.under(memo.path.parent if memo is not None and memo.path is not None else None)
        version = self._version()
        name = self.ds._fingerprint
        known = store.get("hf-digests", name, *version) if version else None
        if known is not None and len(known) == len(self):
            stored: list[str | None] = known
        else:
            started = time.time_ns()
            stored = self._hash_stored(progress)
            if version is not None:
                store.put("hf-digests", name, version[0], started, stored)
        paths = {i: self._cell(i)["path"] for i, d in enumerate(stored) if d is None}
        if paths:  # images stored as paths: hashed like a folder's files, through the per-file memo
            found = (memo or DigestMemo(None)).file_digests(list(paths.values()), progress)
            for i, d in zip(paths, found, strict=True):
                stored[i] = d
        return [d for d in stored if d is not None]

    def _hash_stored(self, progress: bool) -> list[str | None]:
        """The digest of each row's stored bytes (None where the row stores a path), one pass over the
        column in batches."""
        out: list[str | None] = []
        bar = tqdm(total=len(self), desc=f"hash {self.name}", unit="img", delay=1, disable=not progress)
        with bar:
            for batch in self.ds.select_columns([self.column]).iter(batch_size=_BATCH):
                for value in batch.column(self.column).combine_chunks().field("bytes").to_pylist():
                    out.append(bytes_digest(value) if value is not None else None)
                bar.update(batch.num_rows)
        return out

    def _fingerprint_rows(self, h: Any, rows: np.ndarray | None = None) -> None:
        h.update(str(self.ds._fingerprint).encode())
        if rows is not None:
            h.update(rows.tobytes())


def hf_sets(
    source: Any,
    image_column: str | None = None,
    label_column: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[dict[str, SampleSet], list[str]]:
    """The samples of a Hugging Face dataset by split (``all`` when it has none) and its class names.

    Example:
        >>> sets, classes = hf_sets("data/digits-hf")  # doctest: +SKIP
    """
    where = f"dataset {source!r}" if isinstance(source, (str, Path)) else f"the {type(source).__name__}"
    parts = open_hf(source)
    first = "train" if "train" in parts else "all"
    parts = {first: parts[first], **parts}  # the first split's classes are the dataset's
    image, label = choose_columns(parts[first].features, image_column, label_column, where)
    values: dict[str, list[Any]] = {}
    names: list[str] | None = None
    for split, ds in parts.items():
        at = f"{where} ({split})"
        choose_columns(ds.features, image, label, at)  # every split has both columns
        values[split], own = _label_values(ds, label, at)
        if split != first and own != names:
            raise FeatcacheError(f"{at}: its label classes {own} differ from the {first} split's {names}")
        names = own
        if own is not None and any(v is None or v < 0 for v in values[split]):
            raise FeatcacheError(
                f"{at}: rows without a label (ClassLabel -1, as a hidden test split has); remove them "
                "(ds.filter) or leave that split out"
            )
    classes = names if names is not None else class_names(values[first], where)
    index = {c: i for i, c in enumerate(classes)}
    sets: dict[str, SampleSet] = {}
    for split, ds in parts.items():
        if names is not None:
            labels = np.asarray(values[split], dtype=np.int64)
        else:
            unknown = sorted({str(v) for v in values[split]} - set(index))
            if unknown:
                raise FeatcacheError(
                    f"{where}: the {split} split has labels the train split lacks: {unknown[:5]}; a head "
                    "can only predict the classes it was trained on"
                )
            labels = np.asarray([index[str(v)] for v in values[split]], dtype=np.int64)
        name = str(source) if isinstance(source, (str, Path)) else f"datasets:{ds._fingerprint}"
        sets[split] = HFSamples(ds, image, labels, classes, name, max_pixels)
    return sets, classes
