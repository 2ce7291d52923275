"""Plain-text output without heavy imports: aligned tables (the command line's ``cache ls`` starts fast)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain aligned text table; floats get 4 significant digits, whole numbers thousands separators.

    Example:
        >>> print(format_table([{"layer": "layer3", "acc": 0.91234}]))
        layer   acc
        ------  ------
        layer3  0.9123
    """
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"  # the same in every row: 1,024 and 12,345, not 1024 and 12,345
        return "-" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    """A size as ``du -h`` prints it (powers of 1024): what ``cache gc --max-size`` takes back.

    Example:
        >>> human_bytes(512), human_bytes(3 * 2**20), human_bytes(1.5 * 2**30)
        ('512B', '3.0M', '1.5G')
    """
    for unit in ("B", "K", "M", "G"):
        if abs(n) < 1024:
            return f"{int(n)}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"


def human_ago(seconds: float) -> str:
    """How long ago, in the largest whole unit: ``just now``, ``5 minutes ago``, ``3 days ago``.

    Example:
        >>> human_ago(30), human_ago(3 * 86400 + 5), human_ago(3600)
        ('just now', '3 days ago', '1 hour ago')
    """
    for unit, size in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400), ("day", 86400),
                       ("hour", 3600), ("minute", 60)):  # fmt: skip
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"
