"""``featcache train | finetune | sweep | probe``: the jobs, from one :class:`RunSpec` each."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .. import runs as jobs  # the jobs load torch when first called, after every setting is checked
from .._checks import check_number
from .._format import format_table
from .._util import FeatcacheError
from ..data.config import DataConfig
from ..extraction.config import ExtractConfig, Views
from ..runs.config import FinetuneConfig, KnnConfig, ProbeConfig, SweepGrid
from ..runs.spec import RunSpec
from ..train.config import HeadSpec, TrainConfig
from .extract import count_text
from .flags import from_args
from .show import print_json

if TYPE_CHECKING:
    from ..cache.splits import CachedFeatures
    from ..runs.folds import FoldsResult
    from ..runs.metrics import Scores
    from ..runs.record import RunRecord

T = TypeVar("T")


def run_spec(a: argparse.Namespace, **given: Any) -> RunSpec:
    """The job spec of a run verb's flags (``given`` fields win); with ``--resume``, the run's own spec
    from its config.json, with the flags written on the command line on top."""
    if getattr(a, "resume", False):
        return resumed(a)[0]
    if a.model is None or a.data is None:
        raise FeatcacheError(
            f"{a.verb} needs MODEL and DATA (or --resume --out DIR to continue the run there from its "
            "config.json)"
        )
    fields = a._config_fields
    parts: dict[str, Any] = {
        "data": from_args(DataConfig, a),
        "extract": from_args(ExtractConfig, a),
        # a verb with some of TrainConfig's flags (probe: --ram-budget-gb) still runs on --device
        "train": from_args(
            TrainConfig, a, **({} if "device" in fields.get(TrainConfig, {}) else {"device": a.device})
        ),
        "views": Views.parse(a.views, a.augment) if "views" in a else None,
        "progress": not a.quiet,
    }
    return from_args(RunSpec, a, model=a.model, out=a.out, **{**parts, **given})


def written(cls: type[T], a: argparse.Namespace) -> dict[str, Any]:
    """The fields of config ``cls`` whose flags were written on the command line."""
    dests = a._config_fields.get(cls, {})
    return {name: getattr(a, dest) for name, dest in dests.items() if dest in a._given}


def resumed(a: argparse.Namespace) -> tuple[RunSpec, RunRecord]:
    """The spec of the run in ``--out`` (its config.json), with every setting written on the command line
    on top (the job refuses those that differ from the run)."""
    spec, record = RunSpec.from_run(a.out, progress=not a.quiet, **written(RunSpec, a))
    parts: dict[str, Any] = {
        "data": replace(spec.data, **written(DataConfig, a)),
        "extract": replace(spec.extract, **written(ExtractConfig, a)),
        "train": replace(spec.train, **written(TrainConfig, a)),
    }
    if a.data is not None:
        parts["data"] = replace(parts["data"], spec=a.data)
    if {"views", "augment"} & a._given:
        parts["views"] = Views.parse(a.views, a.augment)
    return replace(spec, model=a.model or spec.model, **parts), record


def _check_folds(a: argparse.Namespace) -> None:
    """``--folds``: 0 (off) or 2 or more, refused before any model is loaded."""
    check_number("folds", a.folds, 0, integer=True, why="0: off")
    if a.folds == 1:
        raise FeatcacheError("--folds 1: cross-validation needs at least 2 folds (0: off)")


def cmd_train(a: argparse.Namespace) -> None:
    _check_folds(a)
    if a.folds:
        _folds(a, from_args(HeadSpec, a))
        return
    if a.resume:
        spec, record = resumed(a)
        from ..runs.record import FoldsPart  # the run's record was read: torch is loaded

        head = replace(record.head or HeadSpec(), **written(HeadSpec, a))
        layer = a.layer if "layer" in a._given else str(record.layer)
        if isinstance(record.part, FoldsPart):  # a folds folder: finished folds reused, the others trained
            _print_folds(a, *jobs.folds_run(spec, layer, record.part.folds, head))
            return
        run = jobs.train_run(spec, layer, head)
    else:
        spec, head = run_spec(a), from_args(HeadSpec, a)  # every setting checked before torch loads
        run = jobs.train_run(spec, a.layer, head)
    m = run.metrics
    for split, c in (m.cache_rows or {}).items():
        print(f"{split}: {c.rows} rows: {c.from_cache} from the cache, {c.extracted} extracted")
    print(
        f"best epoch {m.best_epoch}  train {_num(m.train_seconds, '.2f')}s  extract "
        f"{_num(m.extract_seconds, '.2f')}s"
    )
    if m.test is not None:
        print(test_line(m.test))
    else:
        print("no test split: nothing was held out for testing (--test-fraction, or a larger --limit)")
    print(run_line(str(run.dir)))


def _num(value: float | None, spec: str = ".4f") -> str:
    """A score as the run line shows it; ``nan`` for one that is not defined (None in the metrics)."""
    return "nan" if value is None else format(value, spec)


def test_line(test: Scores) -> str:
    """The test split's headline numbers for the run's task.

    Example:
        >>> from featcache.runs.metrics import RegressScores
        >>> test_line(RegressScores(loss=0.1, mae=0.5, rmse=0.7, r2=0.81, pearson=0.9, per_target={}, n=9))
        'test R2 0.8100  MAE 0.5000  RMSE 0.7000  Pearson r 0.9000'
    """
    from ..runs.metrics import MultilabelScores, RegressScores  # the run has finished: torch is loaded

    if isinstance(test, RegressScores):
        return (
            f"test R2 {_num(test.r2)}  MAE {_num(test.mae)}  RMSE {_num(test.rmse)}  Pearson r "
            f"{_num(test.pearson)}"
        )
    if isinstance(test, MultilabelScores):
        return (
            f"test mAP {_num(test.map)} (micro {_num(test.map_micro)})  F1 {test.f1:.4f} at threshold "
            f"{test.threshold:g} (chosen on val)  loss {_num(test.loss)}"
        )
    top5 = f"  top-5 {test.top5:.4f}" if test.top5 is not None else ""
    return f"test accuracy {test.acc:.4f}{top5}  loss {test.loss:.4f}"


def cmd_finetune(a: argparse.Namespace) -> None:
    if a.resume:
        spec, record = resumed(a)
        from ..runs.record import FinetunePart  # the run's record was read: torch is loaded

        ft = replace(record.part_as(FinetunePart, "finetune --resume").finetune, **written(FinetuneConfig, a))
        run = jobs.finetune_run(spec, ft)
    else:
        spec, ft = run_spec(a), from_args(FinetuneConfig, a)  # every setting checked before torch loads
        run = jobs.finetune_run(spec, ft)
    m = run.metrics
    print(f"{m.mode}: best epoch {m.best_epoch}  train {_num(m.train_seconds, '.2f')}s")
    if m.test is not None:
        print(test_line(m.test))
    print(run_line(str(run.dir)))


def cmd_sweep(a: argparse.Namespace) -> None:
    if a.resume:  # the grid and head from the sweep's config.json, flags written on top (checked there)
        spec, record = resumed(a)
        from ..runs.record import SweepPart  # the run's record was read: torch is loaded

        head = replace(record.head or HeadSpec(), **written(HeadSpec, a))
        grid = replace(record.part_as(SweepPart, "sweep --resume").grid, head=head, **written(SweepGrid, a))
        res = jobs.sweep_run(spec, grid)
    elif a.layers is None:
        raise FeatcacheError(
            "sweep needs --layers (the layers to try: blocks.4,penultimate or @blocks), or "
            "--resume --out DIR to continue the sweep there from its config.json"
        )
    else:
        spec, grid = run_spec(a), from_args(SweepGrid, a, head=from_args(HeadSpec, a))  # checked first
        res = jobs.sweep_run(spec, grid)
    if a.json:
        print_json({"best": res.best, "rows": res.rows})
        return
    b = res.best
    key = next(k for k in b if k.startswith("val_") and k != "val_loss")  # val_acc, val_map, val_r2...
    columns = [k for k in b if k != "val_loss"]  # a diverged row shows "diverged" as its val_acc
    print(format_table([{**r, key: r.get(key, "diverged")} for r in res.rows], columns))
    test = f", test {b['test_' + key[4:]]:.4f}" if "test_" + key[4:] in b else ""
    print(f"chosen on val {key[4:]}: {b['layer']} {b['run']} (val {b[key]:.4f}{test})")
    n = len({r["layer"] for r in res.rows})
    print(f"one extraction for {n} layers: {res.extract_seconds:.1f}s; sweep folder: {res.out}")
    print(run_line(res.out / b["run"], "chosen run"))


def cmd_probe(a: argparse.Namespace) -> None:
    config = from_args(ProbeConfig, a)
    _check_folds(a)
    if a.folds:
        _folds(a, config)
        return
    spec = run_spec(a)  # every setting checked before torch loads
    m = jobs.probe_run(spec, a.layer, config).metrics
    if a.json:
        print_json(m.to_json())
        return
    from ..runs.metrics import ClassifyScores  # the probe has run: torch is loaded

    few = m.few_shot
    if few is not None:
        print(
            f"{few.shots}-shot {few.metric} on {few.on} over {few.seeds} draws of the training "
            f"split: {few.test_mean:.4f} ± {few.test_std:.4f} (per draw: "
            + ", ".join(f"{v:.3f}" for v in few.per_seed)
            + ")"
        )
    else:
        print(format_table(list(m.sweep or ())))
        edge = {max(config.strengths): "strongest", min(config.strengths): "weakest"}.get(m.strength or 0.0)
        hint = f" (the {edge} tried: widen --strengths)" if edge and len(config.strengths) > 1 else ""
        print(f"chosen L2 strength {m.strength:g}{hint} on {m.chosen_on}; refit on train+val")
        if isinstance(m.test, ClassifyScores):
            print(f"test accuracy {m.test.acc:.4f}  balanced accuracy {m.test.balanced_acc:.4f}")
        elif m.test is not None:
            print(test_line(m.test))
    if a.out:
        print(f"{run_line(a.out)}; export it with `featcache export {a.out}`")


def run_line(path: str | Path, what: str = "run folder") -> str:
    """A run's last line: its folder and what it wrote to look at (misclassified.csv, the pictures)."""
    from ..runs.folder import RunFolder  # the run has finished: torch is loaded

    files = RunFolder(path).outputs()
    return f"{what}: {path}" + (f"  ({files})" if files else "")


