"""Small typed readers for strategy JSON: each returns the value or raises a ConfigError that names its path.

Shared by the seed-layout validation (`parse.py`, `parse_registry.py`) and
the reference-layout converter (`reference_layout.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qstrat.errors import ConfigError


def expect_object(value, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError.expected(path, "an object", value)
    for k in value:
        if not isinstance(k, str):
            raise ConfigError.expected(path, "an object with string keys", value)
    return value


def check_known(d: Mapping, path: str, allowed) -> None:
    for k in d:
        if k not in allowed:
            raise ConfigError.unknown_key(path, k, [a for a in allowed if a != "_comment"])


def expect_str(value, path: str, what: str = "a string") -> str:
    if not isinstance(value, str):
        raise ConfigError.expected(path, what, value)
    return value


def expect_list(value, path: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise ConfigError.expected(path, "a list", value)
    return list(value)


def str_list(value, path: str) -> tuple[str, ...]:
    return tuple(
        expect_str(v, f"{path}[{i}]", "a layer name (a string)") for i, v in enumerate(expect_list(value, path))
    )


def comment(d: Mapping, path: str) -> str | None:
    if "_comment" not in d:
        return None
    return expect_str(d["_comment"], f"{path}._comment", "a string (a comment)")


def json_value(value, path: str):
    """Accept only plain JSON values (what json.dumps writes back unchanged)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError.expected(path, "a finite number", value)
        return value
    if isinstance(value, (list, tuple)):
        return [json_value(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(expect_str(k, path, "string keys")): json_value(v, f"{path}.{k}") for k, v in value.items()}
    raise ConfigError.expected(path, "a JSON value", value)
