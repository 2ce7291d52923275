"""Cached rows out of featcache: one layer of a split's rows, with each image's id, content digest and
label, as ``.npy`` + ``.csv`` or as Parquet, for retrieval, UMAP or any other tool.

The rows are read from the table in chunks of about ``chunk_bytes`` and written as they are read, so a
split larger than RAM is written with one chunk in memory at a time. Each file is written under a
temporary name and renamed when complete: a killed ``embed`` leaves no half-written file under the
name asked for. Rows are read only through :class:`~featcache.cache.store.CachedFeatures` (its
``features``, ``ids``, ``digests``, ``labels``), never from the table's files directly.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .._errors import FeatcacheError, unknown
from .splits import CachedFeatures

#: what ``--split`` takes: one split, or every split one after the other
EMBED_SPLITS = ("train", "val", "test", "all")
#: the output formats, by the file's suffix
EMBED_SUFFIXES = (".npy", ".parquet")
#: rows are read and written in chunks of about this many bytes (as written)
CHUNK_BYTES = 64 << 20
#: the columns of the ``.csv`` beside a ``.npy`` (Parquet: the same, less ``row``, plus ``features``)
ROW_COLUMNS = ("row", "split", "id", "digest", "label", "class")
PARQUET_FIX = "pip install 'featcache[parquet]' (pyarrow), or write .npy (--out FILE.npy)"


@dataclass(frozen=True)
class EmbedConfig:
    """What ``featcache embed`` writes.

    Attributes:
        out: the output file: ``.npy`` (the features; a ``.csv`` of the rows, one line per row in the
            same order, is written beside it with the same stem) or ``.parquet`` (one row per image,
            the features as a list column; needs pyarrow: featcache[parquet]).
        layer: the one layer whose rows are written.
        split: train, val, test, or all (every split, one after the other; a split column says which).

    Example:
        >>> EmbedConfig("emb.parquet", split="test").split
        'test'
    """

    out: str
    layer: str = "penultimate"
    split: str = "all"

    def __post_init__(self) -> None:
        if self.split not in EMBED_SPLITS:
            raise unknown("split", self.split, EMBED_SPLITS, "Use --split train|val|test|all.")
        if Path(self.out).suffix not in EMBED_SUFFIXES:
            raise FeatcacheError(
                f"--out {self.out!r}: the format comes from the suffix: FILE.npy (features, with "
                "FILE.csv of ids, digests and labels beside it) or FILE.parquet (one row per image)"
            )
        if Path(self.out).suffix == ".parquet":
            require_pyarrow()


def require_pyarrow() -> Any:
    """The ``pyarrow`` module, or the error that names the extra that installs it."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as exc:
        raise FeatcacheError(f"writing Parquet needs pyarrow, which is not installed: {PARQUET_FIX}") from exc
    return pyarrow


@dataclass(frozen=True)
class Embedded:
    """What :func:`write_embeddings` wrote: the files, the rows and the shape and dtype of one row."""

    paths: tuple[Path, ...]
    rows: int
    row_shape: tuple[int, ...]
    dtype: str


def choose_splits(
    feats: Mapping[str, CachedFeatures] | CachedFeatures, split: str
) -> list[tuple[str, CachedFeatures]]:
    """The ``(name, rows)`` parts ``split`` names, in order; a split the dataset lacks is an error."""
    if isinstance(feats, CachedFeatures):
        return [(feats.result.split or split, feats)]
    parts = [(name, f) for name, f in feats.items() if split in ("all", name)]
    if not parts:
        raise FeatcacheError(
            f"--split {split}: this dataset has no {split} split (it has {', '.join(feats) or 'none'}); "
            "choose one of those, or --split all"
        )
    return parts


def _out_dtype(stored: str) -> np.dtype[Any]:
    """bfloat16 (stored as raw uint16) is written as float32, which holds it exactly; others as stored."""
    return np.dtype(np.float32) if stored == "bfloat16" else np.dtype(stored)


