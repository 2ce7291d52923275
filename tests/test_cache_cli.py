"""``featcache cache``: the table ``ls`` prints, ``verify`` of every entry, ``rm`` by keys and filters
with ``--dry-run``, ``gc --max-size``, and a start without torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_python
from featcache._format import human_bytes
from featcache.cache.store import FeatureCache
from featcache.cli.cache import short_layers
from featcache.cli.main import main
from test_store import disk_bytes, make_table


def cli(capsys: pytest.CaptureFixture[str], root: Path, *argv: str) -> tuple[int, str, str]:
    code = main(["cache", *argv, "--cache-dir", str(root)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ls_prints_a_readable_table_with_a_total(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    a = make_table(cache, "torchvision:resnet18", "digits", rows=9, age_days=3)
    b = make_table(cache, "timm:vit_tiny", "faces", size=(64, 48))
    (tmp_path / "lost+found").mkdir()
    code, out, err = cli(capsys, tmp_path, "ls")
    assert code == 0, err
    lines = out.splitlines()
    header = lines[1].split()
    assert header[:6] == ["key", "model", "dataset", "input", "layers", "rows"] and "status" in header
    rows = {ln.split()[0][:12]: ln for ln in lines[3:5]}
    assert list(rows) == [b[:12], a[:12]]  # most recently used first
    assert all(
        w in rows[a[:12]] for w in ("torchvision:resnet18", "digits", "32x32", "penultimate", "3 days ago")
    )
    assert "64x48" in rows[b[:12]] and "just now" in rows[b[:12]] and " ok" in rows[b[:12]]
    total = disk_bytes(cache.path(a)) + disk_bytes(cache.path(b))
    assert lines[-1] == f"2 entries, {human_bytes(total)} on disk"
    assert "skipped 1 folder that is not a cache entry: lost+found" in err
    code, out, _ = cli(capsys, tmp_path, "ls", "--json")
    entries = json.loads(out)
    assert [e["key"] for e in entries] == [b, a]
    assert entries[1]["datasets"] == ["digits"] and entries[1]["input_size"] == [32, 32]
    assert entries[1]["rows"] == 9 and entries[1]["bytes"] == disk_bytes(cache.path(a))
    code, out, _ = cli(capsys, tmp_path, "ls", "--model", "*vit*")
    assert b[:12] in out and a[:12] not in out and "1 entry," in out


def test_verify_without_a_key_checks_every_entry(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    good = make_table(cache, "m:good", "d")
    bad = make_table(cache, "m:bad", "d")
    shard = next((cache.path(bad) / "shards").glob("*.[0-9].npy"))  # rows, not the digests file
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    old = cache.path("f" * 64)  # an entry of cache version 1: never read, not damaged
    old.mkdir()
    (old / "record.json").write_text("{}")
    code, out, err = cli(capsys, tmp_path, "verify", "-q")
    assert code == 2
    assert f"OK   {good}" in out and f"BAD  {bad[:12]}" in out and "checksum mismatch" in out
    assert f"OLD  {'f' * 64}" in out
    assert f"featcache cache rm {bad[:12]}" in err and "1 of 3 entries" in err
    assert cli(capsys, tmp_path, "verify", good[:10])[0] == 0


def test_rm_takes_keys_and_filters_and_dry_run_removes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cache = FeatureCache(tmp_path)
    old = make_table(cache, "torchvision:resnet18", "digits", age_days=40)
    mid = make_table(cache, "torchvision:resnet50", "digits", age_days=10)
    new = make_table(cache, "timm:vit_tiny", "faces")
    freed = disk_bytes(cache.path(old)) + disk_bytes(cache.path(mid))
    code, out, _ = cli(capsys, tmp_path, "rm", "--dataset", "digits", "--older-than", "5", "--dry-run")
    assert code == 0 and f"would remove {old[:12]}" in out and f"would remove {mid[:12]}" in out
    assert f"would remove 2 entries, {human_bytes(freed)} freed (dry run" in out
    assert set(cache.entries()) == {old, mid, new}
    code, out, _ = cli(capsys, tmp_path, "rm", "--model", "resnet18")
    assert code == 0 and f"removed {old[:12]}" in out and set(cache.entries()) == {mid, new}
    code, out, _ = cli(capsys, tmp_path, "rm", mid[:8], new[:8])
    assert code == 0 and "removed 2 entries" in out and cache.entries() == []
    code, _, err = cli(capsys, tmp_path, "rm")
    assert code == 2 and "name the entries" in err
    code, _, err = cli(capsys, tmp_path, "rm", "--max-size", "1G")
    assert code == 2 and "apply to `cache gc`" in err
    code, _, err = cli(capsys, tmp_path, "gc", "--max-size", "lots")
    assert code == 2 and "'lots' is not a size" in err and "Traceback" not in err


def test_gc_max_size_through_the_command_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    old = make_table(cache, "m:old", "d", rows=300, width=64, age_days=2)
    new = make_table(cache, "m:new", "d", rows=300, width=64)
    limit = disk_bytes(cache.path(new)) + 1024
    code, out, _ = cli(capsys, tmp_path, "gc", "--max-size", f"{limit / 1024:.0f}K")
    assert code == 0 and f"removed {cache.path(old)}" in out and "1 least recently used tables" in out
    assert cache.entries() == [new]


def test_cache_verbs_start_without_torch(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    key = make_table(cache, "torchvision:resnet18", "digits", age_days=2)
    code = (
        "import sys, time\n"
        "from featcache.cli.main import main\n"
        "t0 = time.perf_counter()\n"
        f"for argv in (['ls'], ['ls', '--json'], ['info', '{key[:8]}'], ['verify'], ['rm', '{key[:8]}', "
        "'--dry-run'], ['gc', '--max-size', '1G']):\n"
        f"    assert main(['cache', *argv, '--cache-dir', {str(tmp_path)!r}]) == 0, argv\n"
        "heavy = ('torch', 'torchvision', 'timm', 'PIL')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    assert run_python(code).stdout.strip().splitlines()[-1] == "[]"


def test_ls_shortens_a_long_layer_list_to_its_ends_and_count(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    every_block = (*(f"blocks.{i}" for i in range(7)), "penultimate")
    make_table(FeatureCache(tmp_path), "efficientnet-lite0", "photos", layers=every_block)
    make_table(FeatureCache(tmp_path), "efficientnet-lite0", "digits", layers=("blocks.3", "penultimate"))
    code, out, err = cli(capsys, tmp_path, "ls")
    assert code == 0, err
    assert "blocks.0..penultimate (8)" in out and "blocks.3,penultimate" in out and "blocks.1" not in out
    code, out, _ = cli(capsys, tmp_path, "ls", "--json")  # the JSON keeps every name
    assert sorted(len(e["layers"]) for e in json.loads(out)) == [2, 8]
    assert short_layers(["stages.3.blocks.2.conv_dw", "stages.3.blocks.2.norm"]) == (
        "stages.3.blocks.2.conv_dw,stages.3.blocks.2.norm"  # two names are never shortened
    )


def test_a_filter_that_matches_nothing_names_what_there_is(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    make_table(FeatureCache(tmp_path), "efficientnet-lite0", "digits")
    code, out, _ = cli(capsys, tmp_path, "rm", "--model", "lite0", "--dry-run")
    assert code == 0 and "would remove 0 entries" in out
    assert "'*lite0*'" in out and "models in the cache: efficientnet-lite0" in out
    code, out, _ = cli(capsys, tmp_path, "ls", "--dataset", "digit")
    assert "datasets in the cache: digits" in out and "--model" not in out
    code, out, _ = cli(capsys, tmp_path, "rm", "--model", "*lite0*", "--older-than", "5", "--dry-run")
    assert "would remove 0 entries" in out and "in the cache" not in out  # the model filter did match
    assert FeatureCache(tmp_path).entries()  # nothing removed by any of these
