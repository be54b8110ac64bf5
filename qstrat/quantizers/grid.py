"""The integer grid: round modes, data formats, range methods and q_min/q_max.

Nothing here imports keras; it is shared by the keras.ops kernels, the NumPy
reference twins and the calibration observers.

Grid rules (DPU conventions, bit-width agnostic):
    signed:              [-2^(b-1), 2^(b-1) - 1]
    signed, narrow:      [-2^(b-1) + 1, 2^(b-1) - 1]
    unsigned:            [0, 2^b - 1]

Integer grids go up to 32 bits (an int32 bias, as the DPU and ONNX QDQ keep
it); the float data formats are 16 bits. Strategies allow more than 16 bits
only for bias targets (`qstrat.strategy.load`). Above 24 bits a float32 cannot
hold every integer of the grid: `fake_quant` says what the kernels return there.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


class RoundMode(str, enum.Enum):
    """How a value halfway between two grid points is rounded.

    HALF_UP is the DPU's activation rounding (floor(x + 0.5), so -2.5 -> -2);
    HALF_AWAY_FROM_ZERO is C's std::round, the DPU's weight rounding;
    FLOOR is used by the DPU softmax output.
    """

    HALF_TO_EVEN = "HALF_TO_EVEN"
    HALF_UP = "HALF_UP"
    HALF_TO_ZERO = "HALF_TO_ZERO"
    HALF_AWAY_FROM_ZERO = "HALF_AWAY_FROM_ZERO"
    FLOOR = "FLOOR"


class Method(str, enum.Enum):
    """How a quantizer picks its range from observed data."""

    NO_OF = "No_OF"  # the tightest range that does not overflow (min/max)
    MIN_MSE = "Min_MSE"  # the range with the least squared quantization error
    MIN_KL = "Min_KL"  # TensorRT-style entropy calibration over a histogram
    PERCENTILE = "Percentile"  # clip at the method_percentile-th percentile of |x|


class DataFormat(str, enum.Enum):
    """Storage format of a quantized value."""

    INT = "INT"
    UINT = "UINT"
    BFP16 = "BFP16"  # block floating point: 8 values share an 8-bit exponent
    FP16 = "FP16"  # IEEE half precision
    BF16 = "BF16"  # bfloat16

    @property
    def is_float(self) -> bool:
        return self in (DataFormat.BFP16, DataFormat.FP16, DataFormat.BF16)


# Reference-tool integer codes, accepted nowhere but named in error hints.
LEGACY_ROUND_CODES = {0: "HALF_TO_EVEN", 1: "HALF_UP", 2: "HALF_AWAY_FROM_ZERO", 3: "FLOOR"}
LEGACY_METHOD_CODES = {0: "No_OF", 1: "Min_MSE", 2: "Min_KL", 3: "Percentile"}

MIN_BIT_WIDTH = 1
MAX_BIT_WIDTH = 32  # int32; only bias targets may use more than 16 (see the strategy rule)
MAX_TENSOR_BIT_WIDTH = 16  # the widest grid a strategy allows for weights, activations and inputs
BFP_BLOCK_SIZE = 8  # values per shared exponent in BFP16
BFP_MANTISSA_BITS = 7  # magnitude bits per value in BFP16 (plus a sign bit)


@dataclass(frozen=True)
class IntGrid:
    """The integers a quantized value may take."""

    qmin: int
    qmax: int

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1


def int_grid(bit_width: int, unsigned: bool = False, narrow_range: bool = False) -> IntGrid:
    """Return the integer grid for a bit width.

    Example:
        >>> int_grid(8)
        IntGrid(qmin=-128, qmax=127)
        >>> int_grid(8, narrow_range=True)
        IntGrid(qmin=-127, qmax=127)
        >>> int_grid(4, unsigned=True)
        IntGrid(qmin=0, qmax=15)
        >>> int_grid(32)
        IntGrid(qmin=-2147483648, qmax=2147483647)
    """
    if unsigned:
        return IntGrid(0, 2**bit_width - 1)
    half = 2 ** (bit_width - 1)
    return IntGrid(-half + 1 if narrow_range else -half, half - 1)


def float32_inside(grid: IntGrid) -> tuple[float, float]:
    """The float32s nearest inside the grid: (smallest float32 >= qmin, largest float32 <= qmax).

    Why: above 24 bits the grid ends need not be float32s (2^31 - 1 rounds up
    to 2^31, off the grid). For a float32 n, qmin <= n <= qmax exactly when
    these bounds hold it; and a float32 value kept inside them (a zero point
    in float32 state) stays on the grid. Up to 24 bits they are qmin and qmax.

    Example:
        >>> float32_inside(int_grid(8))
        (-128.0, 127.0)
        >>> float32_inside(int_grid(32))
        (-2147483648.0, 2147483520.0)
    """
    lo, hi = np.float32(grid.qmin), np.float32(grid.qmax)
    # Compare as Python float and int, exactly (a float32 against an int would round the int).
    if float(lo) < grid.qmin:
        lo = np.nextafter(lo, np.float32(np.inf))
    if float(hi) > grid.qmax:
        hi = np.nextafter(hi, np.float32(-np.inf))
    return float(lo), float(hi)
