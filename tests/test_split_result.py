"""A split's typed result (cache/splits.py: SplitResult), built once and filled by the extraction: the
JSON ``featcache extract --json`` prints and the manifest keep their form."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featcache.cache.splits import SplitResult, split_key
from featcache.cache.store import FeatureCache
from featcache.cli import main
from featcache.data.datasets import load_dataset

#: the manifest's keys before it was typed (an extraction's split)
MANIFEST_KEYS = {
    "record", "table", "rows", "layers", "layer_layouts", "skipped", "split_key", "split", "dataset",
    "images_extracted", "extract_seconds", "extract_config", "backbone_cfg", "processes", "rows_by_process",
    "method", "extracted", "rows_extracted_this_run",
}  # fmt: skip


def _tree(root: Path) -> Path:
    """Eight small PNGs in two classes and one file that is no image."""
    rng = np.random.default_rng(0)
    for i in range(8):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (root / "b" / "broken.png").write_bytes(b"not a png")
    return root


def test_extract_json_is_the_counts_table_and_split_key_as_before(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "cache"))
    tree = _tree(tmp_path / "imgs")
    argv = ["extract", "torchvision:resnet18", str(tree), "--weights", "none", "--input-size", "32", "32"]
    argv += ["--val-fraction", "0", "--test-fraction", "0", "--layers", "layer2", "-q", "--json"]
    argv += ["--on-bad-image", "skip"]
    outs = []
    for _ in range(2):  # built, then a hit
        assert main(argv) == 0
        outs.append(json.loads(capsys.readouterr().out))
    # the reference: files hashed here, the split's order and labels as the loader gives them
    train = load_dataset(str(tree), val_fraction=0.0, test_fraction=0.0).train
    paths = [tree / i for i in train.ids]
    good = [j for j, p in enumerate(paths) if p.name != "broken.png"]
    digests = [hashlib.sha256(paths[j].read_bytes()).hexdigest() for j in good]
    (key,) = FeatureCache(tmp_path / "cache").entries()
    want_key = split_key(key, digests, np.asarray(train.labels)[good], train.classes)
    first, second = outs
    common = {"rows": 8, "skipped": 1, "table": key, "split_key": want_key}
    assert first == {"train": {**common, "from_cache": 0, "extracted": 8}}
    assert second == {"train": {**common, "from_cache": 8, "extracted": 0}}
    assert list(first["train"]) == ["rows", "from_cache", "extracted", "skipped", "table", "split_key"]


def test_the_result_is_built_once_and_the_manifest_keeps_its_form(tmp_path: Path) -> None:
    from featcache import ExtractConfig, extract, load_backbone

    tree = _tree(tmp_path / "imgs")
    train = load_dataset(str(tree), val_fraction=0.0, test_fraction=0.0).train
    bb = load_backbone("torchvision:resnet18", weights="none")
    cfg = ExtractConfig(input_size=(32, 32), device="cpu", on_bad_image="skip", batch_size=4)
    feats = extract(bb, train, ["layer2"], cfg, cache_dir=str(tmp_path / "c"), progress=False)
    result = feats.result
    assert isinstance(result, SplitResult) and result.record is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.extracted = 0  # type: ignore[misc]
    assert (result.rows, result.extracted, result.split, result.table) == (8, 8, "train", feats.key)
    assert [i for i, _ in result.skipped] == ["b/broken.png"] and feats.hit is False
    assert result.record.key() == feats.key and result.record.layers == ("layer2",)
    assert result.layers["layer2"].shape == (8, *feats.features["layer2"].shape[1:])
    manifest = feats.manifest
    assert set(manifest) == MANIFEST_KEYS
    assert manifest["skipped"] == [{"id": "b/broken.png", "reason": result.skipped[0][1]}]
    assert manifest["record"] == result.record.to_json() and manifest["rows_extracted_this_run"] == 8
    assert json.loads(json.dumps(manifest)) == manifest  # JSON as it is
    again = extract(bb, train, ["layer2"], cfg, cache_dir=str(tmp_path / "c"), progress=False)
    assert again.hit and again.result.extracted == 0 and again.manifest["images_extracted"] == 0
    # a view of it reads nothing and says so
    head = feats.subset([0, 1], "head")
    assert (head.result.rows, head.result.extracted, head.result.skipped, head.result.split) == (
        2,
        0,
        (),
        "head",
    )
    assert head.result.extraction is None and head.layouts == feats.layouts
