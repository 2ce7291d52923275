"""Per-epoch logging beside ``history.csv``: ``--logger tensorboard`` writes each epoch's row as
TensorBoard scalars, live, in the run folder's ``tensorboard/`` (one log folder per run: a sweep's runs
each have their own, so ``tensorboard --logdir runs/sweep`` shows them side by side).

The log always holds exactly the rows of the run's history: a resumed run starts its log again from
the history its checkpoint restored, so no epoch is logged twice and none is missing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._errors import FeatcacheError, unknown

#: what ``--logger`` takes
LOGGERS = ("none", "tensorboard")
#: the log folder inside a run folder
TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_FIX = "pip install 'featcache[tensorboard]' (the tensorboard package), or leave out --logger"

#: what the trainer calls after each epoch with the history so far (one dict per epoch, as history.csv)
EpochHook = Callable[[Sequence[Mapping[str, float]]], None]


def check_logger(name: str) -> None:
    """Refuse an unknown logger, or one whose package is not installed, before any work.

    Example:
        >>> check_logger("none")
    """
    if name not in LOGGERS:
        raise unknown("logger", name, LOGGERS, "Use --logger none|tensorboard.")
    if name == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise FeatcacheError(
            f"--logger tensorboard needs the tensorboard package, not installed: {TENSORBOARD_FIX}"
        )


class TensorBoardLog:
    """Each epoch's history row as TensorBoard scalars (one tag per column of history.csv but
    ``epoch``, which is the step), flushed after every epoch so ``tensorboard`` shows it live.

    Example:
        >>> log = TensorBoardLog(Path("runs/mnist/tensorboard"))  # doctest: +SKIP
        >>> log([{"epoch": 1, "train_loss": 0.9, "val_acc": 0.8}]); log.close()  # doctest: +SKIP
    """

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise FeatcacheError(f"--logger tensorboard: {exc}; {TENSORBOARD_FIX}") from exc
        # A resumed run's history is replayed below: a log kept from before would hold its epochs twice.
        shutil.rmtree(folder, ignore_errors=True)
        self.folder = folder
        self.writer: Any = SummaryWriter(str(folder))
        self.logged = 0  # rows of the history written so far

    def __call__(self, history: Sequence[Mapping[str, float]]) -> None:
        for row in history[self.logged :]:
            step = int(row["epoch"])
            for key, value in row.items():
                if key != "epoch":
                    self.writer.add_scalar(key, float(value), global_step=step)
        self.logged = len(history)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@contextlib.contextmanager
def epoch_log(name: str, run_folder: Path) -> Iterator[EpochHook | None]:
    """The per-epoch hook of logger ``name`` for a run written in ``run_folder`` (None for ``none``),
    closed (its files complete) when the block ends, also on an error or Ctrl-C.

    Example:
        >>> with epoch_log("tensorboard", Path("runs/mnist")) as hook:  # doctest: +SKIP
        ...     fit(head, train, val, 10, config, on_epoch=hook)
    """
    check_logger(name)
    if name == "none":
        yield None
        return
    log = TensorBoardLog(run_folder / TENSORBOARD_DIR)
    try:
        yield log
    finally:
        log.close()
