"""Layer and hyper-parameter sweeps: every layer from one backbone pass, a head per combination.

Choosing the layer to transfer from is the first question of transfer learning, and the cache makes
asking it cheap: the backbone runs once over the data for all the layers (one cache entry), then a
head is trained on each layer for each hyper-parameter setting — seconds each, from the cache. The
choice is made on the validation split; the test accuracy is reported, never used to choose.

    featcache sweep efficientnet-lite0 mnist-5k --layers blocks.3,blocks.4,blocks.5,penultimate \\
        --lrs 1e-3,3e-3 --input-size 64 64 --out runs/sweep

A linear head's settings on one layer train as one grid, in one pass over the batches
(:mod:`featcache.train.grid`; each head equal to training it alone, to float rounding); what the grid
does not cover (other heads and tasks, views, class weights) trains one by one, and the sweep says why.

Every combination is a run folder (``load_run``, ``export`` and ``predict`` take it); ``sweep.json``
holds the table and the chosen one, ``sweep.png`` plots validation accuracy per layer. The sweep
folder's own ``config.json`` holds the grid, so ``featcache sweep --resume --out runs/sweep`` finishes
an interrupted sweep: the runs that finished are read back, the others trained again (seconds each,
from the cache), and the table is the one an uninterrupted sweep writes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .._util import FeatcacheError, best_on_val
from ..backbones.registry import Backbone
from ..cache.splits import CachedFeatures
from ..data.datasets import DatasetSplits
from ..train.config import TrainConfig
from ..train.fit import FitResult, TrainingDiverged, TrainingInterrupted
from ..train.grid import grid_not_covered
from ..train.heads import Head, HeadInfo, HeadSpec, build_head
from ..train.objectives import metric_key
from .config import SweepGrid, grid  # noqa: F401  (defined there, without torch)
from .folder import Run, RunFolder, load_run
from .job import Job
from .logger import epoch_log
from .metrics import Metrics
from .record import RunRecord, SweepPart, SweepRunPart
from .report import plot_sweep
from .spec import RunSpec
from .train import train_grid_on_cache, train_on_cache, write_mistakes

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """One row per (layer, settings): validation and test metrics, seconds, run folder; the chosen row."""

    rows: list[dict[str, Any]]
    best: dict[str, Any]
    extract_seconds: float
    out: Path

    def chosen(self) -> Run:
        """The chosen run (:attr:`best`), loaded: its record, typed metrics and head.

        Example:
            >>> sweep_run(spec, grid).chosen().metrics.test.acc  # doctest: +SKIP
            0.948
        """
        return load_run(self.out / self.best["run"])

    def __repr__(self) -> str:
        b = self.best
        return (
            f"SweepResult({str(self.out)!r}, {len(self.rows)} runs, best={b['layer']!r} ({b['run']}) "
            + ", ".join(f"{k}={v:.4g}" for k, v in b.items() if k.startswith("val_") and k != "val_loss")
            + ")"
        )


def _varied(configs: Sequence[TrainConfig]) -> list[str]:
    """The TrainConfig fields that differ between the configs (the sweep's axes)."""
    dicts = [asdict(c) for c in configs]
    return [k for k in dicts[0] if len({repr(d[k]) for d in dicts}) > 1]


def sweep_run(spec: RunSpec, sweep: SweepGrid) -> SweepResult:
    """Extract the grid's layers in one pass, train its head on each for each setting, choose on val.

    Every combination is a run folder inside ``spec.out``; ``sweep.json`` and ``sweep.png`` summarise.
    With ``spec.resume`` (the same grid and settings, checked against the sweep's config.json) the runs
    that finished are reused and only the others train.

    Example:
        >>> spec = RunSpec("efficientnet-lite0", DataConfig("mnist-5k"), out="runs/sweep",
        ...                extract=ExtractConfig(input_size=(64, 64)), train=TrainConfig(epochs=10))
        >>> res = sweep_run(spec, SweepGrid(("blocks.5", "penultimate"), lrs=(1e-3, 3e-3)))  # doctest: +SKIP
        >>> res.best["layer"], res.best["val_acc"]  # doctest: +SKIP
    """
    job = Job.open(spec, "sweep", sweep.layers)
    folder, backbone, layers, splits = job.run_folder, job.backbone, list(job.layers), job.splits
    key = _chosen_on(splits, sweep)
    configs = sweep.configs(spec.train.resolved(len(splits.train)))
    what = f"{len(layers)} layers x {len(configs)} settings, {sweep.head.kind} head"
    job.announce(what, spec.train)
    t0 = time.perf_counter()
    feats, views = job.extract_all()  # one pass for every layer
    extract_seconds = time.perf_counter() - t0
    job.note_data(feats)
    for layer in layers:  # a head that cannot take some layer fails now, not after hours of others
        try:
            shape, layout = tuple(feats["train"].features[layer].shape[1:]), feats["train"].layout(layer)
            build_head(sweep.head, shape, len(splits.classes), layout=layout)
        except FeatcacheError as exc:
            raise FeatcacheError(f"layer {layer!r}: {exc}") from exc
    _write_record(spec, folder, job.record(
        "sweep", backbone, feats, layers, views, head=sweep.head, train=spec.train,
        part=SweepPart(sweep),
    ))  # fmt: skip
    axes = _varied(configs)
    rows: list[dict[str, Any]] = []
    at_last: list[bool] = []  # per trained run: was its best epoch the last one?
    reused = 0  # finished runs of an interrupted sweep, read back (--resume)
    why_not = grid_not_covered(sweep.head, configs, splits.task, len(views))
    if why_not is not None and len(configs) > 1:  # said before the bar starts
        job.say(f"sweep: each of the {len(configs)} settings trains on its own, not as one grid: {why_not}")
    bar = tqdm(total=len(layers) * len(configs), desc="sweep", unit="run", disable=not spec.progress)
    for li, layer in enumerate(layers):
        runs = [
            _run_of(job, folder, backbone, feats, views, sweep.head, layer, cfg, axes, li * len(configs) + ci)
            for ci, cfg in enumerate(configs)
        ]
        done = [(spec.resume and _finished_row(child, record, key)) or None for child, record, _, _ in runs]
        if why_not is None:
            done = _train_grid(runs, done, feats, sweep.head, key, spec, splits)
        for (child, record, cfg, settings), out in zip(runs, done, strict=True):
            out = out or _train_one(child, record, feats, views, sweep.head, cfg, key, spec.logger, splits)
            reused += bool(out.pop("reused", False))
            in_shape = {"shape": out.pop("shape")} if "shape" in out else {}
            rows.append({"layer": layer, **in_shape, **settings, **out})
            if "best_epoch" in out:
                at_last.append(out["best_epoch"] == cfg.epochs)
            trained = _trained(rows)
            if trained:
                best = best_on_val(trained, key)
                bar.set_postfix(best=f"{best['layer']} {best[key]:.3f}")
            bar.update()
    bar.close()
    if reused == len(rows):
        job.say(f"{folder.path} is finished: all {reused} runs reused from it, none trained")
    elif reused:
        job.say(f"resumed {folder.path}: {reused} finished runs reused, {len(rows) - reused} trained")
    if not _trained(rows):
        raise FeatcacheError(f"every combination of the sweep diverged; see {folder.path}/*/ and lower --lrs")
    best = best_on_val(_trained(rows), key)
    warnings = []
    if at_last and all(at_last):
        warnings.append(
            f"still improving: every run's best epoch was its last ({configs[0].epochs}); raise --epochs, "
            "the choice of layer may change"
        )
        log.warning(warnings[-1])
    summary = {
        "model": backbone.cfg.spec,
        "layers": list(layers),
        "axes": axes,
        "head": sweep.head.to_dict(),
        "cache_keys": {k: v.key for k, v in feats.items()},
        **({"view_keys": [v.key for v in views]} if views else {}),
        "extract_seconds": extract_seconds,
        "chosen_on": f"{key} (ties: val_loss)",
        "best": best,
        "rows": rows,
        "warnings": warnings,
    }
    folder.write_json("sweep.json", summary)
    title = f"{backbone.cfg.spec}: {sweep.head.kind} head per layer"
    plot_sweep(_trained(rows), best, list(layers), axes, folder.path / "sweep.png", title, key[4:])
    return SweepResult(rows, best, extract_seconds, folder.path)


def _chosen_on(splits: DatasetSplits, sweep: SweepGrid) -> str:
    """The history key a sweep chooses on (``val_acc``, ``val_map``, ``val_r2``...), and a validation
    split to choose on; a metric of another task, or no val split, is refused before any extraction."""
    key = "val_" + metric_key(splits.task, sweep.metric)
    if splits.val is None or not len(splits.val):
        raise FeatcacheError(
            "a sweep chooses on the validation split: use --val-fraction > 0 (DataConfig(val_fraction=...)) "
            "or a val/ folder"
        )
    return key


def _train_one(
    folder: RunFolder,
    record: RunRecord,
    feats: dict[str, CachedFeatures],
    views: list[CachedFeatures],
    head_spec: HeadSpec,
    cfg: TrainConfig,
    key: str = "val_acc",
    logger: str = "none",
    splits: DatasetSplits | None = None,
) -> dict[str, Any]:
    """One combination of a sweep as a run folder (its own log with ``logger``); its row of the sweep
    table (chosen on ``key``)."""
    folder.write_config(record)
    layer = str(record.layer)
    try:
        with epoch_log(logger, folder.path) as on_epoch:
            head, info, result, metrics = train_on_cache(
                feats, layer, head_spec, cfg, False, views=views, on_epoch=on_epoch
            )
    except TrainingDiverged as exc:  # one bad setting (say, a too high lr) must not end the sweep
        log.warning("%s: %s", folder.path.name, exc)
        return {"diverged": str(exc), "run": folder.path.name}
    row = _write_run(folder, record, head, info, metrics, feats, cfg, splits, key)
    if not result.finished:
        raise _interrupted(folder, result)
    return row


def _write_run(
    folder: RunFolder,
    record: RunRecord,
    head: Head,
    info: HeadInfo,
    metrics: Metrics,
    feats: dict[str, CachedFeatures],
    cfg: TrainConfig,
    splits: DatasetSplits | None,
    key: str,
) -> dict[str, Any]:
    """A trained combination's run folder (head, metrics, report, mistakes); its row of the table."""
    layer = str(record.layer)
    folder.save_head(head, info)
    folder.write_metrics(metrics)
    folder.write_report(metrics, list(record.classes), f"{record.model} · {layer} · {info.spec.kind}")
    write_mistakes(folder, head, feats, layer, cfg, splits)
    return _row(folder, info, metrics, key)


def _interrupted(folder: RunFolder, result: FitResult) -> TrainingInterrupted:
    """The Ctrl-C of a sweep whose run in ``folder`` did not finish, with the command that resumes it."""
    return TrainingInterrupted(
        result,
        f"sweep interrupted in {folder.path} (kept, unfinished, with the runs before it); "
        f"`featcache sweep --resume --out {folder.path.parent}` finishes it, reusing the finished runs",
    )


def _run_of(
    job: Job,
    folder: RunFolder,
    backbone: Backbone,
    feats: dict[str, CachedFeatures],
    views: list[CachedFeatures],
    head: HeadSpec,
    layer: str,
    cfg: TrainConfig,
    axes: list[str],
    index: int,
) -> tuple[RunFolder, RunRecord, TrainConfig, dict[str, Any]]:
    """The ``index``-th combination of a sweep: its run folder (named by number, layer and the varied
    settings), its record, its trainer settings and the values of the sweep's axes."""
    settings = {k: getattr(cfg, k) for k in axes}
    name = "-".join(
        [f"{index:02d}", layer.replace(":", "_").replace("/", "_")]
        + [f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in settings.items()]
    )
    record = job.record(
        "sweep", backbone, feats, [layer], views, layer=layer, head=head,
        train=cfg, part=SweepRunPart(str(folder.path)),
    )  # fmt: skip
    return folder.child(name), record, cfg, settings


def _train_grid(
    runs: list[tuple[RunFolder, RunRecord, TrainConfig, dict[str, Any]]],
    done: list[dict[str, Any] | None],
    feats: dict[str, CachedFeatures],
    head_spec: HeadSpec,
    key: str,
    spec: RunSpec,
    splits: DatasetSplits,
) -> list[dict[str, Any] | None]:
    """The rows of one layer's runs with those not ``done`` trained as one grid
    (:func:`~featcache.runs.train.train_grid_on_cache`), each written to its folder as
    :func:`_train_one` writes it; None for a run left to train one by one (grid not applicable)."""
    todo = [i for i, out in enumerate(done) if out is None]
    if len(todo) < 2:
        return done
    layer = str(runs[0][1].layer)
    with contextlib.ExitStack() as stack:
        hooks = []
        for i in todo:
            runs[i][0].write_config(runs[i][1])
            hooks.append(stack.enter_context(epoch_log(spec.logger, runs[i][0].path)))
        cfgs = [runs[i][2] for i in todo]
        outs = train_grid_on_cache(feats, layer, head_spec, cfgs, False, hooks)
    if outs is None:
        return done
    done = list(done)
    stop: TrainingInterrupted | None = None
    for i, out in zip(todo, outs, strict=True):
        child = runs[i][0]
        if isinstance(out, TrainingDiverged):  # as _train_one: the other settings go on
            log.warning("%s: %s", child.path.name, out)
            done[i] = {"diverged": str(out), "run": child.path.name}
            continue
        head, info, result, metrics = out
        done[i] = _write_run(child, runs[i][1], head, info, metrics, feats, runs[i][2], splits, key)
        if not result.finished and stop is None:
            stop = _interrupted(child, result)
    if stop is not None:
        raise stop
    return done


def _write_record(spec: RunSpec, folder: RunFolder, record: RunRecord) -> None:
    """The sweep folder's own ``config.json`` (the shared settings, its grid and head), so that
    ``sweep --resume --out DIR`` needs nothing retyped; a resume first checks it is the same sweep."""
    if spec.resume:
        # the grid first: what the user typed is named before the cache keys it changes
        keys = ("grid", "head", "train", "cache_keys", "split_keys", "view_keys")
        folder.check_resume(record, keys, "this command's settings")
    folder.write_config(record)


def _finished_row(folder: RunFolder, record: RunRecord, key: str = "val_acc") -> dict[str, Any] | None:
    """The row of a sweep's run that finished before the sweep was interrupted, read back from its folder
    (None, so it trains again: a run that is absent, unfinished, diverged or made with other settings)."""
    metrics = folder.read_metrics()
    if metrics is None or not metrics.finished or not (folder.path / "head.json").is_file():
        return None
    old = folder.read_config()
    if any(
        getattr(old, k) != getattr(record, k) for k in ("layer", "head", "train", "cache_keys", "split_keys")
    ):
        return None
    return {**_row(folder, folder.load_head()[1], metrics, key), "reused": True}


def _row(folder: RunFolder, info: HeadInfo, metrics: Metrics, key: str = "val_acc") -> dict[str, Any]:
    """A finished run's row of the sweep table, from its metrics (as written to its metrics.json): the
    val and test values of the metric ``key`` chooses on (``val_acc``, ``val_map``, ``val_r2``, ...)."""
    name, val, test = key[4:], metrics.val, metrics.test
    if val is None or metrics.train_seconds is None:  # _chosen_on refused a sweep without val
        raise FeatcacheError(f"{folder.path}: a sweep's run has no validation scores to choose on")
    return {
        "shape": list(info.in_shape),
        key: val.score(name),
        "val_loss": val.loss,
        **({f"test_{name}": test.score(name)} if test is not None else {}),
        "best_epoch": metrics.best_epoch,
        "train_seconds": round(metrics.train_seconds, 3),
        "run": folder.path.name,
    }


def _trained(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows whose training finished (not the diverged ones)."""
    return [r for r in rows if "diverged" not in r]
