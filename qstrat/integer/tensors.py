"""Integer tensors for the reference executor, and their exact shifts and roundings.

An `IntTensor` holds ``values`` (int64) at a power-of-2 position ``pos`` over a
positive integer ``den``: the real number it stands for is
``values * 2^-pos / den``. ``pos`` is an int, or a vector over the last
(channel) axis for per-channel positions; ``den`` is 1 except after an exact
average (`den` the window count), an int or an array that broadcasts against
``values``.

Every operation here is exact integer arithmetic: shifts left are checked
against int64 overflow, and the one lossy step, `requantize`, rounds the exact
rational ``values * 2^(opos - pos) / den`` with the quantizer's round mode
(`qstrat.quantizers.grid.RoundMode`) and clips it to the grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qstrat.errors import UnsupportedError
from qstrat.quantizers.grid import IntGrid, RoundMode

# Values are kept below 2^62 so that 2 * values (the rounding helper) still fits an int64.
INT64_ROOM = 62
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class IntTensor:
    """``values * 2^-pos / den``: integers at a power-of-2 position.

    Attributes:
        values: int64 array (batch first, channels last).
        pos: int, or int64 array of shape (C,) for per-channel positions (C the last axis).
        den: positive int, or a positive int64 array broadcasting against ``values``.

    Example:
        >>> t = IntTensor(np.array([3, -5]), pos=2)       # 0.75, -1.25
        >>> to_float(t)
        array([ 0.75, -1.25], dtype=float32)
    """

    values: np.ndarray
    pos: int | np.ndarray
    den: int | np.ndarray = 1

    def __post_init__(self):
        object.__setattr__(self, "values", np.asarray(self.values, np.int64))
        object.__setattr__(self, "pos", as_pos(self.pos))
        den = np.asarray(self.den, np.int64)
        object.__setattr__(self, "den", int(den) if den.ndim == 0 else den)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def per_channel(self) -> bool:
        return isinstance(self.pos, np.ndarray)

    @property
    def exact_den(self) -> bool:
        """True when ``den`` is 1 (the values are the grid integers themselves)."""
        return not isinstance(self.den, np.ndarray) and self.den == 1


def as_pos(pos) -> int | np.ndarray:
    """A position as an int, or an int64 vector when it differs between channels."""
    arr = np.asarray(pos)
    if arr.size == 0:
        raise UnsupportedError("a position vector needs at least one channel")
    if not np.all(arr == np.round(arr)):
        raise UnsupportedError(f"positions must be integers, got {arr}")
    arr = np.round(arr).astype(np.int64)
    if arr.ndim == 0 or np.all(arr == arr.reshape(-1)[0]):
        return int(arr.reshape(-1)[0])
    return arr.reshape(-1)


def shift_left(values: np.ndarray, shift) -> np.ndarray:
    """``values * 2^shift`` for shifts >= 0 (broadcast), raising instead of overflowing int64."""
    values = np.asarray(values, np.int64)
    shift = np.asarray(shift, np.int64)
    if np.any(shift < 0):
        raise ValueError(f"shift_left needs shifts >= 0, got {shift.min()}")
    if values.size and shift.size:
        top = int(np.max(np.abs(values), initial=0))
        if top and top.bit_length() + int(shift.max()) > INT64_ROOM:
            raise UnsupportedError(
                f"an integer tensor (largest magnitude {top}) shifted left by {int(shift.max())} bits "
                "leaves int64: the positions differ by too much. Check the quantize positions "
                "(qstrat.get_quantize_info)."
            )
    return np.left_shift(values, shift)


def align(t: IntTensor, pos) -> IntTensor:
    """``t`` at the finer position ``pos`` (>= t.pos everywhere): an exact left shift."""
    pos = as_pos(pos)
    return IntTensor(shift_left(t.values, np.asarray(pos) - np.asarray(t.pos)), pos, t.den)


def uniform(t: IntTensor) -> IntTensor:
    """``t`` with one position for all channels (the finest of them), exactly."""
    if not t.per_channel:
        return t
    return align(t, int(np.max(t.pos)))


def common_pos(*positions) -> int | np.ndarray:
    """The finest of several positions, per channel where any is a vector."""
    top = np.asarray(positions[0])
    for p in positions[1:]:
        top = np.maximum(top, np.asarray(p))
    return as_pos(top)


def at_least(t: IntTensor, pos: int) -> IntTensor:
    """``t`` at a position >= ``pos`` in every channel (shifted left where it is coarser)."""
    return align(t, np.maximum(np.asarray(t.pos), pos))


def full_den(t: IntTensor) -> np.ndarray:
    """``den`` as an int64 array of the values' shape (for layout operations)."""
    return np.broadcast_to(np.asarray(t.den, np.int64), t.shape).copy()


