"""Command-line flags made from the config dataclasses: one place per setting.

Each flag's type, default and help text come from its dataclass field (the help from the class
docstring's ``Attributes:`` section), and :func:`from_args` builds the config back from the parsed
arguments, so a flag cannot drift from the library's default, and every rule the config enforces in
``__post_init__`` is enforced for the command line by the same code, with the same message.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from .._checks import check_input_side
from .._errors import FeatcacheError

T = TypeVar("T")
TRISTATE = {"auto": None, "on": True, "off": False}


def field_help(cls: type) -> dict[str, str]:
    """``{field: text}`` from the ``Attributes:`` section of ``cls``'s docstring.

    Example:
        >>> from featcache.train import TrainConfig
        >>> field_help(TrainConfig)["lr"]
        'peak learning rate.'
    """
    doc = inspect.getdoc(cls) or ""
    section = re.search(r"^Attributes:\n((?:[ \t]+.*\n?|\n)*)", doc, re.M)
    out: dict[str, str] = {}
    name = None
    for line in (section.group(1) if section else "").splitlines():
        m = re.match(r"^ {4}(\w+)(?: / \w+)*: (.*)$", line)
        if m:
            name = m.group(1)
            out[name] = m.group(2).strip()
        elif name and line.startswith("        "):
            out[name] += " " + line.strip()
    # reStructuredText markup reads badly in a terminal: ``x`` -> x, :mod:`a.b` -> a.b
    return {k: re.sub(r":\w+:`~?([^`]*)`", r"\1", v).replace("``", "") for k, v in out.items()}


def _field_types(cls: type, names: Sequence[str]) -> dict[str, Any]:
    """The types of the fields ``names`` of ``cls``. Only these are evaluated (their annotations are
    strings, evaluated as :func:`typing.get_type_hints` does in the class's module): ``RunSpec.model``
    names the ``Backbone`` class, which the parser does not import, since it loads torch."""
    where = vars(sys.modules[cls.__module__])
    return {
        f.name: eval(f.type, where) if isinstance(f.type, str) else f.type
        for f in dataclasses.fields(cls)
        if f.name in names
    }


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _tristate(text: str) -> bool | None:
    if text not in TRISTATE:
        raise argparse.ArgumentTypeError(f"{text!r}: use auto, on or off")
    return TRISTATE[text]


def _comma(item: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        try:
            values = tuple(item(v.strip()) for v in text.split(",") if v.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list ({exc})") from exc
        if not values:  # `--lrs ''` from a script's empty variable: not silently the default
            raise argparse.ArgumentTypeError(
                f"{text!r} holds no value; give one or more, comma-separated, or leave the option out for "
                "its default"
            )
        return values

    parse.__name__ = f"comma-separated {item.__name__}"
    return parse


class _Size(argparse.Action):
    """``H W``; also timm's ``C H W`` with C 1 or 3 (the backbone decides the channels)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: Any = None
    ) -> None:
        if len(values) == 3 and values[0] in (1, 3):
            values = values[1:]
        if len(values) != 2:
            got = " ".join(map(str, values))
            parser.error(f"{option} takes H W (or C H W with C 1 or 3, as timm writes it), got {got}")
        try:  # the rule ExtractConfig applies, with its message (`layers` and `summary` build none)
            for v in values:
                check_input_side(v)
        except FeatcacheError as exc:
            parser.error(str(exc))
        setattr(namespace, self.dest, tuple(values))


