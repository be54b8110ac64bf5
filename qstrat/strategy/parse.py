"""Validating a complete strategy dict into a frozen `Strategy`, with errors that name the JSON path.

`load.py` builds the dict (a built-in, a custom file or dict merged over it,
keyword overrides); this module checks every part of it once: pipeline keys,
the user config and the input quantizer here, quantizer configs and patterns
(names, nesting, cycles, shared quantizers) in `parse_registry.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qstrat.errors import ConfigError, did_you_mean
from qstrat.quantizers.grid import DataFormat
from qstrat.quantizers.params import PARAM_NAMES, parse_params
from qstrat.strategy.keys import SECTIONS, KeySpec
from qstrat.strategy.parse_registry import check_patterns, check_target_bit_width, parse_pattern, parse_quantizer
from qstrat.strategy.readers import check_known as _known
from qstrat.strategy.readers import comment, str_list
from qstrat.strategy.readers import expect_list as _list
from qstrat.strategy.readers import expect_object as _obj
from qstrat.strategy.readers import expect_str as _str
from qstrat.strategy.schema import (
    InputQuantizeConfig,
    Strategy,
    UserConfig,
    freeze,
)
from qstrat.strategy.user_keys import HANDY_KEYS, LAYER_CONFIG_DTYPES, PARTITION_KEYS, USER_KEYS

REGISTRY = "quantize_registry_config"
TOP_KEYS = ("_comment", "base", *SECTIONS, REGISTRY)
REGISTRY_KEYS = ("_comment", "user_defined_quantize_config", "input_quantize_config", "layer_quantize_config")


# ---- pipeline keys ---------------------------------------------------------------------------


def check_key_value(spec: KeySpec, value, path: str):
    """Validate one pipeline value against its KeySpec."""
    kind = spec.kind
    if kind == "bool":
        if not isinstance(value, bool):
            hint = "Write true or false without quotes." if isinstance(value, (str, int)) else None
            raise ConfigError.expected(path, "true or false", value, hint)
        if spec.name == "quantize_with_xcompiler" and value:
            raise ConfigError(
                path,
                "quantize_with_xcompiler needs the external Vitis AI compiler, which qstrat does not call, got true",
                "Set quantize_with_xcompiler to false. qstrat's refine stage applies the DPU compiler's position "
                "constraints itself (adjust_dpu_*, align_*).",
            )
        return value
    if kind == "enum":
        if not isinstance(value, str) or value not in spec.choices:
            hint = did_you_mean(str(value), [str(c) for c in spec.choices]) if isinstance(value, str) else None
            what = "one of " + ", ".join(f'"{c}"' for c in spec.choices)
            raise ConfigError.expected(path, what, value, hint)
        return value
    if kind == "str":
        return _str(value, path)
    rng = ""
    if spec.minimum is not None and spec.maximum is not None:
        rng = f" in [{spec.minimum:g}, {spec.maximum:g}]"
    elif spec.minimum is not None:
        rng = f" >= {spec.minimum:g}"
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            hint = f"Write {value} without quotes." if isinstance(value, str) and value.lstrip("-").isdigit() else None
            raise ConfigError.expected(path, f"an integer{rng}", value, hint)
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ConfigError.expected(path, f"a number{rng}", value)
    if (spec.minimum is not None and value < spec.minimum) or (spec.maximum is not None and value > spec.maximum):
        raise ConfigError.expected(path, f"{'an integer' if kind == 'int' else 'a number'}{rng}", value)
    return value


# ---- sections ------------------------------------------------------------------------------


def _parse_section(d: Mapping, path: str, section: str) -> dict[str, Any]:
    specs = SECTIONS[section]
    d = _obj(d, path)
    _known(d, path, ("_comment", *specs))
    out: dict[str, Any] = {}
    if "_comment" in d:
        out["_comment"] = comment(d, path)
    # The keys keep the order they are given in (the optimize passes run in that order),
    # then the missing ones follow with their defaults.
    for name in [k for k in d if k in specs] + [k for k in specs if k not in d]:
        spec = specs[name]
        out[name] = check_key_value(spec, d[name], f"{path}.{name}") if name in d else spec.default
    return out


def check_user_value(key: str, value, path: str):
    """Validate one ``user_defined_quantize_config`` value."""
    if key in HANDY_KEYS:
        if value is None:
            return None
        target, param = HANDY_KEYS[key]
        if param == "bit_width":  # weight_bit, activation_bit, input_bit: 1 to 16; bias_bit: 1 to 32
            check_target_bit_width(target, value, path)
        try:  # the quantizer parameter rules apply to the value the key sets
            parse_params(key, {param: value}, PARAM_NAMES, {}, tuple(DataFormat))
        except ConfigError as exc:
            raise ConfigError(path, exc.problem, exc.hint) from None
        return value
    if key == "layer_config":
        d = _obj(value, path)
        for name, dtype in d.items():
            if dtype not in LAYER_CONFIG_DTYPES:
                what = "one of " + ", ".join(f'"{t}"' for t in LAYER_CONFIG_DTYPES)
                raise ConfigError.expected(f"{path}.{name}", what, dtype, did_you_mean(str(dtype), LAYER_CONFIG_DTYPES))
        return dict(d)
    return list(str_list(value, path))


def _parse_user(d, path: str) -> UserConfig:
    d = _obj(d, path)
    _known(d, path, ("_comment", *USER_KEYS))
    values: dict[str, Any] = {}
    if "_comment" in d:
        values["_comment"] = comment(d, path)
    for key in USER_KEYS:
        default = {} if key == "layer_config" else ([] if key in PARTITION_KEYS else None)
        values[key] = check_user_value(key, d[key], f"{path}.{key}") if key in d else default
    return UserConfig(freeze(values))


def _parse_input_config(d, path: str) -> InputQuantizeConfig:
    d = _obj(d, path)
    _known(d, path, ("_comment", "input_layers", "quantizer_config"))
    q = d.get("quantizer_config")
    return InputQuantizeConfig(
        str_list(d.get("input_layers", []), f"{path}.input_layers"),
        None if q is None else parse_quantizer(q, f"{path}.quantizer_config", "input"),
        comment(d, path),
    )


def parse_strategy(data, path: str = "$", custom_types=None, pattern_paths=None) -> Strategy:
    """Validate a complete strategy dict (after merging) and freeze it.

    ``pattern_paths[i]``, when given and not None, is where pattern i came from
    (the user's file and index): errors in it cite that, not the merged list.
    """
    d = _obj(data, path)
    _known(d, path, TOP_KEYS)
    base = _str(d.get("base", ""), f"{path}.base", "a built-in strategy name")
    sections = {s: _parse_section(d.get(s, {}), f"{path}.{s}", s) for s in SECTIONS}
    reg = _obj(d.get(REGISTRY, {}), f"{path}.{REGISTRY}")
    _known(reg, f"{path}.{REGISTRY}", REGISTRY_KEYS)
    rpath = f"{path}.{REGISTRY}"
    user = _parse_user(reg.get("user_defined_quantize_config", {}), f"{rpath}.user_defined_quantize_config")
    inputs = _parse_input_config(reg.get("input_quantize_config", {}), f"{rpath}.input_quantize_config")
    lpath = f"{rpath}.layer_quantize_config"
    raw = _list(reg.get("layer_quantize_config", []), lpath)
    where = [
        (pattern_paths[i] if pattern_paths and i < len(pattern_paths) and pattern_paths[i] else f"{lpath}[{i}]")
        for i in range(len(raw))
    ]
    patterns = tuple(parse_pattern(v, where[i], False, custom_types) for i, v in enumerate(raw))
    check_patterns(patterns, where)
    comments = {"": comment(d, path)} if "_comment" in d else {}
    return Strategy(
        base,
        freeze(sections["optimize_pipeline_config"]),
        freeze(sections["quantize_pipeline_config"]),
        freeze(sections["refine_pipeline_config"]),
        user,
        inputs,
        patterns,
        freeze(comments),
    )
