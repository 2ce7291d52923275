"""Content digests: SHA-256 of file bytes / pixels, the (path, size, mtime) memo, changes and races."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

import featcache.data.digests as digests_mod
from conftest import write_tree
from featcache.data.datasets import load_dataset
from featcache.data.digests import (
    CTIME_TICK_NS,
    MEMO_SCHEMA,
    RACY_NS,
    DigestMemo,
    MemoDamagedError,
    SampleChangedError,
    pixels_digest,
)
from featcache.data.samples import ArraySamples


def backdate(files: list[Path], seconds: float = 3600) -> None:
    """Make files look written ``seconds`` ago (a dataset folder that is not brand new). Setting the mtime
    sets the ctime to now, which no call can set back: a tick passes before anything is hashed, or the
    memo's ctime rule (``CTIME_TICK_NS``) would rightly hash the files again next time."""
    t = time.time() - seconds
    for f in files:
        os.utime(f, (t, t))
    time.sleep(2 * CTIME_TICK_NS / 1e9)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files whose bytes the memo reads (every call of ``hash_file``)."""
    seen: list[str] = []
    real = digests_mod.hash_file

    def counting(path: str):  # type: ignore[no-untyped-def]
        seen.append(path)
        return real(path)

    monkeypatch.setattr(digests_mod, "hash_file", counting)
    return seen


def test_a_file_digest_is_the_sha256_of_its_bytes_and_nothing_else(tmp_path: Path) -> None:
    files = write_tree(tmp_path / "a", per_class=2)
    copy = tmp_path / "elsewhere" / "renamed.bin"
    copy.parent.mkdir()
    shutil.copyfile(files[0], copy)  # other name, other folder, other mtime: the same content
    got = DigestMemo(None).file_digests([*files, copy])
    assert got == [hashlib.sha256(f.read_bytes()).hexdigest() for f in [*files, copy]]
    assert got[-1] == got[0] and len(set(got[:-1])) == len(files)


def test_pixel_digests_follow_pixels_dtype_and_shape() -> None:
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert pixels_digest(a) == pixels_digest(a.copy()) == pixels_digest(np.ascontiguousarray(a[:, :, :]))
    assert pixels_digest(a) != pixels_digest(a.reshape(3, 2, 4))  # same bytes, other shape
    assert pixels_digest(a) != pixels_digest(a.astype(np.int8))
    b = a.copy()
    b[1, 2, 3] += 1
    assert pixels_digest(a) != pixels_digest(b)
    # Samples of an array set: equal images share a digest, wherever they sit.
    images = np.stack([a[0], a[1], a[0]])
    d = ArraySamples(images, [0, 1, 2]).digests()
    assert d[0] == d[2] != d[1] and d[0] == pixels_digest(a[0])
    assert ArraySamples(images, [0, 1, 2]).subset([2, 1], "s").digests() == [d[2], d[1]]


def test_the_memo_reads_no_byte_of_an_unchanged_folder(tmp_path: Path, reads: list[str]) -> None:
    files = [tmp_path / "f" / f"{i:04d}.bin" for i in range(2000)]
    files[0].parent.mkdir()
    for i, f in enumerate(files):
        f.write_bytes(i.to_bytes(4, "little") * 50)
    backdate(files)
    memo = DigestMemo(tmp_path / "memo.sqlite3")
    first = memo.file_digests(files)
    assert len(reads) == 2000
    reads.clear()
    t0 = time.perf_counter()
    again = DigestMemo(tmp_path / "memo.sqlite3").file_digests(files)  # another process would do the same
    seconds = time.perf_counter() - t0
    assert again == first and reads == []
    assert seconds < 5, seconds  # 2000 stats and one memo lookup, not 2000 reads

    # A changed file (new size or mtime) is read again, and only it; so is a new path for old bytes.
    files[5].write_bytes(b"new content")
    backdate([files[5]], 60)
    moved = tmp_path / "f" / "moved.bin"
    os.rename(files[7], moved)
    files[7] = moved
    third = memo.file_digests(files)
    assert sorted(reads) == sorted([str(files[5]), str(moved)])
    assert third[5] == hashlib.sha256(b"new content").hexdigest() and third[7] == first[7]


def test_same_size_same_mtime_edit_just_after_hashing_is_caught(tmp_path: Path, reads: list[str]) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"a" * 100)  # written now: within RACY_NS of the hashing below
    memo = DigestMemo(tmp_path / "memo.sqlite3")
    (first,) = memo.file_digests([f])
    st = f.stat()
    f.write_bytes(b"b" * 100)  # same size; put the old mtime back: the stat cannot tell
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    (second,) = memo.file_digests([f])
    assert second != first and second == hashlib.sha256(b"b" * 100).hexdigest()
    assert RACY_NS >= 1_000_000_000 and len(reads) == 2


def test_a_vanished_or_changing_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = write_tree(tmp_path / "tree" / "train", per_class=2)
    train = load_dataset(str(tmp_path / "tree"), val_fraction=0.0).train
    files[3].unlink()
    with pytest.raises(FileNotFoundError, match=str(files[3])):
        train.digests(DigestMemo(None))
    # Bytes that change between the stat before and the stat after the read.
    real_stat, calls = os.stat, []

    def growing(path, *a, **k):  # type: ignore[no-untyped-def]
        st = real_stat(path, *a, **k)
        if str(path) == str(files[0]):
            calls.append(1)
            if len(calls) == 2:  # the stat after the read sees another size
                return os.stat_result((st.st_mode, 0, 0, 0, 0, 0, st.st_size + 1, 0, st.st_mtime, 0))
        return st

    monkeypatch.setattr(digests_mod.os, "stat", growing)
    with pytest.raises(SampleChangedError, match=f"{files[0]}.*changed while featcache was hashing"):
        DigestMemo(None).file_digests([files[0]])


def test_a_damaged_memo_is_named_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "memo.sqlite3").write_bytes(b"this is not a database" * 100)
    f = tmp_path / "x.bin"
    f.write_bytes(b"x")
    with pytest.raises(
        MemoDamagedError, match=r"digest memo is damaged: .*memo.sqlite3.*remove .*to rebuild"
    ):
        DigestMemo(tmp_path / "memo.sqlite3").file_digests([f])


def _plant_columns(memo: Path) -> None:
    """A memo of this schema whose folder table has other columns (an edit, another program)."""
    db = sqlite3.connect(memo)
    db.execute("CREATE TABLE dirs (path TEXT PRIMARY KEY, digest TEXT)")
    db.execute(f"PRAGMA user_version = {MEMO_SCHEMA}")
    db.commit()
    db.close()


@pytest.mark.parametrize("plant", ["columns", "folder", "link", "journal link"])
def test_a_planted_memo_is_one_named_error_and_nothing_is_written_through_it(
    tmp_path: Path, plant: str
) -> None:
    memo, outside = tmp_path / "cache" / ".digests.sqlite3", tmp_path / "outside.db"
    memo.parent.mkdir()
    outside.write_bytes(b"")
    if plant == "columns":
        _plant_columns(memo)
    elif plant == "folder":
        memo.mkdir()
    elif plant == "link":
        memo.symlink_to(outside)
    else:  # SQLite's rollback journal, written beside the database on every write
        Path(f"{memo}-journal").symlink_to(outside)
    f = tmp_path / "x.bin"
    f.write_bytes(b"x")
    backdate([f])
    with pytest.raises(MemoDamagedError, match=r"digest memo is damaged: .*\.digests\.sqlite3.*remove"):
        DigestMemo(memo).file_digests([f])
    assert outside.read_bytes() == b""  # nothing written through a link


def test_a_memo_of_the_older_per_file_schema_is_rebuilt(tmp_path: Path, reads: list[str]) -> None:
    memo = tmp_path / "memo.sqlite3"
    db = sqlite3.connect(memo)  # the (path, size, mtime_ns) memo of an older featcache
    db.execute("CREATE TABLE files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, digest TEXT)")
    db.commit()
    db.close()
    f = tmp_path / "x.bin"
    f.write_bytes(b"x")
    backdate([f])
    assert DigestMemo(memo).file_digests([f]) == [hashlib.sha256(b"x").hexdigest()]
    assert DigestMemo(memo).file_digests([f]) == [hashlib.sha256(b"x").hexdigest()] and len(reads) == 1


def test_a_same_size_same_mtime_rewrite_is_hashed_again(tmp_path: Path, reads: list[str]) -> None:
    """``cp -p`` / ``rsync -t`` / ``touch -r``: other bytes, the same size, the old mtime put back."""
    files = [tmp_path / f"{n}.bin" for n in "abc"]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 64)
    backdate(files)
    memo = DigestMemo(tmp_path / "memo.sqlite3")
    first = memo.file_digests(files)
    time.sleep(CTIME_TICK_NS / 1e9)
    old = files[0].stat()
    files[0].write_bytes(b"\xff" * 64)  # same size
    os.utime(files[0], ns=(old.st_atime_ns, old.st_mtime_ns))
    assert files[0].stat().st_mtime_ns == old.st_mtime_ns and files[0].stat().st_size == old.st_size
    reads.clear()
    again = memo.file_digests(files)
    assert again[0] == hashlib.sha256(b"\xff" * 64).hexdigest() and again[1:] == first[1:]
    assert reads == [str(files[0])]


def test_a_swap_of_two_same_size_files_keeping_their_mtimes_is_hashed_again(
    tmp_path: Path, reads: list[str]
) -> None:
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"A" * 64)
    b.write_bytes(b"B" * 64)
    backdate([a, b])
    memo = DigestMemo(tmp_path / "memo.sqlite3")
    first = memo.file_digests([a, b])
    ta, tb = a.stat().st_mtime_ns, b.stat().st_mtime_ns
    tmp = tmp_path / "t"
    os.rename(a, tmp)
    os.rename(b, a)
    os.rename(tmp, b)
    os.utime(a, ns=(ta, ta))  # each path keeps its mtime
    os.utime(b, ns=(tb, tb))
    reads.clear()
    assert memo.file_digests([a, b]) == first[::-1] and sorted(reads) == [str(a), str(b)]


def test_forget_drops_a_row_so_the_file_is_hashed_again(tmp_path: Path, reads: list[str]) -> None:
    files = [tmp_path / f"{n}.bin" for n in "ab"]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 8)
    backdate(files)
    memo = DigestMemo(tmp_path / "memo.sqlite3")
    memo.file_digests(files)
    memo.forget([files[1]])
    reads.clear()
    memo.file_digests(files)
    assert reads == [str(files[1])]


def test_a_file_changed_after_hashing_is_refused_when_decoded(tmp_path: Path) -> None:
    files = write_tree(tmp_path / "tree" / "train", per_class=2)
    train = load_dataset(str(tmp_path / "tree"), val_fraction=0.0).train
    digests = train.digests()
    assert train.load_checked(0, digests[0]).size == train.load(0).size
    files[0].write_bytes(files[1].read_bytes())
    with pytest.raises(SampleChangedError, match=f"{files[0]}.*changed during this run"):
        train.load_checked(0, digests[0])
    files[0].unlink()
    with pytest.raises(SampleChangedError, match=f"{files[0]}.*vanished"):
        train.load_checked(0, digests[0])


def test_folders_checked_at_once_serve_each_file_its_own_digest(
    tmp_path: Path, reads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memo's records of many folders are compared as one vector: interleaved folders, a folder the
    memo has never seen, relative paths and changed files each get their own file's SHA-256, and only
    the files the memo cannot vouch for are read."""
    files = [tmp_path / f"d{i % 7}" / f"{i:03d}.bin" for i in range(140)]
    for i, f in enumerate(files):
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(i.to_bytes(2, "little") * (10 + i % 3))
    backdate(files)
    memo = DigestMemo(tmp_path / "memo.sqlite3")
    memo.file_digests(files[:100])  # d0..d6, the last 40 files unknown to the memo
    fresh = tmp_path / "new"
    fresh.mkdir()
    added = [fresh / "a.bin", fresh / "b.bin"]
    for f in added:
        f.write_bytes(f.name.encode() * 5)
    files[3].write_bytes(b"changed, other size")
    os.utime(files[10], ns=(files[10].stat().st_atime_ns, files[10].stat().st_mtime_ns))  # ctime only
    backdate([files[3], *added], 60)
    reads.clear()
    monkeypatch.chdir(tmp_path)
    order = [files[i] for i in np.random.default_rng(0).permutation(len(files))] + added
    asked = [os.path.relpath(f) if i % 5 == 0 else f for i, f in enumerate(order)]
    got = memo.file_digests(asked)
    assert got == [hashlib.sha256(f.read_bytes()).hexdigest() for f in order]
    assert sorted(reads) == sorted(str(f) for f in [*files[100:], files[3], files[10], *added])


