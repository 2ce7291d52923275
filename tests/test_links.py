"""Symbolic links planted in a cache: every file a table reads, writes or deletes lies inside it.

Each test plants a link at one path a table writes, touches or deletes (``uses/``, a use record,
``last_used``, ``.locks``, a lock file, a temporary file, ``shards/``, a whole table) pointing at a
folder outside the cache, runs what reads or cleans the table (a split read, an append, ``gc``,
``compact``, ``rm``), and checks the outside folder is byte- and mtime-identical afterwards and the
command said what it did not remove.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import write_tree
from featcache._errors import FeatcacheError
from featcache.cache.housekeeping import USES, datasets_used
from featcache.cache.store import FeatureCache
from featcache.cache.writer import write_segment
from featcache.cli.main import main
from featcache.data.datasets import image_folder, load_dataset
from test_store import make_table


def outside(tmp_path: Path) -> Path:
    """A folder outside the cache holding a file nobody may touch."""
    folder = tmp_path / "elsewhere"
    folder.mkdir(exist_ok=True)
    (folder / "keep.txt").write_text("not the cache's\n")
    old = time.time() - 86400
    os.utime(folder / "keep.txt", (old, old))
    return folder


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and mtime (what a write, a touch or a delete changes)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def read_split(cache: FeatureCache, key: str, dataset: str = "digits") -> None:
    """Read a table's rows as one split of ``dataset`` (what train, sweep and probe do)."""
    table = cache.open(key)
    digests = table.digests()
    ids = [f"{i}.png" for i in range(len(digests))]
    labels = np.zeros(len(digests))
    cache.open_split(key, table.layers, digests, ids, labels, ["a"], dataset=dataset)


def test_a_linked_shards_folder_is_never_cleaned_nor_written_through(tmp_path: Path) -> None:
    elsewhere = outside(tmp_path)
    cache = FeatureCache(tmp_path / "cache")
    key = make_table(cache, "m:a", "digits")
    shards = cache.path(key) / "shards"
    for f in shards.iterdir():  # the shard files move out; the table reaches them through a link
        f.rename(elsewhere / f.name)
    shards.rmdir()
    shards.symlink_to(elsewhere)
    before = snapshot(elsewhere)

    removed = FeatureCache(tmp_path / "cache").gc()
    assert removed["leftovers"] == []  # keep.txt, no shard of this table, was the file gc deleted
    assert any(r.startswith(f"{shards} -> {elsewhere}") for r in removed["not_removed"])
    # the index's digests file lies in shards/ too: the table is damaged, and says so, before anything
    with pytest.raises(FeatcacheError, match=r"leads outside the table"):
        FeatureCache(tmp_path / "cache").compact(key)
    with pytest.raises(FeatcacheError, match=r"leads outside the table"):
        read_split(FeatureCache(tmp_path / "cache"), key)
    table = FeatureCache(tmp_path / "cache").open(key)
    rows = np.ones((2, 8), np.float32)
    with pytest.raises(FeatcacheError, match=r"leads outside its table .*featcache writes only inside"):
        write_segment(
            table.path, table.layers, {"penultimate": rows}, ["a" * 64, "b" * 64], {}, "float32", {}
        )
    assert any("shards: a symbolic link" in p for p in table.verify())
    assert snapshot(elsewhere) == before


