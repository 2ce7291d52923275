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
import csv
import errno
import functools
import json
import logging
import os
import platform
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from .._config import from_json
from .._disk import disk_error, disk_errors, ensure_space
from .._util import FeatcacheError, check_name, default_mode, resolve_device, write_json
from .._version import __version__
from ..backbones.registry import BackboneCfg
from ..cache.splits import CachedFeatures
from ..data.samples import SampleSet
from ..extraction.config import ExtractConfig
from ..train.fit import evaluate
from ..train.heads import Head, HeadInfo, check_input
from ..train.sources import source_for
from .report import plot_confusion, plot_curves, plot_label_ap, plot_scatter, plot_top_losses

log = logging.getLogger(__name__)

KINDS = ("train", "finetune", "probe", "sweep")
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


def environment() -> dict[str, Any]:
    """Versions and hardware, recorded with every run and benchmark."""
    return {
        "featcache": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


@dataclass(frozen=True)
class RunRecord:
    """What ``config.json`` holds: the shared part of every run, typed, and the verb's own part.

    Attributes:
        kind: ``train``, ``finetune``, ``probe`` or ``sweep`` (one run of a sweep, or the sweep's own
            folder: that one's verb part holds its ``grid``).
        model: the backbone spec as resolved (``torchvision:resnet18``).
        backbone_cfg: :meth:`BackboneCfg.to_dict` of the backbone (preprocessing, weights id, ...).
        data: the :class:`~featcache.data.DataConfig` as a dict.
        extract: the :class:`~featcache.extraction.ExtractConfig` as a dict, with the run's ``layers``,
            ``augment`` and ``views``.
        classes: class names, in label order (regress: the targets' names).
        task: what the run learnt: ``classify``, ``multilabel`` or ``regress`` (never part of a cache key).
        weights: the weights' name; ``weights_arg``: what was passed (to rebuild the backbone).
        layer: the layer a head trained on (None for a fine-tuned network); ``layer_layout``: its
            layout (what pooling averaged over; export pools the same way).
        cache_keys / view_keys: the feature tables the run read; ``split_keys``: each split as read
            (the table, the rows' content digests in order, labels and classes).
        cache_dir: the cache root given to the run (None: the default one).
        head / train: the head spec and trainer settings as dicts.
        verb: the verb's own part (``finetune``, ``plan``, ``mode``, ``probe``, ``sweep``, ...), written
            at the top level of ``config.json``.

    Example:
        >>> record = RunFolder("runs/mnist").read_config()  # doctest: +SKIP
        >>> record.kind, record.layer  # doctest: +SKIP
        ('train', 'penultimate')
    """

    kind: str
    model: str
    backbone_cfg: dict[str, Any]
    data: dict[str, Any]
    extract: dict[str, Any]
    classes: tuple[str, ...]
    weights: str | None = None
    weights_arg: str | None = None
    layer: str | None = None
    layer_layout: str | None = None
    cache_keys: dict[str, str] = field(default_factory=dict)
    split_keys: dict[str, str] = field(default_factory=dict)
    view_keys: tuple[str, ...] = ()
    cache_dir: str | None = None
    head: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    verb: dict[str, Any] = field(default_factory=dict)
    featcache_version: str = __version__
    environment: dict[str, Any] = field(default_factory=environment)
    task: str = "classify"

    def __repr__(self) -> str:
        return (
            f"RunRecord(kind={self.kind!r}, model={self.model!r}, layer={self.layer!r}, "
            f"classes={len(self.classes)}, cache_keys={len(self.cache_keys)})"
        )

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FeatcacheError(f"unknown run kind {self.kind!r}: one of {', '.join(KINDS)}")
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "view_keys", tuple(self.view_keys))
        # The dict parts as config.json holds them (tuples as lists), so a record equals its reread self.
        dicts = ("backbone_cfg", "data", "extract", "cache_keys", "split_keys", "head", "train", "verb")
        for name in (*dicts, "environment"):
            object.__setattr__(self, name, json.loads(json.dumps(getattr(self, name))))

    @property
    def backbone(self) -> BackboneCfg:
        """The backbone config the run was made with."""
        return BackboneCfg.from_dict(self.backbone_cfg)

    def extract_config(self) -> ExtractConfig:
        """The extraction settings of the run (its layers and views are the run's, not the settings')."""
        return from_json(
            ExtractConfig, {k: v for k, v in self.extract.items() if k not in ("layers", "augment", "views")}
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``config.json`` (the verb's part at the top level)."""
        d = asdict(self)
        d.pop("verb")
        d["classes"], d["view_keys"] = list(self.classes), list(self.view_keys)
        if not self.view_keys:
            d.pop("view_keys")
        return {**d, **self.verb}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RunRecord:
        """Read ``config.json``; keys that are not fields are the verb's part."""
        names = {f.name for f in fields(cls)} - {"verb"}
        known = {k: v for k, v in d.items() if k in names}
        missing = [k for k in ("model", "backbone_cfg", "data", "extract", "classes") if k not in known]
        if missing:
            raise FeatcacheError(f"a run's config.json lacks {missing}: not written by featcache")
        known.setdefault("kind", "train")  # configs written before runs recorded their kind
        return cls(**known, verb={k: v for k, v in d.items() if k not in names})


@dataclass
class Run:
    """A finished (or loaded) run: its folder, record, metrics and trained head."""

    dir: Path
    record: RunRecord
    metrics: dict[str, Any]
    head: Head
    head_info: HeadInfo

    def __repr__(self) -> str:
        return (
            f"Run({str(self.dir)!r}, kind={self.record.kind!r}, layer={self.record.layer!r}, "
            f"head={self.head_info.spec.kind!r}, classes={len(self.record.classes)}{_scores(self.metrics)})"
        )

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

    def evaluate(self, cached: CachedFeatures, device: str = "auto") -> dict[str, Any]:
        """Evaluate the trained head on cached features of the same layer (e.g. another split)."""
        dev = resolve_device(device)
        data = source_for(cached, self.layer, dev)
        check_input(self.head_info.in_shape, data.row_shape)
        info = self.head_info
        threshold = info.threshold if info.threshold is not None else 0.5
        return evaluate(
            self.head.to(dev), data, info.num_classes, task=info.task, threshold=threshold, names=self.classes
        )


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
        """Whether this is a sweep's folder (a run folder per combination), not a run: its config.json
        holds a grid (a sweep before those records: a ``sweep.json`` and no config.json)."""
        file = self.path / "config.json"
        if not file.is_file():
            return (self.path / "sweep.json").is_file()
        try:
            return "grid" in json.loads(file.read_text())
        except json.JSONDecodeError:
            return False

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
        except (json.JSONDecodeError, TypeError) as exc:
            raise FeatcacheError(f"{str(file)!r} is not a readable run config ({exc})") from exc

    def check_resume(self, record: RunRecord, keys: Iterable[str], what: str) -> None:
        """Refuse to resume a run whose saved ``keys`` of config.json differ from ``record``'s."""
        old, new = (
            json.loads((self.path / "config.json").read_text()),
            json.loads(json.dumps(record.to_json())),
        )
        diffs = [d for k in keys for d in _differences(k, old.get(k), new.get(k))]
        if diffs:
            raise FeatcacheError(
                f"--resume {self.path}: {what} differ from the run's config.json ({'; '.join(diffs[:6])}); "
                "resume with the run's own settings, or start a new run (another --out, or --overwrite)"
            )

    # ---------------------------------------------------------------- metrics, weights, report

    @_writes("metrics.json")
    def write_metrics(self, metrics: Mapping[str, Any]) -> None:
        write_json(self._out("metrics.json"), dict(metrics))

    def read_metrics(self) -> dict[str, Any]:
        """``metrics.json``, or ``{}`` for a run that has not finished."""
        file = self.path / "metrics.json"
        return dict(json.loads(file.read_text())) if file.exists() else {}

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
        if metrics.get("finished", True):
            return ""
        record = self.read_config()
        verb = verb or record.kind
        epochs = (record.train or {}).get("epochs", "?")
        return (
            f"{self.path} is unfinished (interrupted after epoch {len(metrics.get('history', []))} of "
            f"{epochs}): it holds the best {'head' if record.kind != 'finetune' else 'weights'} of the "
            f"finished epochs; `featcache {verb} --resume --out {self.path}` finishes it"
        )

    @_writes("the report (curves, confusion matrix)")
    def write_report(self, metrics: Mapping[str, Any], classes: list[str], title: str) -> None:
        """``curves.png`` and ``history.csv`` (runs that trained by epochs), and ``confusion.png`` (when
        there is a test split)."""
        if "history" in metrics:
            plot_curves(dict(metrics), self._out("curves.png"), title)
            self._write_csv("history.csv", list(metrics["history"]))
        if "test" in metrics and "confusion" in metrics["test"]:
            plot_confusion(metrics["test"]["confusion"], classes, self._out("confusion.png"))
        if "test" in metrics and "per_label_ap" in metrics["test"]:
            plot_label_ap(
                metrics["test"]["per_label_ap"], classes, self._out("label_ap.png"), f"{title} · test"
            )

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
    the training; a setting an older config lacks did not exist then, so it was off: absent equals
    None / 0 / False.
    """
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [f"{key}: {a!r} -> {b!r}"]
    off = (None, 0, False)
    out = []
    for f in sorted(set(a) | set(b)):
        if f in ("fast_paths", "verify"):
            continue
        same = a[f] == b[f] if f in a and f in b else (a if f in a else b)[f] in off
        if not same:
            out.append(f"{key}.{f}: {a.get(f)!r} -> {b.get(f)!r}")
    return out


def _scores(metrics: Mapping[str, Any]) -> str:
    """``, val_acc=0.93, test_acc=0.92`` for a repr: the headline numbers of a run's metrics."""
    out = ""
    for split in ("val", "test"):
        key = next((k for k in ("acc", "map", "r2") if k in metrics.get(split, {})), None)
        out += f", {split}_{key}={metrics[split][key]:.4g}" if key else ""
    return out


def load_run(run_dir: str | Path) -> Run:
    """Load a run folder (or a sweep folder's chosen run): config, metrics and the trained head.

    Example:
        >>> run = load_run("runs/mnist")  # doctest: +SKIP
        >>> run.metrics["test"]["acc"]  # doctest: +SKIP
    """
    folder, note = RunFolder.resolve(run_dir)
    if note:
        log.info(note)
    head, info = folder.load_head()
    return Run(folder.path, folder.read_config(), folder.read_metrics(), head, info)
