"""The user-facing error and its messages; no torch, so the command line can report without loading it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FeatcacheError(ValueError):
    """A user-facing error: the CLI prints its message and exits with status 2."""


def closest(value: str, choices: Iterable[str], n: int = 5) -> list[str]:
    """The valid names closest to ``value`` (difflib), best first."""
    choices = list(dict.fromkeys(choices))
    found = difflib.get_close_matches(value, choices, n=n, cutoff=0.5)
    if not found:
        lowered = value.lower()
        found = [c for c in choices if lowered in c.lower()][:n]
    return found


def flag(name: str, value: object) -> str:
    """A setting as the command line and Python both spell it, for messages read by either user.

    Example:
        >>> flag("weights", "none")
        "--weights none (weights='none')"
    """
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    return f"--{name.replace('_', '-')} {shown} ({name}={value!r})"


def unknown(kind: str, value: str, choices: Iterable[str], fix: str) -> FeatcacheError:
    """Build the error for an unknown name: the value, the closest valid names and the fix."""
    near = closest(value, choices)
    hint = f" Did you mean: {', '.join(repr(c) for c in near)}?" if near else ""
    return FeatcacheError(f"unknown {kind} {value!r}.{hint} {fix}")
