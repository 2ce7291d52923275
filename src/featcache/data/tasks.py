"""What a dataset's rows are labelled with: its task, read from a manifest's columns, never guessed.

* ``classify``: one class per image (a ``label`` column; every ImageFolder tree).
* ``multilabel``: a set of classes per image (a ``labels`` column: a JSON list, or ``a;b`` in a CSV cell).
* ``regress``: one or more float targets per image (a ``target`` column, or ``--targets COL,...``).

``--task`` (``DataConfig.task``) overrides what the columns say. A column that could mean two things is
refused with the fix, never reinterpreted: a ``label`` column whose cells all parse as numbers in a CSV
(``0.647`` would become one class per value), ``a;b`` in a ``label`` column (a combined class), more
classes than half the images. scikit-learn's ``type_of_target`` names what numbers look like.

Labels are views over rows, like splits: int64 class indices ``(N,)`` for ``classify``, float32 ``(N, K)``
(multi-hot, or the targets) otherwise. None of it enters a cache key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._util import FeatcacheError, label_array, unknown

__all__ = [
    "TASKS",
    "Targets",
    "check_task",
    "choose_columns",
    "label_array",
    "manifest_targets",
    "task_metric",
]

TASKS = ("classify", "multilabel", "regress")
AUTO = "auto"
#: the column each task reads when the manifest does not say otherwise
COLUMNS = {"classify": "label", "multilabel": "labels", "regress": "target"}
#: below this many images the "more classes than half the images" rule says nothing (smoke tests)
MIN_IMAGES_FOR_CLASS_RULE = 20


def check_task(task: str) -> None:
    """Refuse a task name that is not one of :data:`TASKS` (or ``auto``), naming them.

    Example:
        >>> check_task("regress")
    """
    if task not in (AUTO, *TASKS):
        raise unknown("task", task, (AUTO, *TASKS), "Use --task auto|classify|multilabel|regress.")


def task_metric(task: str) -> str:
    """The metric that chooses on val for ``task`` (higher is better): ``acc``, ``map`` or ``r2``.

    Example:
        >>> task_metric("multilabel")
        'map'
    """
    return {"classify": "acc", "multilabel": "map", "regress": "r2"}[task]


@dataclass(frozen=True)
class Targets:
    """A manifest's labels as arrays: the task, one row per image, and the class (or target) names."""

    task: str
    labels: np.ndarray
    classes: list[str]


def choose_columns(
    where: str, columns: Sequence[str], task: str, targets: Sequence[str]
) -> tuple[str, list[str]]:
    """(task, the columns it reads) from a manifest's ``columns``, ``--task`` and ``--targets``.

    Example:
        >>> choose_columns("m.csv", ["path", "labels"], "auto", ())
        ('multilabel', ['labels'])
    """
    check_task(task)
    have = set(columns)
    if targets:
        if task not in (AUTO, "regress"):
            raise FeatcacheError(
                f"--targets names float columns to regress on; it does not go with --task {task}"
            )
        lacking = [t for t in targets if t not in have]
        if lacking:
            raise FeatcacheError(
                f"{where} has no column {lacking[0]!r} (--targets); its columns: {sorted(have)}"
            )
        return "regress", list(targets)
    if task != AUTO:
        column = COLUMNS[task] if COLUMNS[task] in have else "label"
        if column not in have:
            raise FeatcacheError(
                f"{where} needs a header line with 'path' and '{COLUMNS[task]}' columns for --task {task} "
                f"(got {sorted(have)})"
            )
        return task, [column]
    found: list[str] = [c for c in ("label", "labels", "target") if c in have]
    if not found:
        raise FeatcacheError(
            f"{where} needs a header line with 'path' and 'label' columns (got {sorted(have)}); "
            f"e.g. path,label "
            "then cats/1.jpg,cat; or 'labels' (a set of classes per image: cat;indoor) or 'target' (a number)"
        )
    if len(found) > 1:
        raise FeatcacheError(
            f"{where} has columns {' and '.join(map(repr, found))}: say which to learn with --task "
            + "|".join(t for t, c in COLUMNS.items() if c in found)
        )
    return next(t for t, c in COLUMNS.items() if c == found[0]), found


def _number(cell: Any) -> float | None:
    """A cell as a float, or None when it is not a number (bools are not numbers)."""
    if isinstance(cell, bool):
        return None
    if isinstance(cell, (int, float)):
        return float(cell)
    if isinstance(cell, str):
        try:
            return float(cell.strip())
        except ValueError:
            return None
    return None


def _numbers_refusal(where: str, cells: Sequence[Any]) -> FeatcacheError:
    """Why a ``label`` column of numbers is not trained as classes, with scikit-learn's reading of it."""
    from sklearn.utils.multiclass import type_of_target

    values = np.asarray([_number(c) for c in cells], dtype=np.float64)
    kind = type_of_target(values)
    distinct = len(np.unique(values))
    if kind == "continuous":
        guess = f"they look like measurements (scikit-learn's type_of_target: {kind!r}, {distinct} values)"
    else:
        guess = f"they could be class ids or measurements (type_of_target: {kind!r}, {distinct} values)"
    return FeatcacheError(
        f"{where}: every label is a number ({', '.join(map(str, list(cells)[:3]))}, ...): "
        f"{guess}. Say what they "
        "are: --task regress to predict the number (or name the column 'target'), or --task classify if they "
        f"really are class ids ({distinct} classes)"
    )


