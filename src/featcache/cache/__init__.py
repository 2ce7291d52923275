"""The feature store: rows of backbone activations keyed by image content, in crash-safe tables.

Design
------
**Tables.** A *feature table* holds the rows of one extraction setting. Its key is the SHA-256 of a
typed record of everything that decides a row's values and nothing else (:class:`~featcache.cache.
identity.TableRecord`, built by :func:`featcache.extraction.build.cache_record`): backbone spec and
weights digest, resolved preprocessing, layers, pooling, storage dtype, AMP, the augmented view's
index and augmentation, and :data:`CACHE_VERSION`. Labels, split membership, dataset names, paths
and row order are not part of it.

**Rows.** A row is keyed by its image's content digest (:mod:`featcache.data.digests`): SHA-256 of the
file's bytes, or of the pixels and shape for in-memory sets. Two files with the same bytes are one row.
Paths only memoise digests: ``<root>/.digests.sqlite3`` keeps, per folder, each file's stat data as
git's index keys it (size, mtime, ctime, inode, device) and its digest, so an unchanged file is not
read twice. An augmented view seeds its randomness with (digest, view index),
so a view's row is reusable across datasets too.

**Splits are views.** A dataset split is an ordered list of digests plus labels. Extraction computes the
digests, looks them up, runs the backbone only on the digests the table lacks, and appends them; the
split is then read as :class:`~featcache.cache.splits.CachedFeatures` whose ``features[layer]`` is a
:class:`~featcache.cache.rows.RowView` (rows gathered through the shards' memory maps on demand).
Relabelling, redrawing a split, k folds, or a second dataset over the same images cost no forward pass.

**Appends.** New rows go to new shards of whole batches (so a resumed append forms the same batches as
an uninterrupted one and stores the same bytes), each written to a temporary name and renamed, then
committed by an index segment written last (:mod:`featcache.cache.writer`). A SIGKILL at any moment
loses at most the uncommitted shard; the next run extracts only what no segment holds. A file lock
per table serialises appenders (the second re-reads the index and finds the first's rows: nothing is
lost or duplicated); readers take no lock. Under ``torchrun`` rank 0 holds the lock and the ranks deal
the missing rows' shards round-robin, each committing its own segments.

**Trust.** Nothing read from disk is used unchecked. A table is opened only if its record hashes to
its folder's name and reads as a record; every index segment is checked on open (its own SHA-256,
every field, the table's layers), so a damaged one is an error, never a ``KeyError`` or rows under
the wrong image; each shard's SHA-256 is checked when its first row is read in a process (memoised per
file version; ``--no-verify`` skips only this). No name from a record, a segment or the user becomes a
path: shard files are named by segment (a checked pattern) and layer position, and every file opened
is checked to lie inside its table (:func:`featcache._util.check_name` and :func:`~featcache._util.
inside` for code that must turn a name into a path). A damaged table is an error that names
``featcache cache rm KEY`` and is never used.

**Housekeeping** (:mod:`featcache.cache.housekeeping`). ``cache verify`` checks every segment and shard
checksum; ``cache ls/info`` show entries (model, the datasets read from them, input size, layers, rows,
size, last use; damaged entries as such, folders that are not entries named and left alone);
``cache rm`` removes entries by key or filter (``--model``, ``--dataset``, ``--older-than``);
``cache gc`` removes old-format entries, files no segment references, tables unused for
``--unused-days``, and least recently used tables beyond ``--max-size``; ``cache compact`` rewrites a
fragmented table into few segments, copying rows byte for byte.

The names below are imported on first use (PEP 562): the command line's ``cache`` flags come from
:mod:`~featcache.cache.housekeeping` without loading numpy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_names

# name -> the module of this package that defines it
_HOMES = {
    "CACHE_VERSION": "identity",
    "CacheScan": "housekeeping",
    "CachedFeatures": "splits",
    "ChannelStats": "splits",
    "EmbedConfig": "embed",
    "FeatureDataset": "dataset",
    "FeatureCache": "store",
    "FeatureTable": "table",
    "GcLimits": "housekeeping",
    "RowView": "rows",
    "Selection": "housekeeping",
    "SplitResult": "splits",
    "cache_key": "table",
    "cache_root": "housekeeping",
    "write_embeddings": "embed",
}

__all__ = sorted(_HOMES)

if TYPE_CHECKING:  # what type checkers see; at run time, __getattr__ imports on demand
    from .dataset import FeatureDataset  # noqa: F401
    from .embed import EmbedConfig, write_embeddings  # noqa: F401
    from .housekeeping import CacheScan, GcLimits, Selection, cache_root  # noqa: F401
    from .identity import CACHE_VERSION  # noqa: F401
    from .rows import RowView  # noqa: F401
    from .splits import CachedFeatures, ChannelStats, SplitResult  # noqa: F401
    from .store import FeatureCache  # noqa: F401
    from .table import FeatureTable, cache_key  # noqa: F401

__getattr__, __dir__ = lazy_names(__name__, _HOMES)
