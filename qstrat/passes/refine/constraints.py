"""The DPU compiler's position constraints, one small pure function per rule.

Why: the DPU shifts where a float target would rescale, and its shifters
have fixed widths. A position pair whose shift does not fit is rejected (or
silently mangled) by the compiler, so the refine stage moves positions until
every shift fits. Each rule takes the positions involved and returns the
adjusted one(s); a position changes only where its bound is violated, and
then by the least that satisfies it.

Notation: ``ipos`` input position (the producer's output quantizer),
``wpos`` weight, ``bpos`` bias, ``opos`` output; a value x is stored as
round(x * 2^pos). `qstrat.passes.refine.positions` applies the rules to a
quantized model, in the order of ``RULES``.
"""

from __future__ import annotations

# Shifter limits of the DPU (the reference tool's compiler constraints).
SIGMOID_INPUT_RANGE = (0, 15)
SIGMOID_MIN_OUTPUT = 7
SIGMOID_SHIFT = 14  # the hard sigmoid's multiplier is 2731 / 2^14
MAX_SHIFT_READ = 15
SHIFT_WRITE_RANGE = (-15, 15)
SHIFT_SWISH_RANGE = (0, 15)
SHIFT_CUT_RANGE = (0, 16)
MAX_SHIFT_BIAS = 16
# The accumulator holds 24 bits: 8 output bits, then shift_cut bits below them.
ACCUMULATOR_BITS = 24
OUTPUT_BITS = 8

RULES = (
    "adjust_dpu_sigmoid",
    "adjust_dpu_shift_read",
    "adjust_dpu_shift_write",
    "adjust_dpu_shift_swish",
    "adjust_dpu_shift_cut",
    "adjust_dpu_shift_bias",
    "adjust_dpu_shift_bias_leakyrelu",
    "align_concat",
    "align_pool",
)


def _clamp(value: int, lo: int, hi: int) -> int:
    return min(max(value, lo), hi)


def sigmoid_positions(ipos: int, opos: int) -> tuple[int, int]:
    """Hard sigmoid: ipos in [0, 15]; opos at least 7; and shift_sigmoid = 14 + ipos - opos above 0.

    Example:
        >>> sigmoid_positions(17, 5)
        (15, 7)
    """
    ipos = _clamp(ipos, *SIGMOID_INPUT_RANGE)
    opos = max(opos, SIGMOID_MIN_OUTPUT)
    if SIGMOID_SHIFT + ipos - opos <= 0:
        opos = SIGMOID_SHIFT + ipos
    return ipos, opos


def shift_read(ipos: list[int]) -> list[int]:
    """Add/Multiply: the input positions differ by at most 15; higher ones come down to min + 15.

    Example:
        >>> shift_read([2, 20, 9])
        [2, 17, 9]
    """
    low = min(ipos)
    return [min(p, low + MAX_SHIFT_READ) for p in ipos]


def shift_write(ipos: list[int], opos: int) -> int:
    """Add/Multiply: min(ipos) - opos in [-15, 15]; the output position moves.

    Example:
        >>> shift_write([3, 5], 20)
        18
    """
    low = min(ipos)
    return low - _clamp(low - opos, *SHIFT_WRITE_RANGE)


def shift_swish(ipos_x: int, ipos_sigmoid: int, opos: int) -> int:
    """Swish (x * hard_sigmoid(x)): ipos_x + ipos_sigmoid - opos in [0, 15]; the output position moves.

    Example:
        >>> shift_swish(4, 7, 12)
        11
    """
    total = ipos_x + ipos_sigmoid
    return total - _clamp(total - opos, *SHIFT_SWISH_RANGE)


def shift_cut(wpos: int, ipos: int, opos: int) -> int:
    """Conv/Dense: shift_cut = wpos + ipos - opos in [0, 16]; the weight position moves.

    Example:
        >>> shift_cut(10, 9, 1)
        8
    """
    return _clamp(wpos + ipos - opos, *SHIFT_CUT_RANGE) + opos - ipos


def shift_bias_range(wpos: int, ipos: int, opos: int) -> tuple[int, int]:
    """The allowed shift_bias = wpos + ipos - bpos: [min(0, shift_cut - 16), 16].

    The lower bound keeps the bias inside the 24-bit accumulator: a bias finer
    than the product grid by k bits needs 8 + shift_cut + k <= 24.
    """
    sc = wpos + ipos - opos
    return min(0, -(ACCUMULATOR_BITS - (OUTPUT_BITS + sc))), MAX_SHIFT_BIAS


def shift_bias(wpos: int, ipos: int, bpos: int, opos: int) -> int:
    """Conv/Dense: shift_bias = wpos + ipos - bpos within `shift_bias_range`; the bias position moves.

    Example:
        >>> shift_bias(7, 6, 30, 5)   # shift_cut 8: shift_bias at least -8
        21
    """
    lo, hi = shift_bias_range(wpos, ipos, opos)
    return wpos + ipos - _clamp(wpos + ipos - bpos, lo, hi)


def shift_bias_leakyrelu(wpos: int, ipos: int, bpos: int) -> int:
    """Conv/Dense feeding a LeakyReLU: shift_bias in [0, 16]; the bias position moves.

    Example:
        >>> shift_bias_leakyrelu(7, 6, 15)
        13
    """
    return wpos + ipos - _clamp(wpos + ipos - bpos, 0, MAX_SHIFT_BIAS)


def align_concat(ipos: list[int], opos: int) -> int:
    """Concatenate: every input and the output take the lowest of their positions.

    Example:
        >>> align_concat([5, 7], 6)
        5
    """
    return min(*ipos, opos)


def align_pool(ipos: int, opos: int) -> int:
    """Max/average pooling: input and output take the lower of the two positions.

    Example:
        >>> align_pool(6, 4)
        4
    """
    return min(ipos, opos)
