"""Fault injection on the cache (issue #16): planted records and segments, hostile layer and file names,
flipped bits and truncated files of every kind, SIGKILLs of an extraction. Each ends in the right rows
or a named error (exit 2 from the command line) that says how to remove the table; never in a file
outside the cache or rows used silently."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import featcache.cache.table as table_module
from conftest import random_image
from featcache._util import FeatcacheError, check_name, inside
from featcache.backbones.registry import Backbone, load_backbone
from featcache.cache.store import FeatureCache
from featcache.cache.table import CheckedShard, FeatureTable, cache_key
from featcache.cache.writer import segment_checksum, write_segment
from featcache.cli.main import main
from featcache.data.samples import ArraySamples
from featcache.extraction.build import cache_record, extract
from featcache.extraction.config import ExtractConfig

LAYERS = ("layer3", "penultimate")  # a map (rows + channel statistics) and a vector


def _samples(n: int, seed: int = 0) -> ArraySamples:
    rng = np.random.default_rng(seed)
    images = np.stack([np.asarray(random_image(rng, (36, 36))) for _ in range(n)])
    return ArraySamples(images, np.arange(n) % 3, ["a", "b", "c"], name=f"faults-{seed}")


def _config(**kw: Any) -> ExtractConfig:
    base = {"input_size": (32, 32), "device": "cpu", "batch_size": 4, "shard_rows": 4, "pool": "none"}
    return ExtractConfig(**{**base, **kw})


def _read(backbone: Backbone, samples: ArraySamples, root: Path, **kw: Any) -> dict[str, np.ndarray]:
    """Extract (a hit when the table is whole) and gather every row, as training would."""
    feats = extract(backbone, samples, LAYERS, _config(**kw), cache_dir=str(root), progress=False)
    out = {k: np.asarray(v) for k, v in feats.features.items()}
    out |= {
        f"{k}.{s}": np.asarray(getattr(v, s)) for k, v in feats.channel_stats.items() for s in ("mean", "var")
    }
    return out


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def backbone() -> Backbone:
    return load_backbone("torchvision:resnet18", weights="none")


@pytest.fixture(scope="module")
def pristine(backbone: Backbone, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One table of 12 rows in 3 segments, and its rows read back (the reference every case must
    either reproduce or refuse)."""
    root = tmp_path_factory.mktemp("pristine") / "cache"
    samples = _samples(12)
    rows = _read(backbone, samples, root)
    (key,) = FeatureCache(root).entries()
    return {"root": root, "key": key, "samples": samples, "rows": rows}


