"""Quantizer parameters: one frozen dataclass, checked once when a quantizer is made.

The names and value spellings are the seed's (``bit_width``, ``round_mode:
"HALF_UP"``, ``method: "Min_MSE"``, ...). Each quantizer class says which of
them it accepts; anything else is an error with a "did you mean" hint.
Downstream code reads `QuantizerParams` and never re-validates.

``bit_width`` is 1 to 32 for the integer formats (INT, UINT) and 16 for the
float formats; the framework quantizer (Keras' fake_quant_with_min_max_vars,
TensorFlow's FakeQuant op) takes 2 to 16. Which targets may go above 16 is a
strategy rule, not a quantizer one: only biases (`qstrat.strategy.load`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qstrat.errors import ConfigError, did_you_mean
from qstrat.quantizers.grid import (
    LEGACY_METHOD_CODES,
    LEGACY_ROUND_CODES,
    MAX_BIT_WIDTH,
    MAX_TENSOR_BIT_WIDTH,
    MIN_BIT_WIDTH,
    DataFormat,
    IntGrid,
    Method,
    RoundMode,
    int_grid,
)


@dataclass(frozen=True)
class QuantizerParams:
    """Every parameter a built-in quantizer can take, with its generic default."""

    bit_width: int = 8
    data_format: DataFormat = DataFormat.INT
    method: Method = Method.NO_OF
    method_percentile: float = 99.9999
    round_mode: RoundMode = RoundMode.HALF_TO_EVEN
    symmetry: bool = True
    per_channel: bool = False
    channel_axis: int = -1
    unsigned: bool = False
    narrow_range: bool = False
    epsilon: float = 1e-7
    min_quantize_pos: int = -52
    max_quantize_pos: int = 52
    ema_decay: float = 0.999
    use_framework_quantizer: bool = False

    @property
    def is_unsigned(self) -> bool:
        """True when the grid has no negative values (``unsigned`` or ``data_format: UINT``)."""
        return self.unsigned or self.data_format == DataFormat.UINT

    @property
    def grid(self) -> IntGrid:
        return int_grid(self.bit_width, self.is_unsigned, self.narrow_range)

    def to_dict(self, names) -> dict[str, Any]:
        """The named parameters as JSON values (enums become their strings)."""
        out = {}
        for name in names:
            value = getattr(self, name)
            out[name] = value.value if isinstance(value, enum_types) else value
        return out


enum_types = (DataFormat, Method, RoundMode)
PARAM_NAMES = tuple(f.name for f in dataclasses.fields(QuantizerParams))
# The parameters every built-in quantizer takes (each adds its own).
COMMON_PARAMS = (
    "bit_width",
    "data_format",
    "method",
    "method_percentile",
    "round_mode",
    "symmetry",
    "per_channel",
    "channel_axis",
    "unsigned",
    "narrow_range",
    "epsilon",
)


def _int(path, value, lo=None, hi=None):
    rng = f" in [{lo}, {hi}]" if lo is not None else ""
    if isinstance(value, bool) or not isinstance(value, int):
        hint = None
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            hint = f"Write {value.strip()} without quotes."
        elif isinstance(value, float) and value.is_integer():
            hint = f"Write {int(value)} without a decimal point."
        raise ConfigError.expected(path, f"an integer{rng}", value, hint)
    if lo is not None and not lo <= value <= hi:
        raise ConfigError.expected(path, f"an integer{rng}", value)
    return value


def check_bit_width(path: str, value, max_bit_width: int = MAX_BIT_WIDTH) -> int:
    """``value`` as a bit width in [1, max_bit_width], or a ConfigError saying what to write."""
    return _int(path, value, MIN_BIT_WIDTH, max_bit_width)


def _bool(path, value):
    if not isinstance(value, bool):
        hint = "Write true or false without quotes." if isinstance(value, (str, int)) else None
        raise ConfigError.expected(path, "true or false", value, hint)
    return value


def _number(path, value, what, ok):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError.expected(path, what, value)
    if not ok(value):
        raise ConfigError.expected(path, what, value)
    return float(value)


def _enum(path, value, enum_cls, allowed, legacy=None):
    names = [m.value for m in allowed]
    what = "one of " + ", ".join(f'"{n}"' for n in names)
    if isinstance(value, int) and not isinstance(value, bool) and legacy and value in legacy:
        hint = f'{value} is the Vitis AI integer code; write "{legacy[value]}".'
        raise ConfigError.expected(path, what, value, hint)
    if not isinstance(value, str):
        raise ConfigError.expected(path, what, value)
    if value not in names:
        raise ConfigError.expected(path, what, value, did_you_mean(value, names))
    return enum_cls(value)


def parse_params(
    owner: str,
    raw: Mapping[str, Any],
    accepted: tuple[str, ...],
    defaults: Mapping[str, Any],
    data_formats: tuple[DataFormat, ...],
    path: str | None = None,
) -> QuantizerParams:
    """Check raw quantizer parameters and return them as `QuantizerParams`.

    Args:
        owner: the quantizer type name, used in messages.
        raw: the parameters as written by the user (JSON values).
        accepted: the parameter names this quantizer takes.
        defaults: per-quantizer defaults that replace the generic ones.
        data_formats: the data formats this quantizer supports.
        path: where the parameters sit, for messages; defaults to ``owner``.

    Raises:
        ConfigError: naming the parameter, the value received and what is allowed.
    """
    path = path or owner
    if not isinstance(raw, Mapping):
        raise ConfigError.expected(path, "an object of quantizer parameters", raw)
    for key in raw:
        if key in accepted:
            continue
        if key in PARAM_NAMES:
            raise ConfigError(
                f"{path}.{key}",
                f'{owner} has no parameter "{key}"',
                f"{owner} takes: {', '.join(accepted)}.",
            )
        raise ConfigError.unknown_key(path, str(key), accepted)

    merged = {**defaults, **raw}

    def p(name):
        return f"{path}.{name}"

    values: dict[str, Any] = {}
    for name, value in merged.items():
        if name == "bit_width":
            values[name] = check_bit_width(p(name), value)
        elif name in ("channel_axis",):
            values[name] = _int(p(name), value)
        elif name in ("min_quantize_pos", "max_quantize_pos"):
            values[name] = _int(p(name), value, -126, 126)
        elif name in ("symmetry", "per_channel", "unsigned", "narrow_range", "use_framework_quantizer"):
            values[name] = _bool(p(name), value)
        elif name == "data_format":
            values[name] = _enum(p(name), value, DataFormat, data_formats)
        elif name == "method":
            values[name] = _enum(p(name), value, Method, list(Method), LEGACY_METHOD_CODES)
        elif name == "round_mode":
            values[name] = _enum(p(name), value, RoundMode, list(RoundMode), LEGACY_ROUND_CODES)
        elif name == "method_percentile":
            values[name] = _number(p(name), value, "a number in (50, 100]", lambda v: 50 < v <= 100)
        elif name == "epsilon":
            values[name] = _number(p(name), value, "a positive number", lambda v: v > 0)
        elif name == "ema_decay":
            values[name] = _number(p(name), value, "a number in (0, 1)", lambda v: 0 < v < 1)
    params = QuantizerParams(**values)
    _check_combination(params, path, accepted)
    return params


def _check_combination(q: QuantizerParams, path: str, accepted) -> None:
    """Cross-parameter rules shared by every quantizer."""
    if q.data_format.is_float:
        fmt = q.data_format.value
        if q.bit_width != 16:
            raise ConfigError(
                f"{path}.bit_width",
                f'data_format "{fmt}" stores 16 bits per value, got bit_width {q.bit_width}',
                "Set bit_width to 16.",
            )
        if q.use_framework_quantizer:
            raise ConfigError(
                f"{path}.use_framework_quantizer",
                f'the framework quantizer handles integer grids only, not data_format "{fmt}"',
                "Set use_framework_quantizer to false.",
            )
        if q.data_format != DataFormat.BFP16 and q.round_mode != RoundMode.HALF_TO_EVEN:
            raise ConfigError(
                f"{path}.round_mode",
                f'data_format "{fmt}" rounds like an IEEE conversion (HALF_TO_EVEN), got "{q.round_mode.value}"',
                'Set round_mode to "HALF_TO_EVEN".',
            )
        return
    if q.is_unsigned and q.narrow_range:
        raise ConfigError(
            f"{path}.narrow_range",
            "narrow_range drops the most negative level, and an unsigned grid has none",
            "Set narrow_range to false, or use a signed grid.",
        )
    if q.narrow_range and q.bit_width == 1:
        raise ConfigError(
            f"{path}.narrow_range",
            "a 1-bit narrow grid has a single level (0)",
            "Use bit_width 2 or more, or set narrow_range to false.",
        )
    if "min_quantize_pos" in accepted and q.min_quantize_pos > q.max_quantize_pos:
        raise ConfigError(
            f"{path}.min_quantize_pos",
            f"min_quantize_pos {q.min_quantize_pos} is above max_quantize_pos {q.max_quantize_pos}",
            "Swap the two values.",
        )
    if q.use_framework_quantizer:
        if q.round_mode != RoundMode.HALF_UP:
            raise ConfigError(
                f"{path}.round_mode",
                f'the framework quantizer rounds HALF_UP only, got "{q.round_mode.value}"',
                'Set round_mode to "HALF_UP", or use_framework_quantizer to false.',
            )
        if not 2 <= q.bit_width <= MAX_TENSOR_BIT_WIDTH:
            raise ConfigError(
                f"{path}.bit_width",
                f"the framework quantizer needs bit_width 2 to {MAX_TENSOR_BIT_WIDTH}, got {q.bit_width}",
                f"Set use_framework_quantizer to false for {'1-bit' if q.bit_width < 2 else 'wider'} grids.",
            )
