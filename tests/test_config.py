"""TOML validation: every problem is reported by key, with units."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from mrharmony.config import describe_fields, from_mapping, load_toml, param, to_mapping
from mrharmony.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Example:
    te_ms: float = param(doc="echo time", unit="ms", gt=0, le=1000)
    n_echoes: int = param(1, doc="echoes", ge=1)
    fov_mm: tuple[float, ...] = param((256.0, 256.0), doc="fov", unit="mm", gt=0, length=2)
    mode: Literal["a", "b"] = param("a", doc="mode")
    flag: bool = param(False, doc="a switch")


def test_valid_mapping_with_broadcast_and_defaults():
    ex = from_mapping(Example, {"te_ms": 5, "fov_mm": 200})
    assert ex.te_ms == 5.0 and isinstance(ex.te_ms, float)
    assert ex.fov_mm == (200.0, 200.0)
    assert ex.n_echoes == 1 and ex.mode == "a"
    assert to_mapping(ex)["fov_mm"] == [200.0, 200.0]


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"te_s": 0.005}, r"te_s: unknown key; wrong unit \('s'\): this key is 'te_ms'"),
        ({"te": 5}, r"te: unknown key; wrong unit \(no unit\): this key is 'te_ms'"),
        ({"te_ms": 5, "n_echo": 2}, r"n_echo: unknown key; did you mean 'n_echoes'"),
        ({}, r"te_ms: missing required key \(echo time, ms\)"),
        ({"te_ms": "5"}, r"te_ms: expected a number"),
        ({"te_ms": True}, r"te_ms: expected a number"),
        ({"te_ms": -1}, r"te_ms: -1.0 ms must be greater than 0 ms"),
        ({"te_ms": 2000}, r"te_ms: 2000.0 ms is above the maximum 1000 ms"),
        ({"te_ms": float("nan")}, r"te_ms: expected a finite number"),
        ({"te_ms": 5, "n_echoes": 1.5}, r"n_echoes: expected an integer"),
        ({"te_ms": 5, "n_echoes": 0}, r"n_echoes: 0 is below the minimum 1"),
        ({"te_ms": 5, "fov_mm": [1, 2, 3]}, r"fov_mm: expected 2 values, got 3"),
        ({"te_ms": 5, "fov_mm": [1, -2]}, r"fov_mm\[1\]: -2.0 mm must be greater than 0"),
        ({"te_ms": 5, "mode": "c"}, r"mode: 'c' is not one of 'a', 'b'"),
        ({"te_ms": 5, "flag": 1}, r"flag: expected true or false"),
    ],
)
def test_errors_name_the_key(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        from_mapping(Example, data, source="p.toml")


def test_error_is_prefixed_with_source():
    with pytest.raises(ConfigError, match=r"^p\.toml: te_ms"):
        from_mapping(Example, {}, source="p.toml")


def test_describe_fields_lists_units_and_defaults():
    rows = {r[0]: r for r in describe_fields(Example)}
    assert rows["te_ms"] == ("te_ms", "ms", "required", "echo time")
    assert rows["n_echoes"][2] == "1"


def test_load_toml_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("te_ms = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)
    with pytest.raises(ConfigError, match="is a directory"):
        load_toml(tmp_path)
