"""Load, merge, override, validate and dump quantize strategies.

Precedence, lowest first: the built-in strategy, then a custom strategy (file
or dict), then keyword overrides. Merging follows the reference tool:

- pipeline sections and ``user_defined_quantize_config``: key by key;
- ``input_quantize_config``: replaced whole;
- ``layer_quantize_config``: a pattern with an existing ``pattern_name``
  replaces it in place, a new one is appended (so it comes later and wins).

A custom strategy may say ``"base": "fs"`` to start from another built-in,
or ``"base": ""`` to start from nothing (every pipeline key at its neutral
default, no patterns). Everything is validated once, here; errors name the
JSON path, the value received, what was expected and how to fix it
(`qstrat.strategy.parse` does the checking).
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Mapping
from importlib import resources
from typing import Any

from qstrat.errors import ConfigError, did_you_mean
from qstrat.files import check_writable, write_atomically
from qstrat.strategy.keys import LEGACY_KEYS, SECTIONS
from qstrat.strategy.parse import REGISTRY, REGISTRY_KEYS, TOP_KEYS, parse_strategy
from qstrat.strategy.readers import check_known as _known
from qstrat.strategy.readers import expect_list as _list
from qstrat.strategy.readers import expect_object as _obj
from qstrat.strategy.readers import expect_str as _str
from qstrat.strategy.reference_layout import Conversion, convert, is_reference_layout
from qstrat.strategy.schema import Strategy
from qstrat.strategy.user_keys import USER_KEYS

BUILTINS = ("pof2s", "fs", "tqt")
ALIASES = {"pof2s_tqt": "tqt", "8bit": "pof2s", "8bit_tqt": "tqt"}

# ---- built-ins, files, merging, overrides -----------------------------------------------------


def builtin_names() -> tuple[str, ...]:
    return BUILTINS + tuple(ALIASES)


def builtin_dict(name: str, path: str = "quantize_strategy") -> dict[str, Any]:
    """The JSON of a built-in strategy (aliases resolved)."""
    if not isinstance(name, str) or (name not in BUILTINS and name not in ALIASES):
        hint = did_you_mean(str(name), builtin_names()) or f"Built-in strategies: {', '.join(builtin_names())}."
        raise ConfigError.expected(path, "a built-in strategy name", name, hint)
    real = ALIASES.get(name, name)
    text = resources.files("qstrat.strategy").joinpath("builtin", f"{real}.json").read_text()
    return json.loads(text)


def read_strategy_file(path: str) -> dict[str, Any]:
    """Read a strategy JSON file, with errors that name the file and the line."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read the strategy file ({exc.strerror})", "Check the path.") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            str(path), f"not a text file (byte {exc.start} is not UTF-8)", "Give a strategy JSON file, saved as UTF-8."
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}:{exc.lineno}:{exc.colno}", f"not valid JSON ({exc.msg})", "Fix the JSON syntax at that line."
        ) from None
    except RecursionError:
        raise ConfigError(
            str(path), "nested too deep to read", f"A strategy nests a few levels; at most {MAX_NESTING} are read."
        ) from None