def _copy(pristine: dict[str, Any], tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "cache"
    shutil.copytree(pristine["root"], root)
    return root, root / pristine["key"]


def _segment_files(entry: Path) -> list[Path]:
    return sorted((entry / "segments").glob("*.json"))


def _rewrite_segment(file: Path, edit: Any) -> None:
    """Edit a segment and give it a matching checksum: what a planted (not a damaged) segment looks like."""
    meta = json.loads(file.read_text())
    edit(meta)
    meta["checksum"] = segment_checksum(meta)
    file.write_text(json.dumps(meta))


# --------------------------------------------------------------------------- names and paths


def test_check_name_and_inside_refuse_what_leaves_a_folder(tmp_path: Path) -> None:
    for bad in ("", ".", "..", "../x", "a/b", "/abs", "a\\b", "a\0b", 3, None):
        with pytest.raises(FeatcacheError, match="cannot be a file name"):
            check_name(bad, "layer name")
    assert check_name("layer4.1.conv2", "layer name") == "layer4.1.conv2"
    (tmp_path / "entry").mkdir()
    (tmp_path / "outside").write_text("x")
    (tmp_path / "entry" / "link").symlink_to(tmp_path / "outside")
    assert inside(tmp_path / "entry", "shards/a.npy") == str(tmp_path / "entry" / "shards" / "a.npy")
    for bad in ("../outside", "/etc/passwd", "link", "shards/../../outside"):
        with pytest.raises(FeatcacheError, match="leads outside"):
            inside(tmp_path / "entry", bad)


def test_a_record_that_does_not_hash_to_its_key_is_not_used(
    backbone: Backbone, pristine: dict[str, Any], tmp_path: Path
) -> None:
    root, entry = _copy(pristine, tmp_path)
    doc = json.loads((entry / "table.json").read_text())
    doc["record"]["layers"] = ["../../../escape-record"]  # planted: it no longer hashes to the key
    (entry / "table.json").write_text(json.dumps(doc))
    before = _files(tmp_path)
    with pytest.raises(FeatcacheError, match=rf"does not hash to its name.*cache rm {pristine['key'][:12]}"):
        _read(backbone, pristine["samples"], root)
    with pytest.raises(FeatcacheError, match="does not hash"):
        FeatureCache(root).verify(pristine["key"])
    assert {p for p in _files(tmp_path) if "escape" in p.name} == set()
    assert _files(tmp_path) - before <= _files(root)  # nothing written outside the cache


def test_hostile_layer_names_in_a_record_never_become_paths(tmp_path: Path) -> None:
    """A record that does hash to its key (anyone can make one) with layer names that are paths: the
    table's files are named by layer position, so everything stays inside the table."""
    root = tmp_path / "deep" / "c2" / "cache"
    layers = ["../../../escape-record", "/tmp/escape-abs", "a/../../b"]
    record = {"layers": sorted(layers), "dtype": "float32", "backbone": "planted"}
    table = FeatureTable.create(root / cache_key(record), record)
    arrays = {name: np.full((2, 3), i, np.float32) for i, name in enumerate(table.layers)}
    digests = [f"{i:064x}" for i in range(2)]
    write_segment(table.path, table.layers, arrays, digests, {}, "float32", {}, layouts=dict.fromkeys(layers))
    assert all(p.is_relative_to(table.path) for p in _files(tmp_path))
    feats, _ = table.view(table.index(), digests, table.layers)
    for name in table.layers:
        assert np.array_equal(np.asarray(feats[name]), arrays[name])
    assert table.verify() == []


def test_layer_names_given_to_extract_never_write_outside_the_cache(tmp_path: Path) -> None:
    model = nn.Sequential()
    model.add_module("x/y", nn.Conv2d(3, 4, 3, padding=1))  # torch allows '/' in a module name
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    backbone = load_backbone(model)
    root, samples = tmp_path / "cache", _samples(6)
    feats = extract(backbone, samples, ["x/y"], _config(), cache_dir=str(root), progress=False)
    assert feats.features["x/y"].shape == (6, 4, 32, 32)
    assert all(p.is_relative_to(root) for p in _files(tmp_path))
    entries = FeatureCache(root).entries()
    for hostile in ("../../escape", "/tmp/escape", "nosuchlayer"):
        with pytest.raises(FeatcacheError, match="unknown layer"):
            extract(backbone, samples, [hostile], _config(), cache_dir=str(root), progress=False)
    assert all(p.is_relative_to(root) for p in _files(tmp_path))
    assert FeatureCache(root).entries() == entries  # refused before a table of them was created


@pytest.mark.parametrize("kind", ["../../../../escape", "/etc/passwd", "rows/../../x"])
def test_a_planted_segment_naming_files_outside_is_refused(
    backbone: Backbone, pristine: dict[str, Any], tmp_path: Path, kind: str
) -> None:
    root, entry = _copy(pristine, tmp_path)
    seg = _segment_files(entry)[1]

    def plant(meta: dict[str, Any]) -> None:
        meta["layers"]["layer3"]["files"][kind] = {"sha256": "0" * 64, "bytes": 1}

    _rewrite_segment(seg, plant)
    with pytest.raises(FeatcacheError, match=rf"{seg.name}.*unreadable.*files.*cache rm"):
        _read(backbone, pristine["samples"], root)
    problems = FeatureCache(root).verify(pristine["key"])
    assert len(problems) == 1 and problems[0].startswith(f"segments/{seg.name}: unreadable")


def test_a_shard_that_links_outside_the_table_is_refused(
    backbone: Backbone, pristine: dict[str, Any], tmp_path: Path
) -> None:
    root, entry = _copy(pristine, tmp_path)
    shard = entry / "shards" / f"{_segment_files(entry)[0].stem}.1.npy"
    outside = tmp_path / "outside.npy"
    shutil.move(shard, outside)  # the very same bytes, but outside the table
    shard.symlink_to(outside)
    with pytest.raises(FeatcacheError, match=r"leads outside the table.*cache rm"):
        _read(backbone, pristine["samples"], root)
    assert FeatureCache(root).verify(pristine["key"]) == [
        f"shards/{shard.name}: leads outside the table (a symbolic link?)"
    ]


@pytest.mark.parametrize(
    "edit",
    [
        "swap-digests",
        "digest-of-another-image",
        "duplicate-digest",
        "digests-not-records",
        "rows-count",
        "shape-string",
        "dtype-unknown",
        "layer-missing",
        "extra-layer-on-empty",
        "bytes-missing",
        "rows-missing",
        "not-an-object",
    ],
)
def test_malformed_or_planted_segments_are_named_errors(
    backbone: Backbone, pristine: dict[str, Any], tmp_path: Path, edit: str
) -> None:
    """Damaged index segments and digests files (checksums kept stale) and planted ones (checksums
    recomputed): each is a named error on open and in `cache verify`, never a KeyError or rows under
    the wrong image."""
    root, entry = _copy(pristine, tmp_path)
    seg = _segment_files(entry)[1]
    index_file = entry / "shards" / f"{seg.stem}.digests.npy"
    meta, records = json.loads(seg.read_text()), np.load(index_file)

    def swap(m: dict[str, Any], r: np.ndarray) -> None:
        r[[0, 1]] = r[[1, 0]]

    edits: dict[str, Any] = {  # (segment fields, digest records) -> edited in place
        "swap-digests": swap,
        "digest-of-another-image": lambda m, r: r.__setitem__(0, 0xFF),
        "duplicate-digest": lambda m, r: r.__setitem__(1, r[0]),
        "digests-not-records": "float",
        "rows-count": lambda m, r: m.__setitem__("rows", 5),
        "shape-string": lambda m, r: m["layers"]["penultimate"].__setitem__("shape", "512"),
        "dtype-unknown": lambda m, r: m["layers"]["penultimate"].__setitem__("dtype", "object"),
        "layer-missing": lambda m, r: m["layers"].pop("penultimate"),
        "extra-layer-on-empty": lambda m, r: m.update(rows=0, layers={"../../x": {}}),
        "bytes-missing": lambda m, r: m["layers"]["layer3"]["files"]["rows"].pop("bytes"),
        "rows-missing": lambda m, r: m.pop("rows"),
        "not-an-object": None,
    }
    for planted in (False, True):
        if edits[edit] is None:
            seg.write_text("[1, 2, 3]\n")
        else:
            damaged, rec = json.loads(json.dumps(meta)), records.copy()
            if edits[edit] == "float":
                np.save(index_file, rec.astype(np.float64))
            else:
                edits[edit](damaged, rec)
                np.save(index_file, rec)
            if planted:  # the digests file's record and the segment's checksum made to match
                data = index_file.read_bytes()
                damaged["digests"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                damaged["checksum"] = segment_checksum(damaged)
            seg.write_text(json.dumps(damaged))
        if edit == "swap-digests" and planted:
            # A consistent planted index is an index: its rows are served under its digests. Only a
            # damaged (stale-checksum) one could be told apart; planting needs write access anyway.
            continue
        if edit == "digest-of-another-image" and planted:  # a consistent index lacking one image's row,
            rows = _read(backbone, pristine["samples"], root)  # which is extracted again (a batch of one)
            # Float32 sums in another order (a batch of one, several threads): equal to the layer's scale.
            for k, v in pristine["rows"].items():
                np.testing.assert_allclose(rows[k], v, rtol=1e-5, atol=1e-5 * float(np.abs(v).max()))
            continue
        with pytest.raises(FeatcacheError, match=rf"index segment .*{seg.name}.* is unreadable.*cache rm"):
            _read(backbone, pristine["samples"], root)
        problems = FeatureCache(root).verify(pristine["key"])
        assert len(problems) == 1 and problems[0].startswith(f"segments/{seg.name}: unreadable"), problems
        if edit.endswith("-missing") and edit != "layer-missing":  # named as the field it lacks
            assert "missing field '" in problems[0], problems


# --------------------------------------------------------------------------- damaged bytes

_KINDS = {
    "rows": lambda e: e / "shards" / f"{_segment_files(e)[1].stem}.0.npy",
    "vector-rows": lambda e: e / "shards" / f"{_segment_files(e)[2].stem}.1.npy",
    "mean": lambda e: e / "shards" / f"{_segment_files(e)[0].stem}.0.mean.npy",
    "var": lambda e: e / "shards" / f"{_segment_files(e)[2].stem}.0.var.npy",
    "segment": lambda e: _segment_files(e)[1],
    "digests": lambda e: e / "shards" / f"{_segment_files(e)[1].stem}.digests.npy",
    "table.json": lambda e: e / "table.json",
}


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how.startswith("flip"):
        at = {"flip-start": 8, "flip-header": 30, "flip-middle": len(data) // 2, "flip-end": len(data) - 2}[
            how
        ]
        data[at] ^= 0x10
    elif how == "truncate-1":
        data = data[:-1]
    elif how == "truncate-half":
        data = data[: len(data) // 2]
    else:
        data = bytearray()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "how", ["flip-start", "flip-header", "flip-middle", "flip-end", "truncate-1", "truncate-half", "empty"]
)
@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_every_damaged_file_is_caught_never_used(
    backbone: Backbone, pristine: dict[str, Any], tmp_path: Path, kind: str, how: str
) -> None:
    root, entry = _copy(pristine, tmp_path)
    _damage(_KINDS[kind](entry), how)
    try:
        rows = _read(backbone, pristine["samples"], root)
    except FeatcacheError as exc:
        assert f"cache rm {pristine['key'][:12]}" in str(exc), str(exc)
    else:  # only a damage that changes nothing read may pass: JSON whitespace, table.json's creation time
        assert kind in ("table.json", "segment"), f"damaged {kind} read without an error"
        assert all(np.array_equal(rows[k], v) for k, v in pristine["rows"].items())
        return
    try:
        problems = FeatureCache(root).verify(pristine["key"])
    except FeatcacheError as exc:  # a table.json that is no table record
        assert kind == "table.json" and "cache rm" in str(exc)
    else:
        assert problems, f"cache verify missed a damaged {kind}"


def test_the_command_line_exits_2_naming_cache_rm(
    pristine: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, entry = _copy(pristine, tmp_path)
    _damage(_KINDS["rows"](entry), "flip-middle")
    key = pristine["key"]
    assert main(["cache", "verify", key[:8], "--cache-dir", str(root)]) == 2
    out = capsys.readouterr()
    assert "checksum mismatch" in out.out and f"cache rm {key[:8]}" in out.err and "Traceback" not in out.err
    _damage(_segment_files(entry)[0], "truncate-half")
    assert main(["cache", "info", key[:8], "--cache-dir", str(root)]) == 0  # info shows it as damaged
    assert '"damaged"' in capsys.readouterr().out


def test_a_damaged_shard_stops_training_and_extract_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "cache"
    data = [
        "torchvision:resnet18",
        "digits",
        "--weights",
        "none",
        "--limit",
        "30",
        "--input-size",
        "32",
        "32",
    ]
    common = [*data, "--cache-dir", str(root), "--device", "cpu", "-q"]
    assert main(["extract", *common, "--layers", "layer4"]) == 0
    capsys.readouterr()
    (key,) = FeatureCache(root).entries()
    shard = sorted((root / key / "shards").glob("*.npy"))[0]
    _damage(shard, "flip-end")
    code = main(["train", *common, "--layer", "layer4", "--epochs", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and f"cache rm {key[:12]}" in err and "Traceback" not in err, err
    # extract does not call the damaged entry a [hit]: it hashes the shards of the rows it reports
    assert main(["extract", *common, "--layers", "layer4"]) == 2
    out = capsys.readouterr()
    assert "[hit]" not in out.out and "SHA-256" in out.err and f"cache rm {key[:12]}" in out.err, out
    assert main(["extract", *common, "--layers", "layer4", "--no-verify"]) == 0  # measured and wanted off
    assert "[hit]" in capsys.readouterr().out


# --------------------------------------------------------------------------- lazy checks, --no-verify


def test_checksums_are_checked_once_per_file_version(
    backbone: Backbone, pristine: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, entry = _copy(pristine, tmp_path)
    hashed: list[int] = []
    real = table_module.hashlib.sha256

    class Counting:
        @staticmethod
        def sha256(data: Any) -> Any:
            hashed.append(len(data))
            return real(data)

    monkeypatch.setattr(table_module, "hashlib", Counting)
    feats = extract(backbone, pristine["samples"], LAYERS, _config(), cache_dir=str(root), progress=False)
    assert hashed == []  # opening a split hashes nothing
    feats.features["penultimate"][:2]  # rows of the first shard only
    assert len(hashed) == 1
    np.asarray(feats.features["penultimate"])
    np.asarray(feats.features["penultimate"])
    assert len(hashed) == 3  # each of the 3 shards of that layer once
    again = extract(backbone, pristine["samples"], LAYERS, _config(), cache_dir=str(root), progress=False)
    np.asarray(again.features["penultimate"])
    assert len(hashed) == 3  # another open in this process: memoised
    shard = entry / "shards" / f"{_segment_files(entry)[0].stem}.1.npy"
    os.utime(shard, ns=(time.time_ns(), time.time_ns() + 10**9))  # the file changed: checked again
    third = extract(backbone, pristine["samples"], LAYERS, _config(), cache_dir=str(root), progress=False)
    np.asarray(third.features["penultimate"])
    assert len(hashed) == 4


def test_no_verify_keeps_the_key_and_skips_only_the_checksums(
    backbone: Backbone, pristine: dict[str, Any], tmp_path: Path
) -> None:
    assert cache_key(cache_record(backbone, LAYERS, _config(verify=False))) == pristine["key"]
    root, entry = _copy(pristine, tmp_path)
    _damage(_KINDS["vector-rows"](entry), "flip-end")  # the rows' bytes, not the header
    with pytest.raises(FeatcacheError, match="SHA-256"):
        _read(backbone, pristine["samples"], root)
    feats = extract(
        backbone, pristine["samples"], LAYERS, _config(verify=False), cache_dir=str(root), progress=False
    )
    assert not any(isinstance(p, CheckedShard) for p in feats.features["penultimate"].parts)
    _damage(_KINDS["mean"](entry), "truncate-1")  # sizes and headers are still checked
    with pytest.raises(FeatcacheError, match="cache rm"):
        _read(backbone, pristine["samples"], root, verify=False)


# --------------------------------------------------------------------------- kills


def _extract_in_child(backbone: Backbone, samples: ArraySamples, root: Path) -> multiprocessing.Process:
    def run() -> None:
        torch.set_num_threads(1)  # the same arithmetic in every child
        extract(
            backbone,
            samples,
            LAYERS,
            _config(batch_size=4, shard_rows=None),
            cache_dir=str(root),
            progress=False,
        )

    p = multiprocessing.get_context("fork").Process(target=run)
    p.start()
    return p


def _finish(p: multiprocessing.Process) -> int | None:
    p.join(120)
    if p.is_alive():
        p.kill()
        p.join()
        raise AssertionError("an extraction did not finish in 120 s")
    return p.exitcode


def _rows_by_digest(root: Path) -> dict[str, bytes]:
    cache = FeatureCache(root)
    (key,) = cache.entries()
    return cache.open(key).row_bytes()


def test_sigkilled_extractions_resume_byte_identical(backbone: Backbone, tmp_path: Path) -> None:
    """5 SIGKILLs at random points (after a random number of commits, a random part of a shard later);
    each resumed table holds every row with the uninterrupted run's bytes. The shards are whole batches,
    so the resume forms the batches the uninterrupted run formed (`benchmarks/kill_resume.py` does 100)."""
    samples = _samples(40, seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # no OpenMP pool to fork
    try:
        t0 = time.perf_counter()
        assert _finish(_extract_in_child(backbone, samples, tmp_path / "reference")) == 0
        shard_seconds = (time.perf_counter() - t0) / 8
        reference = _rows_by_digest(tmp_path / "reference")
        segments = len(list((tmp_path / "reference").glob("*/segments/*.json")))
        assert len(reference) == 40 and segments >= 5
        rng = np.random.default_rng(16)
        killed = 0
        for i in range(5):
            root = tmp_path / f"kill{i}"
            wait_for, extra = int(rng.integers(0, segments)), float(rng.uniform(0, shard_seconds))
            p = _extract_in_child(backbone, samples, root)
            while p.is_alive() and len(list(root.glob("*/segments/*.json"))) < wait_for:
                time.sleep(0.002)
            time.sleep(extra)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                killed += 1
            p.join()
            assert _finish(_extract_in_child(backbone, samples, root)) == 0
            rows = _rows_by_digest(root)
            assert rows.keys() == reference.keys()
            assert [d for d in reference if rows[d] != reference[d]] == [], f"kill {i}"
        assert killed >= 3  # most kills landed mid-run
    finally:
        torch.set_num_threads(threads)


def test_a_damaged_table_with_more_layers_is_passed_over(
    backbone: Backbone, pristine: dict[str, Any], tmp_path: Path
) -> None:
    """A table made the same way with more layers would serve "penultimate"; damaged, it is not chosen
    (and not touched): the layer gets its own table."""
    root, entry = _copy(pristine, tmp_path)
    _damage(_segment_files(entry)[0], "flip-middle")
    feats = extract(
        backbone, pristine["samples"], ["penultimate"], _config(), cache_dir=str(root), progress=False
    )
    assert feats.key != pristine["key"] and feats.extracted == 12
    assert np.array_equal(np.asarray(feats.features["penultimate"]), pristine["rows"]["penultimate"])
    assert FeatureCache(root).verify(pristine["key"])  # still damaged, still there for `cache rm`


def test_resuming_with_or_without_verify_is_the_same_run(tmp_path: Path) -> None:
    """--no-verify changes how fast the cache is read, not the training: a run resumes across it."""
    from featcache.data.config import DataConfig
    from featcache.extraction.config import ExtractConfig
    from featcache.runs.folder import RunFolder
    from featcache.runs.record import RunExtraction, RunRecord, TrainPart

    def record(pool: str, verify: bool) -> RunRecord:
        extract = RunExtraction(ExtractConfig(pool=pool, verify=verify), ("penultimate",))
        return RunRecord("train", "m", {}, DataConfig("digits"), extract, (), TrainPart({}))

    folder = RunFolder(tmp_path)
    folder.write_config(record("avg", True))
    for verify in (True, False):
        folder.check_resume(record("avg", verify), ("extract",), "settings")
    with pytest.raises(FeatcacheError, match=r"extract\.pool"):  # the check itself still works
        folder.check_resume(record("max", True), ("extract",), "settings")


@pytest.mark.parametrize("which", ["segment", "table.json"])
def test_index_files_that_link_outside_the_table_are_refused(
    backbone: Backbone, pristine: dict[str, Any], tmp_path: Path, which: str
) -> None:
    root, entry = _copy(pristine, tmp_path)
    file = _segment_files(entry)[0] if which == "segment" else entry / "table.json"
    outside = tmp_path / f"outside-{file.name}"
    shutil.move(file, outside)  # the same bytes, outside the table
    file.symlink_to(outside)
    with pytest.raises(FeatcacheError, match=r"leads outside.*cache rm"):
        _read(backbone, pristine["samples"], root)
    if which == "segment":
        problems = FeatureCache(root).verify(pristine["key"])
        assert len(problems) == 1 and "leads outside the table" in problems[0]
