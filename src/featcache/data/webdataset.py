"""WebDataset tar shards as a dataset, read in place: ``shards-{000000..000099}.tar``, one ``.tar``, or a
folder of them (``train/ val/ test/`` subfolders of shards used as splits when present).

A shard holds samples as members sharing a key, WebDataset's convention: ``KEY.jpg`` (or ``.png``,
``.webp``, any image extension) and its label in ``KEY.cls`` (an integer), ``KEY.txt`` (a class name)
or ``KEY.json`` (a string or integer, or an object with a ``label`` field). ``image_column`` and
``label_column`` choose the extension when a sample has several.

Why the standard :mod:`tarfile` rather than the ``webdataset`` library: the store's guarantees need
(1) nothing unpickled — ``webdataset``'s default decoders unpickle ``.pyd``/``.pickle`` members, and its
URLs run shell commands (``pipe:``) — here a member is only ever hashed, parsed as a label or decoded
as an image by Pillow; (2) each image's offset in its shard, so a sample is read again later (for
extraction, by any ``torchrun`` rank) with one seek, and its bytes checked against the row's digest,
which ``webdataset``'s sample stream does not give. Brace notation is expanded by ``braceexpand``
(what ``webdataset`` uses; ``pip install 'featcache[webdataset]'``).

A shard is read once, as a stream (nothing extracted to disk): each member's bytes are hashed as they
are read. Its member index — keys, offsets, sizes, digests, label texts — is memoised per shard file
version (size, mtime, ctime, inode, device) under the cache root (:class:`~.versions.VersionMemo`),
so a re-run over unchanged shards stats them and reads no member; a changed shard is read again.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .._util import FeatcacheError, flag
from .digests import SampleChangedError
from .samples import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    BadImageError,
    SampleSet,
    check_pixels,
    decode_checked,
    decode_image,
    pixel_limit,
)
from .versions import VersionMemo, file_version

log = logging.getLogger(__name__)

IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
LABEL_EXTS = ("cls", "txt", "json")
#: WebDataset's split of a member name into key and extension: the first dot of the file name
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
#: a label member longer than this is not a class name (a caption, metadata): kept as unusable
_LABEL_BYTES = 4096
_CHUNK = 1 << 20
INSTALL = "pip install 'featcache[webdataset]'"


@dataclass(frozen=True)
class ShardSample:
    """One sample of a shard: its key, image member (extension, data offset, size, digest), label texts."""

    key: str
    ext: str
    offset: int
    size: int
    digest: str
    labels: dict[str, str | None]


def is_shard_spec(spec: str) -> bool:
    """Whether a data spec names tar shards: ``NAME.tar`` or a brace pattern ending in ``.tar``.

    Example:
        >>> is_shard_spec("shards-{000000..000099}.tar"), is_shard_spec("data/pets")
        (True, False)
    """
    return spec.endswith(".tar")


def is_shard_folder(root: Path) -> bool:
    """Whether a folder holds shards (``*.tar`` and no subfolders, or ``train/*.tar``) rather than class
    folders of images."""
    if any((root / "train").glob("*.tar")):
        return True
    subfolders = any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())
    return not subfolders and any(root.glob("*.tar"))


def expand_shards(spec: str) -> list[Path]:
    """The shard files of a spec, in order: ``{000000..000099}`` and ``{a,b}`` expanded as WebDataset does.

    Example:
        >>> [p.name for p in expand_shards("s-{0..2}.tar")]  # doctest: +SKIP
        ['s-0.tar', 's-1.tar', 's-2.tar']
    """
    if "{" in spec:
        try:
            from braceexpand import braceexpand
        except ImportError as exc:
            raise FeatcacheError(
                f"shard pattern {spec!r}: brace notation needs braceexpand: {INSTALL} (or pass a folder "
                "of .tar files)"
            ) from exc
        names = list(braceexpand(spec))
    else:
        names = [spec]
    paths = [Path(n) for n in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(
            f"shards of {spec!r} not found: {', '.join(repr(m) for m in missing[:3])}{more} "
            f"({len(paths) - len(missing)} of {len(paths)} exist); check the pattern's range"
        )
    return paths


def read_shard(path: Path) -> dict[str, Any]:
    """One pass over a shard as a stream: every image member hashed as it is read, label members kept
    (as JSON-ready rows: ``{"samples": [[key, ext, offset, size, digest, {ext: text}]], "no_image": n}``)."""
    images: dict[str, dict[str, list[Any]]] = {}
    labels: dict[str, dict[str, str | None]] = {}
    seen: set[tuple[str, str]] = set()
    with _open_tar(path) as tar:
        for info in tar:
            found = _KEY_EXT.match(info.name)
            if not info.isreg() or not found:
                continue  # directories, links (never followed) and names without an extension
            key, ext = found.group(1), found.group(2).lower()
            if ext not in IMAGE_EXTS and ext not in LABEL_EXTS:
                continue
            member = tar.extractfile(info)
            if member is None:
                continue
            if (key, ext) in seen:
                raise FeatcacheError(
                    f"shard {str(path)!r} holds {key}.{ext} twice; every sample's key must be unique in "
                    "its shard (rewrite the shard)"
                )
            seen.add((key, ext))
            if ext in IMAGE_EXTS:
                h = hashlib.sha256()
                for chunk in iter(lambda: member.read(_CHUNK), b""):  # noqa: B023 (used within the loop)
                    h.update(chunk)
                images.setdefault(key, {})[ext] = [info.offset_data, info.size, h.hexdigest()]
            else:
                labels.setdefault(key, {})[ext] = _label_text(member.read(_LABEL_BYTES + 1))
    samples = [
        [key, ext, *where, labels.get(key, {})] for key, exts in images.items() for ext, where in exts.items()
    ]
    return {"samples": samples, "no_image": len(set(labels) - set(images))}


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:")  # plain tar only: a member is read again later with one seek
    except tarfile.ReadError as exc:
        raise FeatcacheError(
            f"{str(path)!r} is not a plain (uncompressed) tar file ({exc}); WebDataset shards are plain "
            ".tar files: decompress it (gunzip) first"
        ) from exc


def _label_text(data: bytes) -> str | None:
    """A label member's text (None when it is too long or not UTF-8 to be a class name)."""
    if len(data) > _LABEL_BYTES:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def shard_index(
    paths: Sequence[Path], memo: VersionMemo | None = None, progress: bool = False
) -> list[dict[str, Any]]:
    """The member index of each shard: from the memo for a shard at a version it knows, else read.

    Example:
        >>> shard_index([Path("shard-000000.tar")])[0]["samples"][0][:2]  # doctest: +SKIP
        ['0001', 'png']
    """
    memo = memo or VersionMemo(None)
    out = []
    bar = tqdm(paths, desc="read shards", unit="shard", delay=1, disable=not progress)
    for path in bar:
        name = str(path.resolve())
        version = file_version(name)
        found = memo.get("tar", name, version, version[1])
        if found is None:
            with memo.reading("tar", name) as started:
                version = file_version(name)
                found = memo.get(
                    "tar", name, version, version[1]
                )  # another process may have read it meanwhile
                if found is None:
                    found = read_shard(path)
                    if file_version(name) != version:
                        raise SampleChangedError(
                            f"shard {name!r} changed while featcache was reading it; run the command "
                            "again once it is no longer being written"
                        )
                    memo.put("tar", name, version, started, found)
        out.append(found)
    return out


class ShardSamples(SampleSet):
    """Images inside tar shards, read in place; ids are ``SHARD/KEY`` (the shard's path relative to
    ``root``)."""

    def __init__(
        self,
        root: Path,
        shards: Sequence[Path],
        rows: Sequence[tuple[int, ShardSample]],
        labels: np.ndarray,
        classes: Sequence[str],
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        name: str | None = None,
    ) -> None:
        self.root, self.shards = Path(root), [Path(s).resolve() for s in shards]
        self.rows = list(rows)
        self.max_pixels = max_pixels
        names = [_relative(s, self.root) for s in self.shards]
        ids = [f"{names[i]}/{s.key}" for i, s in self.rows]
        super().__init__(ids, labels, classes, name or str(root))

    def describe(self, index: int) -> str:
        shard, s = self.rows[index]
        return f"{self.shards[shard]}:{s.key}.{s.ext}"

    def _bytes(self, index: int) -> bytes:
        shard, s = self.rows[index]
        try:
            with open(self.shards[shard], "rb") as f:
                f.seek(s.offset)
                return f.read(s.size)
        except FileNotFoundError as exc:
            raise SampleChangedError(
                f"shard {str(self.shards[shard])!r} vanished during this run; run the command again "
                "(rows extracted so far are kept)"
            ) from exc

    def load(self, index: int) -> Image.Image:
        return decode_image(io.BytesIO(self._bytes(index)), self.max_pixels, self.describe(index))

    def load_checked(self, index: int, digest: str) -> Image.Image:
        """Decode the member's bytes, read again at its offset, if they still hash to ``digest``."""
        why = ": the shard was rewritten"
        return decode_checked(self._bytes(index), digest, self.describe(index), self.max_pixels, why)

    def _problem(self, index: int) -> str:
        return bytes_problem(self._bytes(index), self.max_pixels, self.describe(index))

    def _content_digests(self, memo: Any, progress: bool) -> list[str]:
        return [s.digest for _, s in self.rows]  # hashed as the shards were read (or memoised)

    def _fingerprint_rows(self, h: Any, rows: np.ndarray | None = None) -> None:
        versions = [file_version(s) for s in self.shards]
        for i in range(len(self)) if rows is None else rows.tolist():
            shard, s = self.rows[i]
            h.update(f"{versions[shard]}:{s.offset}:{s.digest};".encode())


def bytes_problem(data: bytes, max_pixels: int | None, where: str) -> str:
    """Why an image's bytes cannot be decoded, from a cheap look ("" when they look fine)."""
    try:
        with pixel_limit(max_pixels), Image.open(io.BytesIO(data)) as im:
            check_pixels(im.size, max_pixels, where)
            im.verify()  # structure and checksums (PNG CRCs), no pixel decoding
            if im.format == "JPEG" and b"\xff\xd9" not in data[-4096:]:
                return "truncated JPEG: no end-of-image marker (the file was cut short)"
    except BadImageError as exc:
        return str(exc)
    except Image.DecompressionBombError as exc:
        return f"BadImageError: {exc}"
    except (OSError, ValueError, SyntaxError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name


def _rows(
    index: Sequence[dict[str, Any]], image_column: str | None, where: str
) -> list[tuple[int, ShardSample]]:
    """Each shard's samples as ``(shard, sample)``; a sample with several images needs ``image_column``."""
    if image_column is not None and image_column not in IMAGE_EXTS:
        raise FeatcacheError(
            f"{flag('image_column', image_column)}: for WebDataset shards it names the image member's "
            f"extension, one of {', '.join(IMAGE_EXTS)}"
        )
    by_key: dict[tuple[int, str], list[ShardSample]] = {}
    for shard, found in enumerate(index):
        for key, ext, offset, size, digest, labels in found["samples"]:
            by_key.setdefault((shard, key), []).append(ShardSample(key, ext, offset, size, digest, labels))
    rows = []
    for (shard, key), options in by_key.items():
        chosen = [s for s in options if image_column is None or s.ext == image_column]
        if len(chosen) > 1:
            raise FeatcacheError(
                f"{where}: sample {key!r} has {len(chosen)} images "
                f"({', '.join(f'{key}.{s.ext}' for s in chosen)}); choose one extension with "
                f"{flag('image_column', chosen[0].ext)}"
            )
        if not chosen:
            raise FeatcacheError(
                f"{where}: sample {key!r} has no {key}.{image_column} (it has "
                f"{', '.join(s.ext for s in options)}); choose another {flag('image_column', options[0].ext)}"
            )
        rows.append((shard, chosen[0]))
    skipped = sum(f["no_image"] for f in index)
    if skipped:
        log.warning("%s: %d keys have no image member and are not samples", where, skipped)
    if not rows:
        raise FeatcacheError(
            f"{where}: no images found in the shards (members KEY.{'|'.join(IMAGE_EXTS[:4])}...)"
        )
    return rows


def label_values(rows: Sequence[ShardSample], label_column: str | None, where: str) -> list[int | str]:
    """Each sample's label from its ``.cls`` (integer), ``.txt`` (class name) or ``.json`` member; with
    several kinds of label member, ``label_column`` chooses (else the dataset is refused, never guessed)."""
    present = sorted({e for s in rows for e in s.labels}, key=LABEL_EXTS.index)
    if label_column is not None and label_column not in LABEL_EXTS:
        raise FeatcacheError(
            f"{flag('label_column', label_column)}: for WebDataset shards it names the label member's "
            f"extension, one of {', '.join(LABEL_EXTS)}"
        )
    if label_column is None and len(present) > 1:
        raise FeatcacheError(
            f"{where}: samples have {len(present)} kinds of label member "
            f"({', '.join('KEY.' + e for e in present)}); choose the label with "
            f"{flag('label_column', present[0])}"
        )
    ext = label_column or (present[0] if present else None)
    lacking = [s.key for s in rows if ext not in s.labels]
    if ext is None or lacking:
        shown = ", ".join(repr(k) for k in lacking[:5])
        others = [e for e in present if e != ext]
        fix = (
            f"choose the label member they have: {flag('label_column', others[0])}"
            if others
            else "give every image a KEY.cls (an integer), KEY.txt (a class name) or KEY.json label"
        )
        raise FeatcacheError(
            f"{where}: {len(lacking)} samples have no label member KEY.{ext or 'cls|txt|json'} "
            f"({shown}); {fix}"
        )
    return [_label(s, ext, where) for s in rows]


def _label(s: ShardSample, ext: str, where: str) -> int | str:
    text, at = s.labels[ext], f"{where}: {s.key}.{ext}"
    if text is None or not text.strip():
        raise FeatcacheError(f"{at} is empty, longer than {_LABEL_BYTES} bytes or not UTF-8: not a label")
    if ext == "cls":
        try:
            return int(text.strip())
        except ValueError:
            raise FeatcacheError(f"{at} holds {text.strip()[:40]!r}, not an integer class index") from None
    if ext == "txt":
        return text.strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise FeatcacheError(f"{at} is not JSON") from None
    if isinstance(value, dict) and "label" in value:
        value = value["label"]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise FeatcacheError(
            f'{at} holds {str(value)[:60]}: a label is a JSON string or integer, or {{"label": ...}}'
        )
    return value


def class_names(values: Sequence[int | str], where: str) -> list[str]:
    """The sorted distinct labels as class names (integers in numeric order)."""
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        raise FeatcacheError(f"{where}: labels mix integers and strings; use one kind for every sample")
    return [str(v) for v in sorted(set(values))]  # type: ignore[type-var]


def shard_sets(
    spec: str,
    image_column: str | None = None,
    label_column: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    memo: VersionMemo | None = None,
    progress: bool = True,
) -> tuple[dict[str, SampleSet], list[str]]:
    """The samples of a shard spec by split (``all`` when it has none) and its class names.

    A folder with ``train/`` (and ``val/``, ``test/``) subfolders of shards has those splits; a folder
    of shards, one shard or a brace pattern is one set. Class names come from the training shards; a
    label that only val/test hold is refused (a head can only predict what it was trained on).

    Example:
        >>> sets, classes = shard_sets("shards/digits-{0..3}.tar")  # doctest: +SKIP
        >>> list(sets), len(classes)
        (['all'], 10)
    """
    path = Path(spec)
    if path.is_dir():
        parts = {n: sorted((path / n).glob("*.tar")) for n in ("train", "val", "test") if (path / n).is_dir()}
        if not parts.get("train"):
            parts = {"all": sorted(path.glob("*.tar"))}
        root = path
    else:
        parts = {"all": expand_shards(spec)}
        root = parts["all"][0].parent
    root = root.resolve()
    found: dict[str, tuple[list[Path], list[tuple[int, ShardSample]], list[int | str]]] = {}
    for name, shards in parts.items():
        if not shards:
            continue
        where = f"shards {spec!r}" + (f" ({name})" if name != "all" else "")
        rows = _rows(shard_index(shards, memo, progress), image_column, where)
        found[name] = (shards, rows, label_values([s for _, s in rows], label_column, where))
    first = "train" if "train" in found else "all"
    classes = class_names(found[first][2], f"shards {spec!r}")
    index = {c: i for i, c in enumerate(classes)}
    sets: dict[str, SampleSet] = {}
    for name, (shards, rows, values) in found.items():
        unknown = sorted({str(v) for v in values} - set(index))
        if unknown:
            raise FeatcacheError(
                f"shards {spec!r}: the {name} shards have labels the train shards lack: {unknown[:5]}; a "
                "head can only predict the classes it was trained on"
            )
        labels = np.asarray([index[str(v)] for v in values], dtype=np.int64)
        sets[name] = ShardSamples(root, shards, rows, labels, classes, max_pixels, name=str(spec))
    return sets, classes
