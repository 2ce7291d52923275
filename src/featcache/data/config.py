"""``DataConfig``: a dataset spec with how it is split (fractions, seed, limit)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .._checks import check_number
from .._errors import FeatcacheError, flag, unknown
from .tasks import AUTO, check_task

if TYPE_CHECKING:
    from .datasets import DatasetSplits

# This module imports no torch: the command line checks these settings before loading any model.

BAD_IMAGE_POLICIES = ("error", "skip")
#: Pillow's own default limit (a 1/4 GiB 24-bit image): more pixels than this is a bad image
DEFAULT_MAX_PIXELS = 1024 * 1024 * 1024 // 4 // 3
AUGMENTS = ("flip", "crop")


def normalize_augment(spec: str | None) -> str | None:
    """``spec`` with blanks and repeats dropped (``" flip,,flip"`` -> ``"flip"``); unknown names raise.

    Example:
        >>> normalize_augment("flip, crop,flip")
        'flip,crop'
    """
    if spec is None:
        return None
    parts = list(dict.fromkeys(p.strip() for p in spec.split(",") if p.strip()))
    for p in parts:
        if p not in AUGMENTS:
            raise unknown("augmentation", p, AUGMENTS, "Use --augment flip,crop.")
    if not parts:
        raise FeatcacheError(f"--augment {spec!r} names no augmentation; use flip, crop or flip,crop")
    return ",".join(parts)


@dataclass(frozen=True)
class DataConfig:
    """A dataset spec and how it is split.

    Attributes:
        spec: folder, .csv/.jsonl manifest, torchvision:NAME:ROOT, mnist-5k, digits or faces;
            WebDataset shards (NAME-{000000..000099}.tar, one .tar, a folder of them); a Hugging Face
            dataset (a save_to_disk folder, or hf-dataset:REPO[:CONFIG] from the hub).
        val_fraction: share of the training images held out for validation (when there is no val/).
        test_fraction: share held out for testing (when there is no test/).
        seed: seed of the split (each image placed by a hash of the seed and its content) and of
            --limit's sample.
        limit: keep at most N samples, stratified.
        download: let torchvision:NAME:ROOT datasets download.
        max_image_pixels: an image file with more pixels (width x height, read from its header) is a
            bad image (--on-bad-image decides), never decoded: a guard against decompression bombs;
            off: no limit. The default is Pillow's own.
        image_column: the image column of a Hugging Face dataset (default: its one Image feature); for
            WebDataset shards, the image member's extension (jpg, png, webp ...).
        label_column: the label column of a Hugging Face dataset (default: its one ClassLabel feature);
            for WebDataset shards, the label member's extension (cls, txt or json).
        task: what the labels are: auto (a manifest's columns say: label classify, labels multilabel,
            target regress; folders and built-in sets classify), classify, multilabel (a set of classes
            per image) or regress (float targets). Recorded with the run, never in a cache key.
        targets: a manifest's columns of float targets to regress on (implies --task regress).

    Example:
        >>> DataConfig("mnist-5k", val_fraction=0.2).load().classes[:3]  # doctest: +SKIP
        ['0', '1', '2']
    """

    spec: str
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    limit: int | None = None
    download: bool = False
    max_image_pixels: int | None = field(
        default=DEFAULT_MAX_PIXELS,
        metadata={"none": "off", "shown": f"{DEFAULT_MAX_PIXELS:,}, Pillow's limit"},
    )
    image_column: str | None = None
    label_column: str | None = None
    task: str = AUTO
    targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_task(self.task)
        object.__setattr__(self, "targets", tuple(str(t) for t in self.targets))
        if self.targets and self.task not in (AUTO, "regress"):
            raise FeatcacheError(
                f"--targets {','.join(self.targets)} regresses on those columns; it does not go with "
                f"--task {self.task}: leave one out"
            )
        check_number("val_fraction", self.val_fraction, 0, 1, high_open=True)
        check_number("test_fraction", self.test_fraction, 0, 1, high_open=True)
        if self.val_fraction + self.test_fraction >= 1:
            raise FeatcacheError(
                f"{flag('val_fraction', self.val_fraction)} and {flag('test_fraction', self.test_fraction)} "
                "leave no training images: their sum must be below 1"
            )
        check_number("seed", self.seed, 0, 2**63 - 1, integer=True, option="--split-seed")
        check_number("limit", self.limit, 1, integer=True, none="no limit")
        check_number("max_image_pixels", self.max_image_pixels, 1, integer=True, none="off")

    def load(self, cache_dir: str | None = None) -> DatasetSplits:
        """The train/val/test splits of a dataset its task can learn: for a classifier, two classes or
        more; for multi-label, a class with images on the training split (the memos of WebDataset shards
        and of file digests read from ``cache_dir``'s root: the seeded split places each image by its
        content digest, which extraction needs next anyway)."""
        # here, not at the top: the config is read before torch is imported
        from .._disk import cache_root
        from .datasets import load_dataset
        from .digests import DIGEST_MEMO, DigestMemo

        splits = load_dataset(
            self.spec,
            self.val_fraction,
            self.test_fraction,
            self.seed,
            self.download,
            self.limit,
            max_image_pixels=self.max_image_pixels,
            image_column=self.image_column,
            label_column=self.label_column,
            cache_dir=cache_dir,
            task=self.task,
            targets=self.targets,
            memo=DigestMemo(cache_root(cache_dir) / DIGEST_MEMO),
        )
        if splits.task == "multilabel" and not splits.train.labels.any():
            raise FeatcacheError(
                f"no image of the training split of {self.spec!r} has any of its "
                f"{len(splits.classes)} labels: "
                "nothing to learn; check the 'labels' column"
            )
        if splits.task != "classify":
            return splits
        if len(splits.classes) < 2:
            found = f"one class, {splits.classes[0]!r}" if splits.classes else "no classes"
            raise FeatcacheError(
                f"dataset {self.spec!r} has {found}: a classifier needs at least two. Give each class "
                "its own folder (ROOT/CLASS/image.png), or a manifest with two labels or more"
            )
        present = sorted({int(c) for c in splits.train.labels})
        if len(present) < 2:  # classes named, but the training split holds one (a split column, --limit)
            only = f"only class {splits.classes[present[0]]!r}" if present else "no images"
            raise FeatcacheError(
                f"the training split of {self.spec!r} holds {only} of {len(splits.classes)}: a classifier "
                "needs images of at least two classes to train on. Raise --limit (limit=), or give the "
                "train split images of every class"
            )
        return splits
