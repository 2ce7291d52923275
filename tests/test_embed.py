"""``featcache embed`` and ``FeatureDataset``: cached rows out, compared with ``CachedFeatures.tensor``."""

from __future__ import annotations

import csv
import json
import sys
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import tiny_resnet_on_digits
from featcache.backbones.registry import load_backbone
from featcache.cache.embed import EmbedConfig, write_embeddings
from featcache.cache.splits import CachedFeatures
from featcache.cli.main import main
from featcache.data.config import DataConfig
from featcache.extraction.build import extract_splits
from featcache.extraction.config import ExtractConfig

LAYER = "avgpool"


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """150 digits through a random-init ResNet-18 at 32 px, float32 and bfloat16 tables."""
    root = tmp_path_factory.mktemp("embed")
    bb = load_backbone("torchvision:resnet18", weights="none")
    splits = DataConfig("digits", limit=150).load()
    out: dict[str, Any] = {"cache": str(root / "cache"), "root": root}
    for dtype in ("float32", "bfloat16"):
        config = ExtractConfig(input_size=(32, 32), dtype=dtype)
        out[dtype] = extract_splits(bb, splits, [LAYER], config, cache_dir=out["cache"], progress=False)
    return out


def _expected(feats: dict[str, CachedFeatures], names: list[str]) -> tuple[torch.Tensor, list[list[str]]]:
    """The reference: each split's ``tensor(layer)`` one after the other, and its (split, id, digest,
    label, class) rows."""
    x = torch.cat([feats[n].tensor(LAYER).float() for n in names])
    rows = [
        [n, f.ids[i], f.digests[i], str(int(f.labels[i])), f.classes[int(f.labels[i])]]
        for n in names
        for f in [feats[n]]
        for i in range(len(f))
    ]
    return x, rows


def _embed_cli(cached: dict[str, Any], out: Path, *extra: str) -> None:
    args = ["embed", *tiny_resnet_on_digits(150), "--layer", LAYER, "--out", str(out), "-q"]
    assert main([*args, "--cache-dir", cached["cache"], *extra]) == 0


@pytest.mark.parametrize("split", ["all", "test"])
def test_embed_npy_and_csv_hold_the_cached_rows(
    cached: dict[str, Any], tmp_path: Path, split: str, capsys: pytest.CaptureFixture[str]
) -> None:
    feats = cached["float32"]
    _embed_cli(cached, tmp_path / "emb.npy", "--split", split)
    names = list(feats) if split == "all" else [split]
    want_x, want_rows = _expected(feats, names)
    got = np.load(tmp_path / "emb.npy")
    assert got.shape == tuple(want_x.shape) and got.dtype == np.float32
    assert torch.equal(torch.from_numpy(got), want_x)
    with (tmp_path / "emb.csv").open() as f:
        table = list(csv.reader(f))
    assert table[0] == ["row", "split", "id", "digest", "label", "class"]
    assert [r[1:] for r in table[1:]] == want_rows
    assert [int(r[0]) for r in table[1:]] == list(range(len(want_rows)))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"wrote {len(want_rows)} rows of {LAYER} (512, float32)" in last and "emb.csv" in last


def test_embed_parquet_holds_the_cached_rows(cached: dict[str, Any], tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    feats = cached["float32"]
    _embed_cli(cached, tmp_path / "emb.parquet")
    table = pq.read_table(tmp_path / "emb.parquet")
    want_x, want_rows = _expected(feats, list(feats))
    assert table.num_rows == len(want_x)
    got = torch.from_numpy(np.stack(table.column("features").to_numpy(zero_copy_only=False)))
    assert torch.equal(got, want_x)
    cols = [table.column(k).to_pylist() for k in ("split", "id", "digest", "label", "class")]
    assert [[str(v) for v in r] for r in zip(*cols, strict=True)] == want_rows
    meta = json.loads(table.schema.metadata[b"featcache"])
    assert meta["layer"] == LAYER and meta["shape"] == [512] and meta["classes"] == feats["train"].classes


def test_bfloat16_rows_are_written_exactly_as_float32(cached: dict[str, Any], tmp_path: Path) -> None:
    feats = cached["bfloat16"]
    done = write_embeddings(feats, LAYER, tmp_path / "bf.npy", "train")
    assert done.dtype == "float32"
    want = feats["train"].tensor(LAYER)
    assert want.dtype == torch.bfloat16
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "bf.npy")), want.float())