def test_gc_cli_says_what_it_did_not_remove_and_why(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    elsewhere = outside(tmp_path)
    cache = FeatureCache(tmp_path / "cache")
    key = make_table(cache, "m:a", "digits")
    # a link named like a leftover (a killed append's temporary file) and one like an unreferenced shard
    (cache.path(key) / "shards" / "x.npy.tmp-999").symlink_to(elsewhere / "keep.txt")
    (cache.path(key) / "shards" / "00000000000000000001-abcdef12.0.npy").symlink_to(elsewhere / "keep.txt")
    before = snapshot(elsewhere)
    assert main(["cache", "gc", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert out.count("not removed ") == 2 and "gc never follows or deletes links" in out
    assert "0 partial entries" in out
    assert snapshot(elsewhere) == before
    assert (cache.path(key) / "shards" / "x.npy.tmp-999").is_symlink()  # said, and left for the user


def test_reading_a_split_writes_and_touches_nothing_through_links(tmp_path: Path) -> None:
    elsewhere = outside(tmp_path)
    cache = FeatureCache(tmp_path / "cache")
    a, b = make_table(cache, "m:a", "digits"), make_table(cache, "m:b", "digits")
    # table a: `uses/` itself a link; table b: its use record and `last_used` links to a file outside
    uses = cache.path(a) / USES
    for f in uses.iterdir():
        f.unlink()
    uses.rmdir()
    uses.symlink_to(elsewhere)
    record = next((cache.path(b) / USES).iterdir())
    record.unlink()
    record.symlink_to(elsewhere / "keep.txt")
    (cache.path(b) / "last_used").unlink()
    (cache.path(b) / "last_used").symlink_to(elsewhere / "keep.txt")
    before = snapshot(elsewhere)

    read_split(FeatureCache(tmp_path / "cache"), a, "faces")
    read_split(FeatureCache(tmp_path / "cache"), b)
    assert snapshot(elsewhere) == before  # no <hash>.json created in, no mtime touched of, a file there
    assert datasets_used(cache.path(a)) == {}  # nothing read through the linked folder
    assert not record.is_symlink() and list(datasets_used(cache.path(b))) == ["digits"]  # replaced
    assert any(e["key"] == a and e["datasets"] == [] for e in FeatureCache(tmp_path / "cache").ls())


def test_a_use_records_temporary_name_planted_as_a_link_is_not_written_through(tmp_path: Path) -> None:
    elsewhere = outside(tmp_path)
    cache = FeatureCache(tmp_path / "cache")
    key = make_table(cache, "m:a", "digits")
    name = hashlib.sha256(b"faces").hexdigest()[:24]
    (cache.path(key) / USES / f"{name}.json.tmp-{os.getpid()}").symlink_to(elsewhere / "keep.txt")
    before = snapshot(elsewhere)
    read_split(FeatureCache(tmp_path / "cache"), key, "faces")
    assert snapshot(elsewhere) == before


@pytest.mark.parametrize("planted", [".locks", "lock file"])
def test_a_lock_is_never_created_through_a_link(planted: str, tmp_path: Path) -> None:
    elsewhere = outside(tmp_path)
    cache = FeatureCache(tmp_path / "cache")
    key = make_table(cache, "m:a", "digits")
    locks = cache.root / ".locks"
    if planted == ".locks":
        for f in locks.iterdir():
            f.unlink()
        locks.rmdir()
        locks.symlink_to(elsewhere)
    else:
        (locks / f"{key}.lock").unlink()
        (locks / f"{key}.lock").symlink_to(elsewhere / "keep.txt")
    before = snapshot(elsewhere)
    with pytest.raises(
        FeatcacheError, match=r"symbolic link.*never through a symbolic link: remove the link"
    ):
        cache.rm(key)
    assert cache.path(key).is_dir() and snapshot(elsewhere) == before
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]


def test_rm_of_a_linked_table_removes_the_link_alone_and_says_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    elsewhere_cache = FeatureCache(tmp_path / "other")
    key = make_table(elsewhere_cache, "m:a", "digits")
    before = snapshot(elsewhere_cache.root)
    cache = FeatureCache(tmp_path / "cache")
    cache.root.mkdir()
    cache.path(key).symlink_to(elsewhere_cache.path(key))

    with pytest.raises(FeatcacheError, match=r"is a symbolic link .*removes the link"):
        cache.open(key)
    (entry,) = cache.ls()
    assert entry["status"] == "damaged" and "a symbolic link to" in entry["reason"] and entry["bytes"] == 0
    removed = cache.gc(unused_for_s=0, max_bytes=0)
    assert removed["unused"] == removed["over_size"] == [] and "gc never follows" in removed["not_removed"][0]
    assert main(["cache", "rm", key[:12], "--cache-dir", str(cache.root)]) == 0
    out = capsys.readouterr().out
    assert "a symbolic link to" in out and "removed 1 entry, 0B freed" in out
    assert not os.path.lexists(cache.path(key))  # the link is gone ...
    assert snapshot(elsewhere_cache.root) == before  # ... and what it pointed to is untouched


def test_rm_of_a_table_holding_links_removes_the_links_not_their_targets(tmp_path: Path) -> None:
    elsewhere = outside(tmp_path)
    cache = FeatureCache(tmp_path / "cache")
    key = make_table(cache, "m:a", "digits")
    (cache.path(key) / "shards" / "planted").symlink_to(elsewhere)
    (cache.path(key) / "last_used").unlink()
    (cache.path(key) / "last_used").symlink_to(elsewhere / "keep.txt")
    before = snapshot(elsewhere)
    cache.rm(key)
    assert not cache.path(key).exists() and snapshot(elsewhere) == before


# ------------------------------------------------------------------ datasets: manifests, ImageFolders


def _manifest_dir(tmp_path: Path) -> tuple[Path, Path]:
    """``data/`` with two images of two classes, and a secret image outside it in ``elsewhere/``."""
    data = tmp_path / "data"
    write_tree(data, classes=("a", "b"), per_class=2, formats=("png",))
    secret = outside(tmp_path) / "secret.png"
    write_tree(tmp_path / "tmp-secret", classes=("s",), per_class=1, formats=("png",))[0].rename(secret)
    return data, secret


@pytest.mark.parametrize("row", ["../elsewhere/secret.png", "a/../../elsewhere/secret.png", "link.png"])
def test_a_manifest_row_outside_its_folder_is_refused_with_its_line(tmp_path: Path, row: str) -> None:
    data, secret = _manifest_dir(tmp_path)
    (data / "link.png").symlink_to(secret)  # inside the folder, leading out of it
    manifest = data / "labels.csv"
    manifest.write_text(f"path,label\na/00.png,a\n{row},b\nb/00.png,b\n")
    how = "a symbolic link on its way leads to" if row == "link.png" else "it resolves to"
    with pytest.raises(
        FeatcacheError, match=re.escape(f"line 3: {row!r} is outside the manifest's folder")
    ) as e:
        load_dataset(str(manifest))
    assert (
        how in str(e.value)
        and str(secret.resolve()) in str(e.value)
        and "move the manifest up" in str(e.value)
    )


def test_manifest_paths_that_stay_inside_are_read_links_too(tmp_path: Path) -> None:
    data, _ = _manifest_dir(tmp_path)
    (data / "inner.png").symlink_to(data / "b" / "01.png")
    manifest = data / "labels.csv"
    manifest.write_text("path,label\na/00.png,a\nb/../a/01.png,a\ninner.png,b\nb/00.png,b\n")
    splits = load_dataset(str(manifest), val_fraction=0.0, test_fraction=0.0)
    digests = dict(zip(splits.train.ids, splits.train.digests()))
    assert digests["inner.png"] == hashlib.sha256((data / "b" / "01.png").read_bytes()).hexdigest()
    assert set(digests) == {"a/00.png", "b/../a/01.png", "inner.png", "b/00.png"}


@pytest.mark.parametrize("planted", ["file", "class folder", "deeper folder"])
def test_an_image_folder_with_a_link_leading_outside_is_refused(tmp_path: Path, planted: str) -> None:
    data, secret = _manifest_dir(tmp_path)
    link = {"file": data / "a" / "zz.png", "class folder": data / "c", "deeper folder": data / "b" / "more"}
    link[planted].symlink_to(secret if planted == "file" else secret.parent)
    with pytest.raises(FeatcacheError, match=r"symbolic link\(s\) leading outside it") as e:
        image_folder(data)
    assert f"{link[planted].relative_to(data)} -> {link[planted].readlink()}" in str(e.value)
    assert "copy those files in, or pass the folder they lead to" in str(e.value)


def test_image_folder_links_inside_it_are_followed(tmp_path: Path) -> None:
    data = tmp_path / "data"
    files = write_tree(data / "train", classes=("a", "b"), per_class=2, formats=("png",))
    write_tree(data / "val", classes=("a", "b"), per_class=1, formats=("png",), seed=1)
    (data / "train" / "a" / "copy.png").symlink_to(data / "val" / "b" / "00.png")  # inside the dataset
    splits = image_folder(data)
    assert splits.train.ids == ["a/00.png", "a/01.png", "a/copy.png", "b/00.png", "b/01.png"]
    got = dict(zip(splits.train.ids, splits.train.digests()))
    assert got["a/copy.png"] == hashlib.sha256((data / "val" / "b" / "00.png").read_bytes()).hexdigest()
    assert got["a/00.png"] == hashlib.sha256(files[0].read_bytes()).hexdigest()


def test_a_table_file_linked_out_is_damaged_and_not_read(tmp_path: Path) -> None:
    elsewhere = outside(tmp_path)
    cache = FeatureCache(tmp_path / "cache")
    key = make_table(cache, "m:a", "digits")
    table_json = cache.path(key) / "table.json"
    table_json.rename(elsewhere / "table.json")
    table_json.symlink_to(elsewhere / "table.json")
    (entry,) = FeatureCache(tmp_path / "cache").ls()
    assert (
        entry["status"] == "damaged"
        and entry["reason"] == "table.json leads outside the table (a symbolic link?)"
    )
    assert FeatureCache(tmp_path / "cache").gc()["old_format"] == []  # damaged, kept for `cache rm`
    before = snapshot(elsewhere)
    FeatureCache(tmp_path / "cache").rm(key)
    assert snapshot(elsewhere) == before and not os.path.lexists(cache.path(key))
