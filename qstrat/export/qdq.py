"""A quantizer's grid as ONNX sees it: scale, zero point, integer type and axis.

ONNX's QuantizeLinear computes ``saturate(round_half_to_even(x / scale) + zp)``
in the integer type of the zero point, and DequantizeLinear ``(q - zp) * scale``.
Every integer-grid quantizer qstrat ships is exactly that with its own
rounding, so its export is a pair of nodes with:

- Pof2SQuantizer, TQTQuantizer: scale exactly 2^-pos (a power of two is a
  float32 for every position a strategy allows), zero point from the state;
- FSQuantizer, MAFSQuantizer: the float32 scale and the zero point of the state.

A grid narrower than its integer type (narrow range, fewer than 8 bits) needs
an integer ``Clip`` after QuantizeLinear; `Grid.storage` says which type holds
it. A custom quantizer class exports when it defines
``affine_grid(state) -> (scale, zero_point)`` (NumPy, shaped like its state)
for its ``grid`` and ``axis``; float data formats (FP16, BF16, BFP16) have no
QDQ form and are refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qstrat.errors import UnsupportedError
from qstrat.quantizers.affine import affine_of
from qstrat.quantizers.grid import RoundMode

# ONNX integer types by (signed, bits), with the opset whose QuantizeLinear first produces them.
_TYPES = {
    (True, 8): ("int8", 10),
    (False, 8): ("uint8", 10),
    (True, 16): ("int16", 21),
    (False, 16): ("uint16", 21),
    (True, 32): ("int32", None),  # DequantizeLinear reads int32 (opset 10); no QuantizeLinear writes it
}
# The 16-bit limit of an x86 integer kernel without VNNI: u8 x s8 products are summed in pairs into int16.
INT16_MAX = 32767


@dataclass(frozen=True)
class Grid:
    """One quantizer's integer grid, ready for QDQ nodes.

    Attributes:
        scale: float32, () or (C,).
        zero_point: int64, the shape of scale.
        qmin, qmax: the grid's integer bounds (zero point included).
        axis: the channel axis of a per-channel grid in the tensor's Keras layout, else None.
        round_mode: how the Keras quantizer rounds (ONNX rounds HALF_TO_EVEN).
        bits: the quantizer's bit width.
    """

    scale: np.ndarray
    zero_point: np.ndarray
    qmin: int
    qmax: int
    axis: int | None
    round_mode: RoundMode
    bits: int
    # Values may be two float32 ulps off the grid: Keras' framework fake-quant adds the range's minimum
    # after scaling (TensorFlow's FakeQuantWithMinMaxVars), and XLA (JAX) divides the range by the level
    # count as a multiplication by its reciprocal, so (q - zp) * scale is not exact.
    ulp_off: bool = False

    @property
    def per_channel(self) -> bool:
        return self.axis is not None and np.ndim(self.scale) == 1

    def storage(self) -> str:
        """The narrowest ONNX integer type that holds the grid and its zero point."""
        zp_lo, zp_hi = int(np.min(self.zero_point)), int(np.max(self.zero_point))
        lo, hi = min(self.qmin, zp_lo), max(self.qmax, zp_hi)
        for (signed, _bits), (name, _) in _TYPES.items():
            tlo, thi = type_range(name)
            if (signed or lo >= 0) and tlo <= lo and hi <= thi:
                return name
        raise UnsupportedError(f"a grid of [{self.qmin}, {self.qmax}] has no ONNX integer type.")

    def type_range(self) -> tuple[int, int]:
        return type_range(self.storage())

    @property
    def power_of_two(self) -> bool:
        return bool(np.all(np.frexp(np.asarray(self.scale, np.float32))[0] == 0.5))

    @property
    def onnx_exact(self) -> bool:
        """True when QuantizeLinear computes exactly what the Keras quantizer does.

        ONNX divides by the scale and rounds half to even; the Keras kernels
        multiply by the scale's reciprocal, which is the same only for powers of two.
        """
        return self.round_mode == RoundMode.HALF_TO_EVEN and self.power_of_two and not self.ulp_off

    def weight_storage(self) -> str:
        """Weights and biases: int8/uint8 when the grid fits, else int32 (DequantizeLinear reads it at any opset)."""
        kind = self.storage()
        return kind if kind in ("int8", "uint8") else "int32"

    @property
    def clipped(self) -> bool:
        """True when the grid is narrower than its type, so QuantizeLinear alone would not clip to it."""
        return (self.qmin, self.qmax) != self.type_range()

    def quantize_opset(self) -> int | None:
        """The lowest opset whose QuantizeLinear writes this grid's type (None: none does)."""
        return dict(_TYPES.values())[self.storage()]

    def integers(self, values: np.ndarray) -> np.ndarray:
        """The grid integers of values already on the grid (fake-quantized weights), in the storage type.

        Raises when a value is off the grid: exporting it would change the model.
        """
        scale, zp = self._broadcast(values.ndim)
        q = np.rint(values.astype(np.float64) / scale.astype(np.float64)) + zp
        back = ((q - zp).astype(np.float32) * scale).astype(np.float32)
        values = values.astype(np.float32)
        off = np.abs(back - values) > (2 * np.spacing(np.abs(values)) if self.ulp_off else 0)
        if np.any(off):
            bad = int(np.sum(off))
            raise UnsupportedError(
                f"{bad} values are not on the quantizer's grid (were they changed after quantization?)."
            )
        return np.clip(q, self.qmin, self.qmax).astype(self.storage())

    def _broadcast(self, ndim: int):
        scale, zp = np.asarray(self.scale, np.float32), np.asarray(self.zero_point, np.float64)
        if self.per_channel:
            shape = [1] * ndim
            shape[self.axis % ndim] = -1
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        return scale, zp

    def full(self, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Scale, zero point and (per channel) channel index, broadcast to ``shape`` to move with a weight's layout."""
        scale, zp = self._broadcast(len(shape))
        channel = None
        if self.per_channel:
            index = np.arange(np.size(self.scale)).reshape(
                [-1 if a == self.axis % len(shape) else 1 for a in range(len(shape))]
            )
            channel = np.broadcast_to(index, shape)
        return np.broadcast_to(scale, shape), np.broadcast_to(zp, shape), channel


def type_range(name: str) -> tuple[int, int]:
    info = np.iinfo(np.dtype(name))
    return int(info.min), int(info.max)


def grid_of(quantizer, state, where: str) -> Grid:
    """The `Grid` of ``quantizer`` with ``state`` (NumPy values), or a clear error."""
    p = quantizer.params
    if p.data_format.is_float:
        raise UnsupportedError(
            f"{where}: {quantizer.type_name} with data_format {p.data_format.value} has no ONNX QDQ form "
            "(QuantizeLinear writes integers). Use an integer data_format for the layers you export."
        )
    scale, zp, ulp_off = affine_of(quantizer, state, where)
    g = quantizer.grid
    return Grid(scale, zp, g.qmin, g.qmax, quantizer.axis, p.round_mode, p.bit_width, ulp_off=ulp_off)


# ---- x86 integer kernels: can an int16 pair sum saturate? ----------------------------------------


def u8_activation_range(grid: Grid) -> tuple[int, int]:
    """The range of an activation's bytes in a u8 x s8 kernel: int8 tensors are shifted by +128 first."""
    lo, hi = grid.qmin, grid.qmax
    return (lo + 128, hi + 128) if grid.storage() == "int8" else (lo, hi)


def pair_sum_bound(weights: np.ndarray, out_axis: int, a_max: int) -> np.ndarray:
    """Per output channel, the largest |a_i w_i + a_j w_j| over two weights of the channel and a in [0, a_max].

    ``weights`` are the stored integers. The bound takes the two largest
    positive weights and the two largest negative ones (the kernel pairs
    neighbours along the reduction axis, in an order that depends on the
    kernel, so any two may meet). Above 32767 the pair sum can saturate.
    """
    w = np.moveaxis(np.asarray(weights, np.int64), out_axis, 0).reshape(weights.shape[out_axis], -1)
    pos = -np.sort(-np.maximum(w, 0), axis=1)[:, :2]
    neg = -np.sort(-np.maximum(-w, 0), axis=1)[:, :2]
    return a_max * np.maximum(pos.sum(axis=1), neg.sum(axis=1))
