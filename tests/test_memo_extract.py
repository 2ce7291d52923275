"""The digest memo under extraction (#22): a rewrite the stat cannot see by size and mtime, a swap of
two files, a memoised digest the bytes disagree with, and a planted memo, end to end."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import random_image, write_tree
from featcache import ExtractConfig, extract, load_dataset
from featcache.backbones.registry import Backbone
from featcache.cache.splits import CachedFeatures
from featcache.cache.store import DIGEST_MEMO
from featcache.cli.main import main
from featcache.data.digests import CTIME_TICK_NS, DigestMemo, _DirRow

LAYERS = ("penultimate",)


def _tree(root: Path, per_class: int = 3) -> list[Path]:
    """BMP files: every image of one size has the same byte count (a same-size rewrite is possible)."""
    files = write_tree(root / "train", classes=("a", "b"), per_class=per_class, formats=("bmp",))
    t = time.time() - 3600
    for f in files:
        os.utime(f, (t, t))
    return files


def _run(bb: Backbone, root: Path, cache: Path) -> CachedFeatures:
    """One extraction over the folder listed anew, as a new process would."""
    train = load_dataset(str(root), val_fraction=0.0).train
    cfg = ExtractConfig(input_size=(32, 32), device="cpu", batch_size=4)
    return extract(bb, train, LAYERS, cfg, cache_dir=str(cache), progress=False)


def _row(f: CachedFeatures, image_id: str) -> np.ndarray:
    return np.asarray(f.features["penultimate"][f.ids.index(image_id)])


def test_a_cp_p_rewrite_is_extracted_and_served_its_new_features(resnet18: Backbone, tmp_path: Path) -> None:
    files = _tree(tmp_path / "tree")
    first = _run(resnet18, tmp_path / "tree", tmp_path / "c")
    time.sleep(CTIME_TICK_NS / 1e9)
    old = files[0].stat()
    random_image(np.random.default_rng(99), (40, 48)).save(files[0], format="BMP")  # cp -p: new bytes,
    os.utime(files[0], ns=(old.st_atime_ns, old.st_mtime_ns))  # the same size, the old times
    assert (files[0].stat().st_size, files[0].stat().st_mtime_ns) == (old.st_size, old.st_mtime_ns)
    again = _run(resnet18, tmp_path / "tree", tmp_path / "c")
    assert again.extracted == 1
    want = hashlib.sha256(files[0].read_bytes()).hexdigest()
    assert again.digests[again.ids.index("a/00.bmp")] == want
    fresh = _run(resnet18, tmp_path / "tree", tmp_path / "fresh")  # the reference: a cache that never saw it
    # one image alone in its batch, four in a batch: equal up to float rounding; far from the old image
    assert np.allclose(_row(again, "a/00.bmp"), _row(fresh, "a/00.bmp"), rtol=1e-4, atol=1e-5)
    assert not np.allclose(_row(again, "a/00.bmp"), _row(first, "a/00.bmp"), rtol=1e-2, atol=1e-3)


def test_a_swap_of_two_files_keeping_their_mtimes_serves_each_path_its_new_content(
    resnet18: Backbone, tmp_path: Path
) -> None:
    files = _tree(tmp_path / "tree")
    a, b = files[0], files[-1]  # a/00.bmp and b/02.bmp
    first = _run(resnet18, tmp_path / "tree", tmp_path / "c")
    ta, tb = a.stat().st_mtime_ns, b.stat().st_mtime_ns
    os.rename(a, tmp_path / "t")
    os.rename(b, a)
    os.rename(tmp_path / "t", b)
    os.utime(a, ns=(ta, ta))
    os.utime(b, ns=(tb, tb))
    again = _run(resnet18, tmp_path / "tree", tmp_path / "c")
    ia, ib = "a/00.bmp", "b/02.bmp"
    assert again.digests[again.ids.index(ia)] == first.digests[first.ids.index(ib)]
    assert np.array_equal(_row(again, ia), _row(first, ib)) and np.array_equal(
        _row(again, ib), _row(first, ia)
    )
    assert again.extracted == 0  # both contents had rows: the swap is a relabelling, no forward pass


def test_a_memoised_digest_the_bytes_disagree_with_is_hashed_again_not_refused_forever(
    resnet18: Backbone, tmp_path: Path
) -> None:
    files = _tree(tmp_path / "tree")
    first = _run(resnet18, tmp_path / "tree", tmp_path / "c")
    memo = DigestMemo(tmp_path / "c" / DIGEST_MEMO)
    folder, name = str(files[0].parent), files[0].name
    row = memo._rows([folder])[folder]
    at = row.names.index(name)
    wrong = row.digests[: 32 * at] + b"\x01" * 32 + row.digests[32 * at + 32 :]
    memo._store({folder: _DirRow(row.names, row.stats, wrong)})  # a digest no table holds
    again = _run(resnet18, tmp_path / "tree", tmp_path / "c")  # the loader finds the mismatch: rehashed once
    assert again.digests == first.digests and again.extracted == 0
    row = memo._rows([folder])[folder]  # the memo holds the file's true digest again
    at = row.names.index(name)
    assert row.digests[32 * at : 32 * at + 32].hex() == first.digests[first.ids.index("a/00.bmp")]


def test_a_memo_planted_as_a_link_is_one_named_error_at_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _tree(tmp_path / "tree")
    cache, outside = tmp_path / "c", tmp_path / "elsewhere.db"
    cache.mkdir()
    outside.write_bytes(b"")
    (cache / DIGEST_MEMO).symlink_to(outside)
    argv = ["extract", "torchvision:resnet18", str(tmp_path / "tree"), "--weights", "none"]
    code = main([*argv, "--input-size", "32", "32", "--cache-dir", str(cache), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "digest memo is damaged" in err and "symbolic link" in err and "Traceback" not in err
    assert outside.read_bytes() == b""


def test_a_shard_is_hashed_once_per_file_version_across_processes(
    resnet18: Backbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import featcache.cache.store as store_module
    import featcache.cache.table as table_module

    _tree(tmp_path / "tree")
    first = _run(resnet18, tmp_path / "tree", tmp_path / "c")
    t = time.time() - 3600  # shards written an hour ago: not racily close to their check
    shards = sorted((first.path / "shards").glob("*.[0-9].npy"))  # rows (digests files: per parse)
    for f in shards:
        os.utime(f, (t, t))
    time.sleep(2 * CTIME_TICK_NS / 1e9)
    hashed: list[int] = []
    real = table_module.hashlib.sha256

    class Counting:
        @staticmethod
        def sha256(data: bytes) -> object:
            hashed.append(len(data))
            return real(data)

    monkeypatch.setattr(table_module, "hashlib", Counting)

    def new_process_reads() -> None:
        table_module._VERIFIED.clear()  # what this process checked and opened: gone, as in a new process
        store_module._SHARED.clear()
        f = _run(resnet18, tmp_path / "tree", tmp_path / "c")
        assert f.hit
        f.check()

    new_process_reads()
    assert len(hashed) == len(shards)  # each shard once
    new_process_reads()
    assert len(hashed) == len(shards)  # checked by an earlier process, same file version: not again
    os.utime(shards[0], (t, t))  # its ctime changes: another version as far as a stat can tell
    time.sleep(2 * CTIME_TICK_NS / 1e9)
    new_process_reads()
    assert len(hashed) == len(shards) + 1