def test_a_memo_row_finds_names_from_its_stored_blob() -> None:
    """A folder row read from the memo keeps its names as stored; the same listing is recognised from
    them, another listing (reordered, a name added, a name no listing makes) is matched name by name."""
    from featcache.data.digests import STAT_DTYPE, _DirRow

    names = ["a.png", "b\udcff.png", "c.png"]  # an undecodable byte, as os.scandir gives it
    row = _DirRow(names, np.zeros(3, STAT_DTYPE), bytes(96))
    stored = _DirRow.decode(*row.encode())
    assert stored.positions(list(names)).tolist() == [0, 1, 2]
    assert stored.positions(["c.png", "a.png"]).tolist() == [2, 0]
    assert stored.positions(["a.png", "new.png", "b\udcff.png"]).tolist() == [0, -1, 1]
    assert stored.positions(["a.png", "\ud800.png", "c.png"]).tolist() == [0, -1, 2]
    assert stored.positions([*names, "d.png", "e.png"]).tolist() == [0, 1, 2, -1, -1]  # files added last
    assert stored.positions([*names[:2], "a0.png", "c.png"]).tolist() == [0, 1, -1, 2]
    assert stored.names == names and stored.encode() == row.encode()
    with pytest.raises(ValueError, match="2 names, 3 stats"):
        _DirRow.decode(b"a\0b", np.zeros(3, STAT_DTYPE).tobytes(), bytes(96))


