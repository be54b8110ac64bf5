"""Validating the registry's quantizer configs and patterns (`qstrat.strategy.parse` validates the rest).

A quantizer config names a quantizer class and its parameters; a pattern
matches layers by type, name, config values and inputs (nested patterns, or
references to a top-level pattern by name) and says which quantizers they
get. Patterns are checked for unique names, references that resolve, no
reference cycles, and shared quantizers that exist where they are used.
"""

from __future__ import annotations

import re

from qstrat.errors import ConfigError, did_you_mean
from qstrat.quantizers import get_quantizer_class
from qstrat.quantizers.grid import MAX_BIT_WIDTH, MAX_TENSOR_BIT_WIDTH
from qstrat.quantizers.params import check_bit_width
from qstrat.strategy.layer_types import check_layer_params, check_layer_type
from qstrat.strategy.readers import check_known as _known
from qstrat.strategy.readers import comment, json_value
from qstrat.strategy.readers import expect_list as _list
from qstrat.strategy.readers import expect_object as _obj
from qstrat.strategy.readers import expect_str as _str
from qstrat.strategy.schema import TARGET_TYPES, LayerPattern, PatternRef, QuantizerSpec, QuantTarget, freeze

PATTERN_KEYS = ("_comment", "pattern_name", "layer_type", "layer_name", "layer_params", "layer_inputs", "quant_config")
TARGET_KEYS = ("_comment", "target_name", "target_type", "shared_quantizer", "quantizer_config")
QUANTIZER_KEYS = ("_comment", "name", "type", "params", "quantizer_type", "quantizer_params")


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
    return QuantizerSpec(qtype, freeze(json_value(dict(params), f"{path}.{params_key}")), name, comment(d, path))


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


def parse_pattern(value, path: str, nested: bool, custom_types) -> LayerPattern | PatternRef:
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
    params = json_value(dict(_obj(d.get("layer_params", {}), f"{path}.layer_params")), f"{path}.layer_params")
    check_layer_params(types, params, f"{path}.layer_params", custom_types)
    inputs = tuple(
        parse_pattern(v, f"{path}.layer_inputs[{i}]", True, custom_types)
        for i, v in enumerate(_list(d.get("layer_inputs", []), f"{path}.layer_inputs"))
    )
    targets = tuple(
        _parse_target(v, f"{path}.quant_config[{i}]")
        for i, v in enumerate(_list(d.get("quant_config", []), f"{path}.quant_config"))
    )
    return LayerPattern(name, types, layer_name, freeze(params), inputs, targets, comment(d, path))


def _walk(pattern: LayerPattern, path: str):
    """Yield (pattern, path) for a pattern and its nested input entries."""
    yield pattern, path
    for i, entry in enumerate(pattern.layer_inputs):
        if isinstance(entry, LayerPattern):
            yield from _walk(entry, f"{path}.layer_inputs[{i}]")


def check_patterns(patterns: tuple[LayerPattern, ...], where: list[str]) -> None:
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
