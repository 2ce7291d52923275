"""Sharded extraction under torchrun (2 CPU processes, gloo): the table one process writes, resumable."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, tiny_resnet_on_digits
from featcache import ExtractConfig, extract, load_backbone, load_dataset
from featcache.cache.store import FeatureCache

extract_mod = importlib.import_module("featcache.extraction.build")

LAYERS = ("layer2", "penultimate")
BASE = [
    *tiny_resnet_on_digits(),
    *("--layers", "layer2,penultimate", "--batch-size", "8", "-q"),
]


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node 2 ARGS``, from this virtualenv, on the CPU."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def single_process(cache_dir: Path) -> dict[str, object]:
    bb = load_backbone("torchvision:resnet18", weights="none")
    splits = load_dataset("digits", limit=150)
    cfg = ExtractConfig(input_size=(32, 32), batch_size=8, device="cpu")
    return {
        name: extract(bb, s, LAYERS, cfg, cache_dir=str(cache_dir), split=name, progress=False)
        for name, s in splits.items()
    }


def assert_same_entries(sharded: FeatureCache, reference: dict[str, object]) -> None:
    """Every split's rows, read by digest from the sharded cache's table, equal the reference's."""
    for ref in reference.values():
        table = sharded.open(ref.key)  # type: ignore[attr-defined]
        got, _ = table.view(table.index(), ref.digests, list(ref.features))  # type: ignore[attr-defined]
        for layer, arr in ref.features.items():  # type: ignore[attr-defined]
            np.testing.assert_allclose(got[layer], arr, rtol=1e-5, atol=1e-5)
        assert sharded.verify(ref.key) == []  # type: ignore[attr-defined]


@pytest.mark.slow
def test_two_processes_write_the_entry_one_process_would(tmp_path: Path) -> None:
    proc = torchrun("-m", "featcache", "extract", *BASE, "--cache-dir", str(tmp_path / "sharded"))
    lines = [ln for ln in proc.stdout.splitlines() if "rows" in ln]
    assert len(lines) == 3 and all("[built]" in ln for ln in lines), proc.stdout  # rank 0 prints, once
    assert all("0 from the cache" in ln for ln in lines), proc.stdout
    sharded = FeatureCache(tmp_path / "sharded")
    reference = single_process(tmp_path / "single")
    assert_same_entries(sharded, reference)
    (table,) = sharded.tables()  # one table: train, val and test are views over it
    by_process: dict[int, int] = {}
    for seg in table.index().segments:
        by_process[seg.info["process"]] = by_process.get(seg.info["process"], 0) + seg.rows
    assert set(by_process) == {0, 1}, by_process
    assert min(by_process.values()) >= sum(by_process.values()) // 3  # shares are similar
    # A second run finds the entries: nothing extracted, every rank agrees.
    again = torchrun("-m", "featcache", "extract", *BASE, "--cache-dir", str(tmp_path / "sharded"))
    assert again.stdout.count("[hit]") == 3


RESUME = """
import json, sys
from featcache import ExtractConfig, extract, load_backbone, load_dataset
from featcache.extraction.distributed import ranks_from_env
ranks = ranks_from_env()
bb = load_backbone("torchvision:resnet18", weights="none")
train = load_dataset("digits", limit=150).train
cfg = ExtractConfig(input_size=(32, 32), batch_size=8, device="cpu", shard_rows=16)
out = extract(bb, train, ["layer2", "penultimate"], cfg, cache_dir=sys.argv[1], progress=False, ranks=ranks)
ranks.close()
if ranks.is_main:
    print(json.dumps({k: out.manifest[k] for k in ("rows", "rows_extracted_this_run", "processes")}))
"""


@pytest.mark.slow
def test_sharded_run_resumes_a_partial_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bb = load_backbone("torchvision:resnet18", weights="none")
    train = load_dataset("digits", limit=150).train
    cfg = ExtractConfig(input_size=(32, 32), batch_size=8, device="cpu", shard_rows=16)
    real_run = extract_mod._run

    def first_two_shards(ex, job, table, pending, indices, *rest):  # type: ignore[no-untyped-def]
        real_run(ex, job, table, pending[:32], indices[:32], *rest)

    monkeypatch.setattr(extract_mod, "_run", first_two_shards)
    with pytest.raises(ValueError, match=f"holds no row for {len(train) - 32} of these"):  # 2 shards in
        extract(bb, train, LAYERS, cfg, cache_dir=str(tmp_path / "cache"), progress=False)
    monkeypatch.undo()
    script = tmp_path / "resume.py"
    script.write_text(RESUME)
    proc = torchrun(str(script), str(tmp_path / "cache"))
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info == {"rows": len(train), "rows_extracted_this_run": len(train) - 32, "processes": 2}
    reference = extract(bb, train, LAYERS, cfg, cache_dir=str(tmp_path / "single"), progress=False)
    assert_same_entries(FeatureCache(tmp_path / "cache"), {"train": reference})


DISAGREE = """
import sys
from featcache import ExtractConfig, extract, load_backbone, load_dataset
from featcache.extraction.distributed import ranks_from_env
ranks = ranks_from_env()
size = 32 if ranks.is_main else 40  # a flag that differs between ranks changes the key
cfg = ExtractConfig(input_size=(size, size), device="cpu")
try:
    extract(load_backbone("torchvision:resnet18", weights="none"), load_dataset("digits", limit=60).train,
            ["penultimate"], cfg, cache_dir=sys.argv[1], progress=False, ranks=ranks)
except ValueError as exc:
    print(f"rank {ranks.rank}: {exc}")
ranks.close()
"""


@pytest.mark.slow
def test_ranks_with_different_keys_stop_before_writing(tmp_path: Path) -> None:
    script = tmp_path / "disagree.py"
    script.write_text(DISAGREE)
    out = torchrun(str(script), str(tmp_path / "cache")).stdout
    assert out.count("the ranks disagree on the cache key") == 2, out  # both ranks, not a hang
    assert not [p for p in (tmp_path / "cache").glob("*") if not p.name.startswith(".")]


def test_other_verbs_refuse_to_run_once_per_rank(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from featcache.cli.main import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "torchvision:resnet18", "digits", "--out", "unused"]) == 2
    assert "only `extract` is sharded" in capsys.readouterr().err
