"""A quantizer's integer grid as an affine map: ``y = (clip(round(x / scale) + zp, qmin, qmax) - zp) * scale``.

Every integer-grid quantizer qstrat ships is that with its own rounding:

- Pof2SQuantizer, TQTQuantizer: scale exactly 2^-pos (a power of two is a
  float32 for every position a strategy allows), zero point from the state;
- FSQuantizer, MAFSQuantizer: the float32 scale and the zero point of the state
  (with ``use_framework_quantizer``, the grid Keras' framework op really uses);
- a custom class: its ``affine_grid(state) -> (scale, zero_point)``.

ONNX export (`qstrat.export.qdq`) and fast finetune's rounding
(`qstrat.passes.refine.soft_round`) read grids from here.
"""

from __future__ import annotations

import numpy as np

from qstrat.errors import UnsupportedError
from qstrat.quantizers.float_scale import FSQuantizer, MAFSQuantizer
from qstrat.quantizers.framework_op import nudge
from qstrat.quantizers.pof2 import Pof2SQuantizer, TQTQuantizer


def affine_of(quantizer, state, where: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """(scale float32, zero point int64, ulp_off) of ``quantizer`` with ``state``, or a clear error.

    ``ulp_off``: grid values may be two float32 ulps off ``(q - zp) * scale`` (Keras' framework fake-quant
    adds the range's minimum after scaling).
    """
    p = quantizer.params
    if p.data_format.is_float:
        raise UnsupportedError(
            f"{where}: {quantizer.type_name} with data_format {p.data_format.value} has no integer grid "
            "(it rounds to a float format). Use an integer data_format for this layer."
        )
    state = {k: np.asarray(v) for k, v in state.items()}
    ulp_off = False
    if isinstance(quantizer, TQTQuantizer):
        pos = quantizer.position(state)
        scale, zp = _pof2(pos), np.zeros_like(pos, np.int64)
    elif isinstance(quantizer, Pof2SQuantizer):
        scale = _pof2(state["pos"])
        zp = np.rint(state.get("zero_point", np.zeros_like(state["pos"]))).astype(np.int64)
    elif isinstance(quantizer, FSQuantizer) and p.use_framework_quantizer:
        g = quantizer.grid
        scale, zp = _framework_grid(state["scale"], state["zero_point"], g.qmin, g.qmax, p.bit_width, p.narrow_range)
        ulp_off = True
    elif isinstance(quantizer, FSQuantizer | MAFSQuantizer):
        scale, zp = state["scale"].astype(np.float32), np.rint(state["zero_point"]).astype(np.int64)
    elif hasattr(quantizer, "affine_grid"):
        scale, zp = quantizer.affine_grid(state)
        scale, zp = np.asarray(scale, np.float32), np.rint(np.asarray(zp)).astype(np.int64)
    else:
        raise UnsupportedError(
            f"{where}: {quantizer.type_name} has no known integer grid. Give the class a method "
            "affine_grid(self, state) -> (scale, zero_point) for its grid (y = (clip(round(x / scale) + zp, "
            "qmin, qmax) - zp) * scale), or leave the layer out of quantization."
        )
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        raise UnsupportedError(f"{where}: the scale must be positive and finite, got {scale.ravel()[:4]}.")
    return scale, zp, ulp_off


def _framework_grid(scale, zero_point, qmin: int, qmax: int, bits: int, narrow: bool):
    """The grid Keras' ``fake_quant_with_min_max_vars`` really uses for the range qstrat gives it.

    It is given [(qmin - zp) * s, (qmax - zp) * s] and recomputes the scale
    from that range on its own unsigned grid, in float32, then nudges the
    zero point to an integer (TensorFlow's FakeQuantWithMinMaxVars,
    `qstrat.quantizers.framework_op.nudge`).
    """
    f = np.float32
    s, zp = np.asarray(scale, f), np.asarray(zero_point, f)
    lo, hi = (f(qmin) - zp) * s, (f(qmax) - zp) * s
    umin = 1 if narrow else 0
    s2, _, zp_u = nudge(lo, hi, umin, 2**bits - 1)
    return s2, (zp_u + (qmin - umin)).astype(np.int64)


def _pof2(pos) -> np.ndarray:
    pos = np.asarray(pos, np.float64)
    return np.exp2(-np.rint(pos)).astype(np.float32)