def _decoded(block: np.ndarray, stored: str) -> np.ndarray:
    """Rows as written: a bfloat16 row's 16 bits are the high half of its float32 (exact, no torch)."""
    if stored == "bfloat16":
        return (block.astype(np.uint32) << 16).view(np.float32)
    return block


def _chunks(
    parts: Sequence[tuple[str, CachedFeatures]], layer: str, chunk_bytes: int, progress: bool
) -> Iterator[tuple[str, CachedFeatures, int, np.ndarray]]:
    """``(split, rows, start, block)`` for consecutive chunks of every part: one chunk in memory at a time."""
    total = sum(len(f) for _, f in parts)
    bar = tqdm(total=total, desc="embed", unit="row", disable=not progress)
    for name, f in parts:
        view = f.features[layer]
        row_bytes = max(1, int(np.prod(view.shape[1:], dtype=np.int64)) * _out_dtype(f.dtype).itemsize)
        step = max(1, chunk_bytes // row_bytes)
        for start in range(0, len(f), step):
            block = _decoded(np.asarray(view[start : start + step]), f.dtype)
            yield name, f, start, block
            bar.update(len(block))
    bar.close()


def _row_fields(name: str, f: CachedFeatures, start: int, n: int) -> dict[str, list[Any]]:
    """The columns of rows ``start .. start + n`` of one part (not ``row``)."""
    labels = f.labels[start : start + n]
    return {
        "split": [name] * n,
        "id": [str(i) for i in f.ids[start : start + n]],
        "digest": list(f.digests[start : start + n]),
        "label": [int(y) for y in labels],
        "class": [f.classes[int(y)] for y in labels],
    }


def _check_parts(parts: Sequence[tuple[str, CachedFeatures]], layer: str) -> tuple[tuple[int, ...], str]:
    """One row shape and stored dtype for every part, and a digest per row (or nothing is written)."""
    for name, f in parts:
        if layer not in f.features:
            raise FeatcacheError(f"layer {layer!r} is not in the {name} rows; they hold {list(f.features)}")
        if len(f.digests) != len(f) or len(f.ids) != len(f):
            raise FeatcacheError(f"the {name} rows lack ids or digests: read them from a table (extract)")
    shapes = {tuple(f.features[layer].shape[1:]) for _, f in parts}
    dtypes = {f.dtype for _, f in parts}
    if len(shapes) != 1 or len(dtypes) != 1:
        raise FeatcacheError(f"the splits' rows of {layer!r} differ in shape or dtype: {shapes}, {dtypes}")
    return shapes.pop(), dtypes.pop()


def write_embeddings(
    feats: Mapping[str, CachedFeatures] | CachedFeatures,
    layer: str,
    out: str | os.PathLike[str],
    split: str = "all",
    chunk_bytes: int = CHUNK_BYTES,
    progress: bool = False,
) -> Embedded:
    """Write one layer of a split's cached rows, with each image's id, digest and label, in row order.

    ``FILE.npy`` holds the (N, ...) features and ``FILE.csv`` beside it one line per row (``row, split,
    id, digest, label, class``); ``FILE.parquet`` holds one row per image with the same columns and the
    features flattened into a ``features`` list column (the row shape, layer and classes are in the
    schema's ``featcache`` metadata). bfloat16 rows are written as float32 (exactly); Parquet writes
    float32. Rows are streamed in chunks of about ``chunk_bytes``: a split larger than RAM is written
    with one chunk in memory.

    Args:
        feats: the splits of :func:`~featcache.extraction.build.extract_splits` (or one split's rows).
        layer: the layer to write.
        out: the output file, ``.npy`` or ``.parquet``.
        split: ``train``, ``val``, ``test`` or ``all`` (one after the other).
        chunk_bytes: about how many bytes of rows are read and written at a time.
        progress: show a progress bar.

    Example:
        >>> feats = extract_splits(bb, load_dataset("digits"), ["avgpool"])  # doctest: +SKIP
        >>> write_embeddings(feats, "avgpool", "digits.parquet").rows  # doctest: +SKIP
        1797
    """
    config = EmbedConfig(str(out), layer, split)  # the suffix and split rules of the command line
    parts = choose_splits(feats, config.split)
    row_shape, stored = _check_parts(parts, layer)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = _chunks(parts, layer, chunk_bytes, progress)
    rows = sum(len(f) for _, f in parts)
    if path.suffix == ".parquet":
        meta = _metadata(parts, layer, row_shape, stored)
        paths: tuple[Path, ...] = (_write_parquet(path, chunks, row_shape, meta),)
    else:
        paths = _write_npy(path, chunks, (rows, *row_shape), _out_dtype(stored))
    return Embedded(paths, rows, row_shape, str(_out_dtype(stored)) if path.suffix == ".npy" else "float32")


def _metadata(
    parts: Sequence[tuple[str, CachedFeatures]], layer: str, row_shape: tuple[int, ...], stored: str
) -> dict[str, Any]:
    """What a Parquet file records about its rows (in the schema's ``featcache`` metadata)."""
    first = parts[0][1]
    return {
        "layer": layer,
        "shape": list(row_shape),
        "layout": first.layout(layer),
        "stored_dtype": stored,
        "model": first.result.stored_record.get("backbone"),
        "table": first.key,
        "splits": [name for name, _ in parts],
        "classes": list(first.classes),
    }


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_npy(
    path: Path,
    chunks: Iterator[tuple[str, CachedFeatures, int, np.ndarray]],
    shape: tuple[int, ...],
    dtype: Any,
) -> tuple[Path, Path]:
    """``path`` (.npy, its header first, then each chunk's bytes; no memory map) and its ``.csv``."""
    table = path.with_suffix(".csv")
    tmp_npy, tmp_csv = _tmp(path), _tmp(table)
    try:
        with tmp_npy.open("wb") as fx, tmp_csv.open("w", newline="") as fc:
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(fx, header)
            writer = csv.writer(fc)
            writer.writerow(ROW_COLUMNS)
            row = 0
            for name, f, start, block in chunks:
                fx.write(np.ascontiguousarray(block, dtype=dtype).tobytes())
                cols = _row_fields(name, f, start, len(block))
                for i in range(len(block)):
                    writer.writerow([row + i, *(cols[k][i] for k in ROW_COLUMNS[1:])])
                row += len(block)
        os.replace(tmp_npy, path)
        os.replace(tmp_csv, table)
    finally:
        tmp_npy.unlink(missing_ok=True)
        tmp_csv.unlink(missing_ok=True)
    return path, table


def _write_parquet(
    path: Path,
    chunks: Iterator[tuple[str, CachedFeatures, int, np.ndarray]],
    row_shape: tuple[int, ...],
    meta: dict[str, Any],
) -> Path:
    """``path`` (.parquet): a row group per chunk, the features as a fixed-size float32 list column."""
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    width = int(np.prod(row_shape, dtype=np.int64))
    schema = pa.schema(
        [
            ("split", pa.string()),
            ("id", pa.string()),
            ("digest", pa.string()),
            ("label", pa.int64()),
            ("class", pa.string()),
            ("features", pa.list_(pa.float32(), width)),
        ],
        metadata={"featcache": json.dumps(meta)},
    )
    tmp = _tmp(path)
    try:
        with pq.ParquetWriter(str(tmp), schema) as writer:
            for name, f, start, block in chunks:
                flat = np.ascontiguousarray(block, dtype=np.float32).reshape(-1)
                cols = _row_fields(name, f, start, len(block))
                features = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), width)
                arrays = [pa.array(cols[k], schema.field(k).type) for k in ROW_COLUMNS[1:]]
                writer.write_table(pa.Table.from_arrays([*arrays, features], schema=schema))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