def _peak(run: Any) -> int:
    """The most memory Python allocated at once while ``run()`` ran (numpy's arrays included)."""
    tracemalloc.start()
    try:
        run()
        return int(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()


def test_embed_streams_in_chunks_never_the_whole_split(cached: dict[str, Any], tmp_path: Path) -> None:
    """Written a few rows at a time, the peak of memory allocated is below the one-chunk write's by at
    least half a split's bytes (a write that gathered a split would allocate them all at once),
    and the files are the same."""
    feats = cached["float32"]
    largest = max(f.features[LAYER].nbytes for f in feats.values())  # a split gathered at once
    one = _peak(lambda: write_embeddings(feats, LAYER, tmp_path / "one.npy", chunk_bytes=1 << 30))
    few = _peak(lambda: write_embeddings(feats, LAYER, tmp_path / "few.npy", chunk_bytes=7 * 512 * 4))
    assert one > largest  # the measure sees the rows
    assert few < one - largest / 2, (few, one, largest)
    assert (tmp_path / "one.npy").read_bytes() == (tmp_path / "few.npy").read_bytes()
    assert (tmp_path / "one.csv").read_text() == (tmp_path / "few.csv").read_text()


def test_embed_refuses_bad_output_split_and_missing_pyarrow(
    cached: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(ValueError, match=r"FILE\.npy .* or FILE\.parquet"):
        EmbedConfig("emb.txt")
    with pytest.raises(ValueError, match=r"unknown split 'tset'.*'test'"):
        EmbedConfig("emb.npy", split="tset")
    one = {"train": cached["float32"]["train"]}
    with pytest.raises(ValueError, match=r"no val split \(it has train\)"):
        write_embeddings(one, LAYER, tmp_path / "e.npy", "val")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` raises ImportError
    assert main(["embed", *tiny_resnet_on_digits(150), "--out", str(tmp_path / "e.parquet")]) == 2
    err = capsys.readouterr().err
    assert "needs pyarrow" in err and "featcache[parquet]" in err
    assert not list(tmp_path.iterdir())  # nothing written, nothing half-written


def test_a_dataloader_over_to_dataset_gives_the_cached_tensors(cached: dict[str, Any]) -> None:
    train = cached["float32"]["train"]
    ds = train.to_dataset()  # one layer: no need to name it
    x, y = train.tensor(LAYER), torch.as_tensor(train.labels)
    assert len(ds) == len(x)
    assert torch.equal(ds[3][0], x[3]) and int(ds[-1][1]) == int(y[-1])
    got = list(DataLoader(ds, batch_size=16))
    assert torch.equal(torch.cat([b[0] for b in got]), x) and torch.equal(torch.cat([b[1] for b in got]), y)
    # shuffled, the batches TensorDataset gives with the same generator
    ref = DataLoader(
        TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    ours = DataLoader(ds, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(1))
    for (a, ya), (b, yb) in zip(ref, ours, strict=True):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    bf = cached["bfloat16"]["train"].to_dataset(LAYER, dtype=torch.float32)
    assert torch.equal(
        next(iter(DataLoader(bf, batch_size=8)))[0], cached["bfloat16"]["train"].tensor(LAYER)[:8].float()
    )
    with pytest.raises(ValueError, match=r"layer 'layer3' is not in these rows; they hold \['avgpool'\]"):
        train.to_dataset("layer3")
