"""Small typed readers for strategy JSON: each returns the value or raises a ConfigError that names its path.

Shared by the seed-layout loader (`load.py`) and the reference-layout
converter (`reference_layout.py`).
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
