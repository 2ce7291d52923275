"""What a run trained on, per split: its images and labels as content keys, so ``--resume`` can refuse
other data and name what changed (an added image, a label fix)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from .._util import FeatcacheError
from ..cache.housekeeping import cache_root
from ..data.datasets import DatasetSplits
from ..data.digests import DIGEST_MEMO, DigestMemo
from .folder import RunFolder
from .record import FinetunePart, TrainPart


def split_contents(
    splits: DatasetSplits, cache_dir: str | None = None, progress: bool = False
) -> dict[str, dict[str, Any]]:
    """Each split's content as a fine-tuning run records it: its image count and SHA-256 keys of its
    images (the content digests, as a set), of its labels (each digest with its class name) and of the
    whole split in order (``key``, the run's ``split_keys``). A resume compares them
    (:func:`check_same_data`): a label fix or an added image is named, never trained on silently.

    Example:
        >>> split_contents(load_dataset("digits", seed=0))["train"]["images"]  # doctest: +SKIP
        1258
    """
    memo = DigestMemo(cache_root(cache_dir) / DIGEST_MEMO)
    out: dict[str, dict[str, Any]] = {}
    every: tuple[list[str], list[str]] = ([], [])
    for name, samples in splits.items():
        digests = samples.digests(memo, progress)
        named = [f"{d} {_label(splits, y)}" for d, y in zip(digests, samples.labels)]
        out[name] = _content(digests, named, splits.classes)
        every[0].extend(digests)
        every[1].extend(named)
    # the whole dataset too: a label fix that a stratified split answers by moving images between the
    # splits is named as what it is
    return {DATASET: _content(*every, splits.classes), **out}


def _label(splits: DatasetSplits, y: Any) -> str:
    """A label as text: a class's name (a renumbering shows), else the label set's or targets' values."""
    if splits.task == "classify":
        return json.dumps(splits.classes[int(y)])
    return json.dumps(np.asarray(y, dtype=np.float64).tolist())


#: the entry of :func:`split_contents` for all splits together (not a split: never in ``split_keys``)
DATASET = "dataset"


def _content(digests: list[str], named: list[str], classes: list[str]) -> dict[str, Any]:
    return {
        "images": len(digests),
        "images_key": _sha("\n".join(sorted(set(digests)))),
        "labels_key": _sha("\n".join(sorted(set(named)))),
        "key": _sha(json.dumps(list(classes)) + "\n" + "\n".join(named)),
    }


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_same_data(run_dir: Path, contents: dict[str, dict[str, Any]]) -> None:
    """Refuse to resume the run in ``run_dir`` (a ``train`` or ``finetune`` run, whose part records its
    split contents) on data other than it trained on, naming what changed per split (images added or
    removed, labels changed, the order).

    Example:
        >>> check_same_data(Path("runs/ft"), split_contents(splits))  # doctest: +SKIP
    """
    part = RunFolder(run_dir).read_config().part
    fix = "resume with the data the run was made with, or start a new run (another --out, or --overwrite)"
    if not isinstance(part, (TrainPart, FinetunePart)):
        raise FeatcacheError(f"--resume {run_dir}: it is not a train or finetune run; {fix}")
    old = part.split_contents
    changes = []
    for name in sorted(set(old) | set(contents), key=lambda n: (n != DATASET, n)):
        a, b = old.get(name), contents.get(name)
        if not isinstance(a, dict) or b is None:
            changes.append(f"the {name} split {'is new' if b is not None else 'is gone'}")
        elif a.get("images_key") != b["images_key"]:
            changes.append(
                f"{name}: other images ({a.get('images')} -> {b['images']}; added, removed or edited)"
            )
        elif a.get("labels_key") != b["labels_key"]:
            changes.append(f"{name}: the same {b['images']} images with other labels (a label fix?)")
        elif a.get("key") != b["key"]:
            changes.append(f"{name}: the same images and labels in another order, or other class names")
    if changes:
        raise FeatcacheError(
            f"--resume {run_dir}: the data changed since the run started: {'; '.join(changes)}; {fix}"
        )
