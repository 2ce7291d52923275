"""Range checks of the config dataclasses' numeric fields and of device names; no torch.

Every config checks its fields in ``__post_init__`` through these helpers, and the command line builds
the same configs from its flags (:mod:`featcache.cli.flags`), so a value is refused with one message
whichever way it comes: the flag and the Python argument both named, the rule, and the value given.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable

from ._errors import FeatcacheError, flag, unknown

#: device names every verb takes (``cuda:N`` picks one GPU)
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
#: the largest input side taken (one 16384 x 16384 RGB image is already 3 GB of float32)
MAX_INPUT_SIDE = 16384
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")


def _num(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def _rule(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {_num(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {_num(high)}"
    return ""


def check_number(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    none: str | None = None,
    why: str = "",
    option: str | None = None,
) -> None:
    """Refuse ``value`` of the setting ``name`` unless it is a finite number within the bounds.

    Args:
        name: the field's name (the flag is ``--name-with-dashes``).
        value: what was given.
        low / high: the bounds (None: unbounded on that side).
        low_open / high_open: exclude that bound.
        integer: a whole number is required (``True``/``False`` are not numbers here).
        none: None is allowed and means this (``"auto"``); else None is refused.
        why: a few words on what the setting does, for the message.
        option: the command line's flag where it is not ``--name`` (``--split-seed``).

    Example:
        >>> check_number("lr", 1e-3, 0, 10, low_open=True)
        >>> check_number("lr", 1e30, 0, 10, low_open=True)
        Traceback (most recent call last):
        ...
        featcache._errors.FeatcacheError: --lr 1e+30 (lr=1e+30) must be a finite number in (0, 10]
    """
    if value is None and none is not None:
        return
    kind = "a whole number" if integer else "a finite number"
    # numpy's numbers count (a grid made with np.logspace); True is not 1 here
    number = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    rule = _rule(low, high, low_open, high_open)
    named = flag(name, value) if option is None else f"{option} {value} ({name}={value!r})"
    text = f"{named} must be {kind} {rule}".rstrip()
    if none is not None:
        text += f", or {none} (None)"
    if why:
        text += f" ({why})"
    if not number:
        raise FeatcacheError(text)
    v = int(value) if integer else float(value)  # type: ignore[call-overload,arg-type]  # ints exactly
    if not math.isfinite(v):
        raise FeatcacheError(text)
    if low is not None and (v < low or (low_open and v == low)):
        raise FeatcacheError(text)
    if high is not None and (v > high or (high_open and v == high)):
        raise FeatcacheError(text)


def check_numbers(name: str, values: Iterable[object], low: float | None = None, **kw: object) -> None:
    """:func:`check_number` for each value of a list setting (``--lrs 1e-3,3e-3``)."""
    for v in values:
        check_number(name, v, low, **kw)  # type: ignore[arg-type]


def check_input_side(value: object) -> None:
    """Refuse an input height or width outside [1, :data:`MAX_INPUT_SIDE`] pixels.

    Example:
        >>> check_input_side(64)
    """
    check_number("input_size", value, 1, MAX_INPUT_SIDE, integer=True, why="pixels, H and W")


def check_device(device: object, name: str = "device") -> str:
    """``device`` if it names a device featcache runs on: auto, cpu, cuda, cuda:N or mps.

    Whether that device exists here is decided when it is used
    (:func:`featcache._util.resolve_device`); this refuses what no machine has.

    Example:
        >>> check_device("cuda:1")
        'cuda:1'
        >>> check_device("cpuu")
        Traceback (most recent call last):
        ...
        featcache._errors.FeatcacheError: unknown device 'cpuu'. Did you mean: 'cpu', 'cuda'? ...
    """
    if isinstance(device, str) and _DEVICE.match(device):
        return device
    choices = [d for d in DEVICES if d != "cuda:N"] + ["cuda:0"]
    raise unknown(
        name,
        str(device),
        choices,
        f"Use --{name.replace('_', '-')} {'|'.join(DEVICES)} ({name}='cpu', ...).",
    )
