"""Writing to disks that may be full, read-only or not ours: one clear error instead of a traceback.

Every writer of the cache (shards, segments) and of run folders checks the free space before it writes
(:func:`ensure_space`) and turns the ``OSError`` of a failed write (``ENOSPC``, ``EDQUOT``, ``EROFS``,
``EACCES``) into a :class:`DiskError` naming the folder, the bytes needed and the fix
(:func:`disk_errors`). Writers write through plain file writes, never through a memory map, so a disk
that fills up mid-write is an error the writer sees, not a ``SIGBUS``. No torch here.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ._errors import FeatcacheError

#: kept free beyond what a write needs: filesystem metadata, the temporary copy of a JSON file
MARGIN = 1 << 20
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


class DiskError(FeatcacheError):
    """A write failed, or would fail, for want of space or permission; the message names the folder."""


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (what ``disk_usage`` can measure before a mkdir)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def free_bytes(directory: str | os.PathLike[str]) -> int | None:
    """Bytes free to this user on the filesystem of ``directory`` (None if it cannot be measured)."""
    try:
        return shutil.disk_usage(_existing(Path(directory))).free
    except OSError:
        return None


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} bytes"


def ensure_space(
    directory: str | os.PathLike[str], needed: int, what: str, fix: str = "", free_up: str = ""
) -> None:
    """Refuse to start writing ``needed`` bytes of ``what`` into ``directory`` when its filesystem has
    less free than that plus :data:`MARGIN`.

    Example:
        >>> ensure_space("/tmp", 10, "a test file")
    """
    free = free_bytes(directory)
    if free is not None and free < needed + MARGIN:
        raise DiskError(_no_space(Path(directory), needed + MARGIN, free, what, fix, free_up))


def _no_space(
    directory: Path, needed: int | None, free: int | None, what: str, fix: str, free_up: str
) -> str:
    parts = [f"{_size(needed)} needed with a {_size(MARGIN)} margin"] if needed is not None else []
    parts += [f"{_size(free)} free"] if free is not None else []
    said = f" ({', '.join(parts)})" if parts else ""
    room = f" ({free_up})" if free_up else ""
    return (
        f"not enough space to write {what} in {str(directory)!r}{said}. Free some space there"
        f"{room}{' or ' + fix if fix else ''}, and run the command again: what was written before is kept"
    )


def disk_error(
    exc: OSError,
    directory: str | os.PathLike[str],
    needed: int | None,
    what: str,
    fix: str = "",
    free_up: str = "",
) -> DiskError | None:
    """The :class:`DiskError` for ``exc`` raised while writing ``what`` into ``directory``; None when the
    failure is not about space or permission (the caller re-raises it).

    A write that comes up short without an errno (numpy's ``tofile``: "65536 requested and 2016
    written") counts as a full disk when the filesystem has less than a write's margin free.

    Example:
        >>> disk_error(OSError(errno.ENOSPC, "No space left"), "/tmp/c", 1 << 20, "a shard").args[0][:30]
        'not enough space to write a sh'
    """
    d = Path(directory)
    code = exc.errno
    free = free_bytes(d)
    if code is None and free is not None and free < MARGIN + (needed or 0):
        code = errno.ENOSPC
    if code in NO_SPACE:
        return DiskError(_no_space(d, needed and needed + MARGIN, free, what, fix, free_up))
    if code in NOT_WRITABLE:
        why = "its filesystem is read-only" if code == errno.EROFS else "this user may not write there"
        where = exc.filename if exc.filename else d
        return DiskError(
            f"cannot write {what} in {str(d)!r}: {why} ({os.strerror(code)}: {str(where)!r}). Make it "
            f"writable{' or ' + fix if fix else ''}"
        )
    return None


@contextmanager
def disk_errors(
    directory: str | os.PathLike[str], needed: int | None, what: str, fix: str = "", free_up: str = ""
) -> Iterator[None]:
    """Inside, a write that fails for space or permission raises :class:`DiskError` (see
    :func:`disk_error`); other errors pass unchanged.

    Example:
        >>> with disk_errors("/tmp", 10, "a test file"):
        ...     pass
    """
    try:
        yield
    except DiskError:
        raise
    except OSError as exc:
        err = disk_error(exc, directory, needed, what, fix, free_up)
        if err is None:
            raise
        raise err from exc


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$FEATCACHE_HOME``, else ``$XDG_CACHE_HOME/featcache`` (``~/.cache/...``)."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("FEATCACHE_HOME"):
        return Path(os.environ["FEATCACHE_HOME"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "featcache"
