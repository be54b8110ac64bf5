"""Validating a complete strategy dict into a frozen `Strategy`, with errors that name the JSON path.

`load.py` builds the dict (a built-in, a custom file or dict merged over it,
keyword overrides); this module checks every part of it once: pipeline keys,
quantizer configs, patterns (names, nesting, cycles, shared quantizers), the
user config and the input quantizer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from qstrat.errors import ConfigError, did_you_mean
from qstrat.quantizers import get_quantizer_class
from qstrat.quantizers.grid import MAX_BIT_WIDTH, MAX_TENSOR_BIT_WIDTH, DataFormat
from qstrat.quantizers.params import PARAM_NAMES, check_bit_width, parse_params
from qstrat.strategy.keys import (
    HANDY_KEYS,
    LAYER_CONFIG_DTYPES,
    PARTITION_KEYS,
    SECTIONS,
    USER_KEYS,
    KeySpec,
)
from qstrat.strategy.layer_types import check_layer_params, check_layer_type
from qstrat.strategy.readers import check_known as _known
from qstrat.strategy.readers import expect_list as _list
from qstrat.strategy.readers import expect_object as _obj
from qstrat.strategy.readers import expect_str as _str
from qstrat.strategy.schema import (
    TARGET_TYPES,
    InputQuantizeConfig,
    LayerPattern,
    PatternRef,
    QuantizerSpec,
    QuantTarget,
    Strategy,
    UserConfig,
    freeze,
)

REGISTRY = "quantize_registry_config"
TOP_KEYS = ("_comment", "base", *SECTIONS, REGISTRY)
REGISTRY_KEYS = ("_comment", "user_defined_quantize_config", "input_quantize_config", "layer_quantize_config")
PATTERN_KEYS = ("_comment", "pattern_name", "layer_type", "layer_name", "layer_params", "layer_inputs", "quant_config")
TARGET_KEYS = ("_comment", "target_name", "target_type", "shared_quantizer", "quantizer_config")
QUANTIZER_KEYS = ("_comment", "name", "type", "params", "quantizer_type", "quantizer_params")


# ---- small typed readers (qstrat.strategy.readers) ------------------------------------------


def _str_list(value, path: str) -> tuple[str, ...]:
    return tuple(_str(v, f"{path}[{i}]", "a layer name (a string)") for i, v in enumerate(_list(value, path)))


def _comment(d: Mapping, path: str) -> str | None:
    if "_comment" not in d:
        return None
    return _str(d["_comment"], f"{path}._comment", "a string (a comment)")


def _json_value(value, path: str):
    """Accept only plain JSON values (what json.dumps writes back unchanged)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError.expected(path, "a finite number", value)
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(_str(k, path, "string keys")): _json_value(v, f"{path}.{k}") for k, v in value.items()}
    raise ConfigError.expected(path, "a JSON value", value)


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
                "Set quantize_with_xcompiler to false. The DPU compiler's position constraints (adjust_dpu_*, "
                "align_*) are to be applied by qstrat's refine stage instead, which does not apply them yet.",
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


# ---- quantizer configs -------------------------------------------------------------


_TARGET_WORDS = {"output": "output (activation)"}


def check_target_bit_width(target_type: str, value, path: str, hint: str = "") -> None:
    """The strategy's bit-width rule: bias targets take 1 to 32 bits, every other target 1 to 16.

    Why: an int32 bias is what the DPU and ONNX QDQ use, while 32-bit weights,
    activations or inputs would only simulate a float model with a grid float32
    cannot hold. ``hint`` is added to the error's own (where the value came from).
    """
    if target_type == "bias":
        return
    try:
        check_bit_width(path, value, MAX_TENSOR_BIT_WIDTH)
    except ConfigError as exc:
        wide = isinstance(value, int) and not isinstance(value, bool) and value > MAX_TENSOR_BIT_WIDTH
        rule = (
            f"Only bias targets go up to {MAX_BIT_WIDTH} bits; {_TARGET_WORDS.get(target_type, target_type)} "
            f"targets take 1 to {MAX_TENSOR_BIT_WIDTH}."
            if wide
            else ""
        )
        text = " ".join(t for t in (exc.hint, rule, hint) if t)
        raise ConfigError(exc.path, exc.problem, text or None) from None