def _or_word(item: Callable[[str], Any], word: str) -> Callable[[str], Any]:
    """``item`` parsing, or None for ``word`` (``--batch-size auto``)."""

    def parse(text: str) -> Any:
        return None if text == word else item(text)

    parse.__name__ = f"{item.__name__} or {word}"
    return parse


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _kwargs(tp: Any, default: Any, none_word: str | None = None) -> dict[str, Any]:
    """argparse keyword arguments for a field of type ``tp`` whose default is ``default``; a field whose
    None has a name (``metadata={"none": "auto"}``) takes that word for None; ``metadata={"shown": ...}``
    only names the default in ``--help`` (``--weights``: pretrained, where ``none`` means random init)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1
    base = args[0] if optional else tp
    if base is bool and optional:  # amp, channels_last: None means "decide by device"
        return {"type": _tristate, "metavar": "auto|on|off", "shown": "auto"}
    if base is bool:
        return {"action": "store_false" if default else "store_true"}
    if typing.get_origin(base) is tuple:
        items = typing.get_args(base)
        if len(items) == 2 and items[1] is not Ellipsis:  # (H, W)
            return {"nargs": "+", "type": _whole, "metavar": "N", "action": _Size}
        return {"type": _comma(items[0]), "metavar": "A,B,..."}
    if base in (int, float) and optional and none_word:
        shown = {"shown": none_word} if default is None else {}  # a set default shows itself
        return {"type": _or_word(base, none_word), "metavar": f"N|{none_word}", **shown}
    if base in (int, float, str):
        return {"type": base}
    raise TypeError(f"no command-line form for a field of type {tp!r}")


def add_config(
    p: argparse.ArgumentParser,
    cls: type,
    skip: Sequence[str] = (),
    rename: Mapping[str, str] | None = None,
    only: Sequence[str] | None = None,
    required: Sequence[str] = (),
    optional: Sequence[str] = (),
) -> None:
    """Add a flag per field of the dataclass ``cls`` (``--kebab-name``, or ``rename[field]``).

    A field whose flag the parser already has (``--device`` of both the extraction and the trainer)
    shares it. ``rename`` to a name without dashes makes a positional argument (one that may be left
    out when its field is in ``optional``: ``train --resume`` reads it from the run).

    Example:
        >>> p = argparse.ArgumentParser()
        >>> from featcache.train import TrainConfig
        >>> add_config(p, TrainConfig, only=["lr", "epochs"])
        >>> from_args(TrainConfig, p.parse_args(["--lr", "0.01"])).lr
        0.01
    """
    rename, helps = rename or {}, field_help(cls)
    hints = _field_types(
        cls,
        [f.name for f in dataclasses.fields(cls) if f.name not in skip and (only is None or f.name in only)],
    )
    mapping: dict[type, dict[str, str]] = p.get_default("_config_fields") or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        kw = _kwargs(hints[f.name], default, f.metadata.get("none"))
        flag = rename.get(f.name, "--" + f.name.replace("_", "-"))
        if kw.get("action") == "store_false":
            flag = rename.get(f.name, "--no-" + f.name.replace("_", "-"))
        dest = flag.lstrip("-").replace("-", "_").removeprefix("no_") if flag.startswith("-") else flag
        mapping.setdefault(cls, {})[f.name] = dest
        if any(a.dest == dest for a in p._actions):
            continue  # shared with another config's field
        # a None whose word is also a value (--weights none is random init) is shown by what it means
        shown = kw.pop("shown", None) or f.metadata.get("shown") or _show(default)
        text = helps.get(f.name, "")
        if kw.get("action") == "store_false":
            text = f"turn off: {text}"
        switch = kw.get("action") in ("store_true", "store_false")
        kw["help"] = text if switch else f"{text} (default: {shown})"
        if f.name in required:
            kw["required"], kw["help"] = True, f"{text} (required)"
        if flag.startswith("-"):
            action = p.add_argument(flag, dest=dest, default=default, **kw)
        elif f.name in optional:  # a positional that --resume reads from the run
            action = p.add_argument(flag, **{**kw, "help": text, "nargs": "?", "default": None})
        else:  # positional: required, no default to show
            action = p.add_argument(flag, **{**kw, "help": text})
        action.featcache_field = (cls, f.name)  # type: ignore[attr-defined]
    p.set_defaults(_config_fields=mapping)


def from_args(cls: type[T], a: argparse.Namespace, **given: Any) -> T:
    """The config ``cls`` from the parsed flags that :func:`add_config` made (``given`` fields win).

    Example:
        >>> from_args(TrainConfig, args, device="cpu")  # doctest: +SKIP
    """
    dests = getattr(a, "_config_fields", {}).get(cls, {})
    values = {name: getattr(a, dest) for name, dest in dests.items() if name not in given}
    return cls(**values, **given)
