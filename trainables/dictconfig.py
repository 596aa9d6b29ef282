"""Typed dataclass configs from plain mappings (YAML, Tune configs), with errors that say where.

`from_dict(Cls, data, where="train")` checks every key against the dataclass fields, converts
values to the annotated types (nested dataclasses, tuples, optionals, literals by validation in
`__post_init__`) and raises `ConfigError` naming the key path, the bad value and what is allowed.
No value is evaluated as code; only plain data types are accepted.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is not allowed; the message names the key path."""


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from mapping `data`; `where` is the key path used in errors."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)  # YAML keys may be ints, bools, dates
    if unknown:
        raise ConfigError(
            f"{_join(where, str(unknown[0]))}: unknown key; "
            f"allowed keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {k: convert(hints[k], v, _join(where, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    """The inverse of from_dict: plain dicts, lists and scalars (JSON/YAML-safe)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def convert(tp: Any, value: Any, where: str) -> Any:
    """Convert one value to type `tp` or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _convert_union(typing.get_args(tp), value, where)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        return _convert_sequence(tp, origin, value, where)
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {_show(value)}")
        return dict(value)
    if tp is Any:
        return value
    return _convert_scalar(tp, value, where)


def _convert_union(args: tuple, value: Any, where: str) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"{where}: a value is required, got null")
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return convert(arg, value, where)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(
        errors[0]
        if len(errors) == 1
        else f"{where}: {_show(value)} fits none of "
        f"{', '.join(_name(a) for a in args if a is not type(None))}"
    )


def _convert_sequence(tp: Any, origin: Any, value: Any, where: str) -> Any:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {_show(value)}")
    args = typing.get_args(tp)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected a list of {len(args)} items, got {len(value)}")
        return tuple(
            convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True))
        )
    item = args[0] if args else Any
    items = [convert(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _convert_scalar(tp: Any, value: Any, where: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_show(value)}")
        if not abs(value) <= sys.float_info.max:  # NaN, ±inf, or an int too large for a float
            raise ConfigError(f"{where}: expected a finite number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_show(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int of more than sys.get_int_max_str_digits() digits
        text = f"<{value.bit_length()} bits>" if isinstance(value, int) else "<unprintable>"
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} ({type(value).__name__})"