def _class_cells(where: str, lines: Sequence[int], cells: Sequence[Any], csv: bool, auto: bool) -> list[str]:
    """The class name of every row of a ``label`` column; a column that means something else is refused."""
    for n, c in zip(lines, cells, strict=True):
        if auto and isinstance(c, str) and ";" in c:
            raise FeatcacheError(
                f"{where}, line {n}: label {c!r} holds ';': a set of classes is not one class. "
                f"Name the column "
                "'labels' (or pass --task multilabel) to learn each class on its own; a ';' inside one class "
                "name is not supported"
            )
        if auto and isinstance(c, float):
            raise FeatcacheError(
                f"{where}, line {n}: label {c!r} is a float: pass --task regress to predict the "
                f"number (or name "
                "the key 'target'), or write class names as strings"
            )
    if auto and csv and all(_number(c) is not None for c in cells):
        raise _numbers_refusal(where, cells)
    names = [str(c) for c in cells]
    distinct = len(set(names))
    if auto and len(names) >= MIN_IMAGES_FOR_CLASS_RULE and distinct > len(names) / 2:
        raise FeatcacheError(
            f"{where}: {distinct} classes for {len(names)} images (more than half the images): "
            f"no split can hold "
            "every class. If the labels are values, pass --task regress; if they are classes, pass --task "
            "classify and give each class more images"
        )
    return names


def _label_set(where: str, n: int, cell: Any) -> list[str]:
    """One ``labels`` cell as a list of class names: a JSON list (JSONL, or its text in a CSV) or ``a;b``."""
    if isinstance(cell, str) and cell.strip().startswith("["):
        try:
            cell = json.loads(cell)
        except json.JSONDecodeError:
            raise FeatcacheError(
                f'{where}, line {n}: labels {cell!r} is not a JSON list; write a;b or ["a", "b"]'
            ) from None
    if isinstance(cell, str):
        parts = [p.strip() for p in cell.split(";")]
        if not cell.strip() or any(not p for p in parts):
            raise FeatcacheError(
                f"{where}, line {n}: labels {cell!r} has an empty class; write a;b (or [] for an image with "
                "none of the classes)"
            )
        return parts
    if isinstance(cell, list) and all(isinstance(c, str) and c.strip() for c in cell):
        return [c.strip() for c in cell]
    raise FeatcacheError(
        f"{where}, line {n}: labels {cell!r} is not a set of class names; write a;b in a CSV, or a JSON list "
        'of strings ["a", "b"]'
    )


def _values(
    where: str, lines: Sequence[int], columns: list[str], rows: Sequence[dict[str, Any]]
) -> np.ndarray:
    """The float targets of every row, (N, len(columns)); a cell that is not a finite number is refused."""
    out = np.zeros((len(rows), len(columns)), dtype=np.float32)
    for i, (n, row) in enumerate(zip(lines, rows, strict=True)):
        for j, col in enumerate(columns):
            v = _number(row.get(col))
            if v is None or not math.isfinite(v):
                raise FeatcacheError(
                    f"{where}, line {n}: target {col!r} is {row.get(col)!r}, not a finite number; give every "
                    "row a number (or remove the row)"
                )
            out[i, j] = v
    return out


def manifest_targets(
    where: str,
    lines: Sequence[int],
    rows: Sequence[dict[str, Any]],
    task: str,
    columns: list[str],
    csv: bool,
    auto: bool,
) -> Targets:
    """The labels of a manifest's ``rows`` for ``task`` read from ``columns`` (:func:`choose_columns`).

    Example:
        >>> t = manifest_targets("m.csv", [2, 3], [{"labels": "a;b"}, {"labels": "b"}], "multilabel",
        ...                      ["labels"], csv=True, auto=True)
        >>> t.classes, t.labels.tolist()
        (['a', 'b'], [[1.0, 1.0], [0.0, 1.0]])
    """
    if task == "regress":
        return Targets(task, _values(where, lines, columns, rows), list(columns))
    cells = [r.get(columns[0]) for r in rows]
    if task == "classify":
        names = _class_cells(where, lines, cells, csv, auto)
        classes = sorted(set(names))
        index = {c: i for i, c in enumerate(classes)}
        return Targets(task, np.asarray([index[c] for c in names], dtype=np.int64), classes)
    sets = [_label_set(where, n, c) for n, c in zip(lines, cells, strict=True)]
    classes = sorted({c for s in sets for c in s})
    if not classes:
        raise FeatcacheError(f"{where}: no image has any label; a multi-label set needs at least one class")
    index = {c: i for i, c in enumerate(classes)}
    hot = np.zeros((len(sets), len(classes)), dtype=np.float32)
    for i, s in enumerate(sets):
        hot[i, [index[c] for c in s]] = 1.0
    return Targets(task, hot, classes)