def scalar_den(t: IntTensor, where: str) -> int:
    """``den`` as an int; an error if it varies over the tensor (``where`` names the layer)."""
    if not isinstance(t.den, np.ndarray):
        return int(t.den)
    flat = t.den.reshape(-1)
    if flat.size and np.all(flat == flat[0]):
        return int(flat[0])
    raise UnsupportedError(
        f"{where}: its input is an average whose window count differs between elements "
        "(a 'same'-padded pooling) and has no quantizer before this layer, so it has no "
        "integer form here. Quantize the pooling layer's output."
    )


def round_ratio(num, den, round_mode: RoundMode | str) -> np.ndarray:
    """Round ``num / den`` (int64 arrays, den > 0) to integers, exactly, with the given tie rule.

    HALF_UP is floor(q + 1/2) (so -2.5 -> -2), HALF_AWAY_FROM_ZERO and
    HALF_TO_ZERO move ties away from or towards zero, HALF_TO_EVEN to the even
    neighbour, FLOOR is floor(q).

    Example:
        >>> round_ratio(np.array([-5, -3, 3, 5]), 2, "HALF_UP")
        array([-2, -1,  2,  3])
    """
    num = np.asarray(num, np.int64)
    den = np.asarray(den, np.int64)
    mode = RoundMode(round_mode)
    if mode == RoundMode.FLOOR:
        return np.floor_divide(num, den)
    if mode == RoundMode.HALF_UP:
        return np.floor_divide(2 * num + den, 2 * den)
    mag = np.abs(num)
    sign = np.where(num < 0, -1, 1)
    if mode == RoundMode.HALF_AWAY_FROM_ZERO:
        return sign * np.floor_divide(2 * mag + den, 2 * den)
    if mode == RoundMode.HALF_TO_ZERO:
        return sign * -np.floor_divide(den - 2 * mag, 2 * den)  # ceil(|q| - 1/2)
    q = np.floor_divide(num, den)  # HALF_TO_EVEN
    twice_rest = 2 * (num - q * den)
    up = (twice_rest > den) | ((twice_rest == den) & (q % 2 == 1))
    return q + up


def rescale(t: IntTensor, pos, round_mode: RoundMode | str) -> np.ndarray:
    """The integers nearest ``t``'s value on the grid of step ``2^-pos`` (not clipped)."""
    pos = np.asarray(as_pos(pos), np.int64)
    up = np.maximum(pos - t.pos, 0)
    down = np.maximum(t.pos - pos, 0)
    num = shift_left(t.values, up)
    den = np.asarray(t.den, np.int64)
    if int(np.max(down, initial=0)) + int(np.max(den, initial=1)).bit_length() > INT64_ROOM:
        raise UnsupportedError(f"a rescale by {int(np.max(down))} bits leaves int64")
    den = den * np.left_shift(np.int64(1), down)
    if np.all(den == 1):
        return num
    return round_ratio(num, den, round_mode)


def requantize(t: IntTensor, pos, grid: IntGrid, round_mode: RoundMode | str) -> IntTensor:
    """``t`` on a quantizer's grid: rounded to position ``pos`` with ``round_mode``, then clipped.

    Example:
        >>> requantize(IntTensor(np.array([5, 700]), 3), 2, int_grid(8), "HALF_UP").values
        array([  3, 127])
    """
    return IntTensor(np.clip(rescale(t, pos, round_mode), grid.qmin, grid.qmax), pos)


def to_float(t: IntTensor, dtype=np.float32) -> np.ndarray:
    """The tensor's value in ``dtype``: ``values * 2^-pos`` rounded once, then divided by ``den``.

    With den = 1 and values of up to 24 significant bits this is exact in
    float32. A ``den`` is divided in ``dtype`` (an IEEE division of two exact
    numbers), as Keras computes an average.
    """
    scaled = np.ldexp(t.values.astype(np.float64), -np.asarray(t.pos, np.int64)).astype(dtype)
    if t.exact_den:
        return scaled
    return (scaled / np.asarray(t.den).astype(dtype)).astype(dtype)


def from_grid(y: np.ndarray, pos) -> np.ndarray:
    """The integers of fake-quantized values ``y`` (on the grid of step 2^-pos along the last axis).

    Raises if a value is not on the grid, which would mean ``pos`` is not the
    quantizer's position.
    """
    scaled = np.ldexp(np.asarray(y, np.float64), np.asarray(pos, np.int64))
    ints = np.round(scaled)
    if not np.array_equal(ints, scaled):
        raise UnsupportedError("fake-quantized values are not on their grid: the position does not match")
    return ints.astype(np.int64)


def int32_overflow(values: np.ndarray) -> bool:
    """True when some value lies outside the int32 range (an accumulator the DPU cannot hold)."""
    return bool(values.size) and (int(values.min()) < INT32_MIN or int(values.max()) > INT32_MAX)