def _merge(base: dict, custom: Mapping, path: str, pattern_paths: list | None = None) -> dict:
    """``custom`` merged over ``base`` (a new dict).

    ``pattern_paths``, if given, is kept aligned with the merged pattern list:
    each pattern ``custom`` adds or replaces gets its path in ``custom``.
    """
    out = copy.deepcopy(base)
    if pattern_paths is not None:
        n_base = len(base.get(REGISTRY, {}).get("layer_quantize_config", []) or [])
        pattern_paths.extend([None] * (n_base - len(pattern_paths)))
    custom = _obj(custom, path)
    _known(custom, path, TOP_KEYS)
    for key, value in custom.items():
        if key in SECTIONS:
            out.setdefault(key, {}).update(dict(_obj(value, f"{path}.{key}")))
        elif key == REGISTRY:
            reg = _obj(value, f"{path}.{key}")
            _known(reg, f"{path}.{key}", REGISTRY_KEYS)
            oreg = out.setdefault(REGISTRY, {})
            for rkey, rval in reg.items():
                rpath = f"{path}.{key}.{rkey}"
                if rkey == "user_defined_quantize_config":
                    oreg.setdefault(rkey, {}).update(dict(_obj(rval, rpath)))
                elif rkey == "layer_quantize_config":
                    merged = list(oreg.get(rkey, []))
                    seen: dict = {}
                    for i, pattern in enumerate(_list(rval, rpath)):
                        pattern = _obj(pattern, f"{rpath}[{i}]")
                        name = pattern.get("pattern_name")
                        if isinstance(name, str) and name in seen:
                            raise ConfigError(
                                f"{rpath}[{i}].pattern_name",
                                f'"{name}" is already the name of {rpath}[{seen[name]}]',
                                "Pattern names must be unique; rename one, or edit the first.",
                            )
                        if isinstance(name, str):
                            seen[name] = i
                        at = next(
                            (
                                j
                                for j, p in enumerate(merged)
                                if isinstance(p, Mapping) and p.get("pattern_name") == name
                            ),
                            None,
                        )
                        if at is None or name is None:
                            merged.append(copy.deepcopy(dict(pattern)))
                            at = len(merged) - 1
                        else:
                            merged[at] = copy.deepcopy(dict(pattern))
                        if pattern_paths is not None:
                            pattern_paths.extend([None] * (len(merged) - len(pattern_paths)))
                            pattern_paths[at] = f"{rpath}[{i}]"
                    oreg[rkey] = merged
                else:
                    oreg[rkey] = copy.deepcopy(rval)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _owner_of(key: str) -> tuple[str, str] | None:
    for section, specs in SECTIONS.items():
        if key in specs:
            return section, key
    if key in USER_KEYS:
        return REGISTRY, key
    return None