def cmd_knn(a: argparse.Namespace) -> None:
    spec, config = run_spec(a), from_args(KnnConfig, a)  # every setting checked before torch loads
    res = jobs.knn_run(spec, a.layer, config)
    if a.json:
        print_json({"metrics": res.metrics, **res.extra})
        return
    print(format_table(res.rows()))
    print(f"bank: {res.extra['bank_rows']} train rows of {res.extra['layer']}; {res.extra['seconds']:.2f}s")


def _folds(a: argparse.Namespace, head: HeadSpec | ProbeConfig) -> None:
    """`train|probe --folds K`: a head per fold on the cached train+val rows, mean +- std."""
    spec = run_spec(a)  # every setting checked before torch loads
    _print_folds(a, *jobs.folds_run(spec, a.layer, a.folds, head))


def _print_folds(a: argparse.Namespace, res: FoldsResult, feats: dict[str, CachedFeatures]) -> None:
    if getattr(a, "json", False):
        print_json(res.to_dict())
        return
    for split, f in feats.items():
        print(f"{split}: {count_text(f)}")
    name = {"acc": "accuracy", "map": "mAP", "map_micro": "micro mAP", "r2": "R2"}.get(res.metric, res.metric)
    for i, (acc, n) in enumerate(zip(res.acc, res.rows, strict=True)):
        print(f"fold {i}: {n} held-out rows, {name} {acc:.4f}")
    chosen = f" at L2 strength {res.extra['strength']:g}" if "strength" in res.extra else ""
    score = f"{res.mean:.4f} +- {res.std:.4f} (std over folds)"
    print(f"{res.folds}-fold cross-validation {name}{chosen}: {score}")
    refit = f"test {name} of the head refitted on train+val"
    if len(res.test_acc) == 1:  # the probe: one head, refitted on train+val with the chosen strength
        print(f"{refit}: {res.test_acc[0]:.4f}")
    elif res.test_acc:  # train: each fold's head on the test split
        summary = res.to_dict()
        print(f"test {name}: {summary['test_mean']:.4f} +- {summary['test_std']:.4f} (the folds' heads)")
        if f"refit_test_{res.metric}" in res.extra:
            print(f"{refit}: {res.extra[f'refit_test_{res.metric}']:.4f}")
    if a.out:
        print(
            f"run folder: {a.out}  (oof.csv, misclassified.csv: out-of-fold predictions of every train+val "
            f"image; the refitted head: `featcache export {a.out}`)"
        )
