"""One JSON codec for the frozen config dataclasses (``BackboneCfg``, ``ExtractConfig``, ``HeadInfo`` ...).

:func:`to_json` writes a dataclass as plain JSON values (tuples become lists); :func:`from_json` reads
it back, driven by the class's type hints: lists become tuples where the field is a tuple, nested
dataclasses are rebuilt, ``Literal`` values are checked. A key the class does not know is an error
(a typo, or a file from another version), a missing key takes the field's default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from ._util import FeatcacheError, unknown

T = TypeVar("T")


def to_json(obj: Any, omit_none: bool = False) -> Any:
    """``obj`` as JSON values: dataclasses as dicts of their fields, tuples as lists.

    With ``omit_none``, a dataclass field that holds None and defaults to None is left out (a record
    with many optional parts, such as a run's metrics, keeps only those it has); :func:`from_json`
    reads the missing field back as its default.

    Example:
        >>> from featcache.train.heads import HeadSpec
        >>> to_json(HeadSpec("mlp", hidden=(64,)))
        {'kind': 'mlp', 'hidden': [64], 'dropout': 0.0, 'conv_channels': 256}
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {
            f.name: to_json(getattr(obj, f.name), omit_none)
            for f in dataclasses.fields(obj)
            if f.init and not (omit_none and f.default is None and getattr(obj, f.name) is None)
        }
    if isinstance(obj, (tuple, list)):
        return [to_json(v, omit_none) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_json(v, omit_none) for k, v in obj.items()}
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise FeatcacheError(
        f"cannot write a {type(obj).__name__} ({obj!r}) as JSON; config fields hold JSON values"
    )


def from_json(cls: type[T], data: Mapping[str, Any]) -> T:
    """Rebuild the dataclass ``cls`` from :func:`to_json`'s output (after a trip through JSON).

    Raises:
        FeatcacheError: a key ``cls`` has no field for, a missing field without default, or a value
            of the wrong type, each naming the class and the field.

    Example:
        >>> from featcache.train.heads import HeadSpec
        >>> from_json(HeadSpec, {"kind": "mlp", "hidden": [64]})
        HeadSpec(kind='mlp', hidden=(64,), dropout=0.0, conv_channels=256)
    """
    name = cls.__name__
    if not isinstance(data, Mapping):
        raise FeatcacheError(f"{name} is stored as a JSON object, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            raise unknown(
                f"{name} field",
                str(key),
                fields,
                f"{name} has the fields {', '.join(fields)}; remove the key.",
            )
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, f in fields.items():
        if key in data:
            kwargs[key] = _decode(hints[key], data[key], f"{name}.{key}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise FeatcacheError(f"{name} needs the field {key!r}, which the stored record lacks")
    return cls(**kwargs)


def _decode(tp: Any, value: Any, where: str) -> Any:
    """``value`` read as type ``tp`` (``where`` names the field in errors)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _decode_union(args, value, where)
    if value is None:
        raise FeatcacheError(f"{where} may not be null")
    if origin is typing.Literal:
        if value not in args:
            raise FeatcacheError(f"{where} must be one of {', '.join(map(repr, args))}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_json(tp, value)  # type: ignore[arg-type]
    if origin is tuple:
        return _decode_tuple(args, value, where)
    if origin in (list, dict) or tp in (list, dict):
        return _decode_container(origin or tp, args, value, where)
    return _decode_scalar(tp, value, where)


def _decode_union(args: tuple[Any, ...], value: Any, where: str) -> Any:
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    for option in options[:-1]:
        try:
            return _decode(option, value, where)
        except FeatcacheError:
            continue
    return _decode(options[-1], value, where)


def _decode_tuple(args: tuple[Any, ...], value: Any, where: str) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise FeatcacheError(f"{where} must be a list, got {type(value).__name__} {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if args and len(args) != len(value):
        raise FeatcacheError(f"{where} must hold {len(args)} values, got {len(value)}: {value!r}")
    return tuple(_decode(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))


def _decode_container(origin: Any, args: tuple[Any, ...], value: Any, where: str) -> Any:
    if origin is list:
        if not isinstance(value, list):
            raise FeatcacheError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        item = args[0] if args else Any
        return [_decode(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, Mapping):
        raise FeatcacheError(f"{where} must be a JSON object, got {type(value).__name__} {value!r}")
    item = args[1] if len(args) == 2 else Any
    return {k: _decode(item, v, f"{where}[{k!r}]") for k, v in value.items()}


def _decode_scalar(tp: Any, value: Any, where: str) -> Any:
    # bool is an int in Python: never let true stand for 1 or 1 for true.
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)  # JSON writes 2.0 as 2.0, but a hand-written config may say 2
    if tp in (str, int, bool) and isinstance(value, tp) and (tp is bool or not isinstance(value, bool)):
        return value
    if tp in (str, int, float, bool):
        raise FeatcacheError(f"{where} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    raise FeatcacheError(f"{where} has the type {tp!r}, which featcache's config codec does not read")