def overrides_to_dict(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Route flat keyword overrides (``weight_bit=4``, ``include_cle=False``) to their sections."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        real = LEGACY_KEYS.get(key, key)
        owner = _owner_of(real)
        if owner is None:
            every = [k for s in SECTIONS.values() for k in s] + list(USER_KEYS)
            hint = did_you_mean(key, every) or "Run `qstrat strategy keys` for the list of keys."
            raise ConfigError(key, f'unknown strategy key "{key}"', hint)
        section, name = owner
        if section == REGISTRY:
            out.setdefault(REGISTRY, {}).setdefault("user_defined_quantize_config", {})[name] = value
        else:
            out.setdefault(section, {})[name] = value
    return out


def names_a_file(name: str) -> bool:
    """Whether a strategy given by name on the command line is a file (a .json name, a path, or a file that
    exists), read as a custom strategy over pof2s, rather than a built-in's name."""
    return name.endswith(".json") or os.path.sep in name or os.path.isfile(name)


def load_strategy(
    quantize_strategy: str = "pof2s",
    custom_quantize_strategy: str | os.PathLike | Mapping | None = None,
    custom_types: Mapping[str, type] | None = None,
    **overrides: Any,
) -> Strategy:
    """Build a strategy: built-in < custom strategy (file or dict) < keyword overrides.

    Args:
        quantize_strategy: "pof2s", "fs", "tqt" (or the aliases "pof2s_tqt", "8bit", "8bit_tqt"), or a
            `Strategy` made before (`load_strategy`, `set_quantize_strategy`), which stands in for the built-in.
        custom_quantize_strategy: a JSON file path, a dict or a `Strategy`, merged over the built-in.
        custom_types: ``{name: class}`` of custom layer classes patterns may name.
        **overrides: flat keys, e.g. ``weight_bit=4`` or ``include_cle=False``.

    Example:
        >>> s = load_strategy("pof2s", {"quantize_registry_config": {"user_defined_quantize_config":
        ...     {"layer_config": {"head": "float32"}}}}, weight_bit=4)
    """
    given = quantize_strategy if isinstance(quantize_strategy, Strategy) else None  # one made before: the base
    base_name = given.base if given is not None else quantize_strategy
    if isinstance(custom_quantize_strategy, Strategy):
        custom_quantize_strategy = custom_quantize_strategy.to_dict(2)  # complete, its base included
    custom, cpath = (None, "$") if custom_quantize_strategy is None else _read_custom(custom_quantize_strategy)
    conversion = _convert_reference(custom, cpath, custom_types)
    if conversion is not None:
        custom = conversion.data
    if custom is not None and "base" in custom:
        base_name = custom["base"]
    try:
        if given is not None and not (custom and custom.get("base", given.base) != given.base):
            data = given.to_dict(2)
        else:
            data = _base_data(base_name, f"{cpath}.base" if custom and "base" in custom else "quantize_strategy")
        paths: list = []
        if custom is not None:
            data = _merge(data, custom, cpath, paths)
            data["base"] = ALIASES.get(base_name, base_name)
        if overrides:
            data = _merge(data, overrides_to_dict(overrides), "overrides", paths)
        return parse_strategy(data, cpath, custom_types, paths)
    except ConfigError as exc:
        if conversion is None:
            raise
        raise conversion.relocate(exc, cpath) from None


def _convert_reference(custom, cpath: str, custom_types) -> Conversion | None:
    """The conversion of a strategy in the reference tool's layout (None for the seed's), with its warnings given."""
    if custom is None or not is_reference_layout(custom):
        return None
    try:
        conversion = convert(custom, custom_types)
    except ConfigError as exc:
        raise type(exc)(cpath + exc.path[1:], exc.problem, exc.hint) from None
    if conversion.warnings:
        warnings.warn(
            f"{cpath[:-3] or 'the custom strategy'} is in the reference tool's layout; converted to qstrat's, "
            "with these changes:\n  " + "\n  ".join(conversion.warnings),
            stacklevel=3,
        )
    return conversion


def _read_custom(value) -> tuple[Mapping, str]:
    """A custom strategy given as a file path or a dict, and the path prefix for its errors."""
    if isinstance(value, (str, os.PathLike)):
        cpath = f"{os.fspath(value)}: $"
        value = read_strategy_file(os.fspath(value))
    else:
        cpath = "$"
    custom = _obj(value, cpath)
    _check_nesting(custom, cpath)
    if "base" in custom:
        _str(custom["base"], f"{cpath}.base", 'a built-in strategy name, or ""')
    return custom, cpath


# Far deeper than any strategy needs (a pattern's layer_inputs chain takes two levels per layer), and well
# inside Python's recursion limit, which merging and parsing walk the strategy by.
MAX_NESTING = 100


def _check_nesting(value, path: str) -> None:
    """Refuse a strategy nested deeper than MAX_NESTING (walked without recursion)."""
    stack = [(value, 0, path)]
    while stack:
        item, depth, where = stack.pop()
        if depth > MAX_NESTING:
            raise ConfigError(
                where if len(where) < 200 else f"{where[:120]}...{where[-60:]}",
                f"nested more than {MAX_NESTING} levels deep",
                'A layer_inputs chain that long matches no model; refer to a pattern by {"pattern": "<name>"} '
                "instead of nesting it.",
            )
        if isinstance(item, Mapping):
            stack.extend((v, depth + 1, f"{where}.{k}") for k, v in item.items())
        elif isinstance(item, list | tuple):
            stack.extend((v, depth + 1, f"{where}[{i}]") for i, v in enumerate(item))


def _base_data(name: str, path: str) -> dict[str, Any]:
    """The dict a strategy starts from: a built-in, or nothing for ``""``."""
    if name == "":
        return {"base": ""}
    data = builtin_dict(name, path)
    data["base"] = ALIASES.get(name, name)
    return data


def dump_quantize_strategy(strategy: Strategy, path: str | os.PathLike, verbose: int = 2) -> str:
    """Write a strategy as JSON, atomically (a temporary file renamed into place); ``verbose`` 0, 1 or 2."""
    if isinstance(verbose, bool) or verbose not in (0, 1, 2):
        raise ConfigError.expected("dump_quantize_strategy verbose", "0, 1 or 2", verbose)
    check_writable(path, "dump_quantize_strategy path")
    path = os.fspath(path)
    write_atomically(path, (json.dumps(strategy.to_dict(verbose), indent=2) + "\n").encode("utf-8"))
    return path


def set_quantize_strategy(
    strategy: Strategy, new_quantize_strategy: str | os.PathLike | Mapping, custom_types=None
) -> Strategy:
    """Merge a strategy (file path or dict, full or partial) over ``strategy``; returns a new one.

    A dump of ``strategy`` at any verbosity gives back an equal strategy.
    """
    new, cpath = _read_custom(new_quantize_strategy)
    conversion = _convert_reference(new, cpath, custom_types)
    if conversion is not None:
        new = conversion.data
    try:
        if "base" in new and new["base"] != strategy.base:
            data = _base_data(new["base"], f"{cpath}.base")
        else:
            data = strategy.to_dict(2)
        paths: list = []
        merged = _merge(data, new, cpath, paths)
        return parse_strategy(merged, cpath, custom_types, paths)
    except ConfigError as exc:
        if conversion is None:
            raise
        raise conversion.relocate(exc, cpath) from None
