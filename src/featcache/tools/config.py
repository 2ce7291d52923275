"""What ``featcache bench`` measures and at what sizes, without torch: the command line checks its
options before loading any model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .._checks import check_number
from .._errors import unknown


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of the benchmark workload.

    ``map_layer`` at ``map_input_size`` is the spatial map the reference ``SimpleClassifier`` setting of
    the trainer benchmark trains on (``blocks.2`` of EfficientNet-Lite0: 40x28x28 at 224 px).

    Example:
        >>> BenchConfig().epochs
        10
    """

    model: str = "efficientnet-lite0"
    limit: int = 2000
    input_size: tuple[int, int] = (64, 64)
    epochs: int = 10
    batch_size: int = 256
    files: int = 512
    bare_batches: int = 8
    map_layer: str = "blocks.2"
    map_input_size: tuple[int, int] = (224, 224)
    store_images: int = 2000
    #: images of the ``scale`` benchmark's folder and table (``bench --only scale --rows N``)
    scale_rows: int = 200_000


QUICK = BenchConfig(
    limit=300,
    input_size=(32, 32),
    epochs=3,
    files=64,
    bare_batches=2,
    map_input_size=(64, 64),
    store_images=200,
)


BENCHMARKS = (
    "e2e",
    "extract_vs_bare",
    "files_vs_tensors",
    "trainer",
    "finetune",
    "cache_hit",
    "probe",
    "knn",
    "relabel_rerun",
    "added_images",
    "content_digests",
    "startup",
    "linear_sweep",
    "gpu",
    "scale",
)
#: run only when named (--only): they build large folders or need a GPU
_ON_REQUEST = ("gpu", "scale")


def check_bench_options(only: Sequence[str] | None, repeats: int) -> None:
    """Refuse an unknown benchmark name (with the closest ones) or a repeat count below 1.

    Example:
        >>> check_bench_options(["probe", "knn"], 3)
    """
    check_number("repeats", repeats, 1, integer=True)
    for name in only or ():
        if name not in BENCHMARKS:
            raise unknown("benchmark", name, BENCHMARKS, f"--only takes names of {', '.join(BENCHMARKS)}.")
