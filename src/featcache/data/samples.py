"""Datasets: image folders, CSV/JSONL manifests, torchvision datasets on disk, arrays, bundled sets.

Every sample has a stable id (relative path, or index for array sets) and an integer label;
class names are kept. A dataset spec resolves to train/val/test :class:`SampleSet` splits::

    path/to/tree            ImageFolder (train/ val/ test/ subfolders used when present)
    path/to/labels.csv      ``path,label`` rows (paths relative to the file); .jsonl likewise
    torchvision:CIFAR10:ROOT   a torchvision dataset already on disk (MNIST, CIFAR100, STL10 ...)
    mnist-5k | digits | faces  real labelled images shipped inside PyPI wheels
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import os
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .._util import FeatcacheError, flag
from .config import BAD_IMAGE_POLICIES, DEFAULT_MAX_PIXELS  # noqa: F401  (defined there, without torch)
from .digests import DigestMemo, SampleChangedError, bytes_digest, digests_of, pixels_digest
from .tasks import label_array

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_PIL_LIMIT_LOCK = threading.Lock()
#: in the reason recorded for an image refused by the pixel limit: a higher limit retries it
TOO_LARGE = "(a decompression bomb?)"


class BadImageError(FeatcacheError):
    """An image could not be decoded; the message names the file and the reason."""


class SampleSet(abc.ABC):
    """An indexable set of labelled images with stable ids and a content digest per sample.

    Subclasses implement :meth:`load` (a PIL image for one index), :meth:`_content_digests` and
    :meth:`_fingerprint_rows`.
    """

    def __init__(
        self,
        ids: Sequence[str],
        labels: np.ndarray,
        classes: Sequence[str],
        name: str,
        task: str = "classify",
    ) -> None:
        if len(ids) != len(labels):
            raise FeatcacheError(f"{name}: {len(ids)} ids but {len(labels)} labels")
        self.ids = list(ids)
        #: ``classify``, ``multilabel`` or ``regress`` (:mod:`featcache.data.tasks`)
        self.task = task
        # int64 class indices, or float32 (N, K) multi-hot rows / targets
        self.labels = label_array(labels, task)
        self.classes = list(classes)  # class names, or the names of the regression targets
        self.name = name

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        # A notebook prints this: counts and where the images come from, never the ids or class names.
        name = "" if self.name == self.source else f"{self.name!r}, "
        return (
            f"{type(self).__name__.lstrip('_')}({name}{len(self)} images, {len(self.classes)} classes, "
            f"from {self.source!r})"
        )

    @property
    def source(self) -> str:
        """The dataset the samples come from (a folder, a manifest, ``digits``); a split's is its parent's.

        Example:
            >>> tiny = ArraySamples(np.zeros((4, 2, 2), np.uint8), [0, 1, 0, 1], name="tiny")
            >>> tiny.subset([0, 1], "train").source
            'tiny'
        """
        return self.name

    @abc.abstractmethod
    def load(self, index: int) -> Image.Image:
        """Decode sample ``index`` as a PIL image (raises on a bad image)."""

    def describe(self, index: int) -> str:
        """Where sample ``index`` comes from, for error messages."""
        return f"{self.name}[{self.ids[index]}]"

    @abc.abstractmethod
    def _fingerprint_rows(self, h: Any, rows: np.ndarray | None = None) -> None:
        """Feed what identifies the content of ``rows`` (all when None) into hash ``h``.

        File stats or pixel bytes; a split hashes only its own rows, not the whole parent set.
        """

    def fingerprint(self) -> str:
        """SHA-256 of the manifest: ids, labels, classes and file sizes/mtimes or pixel bytes (computed
        once per object: a run reads its files' stats once)."""
        cached: str | None = getattr(self, "_fingerprint", None)
        if cached is None:
            h = hashlib.sha256()
            h.update(json.dumps([self.ids, self.classes]).encode())
            h.update(self.labels.tobytes())
            self._fingerprint_rows(h)
            cached = self._fingerprint = h.hexdigest()
        return cached

    def digests(self, memo: DigestMemo | None = None, progress: bool = False) -> list[str]:
        """The content digest of every sample, in order: SHA-256 of a file's bytes, or of an in-memory
        image's pixels and shape (:mod:`featcache.data.digests`). Computed once per object; ``memo``
        spares re-reading files whose path, size and mtime it knows.

        Example:
            >>> s = ArraySamples(np.zeros((2, 4, 4), np.uint8), [0, 1])
            >>> d = s.digests()
            >>> d[0] == d[1] and len(d[0]) == 64  # equal pixels, one digest
            True
        """
        cached: list[str] | None = getattr(self, "_digest_list", None)
        if cached is None:
            cached = self._digest_list = self._content_digests(memo, progress)
        return cached

    def digest(self, index: int) -> str:
        """The content digest of sample ``index`` (see :meth:`digests`)."""
        return self.digests()[index]

    def forget_digests(self) -> None:
        """Drop the digests computed so far (a file was found to differ from its memoised digest)."""
        self.__dict__.pop("_digest_list", None)

    def file_path(self, index: int) -> str | None:
        """The file sample ``index`` is read from (None for in-memory samples)."""
        return None

    @abc.abstractmethod
    def _content_digests(self, memo: DigestMemo | None, progress: bool) -> list[str]:
        """Compute the digest of every sample."""

    def load_checked(self, index: int, digest: str) -> Image.Image:
        """:meth:`load`, raising :class:`SampleChangedError` if the sample no longer has ``digest``.

        In-memory samples cannot change under a run; files override this to hash the bytes they decode.
        """
        return self.load(index)

    def strata(self) -> np.ndarray:
        """What a seeded split keeps the proportions of: the class of each image; one group for the other
        tasks (a plain seeded split).

        Example:
            >>> ArraySamples(np.zeros((3, 2, 2), np.uint8), [0, 1, 1]).strata().tolist()
            [0, 1, 1]
        """
        return self.labels if self.task == "classify" else np.zeros(len(self), dtype=np.int64)

    def subset(self, indices: Sequence[int] | np.ndarray, name: str) -> SampleSet:
        """A view on some rows (used for splits)."""
        return _Subset(self, np.asarray(indices, dtype=np.int64), name)

    def problems(self, indices: Sequence[int], progress: bool = False) -> dict[int, str]:
        """``{index: why}`` of the samples among ``indices`` that cannot be decoded, found by a cheap
        pass over the files' headers (size against the pixel limit, structure), before any backbone
        runs: every bad file of a run is named at once. Memoised per object.

        Example:
            >>> ArraySamples(np.zeros((2, 4, 4), np.uint8), [0, 1]).problems([0, 1])
            {}
        """
        seen: dict[int, str] = self.__dict__.setdefault("_problems", {})
        todo = [i for i in dict.fromkeys(int(i) for i in indices) if i not in seen]
        bar = tqdm(todo, desc="check images", unit="img", delay=1, disable=not progress or not todo)
        for i in bar:
            seen[i] = self._problem(i)
        return {int(i): seen[int(i)] for i in indices if seen[int(i)]}

    def _problem(self, index: int) -> str:
        """Why sample ``index`` cannot be decoded, from a cheap look ("" when it looks fine). In-memory
        samples are decoded already."""
        return ""


class _Subset(SampleSet):
    def __init__(self, parent: SampleSet, indices: np.ndarray, name: str) -> None:
        ids, labels = list(map(parent.ids.__getitem__, indices.tolist())), parent.labels[indices]
        super().__init__(ids, labels, parent.classes, name, parent.task)
        self.parent, self.indices = parent, indices

    @property
    def source(self) -> str:
        return self.parent.source

    def load(self, index: int) -> Image.Image:
        return self.parent.load(int(self.indices[index]))

    def describe(self, index: int) -> str:
        return self.parent.describe(int(self.indices[index]))

    def _content_digests(self, memo: DigestMemo | None, progress: bool) -> list[str]:
        parent = self.parent.digests(memo, progress)
        return list(map(parent.__getitem__, self.indices.tolist()))

    def load_checked(self, index: int, digest: str) -> Image.Image:
        return self.parent.load_checked(int(self.indices[index]), digest)

    def forget_digests(self) -> None:
        super().forget_digests()
        self.parent.forget_digests()

    def file_path(self, index: int) -> str | None:
        return self.parent.file_path(int(self.indices[index]))

    def problems(self, indices: Sequence[int], progress: bool = False) -> dict[int, str]:
        mine = [int(self.indices[i]) for i in indices]  # the parent's memo serves every split
        found = self.parent.problems(mine, progress)
        return {int(i): found[m] for i, m in zip(indices, mine, strict=True) if m in found}

    def _fingerprint_rows(self, h: Any, rows: np.ndarray | None = None) -> None:
        mine = self.indices if rows is None else self.indices[rows]
        h.update(mine.tobytes())
        self.parent._fingerprint_rows(h, mine)


class FileSamples(SampleSet):
    """Images on disk; ids are paths relative to ``root``."""

    def __init__(
        self,
        root: Path,
        paths: Sequence[Path | str],
        labels: np.ndarray,
        classes: Sequence[str],
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        task: str = "classify",
    ) -> None:
        self.root = Path(root)
        self.max_pixels = max_pixels  # travels with the object into DataLoader workers: no global
        # Names as strings, not a Path object per file: a million-image folder lists in about its stats.
        self._top = str(self.root).rstrip(os.sep) + os.sep  # a sample's file is _top + its id
        ids = [p if type(p) is str and p[:1] != os.sep else self._relative(Path(p)) for p in paths]
        #: (folder, file names) of consecutive ids when the samples come from a folder scan, until their
        #: digests are computed: the groups the digest memo is keyed by, known without splitting every
        #: path again; else None
        self._listing: list[tuple[str, list[str]]] | None = None
        super().__init__(ids, labels, classes, name=str(root), task=task)

    @classmethod
    def from_listing(
        cls,
        root: Path,
        listing: Sequence[tuple[str, list[str]]],
        labels: np.ndarray,
        classes: Sequence[str],
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> FileSamples:
        """The images of a folder scan: ``listing`` holds (folder relative to ``root``, file names) in
        sample order; the ids are ``folder/name``.

        Example:
            >>> listing = [("cat", ["1.png", "2.png"])]
            >>> s = FileSamples.from_listing(Path("/data"), listing, np.zeros(2, int), ["cat"])
            >>> s.ids
            ['cat/1.png', 'cat/2.png']
        """
        # an empty set of this root, then its ids as the scan made them: relative by construction, so not
        # checked one by one as the constructor checks given paths (a million-image scan skips 0.2 s)
        samples = cls(root, [], np.zeros(0, np.int64), classes, max_pixels)
        ids = [f"{folder}/{n}" for folder, names in listing for n in names]
        SampleSet.__init__(samples, ids, labels, classes, name=str(root))
        samples._listing = [(folder, list(names)) for folder, names in listing]
        return samples

    def _relative(self, p: Path) -> str:
        return p.relative_to(self.root).as_posix() if p.is_absolute() else p.as_posix()

    @property
    def paths(self) -> list[Path]:
        """Each sample's path relative to ``root``."""
        return [Path(i) for i in self.ids]

    def _abs(self, index: int) -> Path:
        return Path(self._top + self.ids[index])

    def file_path(self, index: int) -> str | None:
        return self._top + self.ids[index]

    def load(self, index: int) -> Image.Image:
        path = self._abs(index)
        return decode_image(path, self.max_pixels, str(path))

    def describe(self, index: int) -> str:
        return str(self._abs(index))

    def _problem(self, index: int) -> str:
        path = self._abs(index)
        try:
            with pixel_limit(self.max_pixels), Image.open(path) as im:
                check_pixels(im.size, self.max_pixels, str(path))
                im.verify()  # structure and checksums (PNG CRCs), no pixel decoding
                if im.format == "JPEG" and not _jpeg_ends(path):  # verify() does not read JPEG data
                    return "truncated JPEG: no end-of-image marker (the file was cut short)"
        except FileNotFoundError:
            return ""  # not a bad image: the decode names the vanished file (SampleChangedError)
        except Image.DecompressionBombError as exc:
            return str(_too_large(str(path), _pillow_size(exc), self.max_pixels))
        except BadImageError as exc:
            return str(exc)
        except (OSError, ValueError, SyntaxError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return ""

    def _content_digests(self, memo: DigestMemo | None, progress: bool) -> list[str]:
        memo = memo or DigestMemo(None)
        if self._listing is not None:
            listing, self._listing = self._listing, None  # used once: the digests are kept
            return memo.folder_digests([(self._top + folder, names) for folder, names in listing], progress)
        return memo.file_digests([self._top + i for i in self.ids], progress)

    def load_checked(self, index: int, digest: str) -> Image.Image:
        """Decode the very bytes that hash to ``digest`` (read once), or raise naming the file."""
        path = self._abs(index)
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise SampleChangedError(
                f"image {str(path)!r} vanished during this run; run the command again to list the dataset "
                "anew (rows extracted so far are kept)"
            ) from exc
        return decode_checked(data, digest, str(path), self.max_pixels)

    def _fingerprint_rows(self, h: Any, rows: np.ndarray | None = None) -> None:
        for i in range(len(self)) if rows is None else rows.tolist():
            try:
                st = self._abs(i).stat()
            except FileNotFoundError as exc:
                raise FileNotFoundError(
                    f"image {self.describe(i)!r} listed in the dataset is missing"
                ) from exc
            h.update(f"{st.st_size}:{st.st_mtime_ns};".encode())


class ArraySamples(SampleSet):
    """Images in an array: (N, H, W) grey or (N, H, W, C) / (N, C, H, W) colour; uint8 or [0, 1] floats."""

    def __init__(
        self, images: np.ndarray, labels: Any, classes: Sequence[str] | None = None, name: str = "array"
    ):
        images = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
            images = images.transpose(0, 2, 3, 1)
        if images.ndim not in (3, 4):
            raise FeatcacheError(
                f"{name}: images must be (N,H,W), (N,H,W,C) or (N,C,H,W), got {images.shape}"
            )
        if images.dtype != np.uint8:
            scale = 255.0 if float(images.max(initial=0)) <= 1.0 else 1.0
            images = np.clip(images.astype(np.float64) * scale, 0, 255).round().astype(np.uint8)
        labels = np.asarray(labels.numpy() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
        classes = list(classes) if classes is not None else [str(c) for c in range(int(labels.max()) + 1)]
        self.images = images
        super().__init__([f"{i:06d}" for i in range(len(images))], labels, classes, name)

    def load(self, index: int) -> Image.Image:
        a = self.images[index]
        return Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a)

    def _content_digests(self, memo: DigestMemo | None, progress: bool) -> list[str]:
        return digests_of(len(self), lambda i: pixels_digest(self.images[i]), progress, self.name)

    def _fingerprint_rows(self, h: Any, rows: np.ndarray | None = None) -> None:
        images = self.images if rows is None else self.images[rows]
        h.update(str(images.shape).encode())
        h.update(np.ascontiguousarray(images).tobytes())


class TorchvisionSamples(SampleSet):
    """A torchvision dataset object (``ds[i] -> (PIL image, label)``)."""

    def __init__(self, ds: Any, name: str) -> None:
        targets = getattr(ds, "targets", None)
        if targets is None:
            targets = getattr(ds, "labels", None)
        if targets is None:
            targets = [ds[i][1] for i in range(len(ds))]
        labels = np.asarray(targets.numpy() if isinstance(targets, torch.Tensor) else targets, dtype=np.int64)
        classes = getattr(ds, "classes", None) or [str(c) for c in range(int(labels.max()) + 1)]
        self.ds = ds
        super().__init__([f"{i:06d}" for i in range(len(ds))], labels, classes, name)

    def load(self, index: int) -> Image.Image:
        img = self.ds[index][0]
        return img if isinstance(img, Image.Image) else Image.fromarray(np.asarray(img))

    def _content_digests(self, memo: DigestMemo | None, progress: bool) -> list[str]:
        """The rows of ``ds.data`` when it has them (CIFAR, MNIST), the files of ``ds.samples``
        (ImageFolder-like), else each decoded image."""
        data = getattr(self.ds, "data", None)
        if data is not None:
            arr = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
            return digests_of(len(self), lambda i: pixels_digest(arr[i]), progress, self.name)
        files = getattr(self.ds, "samples", None)
        if isinstance(files, list) and len(files) == len(self) and all(isinstance(f, tuple) for f in files):
            return (memo or DigestMemo(None)).file_digests([f[0] for f in files], progress)
        return digests_of(len(self), lambda i: image_digest(self.load(i)), progress, self.name)

    def _fingerprint_rows(self, h: Any, rows: np.ndarray | None = None) -> None:
        data = getattr(self.ds, "data", None)
        if data is not None:
            arr = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
            h.update(np.ascontiguousarray(arr if rows is None else arr[rows]).tobytes())
            return
        root = Path(getattr(self.ds, "root", "."))
        for p in sorted(root.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())


def image_digest(img: Image.Image) -> str:
    """The digest of a decoded PIL image: mode, size, palette and pixel bytes."""
    h = hashlib.sha256(f"image|{img.mode}|{img.size}|".encode())
    palette = img.getpalette()
    if palette is not None:
        h.update(bytes(palette))
    h.update(img.tobytes())
    return h.hexdigest()


@contextmanager
def pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Inside, Pillow's own decompression-bomb check lets through what featcache's limit does (which
    :func:`check_pixels` applies from the header), and its warning is silenced.

    Pillow's limit is a process-wide global (``Image.MAX_IMAGE_PIXELS``). It is left alone whenever it
    refuses nothing the limit takes (the default, and any lower limit); only a limit above twice
    Pillow's (or none) sets it aside, under a lock and for the decode alone, then puts it back.

    Example:
        >>> with pixel_limit(10**9):
        ...     Image.MAX_IMAGE_PIXELS is None
        True
    """
    pil = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if pil is None or (max_pixels is not None and max_pixels <= 2 * pil):
            yield
            return
        with _PIL_LIMIT_LOCK:
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                yield
            finally:
                Image.MAX_IMAGE_PIXELS = saved


def check_pixels(size: tuple[int, int], max_pixels: int | None, where: str) -> None:
    """Refuse an image of ``size`` (W, H) with more than ``max_pixels`` pixels, naming the file and
    the fix.

    Example:
        >>> check_pixels((100, 100), 10_000, "a.png")
    """
    pixels = size[0] * size[1]
    if max_pixels is not None and pixels > max_pixels:
        raise _too_large(where, f"{size[0]}x{size[1]} = {pixels:,} pixels", max_pixels)


def _too_large(where: str, size: str, max_pixels: int | None) -> BadImageError:
    limit = f"{max_pixels:,}" if max_pixels is not None else "Pillow's"
    raise_to = flag("max_image_pixels", 4 * (max_pixels or DEFAULT_MAX_PIXELS))
    return BadImageError(
        f"image {where!r} is {size}, more than the limit of {limit} pixels {TOO_LARGE}, so it "
        f"is not decoded. If it is a real image, raise the limit: {raise_to}, or --max-image-pixels off"
    )


def decode_checked(
    data: bytes, digest: str, where: str, max_pixels: int | None, why: str = ""
) -> Image.Image:
    """Decode the very bytes that hash to ``digest`` (a sample's row key), or raise
    :class:`SampleChangedError` naming ``where`` (``why``: what changed it, for the message).

    Example:
        >>> decode_checked(png_bytes, bytes_digest(png_bytes), "a.png", None)  # doctest: +SKIP
    """
    if bytes_digest(data) != digest:
        raise SampleChangedError(
            f"image {where!r} changed during this run (its bytes no longer hash to the digest read at the "
            f"start{why}); run the command again once it is stable (rows extracted so far are kept)"
        )
    return decode_image(io.BytesIO(data), max_pixels, where)


def decode_image(src: str | os.PathLike[str] | IO[bytes], max_pixels: int | None, where: str) -> Image.Image:
    """Fully decode an image, refused from its header when it has more than ``max_pixels`` pixels.

    Raises:
        BadImageError: too many pixels (also for a frame Pillow finds too large), naming ``where``.
        OSError, ValueError, SyntaxError: as Pillow raises them for other bad files.

    Example:
        >>> decode_image("cat.png", DEFAULT_MAX_PIXELS, "cat.png").size  # doctest: +SKIP
        (64, 64)
    """
    try:
        with pixel_limit(max_pixels), Image.open(src) as im:
            check_pixels(im.size, max_pixels, where)
            im.load()
            return im.copy()
    except Image.DecompressionBombError as exc:  # Pillow's own check (beyond twice its limit), or a frame
        raise _too_large(where, _pillow_size(exc), max_pixels) from exc
    except Image.UnidentifiedImageError as exc:  # its text names a BytesIO where bytes were read first
        raise BadImageError(
            f"cannot read image {where!r}: UnidentifiedImageError: not an image, or a format Pillow "
            "cannot read"
        ) from exc


def _pillow_size(exc: Exception) -> str:
    """The pixel count in the text of Pillow's DecompressionBombError, for our message."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    return f"{int(found.group(1)):,} pixels" if found else "too large"


def read_image(path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode an image file (raises ``BadImageError`` naming the file)."""
    try:
        return decode_image(path, max_pixels, str(path))
    except BadImageError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise BadImageError(f"cannot read image {str(path)!r}: {type(exc).__name__}: {exc}") from exc


def image_paths(target: str | Path) -> list[Path]:
    """An image file, or every image file under a folder (sorted)."""
    p = Path(target)
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS)
    if p.is_file():
        return [p]
    raise FileNotFoundError(f"{str(p)!r} is neither an image file nor a folder")


def _jpeg_ends(path: Path) -> bool:
    """Whether a JPEG file holds its end-of-image marker near its end (a file cut short does not)."""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4096))
        return b"\xff\xd9" in f.read()
