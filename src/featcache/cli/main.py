"""``featcache <verb>``: parse, then run the verb's command. A verb's module is imported only when it
runs, so one verb's dependencies do not slow another's start."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Sequence

from .._errors import FeatcacheError
from .parser import build_parser, verb_of

# verb -> "module:function" under featcache.cli
COMMANDS = {
    "models": "models:cmd_models",
    "layers": "models:cmd_layers",
    "summary": "models:cmd_summary",
    "extract": "extract:cmd_extract",
    "embed": "extract:cmd_embed",
    "cache": "cache:cmd_cache",
    "train": "runs:cmd_train",
    "finetune": "runs:cmd_finetune",
    "sweep": "runs:cmd_sweep",
    "probe": "runs:cmd_probe",
    "knn": "runs:cmd_knn",
    "export": "output:cmd_export",
    "predict": "output:cmd_predict",
    "demo": "output:cmd_demo",
    "bench": "output:cmd_bench",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``featcache`` command; returns the exit status (2 on a user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = verb_of(argv)
    parser = build_parser([verb] if verb else [])  # only this verb's flags (and their imports)
    try:
        a = parser.parse_args(argv)
    except SystemExit as exc:  # a usage error (already printed) is a return value, like the others
        if not exc.code:
            raise  # --help
        return int(exc.code)
    a._given = parser.given(argv)  # what --resume checks against the run
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="featcache: %(message)s")
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and a.verb != "extract":
            raise FeatcacheError(
                f"`featcache {a.verb}` runs in one process; under torchrun only `extract` is sharded. "
                "Extract with torchrun first, then run this verb once: it finds the features in the cache"
            )
        module, function = COMMANDS[a.verb].split(":")
        getattr(importlib.import_module(f"{__package__}.{module}"), function)(a)
    except (FeatcacheError, FileNotFoundError, ValueError) as exc:
        if a.verbose:
            raise
        print(f"featcache {a.verb}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `featcache models | head`
        sys.stderr.close()
        return 0
    except OSError as exc:  # a write no writer turned into a DiskError: full, read-only, not ours
        err = _disk_error(exc)
        if err is None or a.verbose:
            raise
        print(f"featcache {a.verb}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        hint = getattr(exc, "hint", "")  # a training run written with its finished epochs says how to go on
        print(
            f"interrupted; {hint}"
            if hint
            else "interrupted; the cache shards and training checkpoints finished so far are kept: run the "
            "same command again (train/finetune with --resume) to go on from them",
            file=sys.stderr,
        )
        return 130
    return 0


def _disk_error(exc: OSError) -> Exception | None:
    """The message of a failed write for want of space or permission (None for other errors)."""
    from .._disk import disk_error

    where = os.path.dirname(os.path.abspath(exc.filename)) if isinstance(exc.filename, str) else "."
    return disk_error(exc, where, None, "files")


if __name__ == "__main__":
    sys.exit(main())
