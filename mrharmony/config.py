"""One configuration format: TOML files validated into frozen dataclasses.

Field names carry their units (``te_ms``, ``fov_mm``, ``flip_deg``). A config class is a
frozen :func:`dataclasses.dataclass` whose fields are declared with :func:`param`, which
records the unit, the allowed range and a one-line description. :func:`from_mapping`
validates a mapping (from TOML) against the class and reports the first problem by key:

- an unknown key, with the key that was probably meant (``te_s`` -> ``te_ms``: a wrong
  unit is reported as such);
- a missing required key, with its meaning and unit;
- a wrong type (``tr_ms = "12"``) or a value out of range (``tr_ms = -5``).

Supported field types: ``float``, ``int``, ``bool``, ``str``, ``Literal[...]`` and
``tuple[float, ...]`` / ``tuple[int, ...]`` / ``tuple[str, ...]``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from mrharmony.errors import ConfigError

__all__ = ["describe_fields", "from_mapping", "load_toml", "param", "resolve_named_toml",
           "to_mapping"]

T = TypeVar("T")

UNIT_SUFFIXES = {
    "ms": "milliseconds",
    "us": "microseconds",
    "s": "seconds",
    "mm": "millimetres",
    "m": "metres",
    "deg": "degrees",
    "rad": "radians",
    "hz": "hertz",
    "khz": "kilohertz",
    "t": "tesla",
    "mt_per_m": "millitesla per metre",
    "t_per_m_per_s": "tesla per metre per second",
    "s_per_mm2": "seconds per square millimetre",
    "hz_per_px": "hertz per pixel",
    "ppm": "parts per million",
    "pct": "percent",
    "kg": "kilograms",
}


def param(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    unit: str | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    length: int | tuple[int, ...] | None = None,
    min_length: int | None = None,
) -> Any:
    """Declare a validated config field.

    Parameters
    ----------
    default : Any, optional
        Default value; omit for a required key. Tuples are used as given.
    doc : str
        One-line meaning, shown in error messages and ``--help`` listings.
    unit : str, optional
        Unit of the value (must match the suffix of the field name).
    ge, gt, le, lt : float, optional
        Inclusive/exclusive bounds, applied to scalars and to every tuple element.
    length : int or tuple of int, optional
        Allowed tuple lengths. A scalar given for a tuple field of a single allowed
        length is broadcast (``fov_mm = 256`` -> ``(256.0, 256.0)``).
    min_length : int, optional
        Minimum tuple length when the length is free.
    """
    metadata = {
        "doc": doc,
        "unit": unit,
        "ge": ge,
        "gt": gt,
        "le": le,
        "lt": lt,
        "length": (length,) if isinstance(length, int) else length,
        "min_length": min_length,
    }
    if dataclasses.MISSING is not default:
        return dataclasses.field(default=default, metadata=metadata)
    return dataclasses.field(metadata=metadata)


def _stem(key: str) -> tuple[str, str | None]:
    """Split ``te_ms`` into (``te``, ``ms``); keys without a known unit return (key, None)."""
    for suffix in sorted(UNIT_SUFFIXES, key=len, reverse=True):
        if key.lower().endswith("_" + suffix):
            return key[: -len(suffix) - 1], suffix
    return key, None


def _unknown_key_message(key: str, known: list[str]) -> str:
    stem, unit = _stem(key)
    for candidate in known:
        c_stem, c_unit = _stem(candidate)
        if c_stem == stem and c_unit is not None and c_unit != unit:
            given = f"'{unit}'" if unit else "no unit"
            return (
                f"unknown key; wrong unit ({given}): this key is '{candidate}' "
                f"({UNIT_SUFFIXES[c_unit]})"
            )
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key{hint} (allowed: {', '.join(sorted(known))})"


def _check_scalar(value: Any, typ: Any, meta: Mapping[str, Any], where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is Literal:
        choices = typing.get_args(typ)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise ConfigError(f"{where}: expected an integer, got {value!r}")
    elif typ is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    else:  # pragma: no cover - programming error in a config class
        raise TypeError(f"unsupported config field type {typ!r}")
    unit = f" {meta['unit']}" if meta.get("unit") else ""
    if meta.get("ge") is not None and value < meta["ge"]:
        raise ConfigError(f"{where}: {value}{unit} is below the minimum {meta['ge']}{unit}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        raise ConfigError(f"{where}: {value}{unit} must be greater than {meta['gt']}{unit}")
    if meta.get("le") is not None and value > meta["le"]:
        raise ConfigError(f"{where}: {value}{unit} is above the maximum {meta['le']}{unit}")
    if meta.get("lt") is not None and value >= meta["lt"]:
        raise ConfigError(f"{where}: {value}{unit} must be less than {meta['lt']}{unit}")
    return value


def _check_value(value: Any, typ: Any, meta: Mapping[str, Any], where: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _check_value(value, args[0], meta, where)
    if origin is tuple:
        elem = typing.get_args(typ)[0]
        lengths = meta.get("length")
        if not isinstance(value, list | tuple):
            if lengths is not None and len(lengths) == 1:
                value = [value] * lengths[0]
            else:
                raise ConfigError(f"{where}: expected a list, got {value!r}")
        if lengths is not None and len(value) not in lengths:
            allowed = " or ".join(str(n) for n in lengths)
            raise ConfigError(f"{where}: expected {allowed} values, got {len(value)}")
        if meta.get("min_length") is not None and len(value) < meta["min_length"]:
            raise ConfigError(f"{where}: expected at least {meta['min_length']} values")
        return tuple(
            _check_scalar(v, elem, meta, f"{where}[{i}]") for i, v in enumerate(value)
        )
    return _check_scalar(value, typ, meta, where)


def from_mapping(cls: type[T], data: Mapping[str, Any], *, source: str = "config") -> T:
    """Validate a mapping into an instance of the frozen dataclass ``cls``.

    Parameters
    ----------
    cls : type
        A dataclass whose fields were declared with :func:`param`.
    data : Mapping
        Keys and values, typically parsed from TOML.
    source : str
        Where the data came from, prefixed to every error message.

    Returns
    -------
    instance of cls

    Raises
    ------
    ConfigError
        On the first unknown key, missing key, wrong type or out-of-range value; the
        message names the key.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a table of keys, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise ConfigError(f"{source}: {key}: {_unknown_key_message(key, list(fields))}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        where = f"{source}: {name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                doc = f.metadata.get("doc", "")
                unit = f.metadata.get("unit")
                unit_text = f", {unit}" if unit else ""
                raise ConfigError(f"{where}: missing required key ({doc}{unit_text})")
            continue
        values[name] = _check_value(data[name], hints[name], f.metadata, where)
    try:
        instance = cls(**values)
    except ConfigError as exc:  # keep the subclass (ProtocolError, ...)
        raise type(exc)(f"{source}: {exc}") from None
    return instance


def to_mapping(obj: Any) -> dict[str, Any]:
    """Return the fields of a config dataclass as plain TOML-compatible values."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is None:
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def describe_fields(cls: type) -> list[tuple[str, str, str, str]]:
    """List ``(key, unit, default, meaning)`` for every field of a config class."""
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = "required" if f.default is dataclasses.MISSING else repr(f.default)
        rows.append((f.name, f.metadata.get("unit") or "", default, f.metadata.get("doc", "")))
    return rows


def load_toml(path: str | Path, *, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """Read a TOML file (the one TOML reader of every config: protocols, scanners, sites,
    studies, cohort effects), turning I/O and syntax problems into ``error``.

    Parameters
    ----------
    path : str or Path
        The file.
    error : exception class
        What to raise (default :class:`ConfigError`; the stages pass their own).
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, expected a TOML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: cannot read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML: {exc}") from None


def resolve_named_toml(
    name_or_path: str | Path, shipped: tuple[str, ...], *, kind: str,
    error: type[ConfigError] = ConfigError,
) -> str | Path:
    """Resolve a shipped preset name or the path of a user TOML file.

    Parameters
    ----------
    name_or_path : str or Path
        A name from ``shipped`` or a path (a ``.toml`` suffix or an existing file).
    shipped : tuple of str
        Names of the presets shipped with mrharmony.
    kind : str
        What is being loaded, for the message (``"scanner"``, ``"site"``).
    error : type
        The :class:`ConfigError` subclass to raise.

    Returns
    -------
    str or Path
        The shipped name (``str``) or the file path (``Path``).

    Raises
    ------
    ConfigError
        (``error``) for an unknown name, with the closest shipped name.
    """
    text = str(name_or_path)
    if text in shipped:
        return text
    path = Path(text)
    if path.suffix == ".toml" or path.exists():
        return path
    close = difflib.get_close_matches(text, shipped, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise error(
        f"unknown {kind} '{text}'{hint} (shipped: {', '.join(shipped)}, "
        f"or give the path of a {kind} TOML file)"
    )
