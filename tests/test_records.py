"""A run's typed records (issue #21): each run kind's config.json part and its metrics.json round-trip
through the JSON codec, the files keep their shape, and a run folder of another format is refused."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from featcache._util import FeatcacheError
from featcache.backbones.registry import load_backbone
from featcache.cli import main
from featcache.data.config import DataConfig
from featcache.extraction.config import ExtractConfig
from featcache.runs.config import FinetuneConfig, ProbeConfig, SweepGrid
from featcache.runs.folder import Run, RunFolder, load_run
from featcache.runs.metrics import (
    CacheRows,
    ClassifyScores,
    ConfusedPair,
    FewShot,
    Metrics,
    MultilabelScores,
    RegressScores,
    TargetScores,
    scores_of,
)
from featcache.runs.probe import probe_run
from featcache.runs.record import (
    READ_BY,
    RUN_FORMAT,
    FinetunePart,
    FoldsPart,
    ProbePart,
    RunExtraction,
    RunFormatError,
    RunRecord,
    SweepPart,
    SweepRunPart,
    TrainPart,
)
from featcache.runs.spec import RunSpec
from featcache.runs.train import train_run
from featcache.train.config import HeadSpec, TrainConfig
from featcache.train.fit import evaluate
from featcache.train.freeze import FreezePlan
from featcache.train.objectives import multilabel_metrics, regress_metrics

CONTENTS = {"train": {"images": 3, "images_key": "a" * 64, "labels_key": "b" * 64, "key": "c" * 64}}
PLAN = FreezePlan(
    spec="last:1",
    bn="frozen",
    classifier="fc",
    split="layer4.1",
    train_modules=("layer4.1", "fc"),
    trainable_modules=("layer4.1.conv1", "fc"),
    trainable_params=1234,
    total_params=99999,
    groups=((("fc",), 1.0), (("layer4.1.conv1",), 0.5)),
)
CLASSIFY = ClassifyScores(
    loss=0.25,
    acc=0.9,
    balanced_acc=0.85,
    per_class_acc=(1.0, 0.7),
    confusion=((5, 0), (3, 7)),
    n=15,
    most_confused=(ConfusedPair("b", "a", 3),),
)
FIT: dict[str, Any] = {
    "history": ({"epoch": 1, "train_loss": 0.5, "val_loss": 0.4, "val_acc": 0.8},),
    "step_losses": (0.7, 0.5),
    "examples_per_epoch": 12,
    "batch_size": 6,
    "steps_per_epoch": 2,
    "best_epoch": 1,
    "stopped_early": False,
    "train_seconds": 0.1,
    "fast_paths": {"preload": True},
}


def _record(kind: str, part: Any, **typed: Any) -> RunRecord:
    extract = RunExtraction(ExtractConfig(input_size=(32, 32)), ("layer3",))
    return RunRecord(
        kind,
        "torchvision:resnet18",
        {"spec": "torchvision:resnet18"},
        DataConfig("digits"),
        extract,
        ("a", "b"),
        part,
        layer="layer3",
        **typed,
    )


# One record per run kind (and part), with the metrics such a run writes.
KINDS: dict[str, tuple[RunRecord, Metrics | None]] = {
    "train": (
        _record(
            "train",
            TrainPart(CONTENTS),
            head=HeadSpec("linear"),
            train=TrainConfig(epochs=1),
            logger="tensorboard",
        ),
        Metrics(
            **FIT,
            val=CLASSIFY,
            test=CLASSIFY,
            extract_seconds=1.5,
            cache_hit={"train": True},
            cache_rows={"train": CacheRows(12, 12, 0)},
        ),
    ),
    "train --folds": (
        _record("train", FoldsPart(3), head=HeadSpec("linear"), train=TrainConfig(epochs=1)),
        Metrics(**FIT, test=CLASSIFY, refit_on="train+val", folds={"folds": 3, "acc": [0.8, 0.9, 1.0]}),
    ),
    "a fold": (_record("train", FoldsPart(3, fold=1)), Metrics(**FIT, fold=CLASSIFY)),
    "probe --folds": (
        _record("probe", FoldsPart(2, probe=ProbeConfig(strengths=(0.1,)))),
        Metrics(
            "regress", test=RegressScores(0.1, 0.2, 0.3, None, 0.9, {"age": TargetScores(0.2, None, 0.9)}, 4)
        ),
    ),
    "probe": (
        _record("probe", ProbePart(ProbeConfig(strengths=(1e-3, 1e-1), shots=2))),
        Metrics(
            strength=0.1,
            sweep=({"strength": 0.1, "val_acc": 0.9, "iterations": 7},),
            iterations=7,
            chosen_on="val_acc",
            refit_on="train",
            test=CLASSIFY,
            few_shot=FewShot(2, 3, "acc", "test", (0.8, 0.9, 0.7), 0.8, 0.1),
        ),
    ),
    "finetune": (
        _record(
            "finetune",
            FinetunePart(
                FinetuneConfig(train="last:1", augment="flip", views=2), PLAN, "cached-prefix", None, CONTENTS
            ),
            train=TrainConfig(epochs=1),
        ),
        Metrics(
            "multilabel",
            **FIT,
            mode="cached-prefix",
            threshold=0.4,
            test=MultilabelScores(0.3, 0.8, 0.7, (0.9, None), 0.4, 0.6, 0.5, 0.3, 10),
        ),
    ),
    "sweep": (_record("sweep", SweepPart(SweepGrid(("layer2", "layer3"), lrs=(1e-3, 1e-2)))), None),
    "a sweep's run": (
        _record("sweep", SweepRunPart("runs/sweep"), train=TrainConfig(lr=1e-3)),
        Metrics(**FIT, val=CLASSIFY),
    ),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_run_kinds_record_and_metrics_round_trip(tmp_path: Path, kind: str) -> None:
    record, metrics = KINDS[kind]
    folder = RunFolder(tmp_path)
    folder.write_config(record)
    assert folder.read_config() == record
    saved = json.loads((tmp_path / "config.json").read_text())
    # the part's keys at the top level, beside the format and the shared fields
    part = {
        k: v for k, v in saved.items() if k not in {f for f in RunRecord.__dataclass_fields__} | {"format"}
    }
    assert saved["format"] == RUN_FORMAT and set(part) == set(type(record.part).__dataclass_fields__)
    if metrics is None:
        assert folder.read_metrics() is None  # a sweep folder keeps sweep.json, not metrics.json
        return
    folder.write_metrics(metrics)
    assert folder.read_metrics() == metrics
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert None not in written.values() and written["task"] == metrics.task  # absent parts left out


def test_scores_read_nan_as_none_as_the_file_holds_it_and_match_the_evaluators() -> None:
    import numpy as np
    import torch

    from featcache.train.sources import FeatureSource

    head = torch.nn.Linear(4, 6)
    x, y = torch.randn(30, 4, generator=torch.Generator().manual_seed(0)), torch.arange(30) % 6
    raw = evaluate(head, FeatureSource(x, y), 6)
    scores = scores_of("classify", raw)
    assert isinstance(scores, ClassifyScores) and scores.top5 == raw["top5"] and scores.acc == raw["acc"]
    assert scores.confusion == tuple(tuple(r) for r in raw["confusion"]) and scores.headline == raw["acc"]
    one = regress_metrics(np.array([[1.0]]), np.array([[2.0]]), ["age"])  # R² of one row: NaN
    reg = scores_of("regress", {"loss": 1.0, **one})
    assert math.isnan(one["r2"]) and reg.r2 is None and reg.mae == one["mae"] and reg.headline is None
    ml = multilabel_metrics(np.array([[0.1, -1.0], [2.0, -2.0]]), np.array([[1.0, 0.0], [0.0, 0.0]]))
    multi = scores_of("multilabel", {"loss": 0.5, **ml})
    assert isinstance(multi, MultilabelScores) and multi.per_label_ap == (ml["per_label_ap"][0], None)
    with pytest.raises(FeatcacheError, match=r"'confusion' is no score of ClassifyScores: one of loss, acc"):
        scores.score("confusion")
    with pytest.raises(FeatcacheError, match="needs the field 'acc'"):
        scores_of("classify", {"loss": 1.0})


def test_a_part_that_does_not_fit_its_kind_is_refused() -> None:
    with pytest.raises(
        FeatcacheError, match="a train run's part is a ProbePart; a train run holds one of TrainPart"
    ):
        _record("train", ProbePart(ProbeConfig()))
    saved = _record("probe", ProbePart(ProbeConfig())).to_json()
    with pytest.raises(
        FeatcacheError, match=r"no probe run's part \(ProbePart: probe; FoldsPart: folds, fold"
    ):
        RunRecord.from_json({**saved, "grid": {"layers": ["x"]}})
    with pytest.raises(FeatcacheError, match="sweep --resume needs a run whose record holds a SweepPart"):
        _record("probe", ProbePart(ProbeConfig())).part_as(SweepPart, "sweep --resume")


def test_the_records_settings_are_typed_configs_that_read_back_equal() -> None:
    """``data``, ``extract``, ``head`` and ``train`` are configs: a dict in their place is refused by
    name; a list given for a tuple field is held as config.json gives it back (the record equals its
    reread self); an extract record without the run's own keys, or with a key no config has, is
    refused by name."""
    with pytest.raises(TypeError, match=r"RunRecord\.head must be a HeadSpec, got dict"):
        _record("train", TrainPart(CONTENTS), head={"kind": "linear"})
    with pytest.raises(TypeError, match=r"RunRecord\.data must be a DataConfig, got dict"):
        replace(_record("train", TrainPart(CONTENTS)), data={"spec": "digits"})
    record = _record("train", TrainPart(CONTENTS), head=HeadSpec("mlp", hidden=[64, 32]))  # type: ignore[arg-type]
    assert record.head is not None and record.head.hidden == (64, 32)
    assert RunRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    names = [f.name for f in dataclasses.fields(RunRecord) if f.name != "part"]
    assert list(record.to_json()) == ["format", *names, "split_contents"]  # config.json's keys, in order
    saved = record.to_json()["extract"]
    assert RunExtraction.from_json(saved) == record.extract and saved["layers"] == ["layer3"]
    with pytest.raises(FeatcacheError, match=r"extract record lacks \['views'\]"):
        RunExtraction.from_json({k: v for k, v in saved.items() if k != "views"})
    with pytest.raises(FeatcacheError, match="ExtractConfig field"):
        RunExtraction.from_json({**saved, "pooling": "avg"})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunSpec, Run]:
    root = tmp_path_factory.mktemp("records")
    bb = load_backbone("torchvision:resnet18", weights="none")
    spec = RunSpec(
        bb,
        DataConfig("digits", limit=60),
        root / "run",
        extract=ExtractConfig(input_size=(32, 32)),
        train=TrainConfig(epochs=1, device="cpu"),
        cache_dir=str(root / "cache"),
        progress=False,
    )
    return spec, train_run(spec, "layer3", HeadSpec("linear"))


def test_a_train_and_a_probe_run_read_back_as_their_jobs_returned_them(tiny: tuple[RunSpec, Run]) -> None:
    spec, run = tiny
    again = load_run(str(run.dir))
    assert (
        again.record == run.record and again.metrics == run.metrics and isinstance(run.record.part, TrainPart)
    )
    assert isinstance(run.metrics.test, ClassifyScores) and run.metrics.cache_rows is not None
    out = Path(str(spec.out)).parent / "probe"
    probe = probe_run(replace(spec, out=out), "layer3", ProbeConfig(strengths=(1e-2,)))
    assert (
        probe.dir == out and load_run(out).metrics == probe.metrics and load_run(out).record == probe.record
    )
    assert probe.record.part == ProbePart(ProbeConfig(strengths=(1e-2,))) and probe.metrics.strength == 1e-2
    alone = probe_run(replace(spec, out=None), "layer3", ProbeConfig(strengths=(1e-2,)))  # no folder
    assert alone.dir is None and alone.metrics.test == probe.metrics.test


def test_a_run_folder_of_another_format_is_refused_naming_the_folder_and_the_fix(
    tiny: tuple[RunSpec, Run], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tiny_run, old = Path(str(tiny[1].dir)), tmp_path / "old"
    old.mkdir()
    for name in ("head.json", "head.safetensors", "metrics.json"):
        (old / name).write_bytes((tiny_run / name).read_bytes())
    saved = json.loads((tiny_run / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "format"}))
    want = (
        rf"'{old}' holds a run of run format 1, written by an older featcache; this featcache .* reads "
        rf"format {RUN_FORMAT}: re-run it, or use featcache {READ_BY[1]}"
    )
    with pytest.raises(RunFormatError, match=want):
        load_run(old)
    assert main(["export", str(old), "--format", "safetensors"]) == 2
    err = capsys.readouterr().err
    assert "run format 1" in err and "re-run it" in err and "Traceback" not in err
    (old / "config.json").write_text(json.dumps({**saved, "format": RUN_FORMAT + 1}))
    with pytest.raises(
        RunFormatError, match=rf"run format {RUN_FORMAT + 1}, which this featcache .* does not know"
    ):
        RunFolder(old).read_config()


def test_export_reads_runs_through_the_run_folder_and_imports_no_job_module() -> None:
    """A fine-tuned network is rebuilt by RunFolder.load_finetuned: export/ imports runs' folder and
    records, never a job (train, finetune, probe, sweep, folds, knn)."""
    import ast

    import featcache.export

    jobs = {"train", "finetune", "probe", "sweep", "folds", "knn"}
    seen = set()
    for path in Path(featcache.export.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("runs."):
                seen.add(node.module.split(".")[1])
    assert seen and not seen & jobs, seen
    assert callable(RunFolder.load_finetuned)


def test_one_run_type_names_its_head_or_its_network() -> None:
    import torch

    from featcache.train.heads import HeadInfo, build_head

    network = Run(None, KINDS["finetune"][0], Metrics("multilabel"), torch.nn.Linear(2, 2))
    assert isinstance(network.model, torch.nn.Linear) and network.plan == PLAN
    with pytest.raises(FeatcacheError, match=r"finetune run trained a network, not a head: use run\.model"):
        _ = network.head
    head, info = build_head(HeadSpec("linear"), (4,), 2), HeadInfo(HeadSpec("linear"), (4,), 2)
    run = Run(None, KINDS["train"][0], Metrics(test=CLASSIFY), head, info)
    assert run.head is head and run.head_info.in_shape == (4,) and "test_acc=0.9" in repr(run)
    with pytest.raises(FeatcacheError, match=r"this train run trained a head: use run\.head"):
        _ = run.model
    with pytest.raises(FeatcacheError, match=r"run\.plan needs a run whose record holds a FinetunePart"):
        _ = run.plan