def parse_quantizer(value, path: str, target_type: str | None = None) -> QuantizerSpec:
    """``{"name", "type", "params"}`` (or ``quantizer_type``/``quantizer_params``), checked by the quantizer.

    ``target_type``, when given, also applies `check_target_bit_width` to ``bit_width``.
    """
    d = _obj(value, path)
    _known(d, path, QUANTIZER_KEYS)
    for a, b in (("type", "quantizer_type"), ("params", "quantizer_params")):
        if a in d and b in d:
            raise ConfigError(path, f'both "{a}" and "{b}" are given', f'Keep one: "{a}" and "{b}" mean the same.')
    type_key = "type" if "type" in d else "quantizer_type"
    params_key = "params" if "params" in d else "quantizer_params"
    if type_key not in d:
        raise ConfigError(path, 'missing key "type"', 'Name a quantizer, e.g. "type": "Pof2SQuantizer".')
    qtype = _str(d[type_key], f"{path}.{type_key}", "a quantizer type name")
    cls = get_quantizer_class(qtype, f"{path}.{type_key}")
    params = _obj(d.get(params_key, {}), f"{path}.{params_key}")
    if target_type is not None and "bit_width" in params:
        check_target_bit_width(target_type, params["bit_width"], f"{path}.{params_key}.bit_width")
    cls.from_params(params, f"{path}.{params_key}")  # raises ConfigError with the full path
    name = _str(d.get("name", ""), f"{path}.name", "a quantizer name (a string)")
    return QuantizerSpec(qtype, freeze(_json_value(dict(params), f"{path}.{params_key}")), name, _comment(d, path))


# ---- patterns ------------------------------------------------------------------------


def _parse_target(value, path: str) -> QuantTarget:
    d = _obj(value, path)
    _known(d, path, TARGET_KEYS)
    for key in ("target_name", "target_type"):
        if key not in d:
            raise ConfigError(path, f'missing key "{key}"', None)
    name = _str(d["target_name"], f"{path}.target_name", "a target name (a string)")
    ttype = _str(d["target_type"], f"{path}.target_type")
    if ttype not in TARGET_TYPES:
        raise ConfigError.expected(
            f"{path}.target_type",
            "one of " + ", ".join(f'"{t}"' for t in TARGET_TYPES),
            ttype,
            did_you_mean(ttype, TARGET_TYPES),
        )
    if not name:
        raise ConfigError.expected(
            f"{path}.target_name", "a non-empty name", name, 'e.g. "kernel", "bias" or "output".'
        )
    if ttype == "input" and not re.fullmatch(r"input(_\d+)?", name):
        raise ConfigError.expected(
            f"{path}.target_name", '"input" (every input) or "input_<i>" for an input target', name
        )
    shared = d.get("shared_quantizer")
    if shared is not None:
        if "quantizer_config" in d:
            raise ConfigError(path, 'both "shared_quantizer" and "quantizer_config" are given', "Keep one.")
        return QuantTarget(name, ttype, None, _str(shared, f"{path}.shared_quantizer", "a quantizer name"))
    if "quantizer_config" not in d:
        raise ConfigError(path, 'missing key "quantizer_config"', 'Give a quantizer, or "shared_quantizer": "<name>".')
    q = d["quantizer_config"]
    return QuantTarget(name, ttype, None if q is None else parse_quantizer(q, f"{path}.quantizer_config", ttype))


def _parse_pattern(value, path: str, nested: bool, custom_types) -> LayerPattern | PatternRef:
    d = _obj(value, path)
    if nested and "pattern" in d:
        _known(d, path, ("pattern",))
        return PatternRef(_str(d["pattern"], f"{path}.pattern", "a pattern_name"))
    _known(d, path, PATTERN_KEYS if not nested else [k for k in PATTERN_KEYS if k != "pattern_name"] + ["pattern"])
    name = None
    if not nested:
        if "pattern_name" not in d:
            raise ConfigError(path, 'missing key "pattern_name"', "Every pattern needs a unique pattern_name.")
        name = _str(d["pattern_name"], f"{path}.pattern_name")
        if not name:
            raise ConfigError.expected(f"{path}.pattern_name", "a non-empty name", name)
    raw_type = _str(d.get("layer_type", ""), f"{path}.layer_type", 'layer class names joined by "|"')
    types = tuple(t.strip() for t in raw_type.split("|")) if raw_type.strip() else ()
    for t in types:
        check_layer_type(t, f"{path}.layer_type", custom_types)
    layer_name = _str(d.get("layer_name", ""), f"{path}.layer_name", "a regular expression (a string)")
    try:
        re.compile(layer_name)
    except re.error as exc:
        raise ConfigError(f"{path}.layer_name", f"not a valid regular expression: {exc}", None) from None
    params = _json_value(dict(_obj(d.get("layer_params", {}), f"{path}.layer_params")), f"{path}.layer_params")
    check_layer_params(types, params, f"{path}.layer_params", custom_types)
    inputs = tuple(
        _parse_pattern(v, f"{path}.layer_inputs[{i}]", True, custom_types)
        for i, v in enumerate(_list(d.get("layer_inputs", []), f"{path}.layer_inputs"))
    )
    targets = tuple(
        _parse_target(v, f"{path}.quant_config[{i}]")
        for i, v in enumerate(_list(d.get("quant_config", []), f"{path}.quant_config"))
    )
    return LayerPattern(name, types, layer_name, freeze(params), inputs, targets, _comment(d, path))


