"""The per-run ``Job``: each part opened, built or checked once per run; ``RunSpec`` holds settings only."""

from __future__ import annotations

import collections
import dataclasses
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import featcache.backbones.shapes as shapes_mod
import featcache.extraction.build as build_mod
import featcache.extraction.config as config_mod
import featcache.extraction.extractor as extractor_mod
from conftest import tiny_resnet_on_digits
from featcache._util import FeatcacheError
from featcache.backbones.registry import load_backbone
from featcache.cache.store import FeatureCache
from featcache.cli import main
from featcache.extraction.build import extract_table
from featcache.extraction.config import ExtractConfig
from featcache.runs.job import Job
from featcache.runs.spec import RunSpec

COUNTED: dict[str, Callable[..., Any]] = {
    "cache_record": build_mod.cache_record,  # the table record
    "parse_layers": config_mod.parse_layers,  # the layer names resolved (@ sets expanded)
    "check_layers": extractor_mod.check_layers,  # the layer's first axis and layout checked
    "layer_shapes": shapes_mod.layer_shapes,  # the forward that infers them
}


def _count_calls(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """Count calls of :data:`COUNTED` through every name featcache's modules bound them to."""
    counts: collections.Counter[str] = collections.Counter()

    def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    wrappers = {name: counted(name, fn) for name, fn in COUNTED.items()}
    for module in [m for n, m in sys.modules.items() if n.startswith("featcache")]:
        for attr, value in list(vars(module).items()):
            for name, fn in COUNTED.items():
                if value is fn:
                    monkeypatch.setattr(module, attr, wrappers[name])
    return counts


def test_one_train_builds_its_table_record_once_and_checks_its_layer_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import featcache.runs.train  # noqa: F401  # bound before counting: its names are counted too

    monkeypatch.setenv("FEATCACHE_HOME", str(tmp_path / "cache"))
    opened: list[FeatureCache] = []
    real_init = FeatureCache.__init__

    def init(self: FeatureCache, *args: Any, **kwargs: Any) -> None:
        opened.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(FeatureCache, "__init__", init)
    counts = _count_calls(monkeypatch)
    argv = ["train", *tiny_resnet_on_digits(100), "-q", "--layer", "layer3", "--epochs", "1"]
    assert main([*argv, "--out", str(tmp_path / "first")]) == 0
    assert dict(counts) == {"cache_record": 1, "parse_layers": 1, "check_layers": 1, "layer_shapes": 1}
    assert len({c.root for c in opened}) == 1 and len(opened) <= 1  # one cache object, its tables read once
    counts.clear()
    assert main([*argv, "--out", str(tmp_path / "second")]) == 0  # a cache hit: no forward pass at all
    assert dict(counts) == {"cache_record": 1, "parse_layers": 1}
    capsys.readouterr()


def test_a_job_holds_the_resolved_backbone_layers_and_folder(tmp_path: Path) -> None:
    ecfg = ExtractConfig(input_size=(32, 32), device="cpu")
    spec = RunSpec("torchvision:resnet18", "digits", weights="none", extract=ecfg, cache_dir=str(tmp_path))
    job = Job.open(spec, "knn", "layer4", folder=False, one_layer=True)
    assert (
        job.folder is None
        and job.layer == "layer4"
        and [n for n, _ in job.splits.items()] == ["train", "val", "test"]
    )
    assert job.backbone.cfg.input_size == (32, 32) and job.backbone.cfg.resize_size == 0
    assert job.cache is FeatureCache.shared(str(tmp_path), ecfg.verify)
    assert job.table() is job.table()  # built once
    assert job.row_shape("layer4") == ((512,), "NC")
    # a backbone given from Python: the same model, its preprocessing resolved for the input size
    given = load_backbone("torchvision:resnet18", "none")
    opened = Job.open(dataclasses.replace(spec, model=given), "sweep", "@blocks", folder=False)
    assert opened.backbone.model is given.model and given.cfg.input_size == (224, 224)
    assert opened.backbone.cfg == given.cfg.with_input_size(32, 32)
    assert opened.layers[-1] == "penultimate" and len(opened.layers) > 4
    with pytest.raises(FeatcacheError, match=r"train trains on one layer, but '@blocks' names \d+"):
        Job.open(spec, "train", "@blocks", folder=False, one_layer=True)
    with pytest.raises(FeatcacheError, match="train needs a run folder: pass --out DIR"):
        Job.open(spec, "train", "layer4")


def test_run_spec_holds_settings_only() -> None:
    """The spec loads, prints and builds nothing: those are the Job's (one owner per step)."""
    methods = {n for n, v in vars(RunSpec).items() if callable(v) and not n.startswith("_")}
    assert methods <= {"no_resume", "from_run"}, methods
    assert isinstance(vars(RunSpec)["from_run"], classmethod)


def test_extract_table_refuses_a_record_of_another_extraction(tmp_path: Path) -> None:
    ecfg = ExtractConfig(input_size=(32, 32), device="cpu")
    spec = RunSpec("torchvision:resnet18", "digits", weights="none", extract=ecfg, cache_dir=str(tmp_path))
    job = Job.open(spec, "knn", "layer4", folder=False, one_layer=True)
    other = job.table(["layer3"])
    with pytest.raises(ValueError, match=r"layers \('layer3',\) \(expected \('layer4',\)\)"):
        extract_table(job.backbone, job.splits, job.layers, ecfg, other, job.cache, progress=False)
    bigger = dataclasses.replace(ecfg, input_size=(48, 48))
    with pytest.raises(ValueError, match="preprocessing"):
        extract_table(job.backbone, job.splits, job.layers, bigger, job.table(), job.cache, progress=False)
    assert not list(tmp_path.rglob("table.json"))  # refused before any table is made
