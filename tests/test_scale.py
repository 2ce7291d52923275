"""`featcache bench --only scale`: the synthetic table in the real format and each operation against its
floor, end to end on a small tree (the figures themselves are the benchmark's, not the test's)."""

from __future__ import annotations

import re
from pathlib import Path

from featcache.tools.scale import scale_rows


def test_the_scale_bench_runs_every_operation_on_a_small_tree(tmp_path: Path) -> None:
    # a row's name without its figures: "scale: add 1 % / (hit + its extraction) (100 new)"
    rows = {re.sub(r" /? ?\(.*", "", r["name"]): r for r in scale_rows(10_000, tmp_path)}
    assert set(rows) == {
        "scale: hit / scandir+stat",
        "scale: add 1 %",
        "scale: cache ls",
        "scale: index parse",
        "scale: train epoch / matmul floor",
        "scale: probe's own peak RSS / table float32 size",
    }
    assert all(r["featcache_s"] > 0 and r["baseline_s"] > 0 for r in rows.values())
    # 1 % of 10,000 images went through the backbone, nothing else
    assert rows["scale: add 1 %"]["name"].endswith("(100 new)")