def test_folder_listings_serve_the_digests_file_paths_get(
    tmp_path: Path, reads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``folder_digests`` (a scan's (folder, names) groups, a folder coming twice, a relative folder)
    gives what ``file_digests`` gives for the same paths, each file its own SHA-256, and reads only
    the files the memo cannot vouch for."""
    files = [tmp_path / f"d{i % 3}" / f"{i:03d}.bin" for i in range(30)]
    for i, f in enumerate(files):
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(i.to_bytes(2, "little") * (5 + i % 4))
    backdate(files)
    monkeypatch.chdir(tmp_path)
    listing = [
        (str(tmp_path / "d1"), [f.name for f in files[1:15:3]]),
        ("d0", [f.name for f in files[0:30:3]]),  # relative to the working folder
        (str(tmp_path / "d1"), [f.name for f in files[16:30:3]]),  # d1 again, after d0
        (str(tmp_path / "d2"), []),
    ]
    paths = [Path(folder).resolve() / n for folder, names in listing for n in names]
    want = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    memo = DigestMemo(tmp_path / "memo.sqlite3")
    assert DigestMemo(None).file_digests(paths) == want
    reads.clear()
    assert memo.folder_digests(listing) == want
    assert sorted(reads) == sorted(map(str, paths))
    reads.clear()
    files[4].write_bytes(b"another content")  # in d1's first group
    backdate([files[4]], 60)
    want[paths.index(files[4])] = hashlib.sha256(b"another content").hexdigest()
    assert memo.folder_digests(listing) == want
    assert reads == [str(files[4])]
    assert memo.folder_digests([]) == []
