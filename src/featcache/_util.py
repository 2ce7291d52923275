"""Small shared helpers: stable hashing, devices, atomic JSON; the errors of :mod:`featcache._errors`."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the command line's cache verbs start without it
    import torch

from ._checks import check_device

# At home in _errors (no torch, for the command line's start); most modules take them from here.
from ._errors import FeatcacheError, closest, flag, unknown  # noqa: F401


def label_array(labels: Any, task: str) -> Any:
    """``labels`` as the array a task keeps (:mod:`featcache.data.tasks`): int64 class indices for
    ``classify``, else float32 ``(N, K)`` label sets or targets. Here (numpy only) for the cache's views.

    Example:
        >>> label_array([1.0, 2.0], "regress").shape
        (2, 1)
    """
    import numpy as np

    if task == "classify":
        return np.asarray(labels, dtype=np.int64)
    a = np.asarray(labels, dtype=np.float32)
    return a.reshape(len(a), -1) if a.ndim != 2 else a


def best_on_val(rows: Iterable[Mapping[str, Any]], key: str = "val_acc") -> Any:
    """The row chosen on the validation split: highest ``key`` (``val_acc``; ``val_map``, ``val_r2`` for
    the other tasks), ties broken by lower ``val_loss``.

    Example:
        >>> best_on_val([{"val_acc": 0.9, "val_loss": 0.3}, {"val_acc": 0.9, "val_loss": 0.2}])["val_loss"]
        0.2
    """
    return max(rows, key=lambda r: (r[key], -r["val_loss"]))


def stable_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 of a JSON record with sorted keys; raises if the record is not JSON-serialisable.

    Example:
        >>> stable_hash({"b": 1, "a": [1, 2]}) == stable_hash({"a": [1, 2], "b": 1})
        True
    """
    try:
        text = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:  # never fall back to a random key
        raise FeatcacheError(f"cannot hash cache record: {exc}; record keys: {sorted(record)}") from exc
    return hashlib.sha256(text.encode()).hexdigest()


def hash_tensors(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state dict (the weights' identity)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cpu``, ``cuda``, ``cuda:N`` and ``mps`` are checked
    to exist here (:func:`featcache._checks.check_device` names the valid choices).

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    import torch

    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FeatcacheError(
            f"device {device!r} requested but CUDA is not available; use {flag('device', 'cpu')}"
        )
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise FeatcacheError(
            f"device {device!r} requested but this machine has {torch.cuda.device_count()} CUDA devices "
            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); use {flag('device', 'cuda:0')}"
        )
    if device == "mps" and not torch.backends.mps.is_available():
        raise FeatcacheError(f"device 'mps' requested but MPS is not available; use {flag('device', 'cpu')}")
    return torch.device(device)


def default_mode(path: os.PathLike[str] | str) -> None:
    """Give a file the permissions a plain ``open()`` would (safetensors writes 0600 temporaries)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write_text(path: os.PathLike[str] | str, text: str) -> None:
    """Write a text file through a temporary name in the same folder, fsync, then rename."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with no_follow_open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def no_follow_open(path: os.PathLike[str] | str, mode: str = "wb") -> IO[Any]:
    """Open ``path`` for writing (``w``/``wb``, truncating) or appending (``a``/``ab``), creating it, but
    never through a symbolic link at ``path`` itself (``O_NOFOLLOW``: a planted link is an ``OSError``,
    ``ELOOP``, and nothing outside is written); the folders above are the caller's to check
    (:func:`inside`).

    Example:
        >>> with no_follow_open("/tmp/featcache-doc.txt", "w") as f:  # doctest: +SKIP
        ...     f.write("x")
    """
    if mode not in ("w", "wb", "a", "ab"):
        raise ValueError(f"mode {mode!r}: no_follow_open writes (w, wb) or appends (a, ab)")
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if mode[0] == "a" else os.O_TRUNC)
    fd = os.open(path, flags, 0o666)
    return os.fdopen(fd, mode)


def write_json(path: os.PathLike[str] | str, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON; a NaN or infinite float is written as null, so the
    file is always valid JSON (``json.dumps`` would write ``NaN``, which no strict reader accepts).

    Example:
        >>> write_json("metrics.json", {"val_loss": float("nan")})  # doctest: +SKIP
    """
    atomic_write_text(path, json.dumps(finite_json(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float (in dicts, lists and tuples) replaced by None.

    Example:
        >>> finite_json({"loss": float("inf"), "acc": [0.5, float("nan")]})
        {'loss': None, 'acc': [0.5, None]}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def check_name(value: object, what: str) -> str:
    """``value`` if it can be one path component: a non-empty string without a separator, NUL, ``.``
    or ``..`` (names read from disk or given by a user never reach outside their folder).

    Example:
        >>> check_name("layer3", "layer name")
        'layer3'
        >>> check_name("../x", "layer name")  # doctest: +SKIP
        FeatcacheError: layer name '../x' cannot be a file name (...)
    """
    if not isinstance(value, str) or value in ("", ".", "..") or any(c in value for c in ("/", "\\", "\0")):
        raise FeatcacheError(
            f"{what} {value!r} cannot be a file name (it must be a non-empty name without '/', '\\\\', "
            "NUL, '.' or '..'); use another name"
        )
    return value


def inside(folder: os.PathLike[str] | str, relative: str) -> str:
    """``folder/relative`` if it lies inside ``folder`` once symlinks and ``..`` are resolved; raises
    otherwise (a file a cache entry opens must belong to that entry).

    Example:
        >>> inside("/tmp/entry", "shards/a.npy")
        '/tmp/entry/shards/a.npy'
    """
    path = os.path.join(os.fspath(folder), relative)
    base = os.path.realpath(folder)
    real = os.path.realpath(path)
    if os.path.isabs(relative) or os.path.commonpath([base, real]) != base:
        raise FeatcacheError(
            f"{relative!r} leads outside {os.fspath(folder)!r} (to {real!r}): a file of this folder must lie "
            "inside it; the folder was tampered with or damaged: remove it"
        )
    return path


def is_inside(folder: os.PathLike[str] | str, path: os.PathLike[str] | str) -> bool:
    """Whether ``path`` lies inside ``folder`` once symbolic links and ``..`` are resolved (``folder``
    itself counts as inside).

    Example:
        >>> is_inside("/tmp/entry", "/tmp/entry/shards/../uses")
        True
    """
    base = os.path.realpath(folder)
    return os.path.commonpath([base, os.path.realpath(path)]) == base


def links_under(folder: os.PathLike[str] | str) -> list[tuple[str, str]]:
    """``(relative path, target)`` of every symbolic link under ``folder``, never following one (what
    housekeeping reports and leaves alone).

    Example:
        >>> links_under("/tmp/entry")  # doctest: +SKIP
        [('shards', '/elsewhere')]
    """
    out = []
    for d, dirs, files in os.walk(folder):  # os.walk does not descend into linked folders
        for name in sorted(dirs + files):
            p = os.path.join(d, name)
            if os.path.islink(p):
                with contextlib.suppress(OSError):
                    out.append((os.path.relpath(p, folder), os.readlink(p)))
    return out
