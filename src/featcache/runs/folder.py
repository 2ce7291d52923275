"""The run folder: the one owner of what a run writes and reads.

A run folder holds ``config.json`` (a :class:`RunRecord`: everything needed to reproduce, reload and
export the run, cache keys included), ``metrics.json``, the trained head (``head.safetensors`` +
``head.json``) or a fine-tuned network's trainable weights (``trainable.safetensors``),
``checkpoint.pt`` (for ``--resume``), ``curves.png``, ``confusion.png``, ``history.csv``,
``misclassified.csv`` and ``top_losses.png`` (and ``tensorboard/`` with ``--logger tensorboard``; the
README's table says what each is). :class:`RunFolder` alone
creates, writes and reads these files, with the same resume/overwrite rules for every verb; export
and predict read runs only through it. No pickle: heads rebuild from JSON + safetensors.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import errno
import functools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .._disk import disk_error, disk_errors, ensure_space
from .._util import FeatcacheError, check_name, default_mode, resolve_device, write_json
from ..backbones.registry import Backbone, BackboneCfg, load_backbone
from ..cache.splits import CachedFeatures
from ..data.samples import SampleSet
from ..extraction.config import ExtractConfig
from ..train.fit import evaluate
from ..train.freeze import FreezePlan, replace_classifier
from ..train.heads import Head, HeadInfo, check_input
from ..train.objectives import METRIC
from ..train.sources import source_for
from .metrics import ClassifyScores, Metrics, MultilabelScores, Scores, scores_of
from .record import FinetunePart, RunFormatError, RunRecord, SweepPart, environment  # noqa: F401  (re-exported)
from .report import plot_confusion, plot_curves, plot_label_ap, plot_scatter, plot_top_losses

log = logging.getLogger(__name__)

# Files a run writes; an --overwrite removes them all before the new run writes anything, so a killed
# overwrite can never be resumed as a mix of two runs.
RUN_FILES = (
    "config.json",
    "metrics.json",
    "checkpoint.pt",
    "head.safetensors",
    "head.json",
    "trainable.safetensors",
    "curves.png",
    "confusion.png",
    "history.csv",
    "misclassified.csv",
    "top_losses.png",
    "skipped.csv",
    "sweep.json",
    "sweep.png",
    "label_ap.png",
    "scatter.png",
    "predictions.csv",
    "splits.csv",
    "folds.json",
    "oof.csv",
)


@dataclass
class Run:
    """A finished (or loaded) run of any verb that trains: its folder, record, typed metrics and what
    it trained: a head (``train``, ``probe``, a sweep's run, a folds folder's refit) with its
    :class:`HeadInfo`, or a fine-tuned network (``finetune``).

    Attributes:
        dir: the run folder (None: a probe run without ``--out``).
        record: what ``config.json`` holds (:class:`RunRecord`, its verb's part included).
        metrics: what ``metrics.json`` holds (:class:`~featcache.runs.metrics.Metrics`).
        trained: the trained head, or the fine-tuned network; :attr:`head` and :attr:`model` name it.
        info: how to rebuild the head (None for a fine-tuned network).

    Example:
        >>> run = train_run(spec, "penultimate")  # doctest: +SKIP
        >>> run.metrics.test.acc, run.head_info.spec.kind  # doctest: +SKIP
        (0.951, 'linear')
    """

    dir: Path | None
    record: RunRecord
    metrics: Metrics
    trained: nn.Module
    info: HeadInfo | None = None

    def __repr__(self) -> str:
        what = f"head={self.info.spec.kind!r}" if self.info is not None else "network"
        where = str(self.dir) if self.dir is not None else None
        return (
            f"Run({where!r}, kind={self.record.kind!r}, layer={self.record.layer!r}, {what}, "
            f"classes={len(self.record.classes)}{_scores(self.metrics)})"
        )

    @property
    def head(self) -> Head:
        """The trained head (a run of a fine-tuned network has none: :attr:`model`)."""
        if not isinstance(self.trained, Head):
            raise FeatcacheError(f"this {self.record.kind} run trained a network, not a head: use run.model")
        return self.trained

    @property
    def head_info(self) -> HeadInfo:
        """How the head was built (its spec, input shape, classes, task, threshold)."""
        if self.info is None:
            raise FeatcacheError(f"this {self.record.kind} run trained a network, not a head: use run.model")
        return self.info

    @property
    def model(self) -> nn.Module:
        """The fine-tuned network of a ``finetune`` run (a head run's is :attr:`head`)."""
        if isinstance(self.trained, Head):
            raise FeatcacheError(f"this {self.record.kind} run trained a head: use run.head")
        return self.trained

    @property
    def plan(self) -> FreezePlan:
        """What a ``finetune`` run trained (its record's :class:`FinetunePart`)."""
        return self.record.part_as(FinetunePart, "run.plan").plan

    def history_rows(self) -> list[dict[str, Any]]:
        """Per-epoch rows of the training history (none for a run that did not train by epochs)."""
        return list(self.metrics.history or ())

    @property
    def config(self) -> dict[str, Any]:
        """``config.json`` as written."""
        return self.record.to_json()

    @property
    def backbone_cfg(self) -> BackboneCfg:
        return self.record.backbone

    @property
    def classes(self) -> list[str]:
        return list(self.record.classes)

    @property
    def layer(self) -> str:
        return str(self.record.layer)

    def extract_config(self) -> ExtractConfig:
        """The extraction settings the head was trained on."""
        return self.record.extract_config()

    def evaluate(self, cached: CachedFeatures, device: str = "auto") -> Scores:
        """Evaluate the trained head on cached features of the same layer (e.g. another split).

        Example:
            >>> run.evaluate(extract(backbone, other, [run.layer])).acc  # doctest: +SKIP
            0.93
        """
        dev = resolve_device(device)
        data = source_for(cached, self.layer, dev)
        check_input(self.head_info.in_shape, data.row_shape)
        info = self.head_info
        threshold = info.threshold if info.threshold is not None else 0.5
        scores = evaluate(
            self.head.to(dev), data, info.num_classes, task=info.task, threshold=threshold, names=self.classes
        )
        return scores_of(info.task, scores)


F = TypeVar("F", bound=Callable[..., Any])
#: how to get a writable run folder, in messages
OUT_FIX = "choose another --out (RunSpec(out=...))"


def _read_only(path: Path) -> bool:
    """Whether ``path`` lies on a read-only filesystem."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _writes(what: str) -> Callable[[F], F]:
    """A RunFolder method that writes ``what``: a full disk or a folder that cannot be written is a
    :class:`~featcache._disk.DiskError` naming the folder, not a traceback."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def method(self: RunFolder, *args: Any, **kwargs: Any) -> Any:
            with disk_errors(self.path, None, what, OUT_FIX):
                return fn(self, *args, **kwargs)

        return method  # type: ignore[return-value]

    return wrap


class RunFolder:
    """The one owner of a run folder's files: prepare, write and read config, metrics, weights, report.

    Example:
        >>> folder = RunFolder.prepare("runs/mnist", resume=False, overwrite=False)  # doctest: +SKIP
        >>> folder.write_config(record); folder.save_head(head, info)  # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @classmethod
    def resolve(cls, path: str | Path) -> tuple[RunFolder, str]:
        """The run folder at ``path``; for a sweep folder, the run it chose, and a line saying so ("" for
        a run folder), so export, predict and load_run take either.

        Example:
            >>> folder, note = RunFolder.resolve("runs/sweep")  # doctest: +SKIP
            >>> note  # doctest: +SKIP
            "runs/sweep is a sweep: using its chosen run 03-blocks.4 (layer blocks.4, val acc 0.946)"
        """
        folder = cls(path)
        sweep = folder.path / "sweep.json"
        if not folder.is_sweep():
            return folder, ""
        if not sweep.is_file():
            raise FileNotFoundError(
                f"{str(folder.path)!r} is a sweep that did not finish (no sweep.json, so no chosen run): "
                f"`featcache sweep --resume --out {folder.path}` finishes it, or pass one of its run folders"
            )
        best = json.loads(sweep.read_text())["best"]
        key = next((k for k in best if k.startswith("val_") and k != "val_loss"), "val_acc")
        note = (
            f"{folder.path} is a sweep: using its chosen run {best['run']} (layer {best['layer']}, val "
            f"{key[4:].replace('_', ' ')} {best[key]:.4g}, chosen on the validation split)"
        )
        return cls(folder.path / best["run"]), note

    def is_sweep(self) -> bool:
        """Whether this is a sweep's folder (a run folder per combination), not a run: its record's part
        is a :class:`~featcache.runs.record.SweepPart` (its grid)."""
        if not (self.path / "config.json").is_file():
            return False
        return isinstance(self.read_config().part, SweepPart)

    @property
    def checkpoint(self) -> Path:
        """Where the trainer keeps its resumable checkpoint."""
        return self._out("checkpoint.pt")

    @classmethod
    def prepare(
        cls, path: str | Path, resume: bool = False, overwrite: bool = False, resumable: bool = True
    ) -> RunFolder:
        """Create the folder for a new run, or open the one to resume; the same rules for every verb.

        ``resume`` needs a run there; otherwise a folder holding a run that trained (metrics, a
        checkpoint or a sweep) is refused unless ``overwrite``, which first removes the old run's files
        so nothing of it can be resumed or read as the new run's.
        """
        if resume and overwrite:
            raise FeatcacheError(
                "--resume (resume=True) continues the run in --out and --overwrite (overwrite=True) replaces "
                "it: pass one"
            )
        folder = cls(path)
        if resume and not (folder.path / "config.json").exists():
            raise FileNotFoundError(
                f"--resume {str(folder.path)!r}: no run there to resume (config.json missing)"
            )
        trained = [f for f in ("metrics.json", "checkpoint.pt", "sweep.json") if (folder.path / f).exists()]
        if trained and not (resume or overwrite):
            how = (
                "pass --resume (resume=True) to continue it, --overwrite (overwrite=True) to replace it"
                if resumable
                else "pass --overwrite (overwrite=True)"
            )
            raise FeatcacheError(
                f"--out {str(folder.path)!r} already holds a run ({', '.join(trained)}): {how}, or choose "
                "another --out"
            )
        folder.check_writable()
        if overwrite:
            folder._remove_run()
        # The folder itself appears with the first file written: a command that fails before writing
        # anything (a one-class dataset, a head that cannot take the layer) leaves no empty --out behind.
        return folder

    def _out(self, name: str) -> Path:
        """Where the run's file ``name`` goes (the folder is created on the first write)."""
        with disk_errors(self.path, None, "the run folder", OUT_FIX):
            self.path.mkdir(parents=True, exist_ok=True)
        return self.path / name

    def check_writable(self) -> None:
        """Refuse, before any work, a run folder that cannot be written (a read-only filesystem, a folder
        of another user) or whose disk is full.

        Example:
            >>> RunFolder("/proc/run").check_writable()  # doctest: +SKIP
            featcache._disk.DiskError: cannot write the run folder in '/proc/run': ...
        """
        here = Path(os.path.abspath(self.path))
        while not here.exists() and here.parent != here:
            here = here.parent
        if not os.access(here, os.W_OK):
            code = errno.EROFS if _read_only(here) else errno.EACCES
            err = disk_error(
                OSError(code, os.strerror(code), str(here)), self.path, None, "the run folder", OUT_FIX
            )
            raise err if err is not None else FeatcacheError(f"cannot write the run folder in {str(here)!r}")
        ensure_space(self.path, 0, "the run folder", OUT_FIX)  # the margin: config.json, metrics, the head

    def _remove_run(self) -> None:
        """The previous run's files, and the run folders of a previous sweep."""
        for name in RUN_FILES:
            (self.path / name).unlink(missing_ok=True)
        shutil.rmtree(self.path / "tensorboard", ignore_errors=True)  # --logger tensorboard's log
        for child in self.path.iterdir() if self.path.is_dir() else ():
            if child.is_dir() and (child / "config.json").exists():
                shutil.rmtree(child)

    def child(self, name: str) -> RunFolder:
        """A run folder inside this one (a sweep's runs, folds), created fresh with this one's
        ``splits.csv`` (the same images in the same splits); ``name`` is one path component."""
        folder = RunFolder(self.path / check_name(name, "run folder name"))
        folder.path.mkdir(parents=True, exist_ok=True)
        # a resumed sweep's finished runs keep theirs (the splits are the same: resume checks split_keys)
        if (self.path / "splits.csv").is_file() and not (folder.path / "splits.csv").exists():
            shutil.copyfile(self.path / "splits.csv", folder._out("splits.csv"))
        return folder

    # ---------------------------------------------------------------- config.json

    @_writes("config.json")
    def write_config(self, record: RunRecord) -> None:
        """Write ``config.json``: the only place it is written."""
        write_json(self._out("config.json"), record.to_json())

    def read_config(self) -> RunRecord:
        """The run's record; a folder without one is named as not a run folder."""
        file = self.path / "config.json"
        runs = sorted(p.parent.name for p in self.path.glob("*/config.json")) if not file.is_file() else []
        if runs:  # a sweep stopped before it wrote sweep.json (Ctrl-C), or a folder of runs: name them
            shown = ", ".join(str(self.path / r) for r in runs[:3]) + (", ..." if len(runs) > 3 else "")
            raise FileNotFoundError(
                f"{str(self.path)!r} is not a featcache run folder but holds {len(runs)}: pass one of them "
                f"({shown}); a sweep that did not finish has no sweep.json, so no chosen run"
            )
        if not file.is_file():
            raise FileNotFoundError(
                f"{str(self.path)!r} is not a featcache run folder (no config.json); pass the folder "
                "written by `featcache train`, `finetune`, `probe --out` or a sweep's run"
            )
        try:
            return RunRecord.from_json(json.loads(file.read_text()))
        except RunFormatError as exc:  # the folder first: which of the user's runs it is
            raise RunFormatError(f"{str(self.path)!r} holds a run of {exc}") from None
        except (json.JSONDecodeError, TypeError, FeatcacheError) as exc:
            raise FeatcacheError(f"{str(file)!r} is not a readable run config ({exc})") from exc

    def check_resume(self, record: RunRecord, keys: Iterable[str], what: str) -> None:
        """Refuse to resume a run whose saved ``keys`` of config.json differ from ``record``'s."""
        old, new = self.read_config().to_json(), json.loads(json.dumps(record.to_json()))
        diffs = [d for k in keys for d in _differences(k, old.get(k), new.get(k))]
        if diffs:
            raise FeatcacheError(
                f"--resume {self.path}: {what} differ from the run's config.json ({'; '.join(diffs[:6])}); "
                "resume with the run's own settings, or start a new run (another --out, or --overwrite)"
            )

    # ---------------------------------------------------------------- metrics, weights, report

    @_writes("metrics.json")
    def write_metrics(self, metrics: Metrics) -> None:
        """Write ``metrics.json``: the typed record, through the JSON codec."""
        write_json(self._out("metrics.json"), metrics.to_json())

    def read_metrics(self) -> Metrics | None:
        """The run's metrics (``metrics.json``), or None for a run that has not trained an epoch."""
        file = self.path / "metrics.json"
        if not file.exists():
            return None
        try:
            return Metrics.from_json(json.loads(file.read_text()))
        except (json.JSONDecodeError, FeatcacheError) as exc:
            raise FeatcacheError(f"{str(file)!r} is not a readable run's metrics ({exc})") from exc

    @_writes("the head's weights")
    def save_head(self, head: nn.Module, info: HeadInfo) -> None:
        """``head.safetensors`` (tensors only) + ``head.json`` (how to rebuild it)."""
        self._save_tensors("head.safetensors", head.state_dict())
        write_json(self._out("head.json"), info.to_dict())

    def load_head(self) -> tuple[Head, HeadInfo]:
        """Rebuild the head saved by :meth:`save_head` (no pickle)."""
        if not (self.path / "head.json").is_file():
            raise FileNotFoundError(f"{str(self.path)!r} is not a featcache run folder (no head.json)")
        info = HeadInfo.from_dict(json.loads((self.path / "head.json").read_text()))
        head = info.build()
        head.load_state_dict(load_file(str(self.path / "head.safetensors")))
        return head.eval(), info

    def save_trainable(self, state: Mapping[str, torch.Tensor]) -> None:
        """A fine-tuned network's trained tensors (``trainable.safetensors``)."""
        self._save_tensors("trainable.safetensors", state)

    def load_trainable(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path / "trainable.safetensors"))

    def load_finetuned(
        self, weights: str | None = None, backbone: nn.Module | Backbone | None = None
    ) -> tuple[Backbone, RunRecord]:
        """Rebuild the fine-tuned network of this ``finetune`` run: base weights + new classifier + the
        trained tensors (``trainable.safetensors``).

        Args:
            weights: the base weights (tag or file) when the run's own ``weights_arg`` cannot rebuild them.
            backbone: for a run made from a module passed from Python (``module:Name``), a module with the
                base weights the run started from; a copy of it is fine-tuned (the module passed is
                unchanged).

        Example:
            >>> backbone, record = RunFolder("runs/ft").load_finetuned()  # doctest: +SKIP
            >>> backbone.model(x).shape  # doctest: +SKIP
        """
        record = self.read_config()
        if not isinstance(record.part, FinetunePart):
            raise FeatcacheError(f"{str(self.path)!r} is a {record.kind} run, not a fine-tuned network")
        weights_arg = weights if weights is not None else record.weights_arg
        size = record.extract_config().input_size
        if backbone is not None:  # a copy: the classifier is replaced and the trained tensors loaded into it
            module = backbone.model if isinstance(backbone, Backbone) else backbone
            backbone = load_backbone(copy.deepcopy(module), cfg=record.backbone, input_size=size)
            weights_arg = "the module passed"
        else:
            backbone = load_backbone(record.model, weights_arg, input_size=size)
        if backbone.cfg.weights_id != record.backbone.weights_id:
            raise FeatcacheError(
                f"{record.model} rebuilt with weights={weights_arg!r} is not the base that run "
                f"{str(self.path)!r} was fine-tuned from; pass the weights tag or file it used"
            )
        replace_classifier(backbone.model, record.part.plan.classifier, len(record.classes))
        result = backbone.model.load_state_dict(self.load_trainable(), strict=False)
        if result.unexpected_keys:
            raise FeatcacheError(
                f"trainable.safetensors of {str(self.path)!r} does not fit {record.model}: "
                f"{result.unexpected_keys[:5]}"
            )
        backbone.model.eval().requires_grad_(False)
        return backbone, record

    @_writes("weights")
    def _save_tensors(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(self._out(name)))
        default_mode(self.path / name)  # safetensors writes 0600; runs are shared like any output

    def unfinished(self, verb: str | None = None) -> str:
        """What to say about a run interrupted before its last epoch ("" for a finished run or one that
        never trained by epochs): what it holds and the command that finishes it.

        Example:
            >>> RunFolder("runs/mnist").unfinished()  # doctest: +SKIP
            'runs/mnist is unfinished (interrupted after epoch 3 of 30) ...'
        """
        metrics = self.read_metrics()
        if metrics is None or metrics.finished:
            return ""
        record = self.read_config()
        verb = verb or record.kind
        epochs = record.train.epochs if record.train is not None else "?"
        return (
            f"{self.path} is unfinished (interrupted after epoch {len(metrics.history or ())} of "
            f"{epochs}): it holds the best {'head' if record.kind != 'finetune' else 'weights'} of the "
            f"finished epochs; `featcache {verb} --resume --out {self.path}` finishes it"
        )

    @_writes("the report (curves, confusion matrix)")
    def write_report(self, metrics: Metrics, classes: list[str], title: str) -> None:
        """``curves.png`` and ``history.csv`` (runs that trained by epochs), and ``confusion.png`` or
        ``label_ap.png`` (when there is a test split)."""
        if metrics.history is not None:
            plot_curves(metrics, self._out("curves.png"), title)
            self._write_csv("history.csv", list(metrics.history))
        if isinstance(metrics.test, ClassifyScores):
            plot_confusion(metrics.test.confusion, classes, self._out("confusion.png"))
        if isinstance(metrics.test, MultilabelScores):
            plot_label_ap(metrics.test.per_label_ap, classes, self._out("label_ap.png"), f"{title} · test")

    @_writes("predictions.csv and scatter.png")
    def write_task_report(
        self, task: str, split: str, ids: list[str], y: torch.Tensor, out: torch.Tensor, classes: list[str]
    ) -> None:
        """``predictions.csv`` of ``split`` for a multi-label or regression head (``out``: its outputs:
        logits, or values in the targets' units) beside the truth ``y``; ``scatter.png`` of a regression.

        Example:
            >>> folder.write_task_report("regress", "test", ids, y, head_outputs, ["age"])  # doctest: +SKIP
        """
        if len(ids) != len(out):  # rows dropped on the way (skipped bad images): ids would not match
            return
        truth, pred = y.float().cpu().numpy(), out.float().cpu().numpy()
        if task == "regress":
            plot_scatter(pred, truth, classes, self._out("scatter.png"), f"{split}: predicted vs true")
            rows = [
                {"split": split, "id": i, **{f"true_{c}": float(t[k]) for k, c in enumerate(classes)},
                 **{f"predicted_{c}": float(p[k]) for k, c in enumerate(classes)}}
                for i, t, p in zip(ids, truth, pred, strict=True)
            ]  # fmt: skip
        else:
            probs = torch.sigmoid(out.float().cpu()).numpy()
            rows = [
                {"split": split, "id": i, "true": ";".join(c for c, v in zip(classes, t, strict=True) if v > 0.5),  # noqa: E501
                 **{f"p_{c}": round(float(v), 6) for c, v in zip(classes, p, strict=True)}}
                for i, t, p in zip(ids, truth, probs, strict=True)
            ]  # fmt: skip
        self._write_csv("predictions.csv", rows)

    @_writes("misclassified.csv")
    def write_misclassified(
        self,
        split: str,
        ids: list[str],
        labels: torch.Tensor,
        logits: torch.Tensor,
        classes: list[str],
        samples: SampleSet | None = None,
    ) -> int:
        """``misclassified.csv``: the rows of ``split`` the model gets wrong, highest loss first, with the
        sample id (the file's path under the dataset, or its index); returns how many. With ``samples``
        (the split's images), also ``top_losses.png``: the first of them in a grid, read through the
        dataset's own loader.

        Example:
            >>> folder.write_misclassified("test", feats.ids, feats_y, logits, classes)  # doctest: +SKIP
            37
        """
        (self.path / "top_losses.png").unlink(missing_ok=True)  # never a picture of an earlier run's
        if len(ids) != len(logits):  # rows dropped on the way (skipped bad images): ids would not match
            return 0
        probs = torch.softmax(logits.double(), 1)
        y = torch.as_tensor(labels).long().cpu()
        pred = probs.argmax(1)
        p_true = probs.gather(1, y[:, None])[:, 0]
        wrong = torch.nonzero(pred != y)[:, 0]
        order = wrong[torch.argsort(p_true[wrong], stable=True)]  # the least likely truth: the highest loss
        rows = [
            {
                "rank": rank,
                "split": split,
                "id": ids[i],
                "true": classes[int(y[i])],
                "predicted": classes[int(pred[i])],
                "p_true": round(float(p_true[i]), 6),
                "p_predicted": round(float(probs[i, pred[i]]), 6),
                "loss": round(float(-torch.log(p_true[i].clamp_min(1e-300))), 6),
            }
            for rank, i in enumerate(order.tolist(), 1)
        ]
        fields = ["rank", "split", "id", "true", "predicted", "p_true", "p_predicted", "loss"]
        self._write_csv("misclassified.csv", rows, fields)
        if samples is not None and rows:
            index = {sample_id: i for i, sample_id in enumerate(samples.ids)}
            plot_top_losses(rows, lambda i: samples.load(index[i]), self._out("top_losses.png"))
        return len(rows)

    def outputs(self) -> str:
        """What the run wrote for a person to look at, for the run's last line: ``misclassified.csv (N
        test images)``, the pictures, ``history.csv``, the TensorBoard log ("" when none).

        Example:
            >>> RunFolder("runs/mnist").outputs()  # doctest: +SKIP
            'misclassified.csv (37 test images), top_losses.png, confusion.png, curves.png, history.csv'
        """
        shown = []
        wrong = self.path / "misclassified.csv"
        if wrong.is_file():
            with wrong.open(newline="") as f:
                rows = list(csv.DictReader(f))
            split = rows[0]["split"] if rows else "evaluated"
            shown.append(f"misclassified.csv ({len(rows)} {split} images)")
        names = ("top_losses.png", "confusion.png", "curves.png", "history.csv", "tensorboard")
        shown += [n + ("/" if n == "tensorboard" else "") for n in names if (self.path / n).exists()]
        return ", ".join(shown)

    @_writes("oof.csv")
    def write_oof(
        self,
        ids: Sequence[str],
        digests: Sequence[str],
        folds: Sequence[int] | torch.Tensor,
        labels: Sequence[int] | torch.Tensor,
        logits: torch.Tensor,
        classes: list[str],
    ) -> None:
        """``oof.csv``: every train+val image's out-of-fold prediction — its id, digest, fold, given label,
        the prediction of the head that did not train on it, the probability that head gives the given
        label, and the loss.

        Example:
            >>> folder.write_oof(pool.ids, pool.digests, fold, pool.labels, oof, classes)  # doctest: +SKIP
        """
        probs = torch.softmax(logits.double(), 1)
        y = torch.as_tensor(labels).long()
        p_label = probs.gather(1, y[:, None])[:, 0]
        pred = probs.argmax(1)
        rows = [
            {
                "id": ids[i],
                "digest": digests[i],
                "fold": int(folds[i]),
                "label": classes[int(y[i])],
                "predicted": classes[int(pred[i])],
                "p_label": round(float(p_label[i]), 6),
                "loss": round(float(-torch.log(p_label[i].clamp_min(1e-300))), 6),
            }
            for i in range(len(ids))
        ]
        self._write_csv("oof.csv", rows, ["id", "digest", "fold", "label", "predicted", "p_label", "loss"])

    @_writes("a CSV file")
    def write_csv(
        self, name: str, rows: Sequence[Mapping[str, Any]], fields: list[str] | None = None
    ) -> None:
        """A CSV file ``name`` of the run (a header, then a line per row), written atomically.

        Example:
            >>> folder.write_csv("oof.csv", [{"id": "a.png", "loss": 0.1}])  # doctest: +SKIP
        """
        self._write_csv(name, rows, fields)

    @_writes("skipped.csv")
    def write_skipped(self, rows: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
        """``skipped.csv``: the images left out as unreadable (``--on-bad-image skip``), one ``{split,
        id, reason}`` row each; written only when there are some. Returns the rows.

        Example:
            >>> folder.write_skipped([{"split": "train", "id": "a.jpg", "reason": "?"}])  # doctest: +SKIP
        """
        out = [{k: str(r[k]) for k in ("split", "id", "reason")} for r in rows]
        if out:
            self._write_csv("skipped.csv", out, ["split", "id", "reason"])
        return out

    @_writes("splits.csv")
    def write_splits(self, rows: Sequence[Mapping[str, str]]) -> dict[str, str]:
        """``splits.csv``: every image of the run with its split, one ``{id, digest, split, label}`` row
        each (:meth:`DatasetSplits.membership`). Returns the ``{digest: split}`` the folder recorded
        before (empty when none), so a run can say how many images changed split.

        Example:
            >>> folder.write_splits(splits.membership())  # doctest: +SKIP
            {}
        """
        before: dict[str, str] = {}
        path = self.path / "splits.csv"
        with contextlib.suppress(OSError, csv.Error, KeyError), path.open(newline="") as f:
            before = {r["digest"]: r["split"] for r in csv.DictReader(f)}
        self._write_csv("splits.csv", rows, ["id", "digest", "split", "label"])
        return before

    @_writes("a CSV file")
    def _write_csv(
        self, name: str, rows: Sequence[Mapping[str, Any]], fields: list[str] | None = None
    ) -> None:
        """A CSV file of the run (a header, then a line per row) that pandas reads as is."""
        columns = fields or list(dict.fromkeys(k for r in rows for k in r))
        tmp = self._out(f".{name}.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.path / name)

    @_writes("a JSON file")
    def write_json(self, name: str, obj: Any) -> None:
        """Another JSON file of the run (``sweep.json``)."""
        write_json(self._out(name), obj)


def _differences(key: str, a: Any, b: Any) -> list[str]:
    """``key: old -> new`` lines where a saved setting differs from this command's.

    The fast paths and reading the cache with or without checksums (``verify``) change the speed, not
    the training. Both sides are records of one run format (``read_config`` checks it), so they hold
    the same fields.
    """
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [f"{key}: {a!r} -> {b!r}"]
    return [
        f"{key}.{f}: {a.get(f, '(none)')!r} -> {b.get(f, '(none)')!r}"
        for f in sorted(set(a) | set(b))
        if f not in ("fast_paths", "verify") and (f not in a or f not in b or a[f] != b[f])
    ]


def _scores(metrics: Metrics) -> str:
    """``, val_acc=0.93, test_acc=0.92`` for a repr: the headline numbers of a run's metrics (and a
    probe's chosen strength)."""
    key = METRIC[metrics.task]
    strength = f", strength={metrics.strength:g}" if metrics.strength is not None else ""
    return strength + "".join(
        f", {split}_{key}={s.headline:.4g}"
        for split, s in (("val", metrics.val), ("test", metrics.test))
        if s is not None and s.headline is not None
    )


def load_run(run_dir: str | Path) -> Run:
    """Load a run folder (or a sweep folder's chosen run): config, metrics and the trained head.

    Example:
        >>> run = load_run("runs/mnist")  # doctest: +SKIP
        >>> run.metrics.test.acc  # doctest: +SKIP
    """
    folder, note = RunFolder.resolve(run_dir)
    if note:
        log.info(note)
    head, info = folder.load_head()
    metrics = folder.read_metrics()
    if metrics is None:
        raise FileNotFoundError(
            f"{str(folder.path)!r} holds no metrics.json: its run stopped before its first epoch ended; "
            "run it again (--overwrite)"
        )
    return Run(folder.path, folder.read_config(), metrics, head, info)