def _walk(pattern: LayerPattern, path: str):
    """Yield (pattern, path) for a pattern and its nested input entries."""
    yield pattern, path
    for i, entry in enumerate(pattern.layer_inputs):
        if isinstance(entry, LayerPattern):
            yield from _walk(entry, f"{path}.layer_inputs[{i}]")


def _check_patterns(patterns: tuple[LayerPattern, ...], where: list[str]) -> None:
    """Unique names, known references, no cycles; ``where[i]`` is pattern i's JSON path."""
    names: dict[str, int] = {}
    for i, p in enumerate(patterns):
        if p.pattern_name in names:
            raise ConfigError(
                f"{where[i]}.pattern_name",
                f'"{p.pattern_name}" is already the name of {where[names[p.pattern_name]]}',
                "Pattern names must be unique; rename one, or edit the first.",
            )
        names[p.pattern_name] = i
    refs: dict[str, set[str]] = {}
    for i, p in enumerate(patterns):
        here = where[i]
        quantizer_names: dict[str, str] = {}
        shared: list[tuple[str, str]] = []
        for node, npath in _walk(p, here):
            for j, t in enumerate(node.quant_config):
                tpath = f"{npath}.quant_config[{j}]"
                if t.quantizer is not None and t.quantizer.name:
                    if t.quantizer.name in quantizer_names:
                        raise ConfigError(
                            f"{tpath}.quantizer_config.name",
                            f'quantizer name "{t.quantizer.name}" is already used at {quantizer_names[t.quantizer.name]}',
                            "Quantizer names must be unique within a pattern.",
                        )
                    quantizer_names[t.quantizer.name] = tpath
                if t.shared_quantizer is not None:
                    shared.append((t.shared_quantizer, f"{tpath}.shared_quantizer"))
            for j, entry in enumerate(node.layer_inputs):
                if isinstance(entry, PatternRef):
                    epath = f"{npath}.layer_inputs[{j}].pattern"
                    if entry.pattern not in names:
                        hint = did_you_mean(entry.pattern, names) or f"Defined patterns: {', '.join(names) or 'none'}."
                        raise ConfigError(epath, f'no pattern is named "{entry.pattern}"', hint)
                    refs.setdefault(p.pattern_name, set()).add(entry.pattern)
        for name, spath in shared:
            if name not in quantizer_names:
                hint = did_you_mean(name, quantizer_names) or (
                    f"Quantizers named in this pattern: {', '.join(quantizer_names) or 'none'}."
                )
                raise ConfigError(spath, f'no quantizer in this pattern is named "{name}"', hint)
    _check_cycles(refs, names, where)


def _check_cycles(refs: dict[str, set[str]], names: dict[str, int], where: list[str]) -> None:
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]):
        state[n] = 1
        for m in sorted(refs.get(n, ())):
            if state.get(m) == 1:
                cycle = stack[stack.index(m) :] + [m] if m in stack else [n, m]
                raise ConfigError(
                    where[names[cycle[0]]],
                    "patterns refer to each other in a cycle: " + " -> ".join(cycle),
                    "A pattern cannot be its own (indirect) input; break the cycle.",
                )
            if state.get(m) is None:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(refs):
        if state.get(n) is None:
            visit(n, [n])


# ---- sections ------------------------------------------------------------------------------


def _parse_section(d: Mapping, path: str, section: str) -> dict[str, Any]:
    specs = SECTIONS[section]
    d = _obj(d, path)
    _known(d, path, ("_comment", *specs))
    out: dict[str, Any] = {}
    if "_comment" in d:
        out["_comment"] = _comment(d, path)
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
    return list(_str_list(value, path))


def _parse_user(d, path: str) -> UserConfig:
    d = _obj(d, path)
    _known(d, path, ("_comment", *USER_KEYS))
    values: dict[str, Any] = {}
    if "_comment" in d:
        values["_comment"] = _comment(d, path)
    for key in USER_KEYS:
        default = {} if key == "layer_config" else ([] if key in PARTITION_KEYS else None)
        values[key] = check_user_value(key, d[key], f"{path}.{key}") if key in d else default
    return UserConfig(freeze(values))


def _parse_input_config(d, path: str) -> InputQuantizeConfig:
    d = _obj(d, path)
    _known(d, path, ("_comment", "input_layers", "quantizer_config"))
    q = d.get("quantizer_config")
    return InputQuantizeConfig(
        _str_list(d.get("input_layers", []), f"{path}.input_layers"),
        None if q is None else parse_quantizer(q, f"{path}.quantizer_config", "input"),
        _comment(d, path),
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
    patterns = tuple(_parse_pattern(v, where[i], False, custom_types) for i, v in enumerate(raw))
    _check_patterns(patterns, where)
    comments = {"": _comment(d, path)} if "_comment" in d else {}
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
