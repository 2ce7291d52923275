"""``FeatureDataset``: a cached split as a torch ``Dataset`` of ``(features, label)``, for any
``DataLoader`` (your own training loop, Lightning, a k-NN index builder).

Rows are read from the table's shard memory maps when indexed, never all at once: a split larger than
RAM works. A batch the ``DataLoader`` asks for is gathered in one read (``__getitems__``), in the order
of the shards, rather than row by row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .._errors import FeatcacheError
from .rows import to_torch
from .splits import CachedFeatures


class FeatureDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """One layer of a cached split as ``(features, label)`` pairs: what ``TensorDataset(cached.tensor(
    layer), labels)`` gives, without loading the split into memory.

    Args:
        cached: the split's rows (:func:`~featcache.extraction.build.extract` or ``extract_splits``).
        layer: the layer to serve; may be left out when the rows hold one layer.
        dtype: cast the features to this dtype (default: as stored; bfloat16 rows as ``torch.bfloat16``).

    Example:
        >>> loader = DataLoader(cached.to_dataset("penultimate"), batch_size=256)  # doctest: +SKIP
        >>> x, y = next(iter(loader))  # doctest: +SKIP
    """

    def __init__(
        self, cached: CachedFeatures, layer: str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        names = list(cached.features)
        if layer is None:
            if len(names) != 1:
                raise FeatcacheError(f"these rows hold {len(names)} layers ({names}): name one (layer=...)")
            layer = names[0]
        if layer not in cached.features:
            raise FeatcacheError(f"layer {layer!r} is not in these rows; they hold {names}")
        self.layer = layer
        self.rows = cached.features[layer]
        self.stored = cached.dtype
        self.dtype = dtype
        self.labels = torch.as_tensor(np.asarray(cached.labels, dtype=np.int64))
        self.classes = list(cached.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (
            f"FeatureDataset(layer={self.layer!r}, rows={len(self)}, row_shape={tuple(self.rows.shape[1:])})"
        )

    def _tensor(self, block: np.ndarray) -> torch.Tensor:
        t = to_torch(block, self.stored)
        return t if self.dtype is None else t.to(self.dtype)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = int(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        i %= len(self)
        return self._tensor(np.asarray(self.rows[i : i + 1]))[0], self.labels[i]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A batch's rows in one gathered read (the ``DataLoader`` calls this with a batch's indices)."""
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"rows {indices} out of range for {len(self)} rows")
        idx %= max(1, len(self))
        x = self._tensor(np.asarray(self.rows[idx]))
        y = self.labels[torch.from_numpy(idx)]
        return list(zip(x.unbind(0), y.unbind(0), strict=True))
