"""The integer form of the activations the DPU computes: ReLU (and its clipped forms), its LeakyReLU and its
hard sigmoid, on `IntTensor` values (`qstrat.integer.layers` picks the one a layer needs).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from qstrat.errors import UnsupportedError
from qstrat.integer.tensors import IntTensor, as_pos, at_least, shift_left
from qstrat.layers.dpu import HARD_SIGMOID_MULTIPLIER, HARD_SIGMOID_SHIFT, LEAKY_RELU_SLOPE


def clip_above(t: IntTensor, limit: float) -> IntTensor:
    """min(t, limit) for a float32 constant ``limit`` (a dyadic rational), exactly."""
    frac = Fraction(float(np.float32(limit)))
    e = int(math.log2(frac.denominator))
    t = at_least(t, e)
    bound = shift_left(np.int64(frac.numerator), np.asarray(t.pos) - e) * np.asarray(t.den)
    return IntTensor(np.minimum(t.values, bound), t.pos, t.den)


def activate(t: IntTensor, name: str) -> IntTensor:
    if name == "linear":
        return t
    t = IntTensor(np.maximum(t.values, 0), t.pos, t.den)
    return clip_above(t, 6.0) if name == "relu6" else t


def leaky(t: IntTensor, slope: float, where: str) -> IntTensor:
    """LeakyReLU with the DPU's slope 26/256: negatives times 26 at pos + 8, the rest shifted left by 8."""
    if float(np.float32(slope)) != LEAKY_RELU_SLOPE:
        raise UnsupportedError(
            f"{where}: LeakyReLU slope {slope} is not the DPU's 26/256, so it has no integer form. "
            "Use slope 0.1 with the strategy key convert_leaky_relu_to_dpu_version, which makes it 26/256."
        )
    v = t.values
    return IntTensor(np.where(v < 0, v * 26, shift_left(v, 8)), as_pos(np.asarray(t.pos) + 8), t.den)


def relu_layer(layer, t: IntTensor):
    if float(layer.threshold) != 0.0:
        return None
    if float(layer.negative_slope) != 0.0:
        return None if layer.max_value is not None else leaky(t, layer.negative_slope, layer.name)
    t = IntTensor(np.maximum(t.values, 0), t.pos, t.den)
    return t if layer.max_value is None else clip_above(t, layer.max_value)


def hard_sigmoid(t: IntTensor) -> IntTensor:
    """relu6(x + 3) * 2731 at pos + 14, with pos >= 0 so that 3 and 6 are integers."""
    t = at_least(t, 0)
    unit = shift_left(np.int64(1), np.asarray(t.pos)) * np.asarray(t.den)
    clipped = np.clip(t.values + 3 * unit, 0, 6 * unit)
    return IntTensor(clipped * HARD_SIGMOID_MULTIPLIER, as_pos(np.asarray(t.pos) + HARD_SIGMOID_SHIFT), t.den)
