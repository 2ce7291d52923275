"""An ImageFolder listed with ``os.scandir`` (names as strings): the same files, in the same order, as
``sorted(Path.rglob("*"))`` listed them."""

from __future__ import annotations

from pathlib import Path

from featcache.data.datasets import load_dataset
from featcache.data.samples import IMAGE_EXTENSIONS


def test_the_listing_equals_sorted_rglob(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    names = ["a.png", "a/b.png", "a.b/c.jpg", "b.PNG", "a-/x.bmp", ".hidden.png", "z/.png", "z/y/x.ppm",
             "notes.txt", "dir.png/inner.png"]  # fmt: skip
    for cls in ("cat", "dog"):
        for n in names:
            f = root / cls / n
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(f"{cls}/{n}".encode())
    (root / "dog" / "linked").symlink_to(root / "cat" / "a", target_is_directory=True)  # not followed
    (root / "dog" / "file-link.png").symlink_to(root / "cat" / "b.PNG")  # a link to a file is listed
    got = load_dataset(str(root), val_fraction=0.0, test_fraction=0.0).train
    want = [
        p.relative_to(root).as_posix()
        for c in ("cat", "dog")
        for p in sorted((root / c).rglob("*"))
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    ]
    assert sorted(got.ids) == sorted(want) and "dog/file-link.png" in want and "dog/linked/b.png" not in want
    by_class = [i for i in got.ids if i.startswith("cat/")]
    assert by_class == [w for w in want if w.startswith("cat/")]  # the order within a class


def test_image_names_are_those_whose_last_suffix_is_an_image_extension() -> None:
    """The listing's name filter against the rule it stands for: the text after the last dot, lower-cased,
    is an image extension, and the dot is not the name's first character."""
    from featcache.data.datasets import _IMAGE_NAME
    from featcache.data.samples import IMAGE_EXTENSIONS

    names = [".png", "a.png", "a.PNG", "a.Jpeg", "..png", ".x.png", "a.png.txt", "a.txt.png", "png", "a.",
             "a.pn", "a.pngx", "a\n.png", "a.png\n", "x.\u0130f", "x.g\u0130f", "x.jpg ", "\u00e9.webp",
             "a.TIFF", "a.tif.bak", "x.ppm", "x.PGM", "x.gif"]  # fmt: skip
    for name in names:
        dot = name.rfind(".")
        want = dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS
        assert bool(_IMAGE_NAME.match(name)) == want, name


def test_a_scans_digests_are_each_files_own_with_files_between_subfolders(tmp_path: Path) -> None:
    """A class folder whose files sort between its subfolders is hashed as groups of one folder coming
    back; each id gets the SHA-256 of its own file, first hashed and then vouched for by the memo, and
    the ids come in sorted(rglob) order, class by class."""
    import hashlib

    from featcache.data.digests import DigestMemo

    root = tmp_path / "tree"
    for n in [
        "cat/a.png",
        "cat/b/x.png",
        "cat/c.png",
        "cat/d/e/f.png",
        "cat/d/g.png",
        "cat/z.png",
        "dog/m.png",
    ]:
        f = root / n
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(n.encode() * 3)
    want = [p.relative_to(root).as_posix() for c in ("cat", "dog") for p in sorted((root / c).rglob("*.png"))]
    memo = DigestMemo(tmp_path / "memo.sqlite3")
    for _ in range(2):  # hashed, then from the memo
        got = load_dataset(str(root), val_fraction=0.0, test_fraction=0.0, memo=memo).train
        assert got.ids == want
        assert got.digests() == [hashlib.sha256((root / i).read_bytes()).hexdigest() for i in want]
