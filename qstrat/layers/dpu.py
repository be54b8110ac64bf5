"""The DPU's versions of layers it does not run as Keras defines them, and their constants.

A power-of-2 accelerator (the DPU) has no exponential and no divider, so the
``pof2s`` strategy replaces these layers by what the DPU computes instead
(`qstrat.passes.dpu_versions` does the replacing):

- sigmoid becomes a hard sigmoid, ``relu6(x + 3) * 2731 / 2^14`` (2731 / 2^14
  is the DPU's 1/6, 0.16668701);
- LeakyReLU with slope 0.1 gets slope 26 / 2^8 = 0.1015625;
- an average over K values becomes a sum times ``k / 2^n``: the DPU's
  multiply-and-shift for 1/K (`avgpool_multiplier`).

The layers compute in float32 exactly what the integer hardware computes,
as long as the values fit float32's 24-bit significand: the pooling layers
sum their window (a depthwise convolution with a kernel of ones, exact on
grid values) and then multiply by ``k / 2^n`` (exact), rather than average
and rescale (which rounds twice). `qstrat.integer` checks this bit for bit.
"""

from __future__ import annotations

import math

import keras
import numpy as np
from keras import ops

from qstrat.layers.masking import KeepsMask

LEAKY_RELU_SLOPE = 26 / 256
# The slope the DPU replaces (|slope - 0.1| below this).
LEAKY_RELU_TOLERANCE = 1e-7
HARD_SIGMOID_MULTIPLIER = 2731
HARD_SIGMOID_SHIFT = 14

# The DPU's own multipliers for square kernels: side -> (k, n), 1/K ~ k / 2^n.
AVGPOOL_TABLE = {3: (7, 6), 5: (10, 8), 6: (7, 8), 7: (21, 10), 14: (21, 12)}
# A kernel side above this has no DPU multiplier.
AVGPOOL_MAX_SIDE = 255


def avgpool_multiplier(kh: int, kw: int) -> tuple[int, int] | None:
    """``(k, n)`` with ``k / 2^n`` the DPU's stand-in for ``1 / (kh * kw)``; None above 255 per side.

    Square kernels of side 3, 5, 6, 7 and 14 use the hardware's table, which is
    coarser than the rule (3x3 is 7/64, where the rule gives 57/512). Every
    other kernel, rectangular ones included, uses the rule: among
    ``n = 0 .. 6 + ceil(log2 K)``, the ``k = round(2^n / K)`` nearest to 1/K,
    the smallest ``n`` on ties. A power-of-2 K gives exactly ``1 / K``.

    Example:
        >>> avgpool_multiplier(3, 3), avgpool_multiplier(9, 9), avgpool_multiplier(2, 4)
        ((7, 6), (101, 13), (1, 3))
    """
    kh, kw = int(kh), int(kw)
    if kh < 1 or kw < 1:
        raise ValueError(f"a pooling kernel needs sides of at least 1, got {kh}x{kw}")
    if max(kh, kw) > AVGPOOL_MAX_SIDE:
        return None
    if kh == kw and kh in AVGPOOL_TABLE:
        return AVGPOOL_TABLE[kh]
    size = kh * kw
    best = None
    for n in range(7 + math.ceil(math.log2(size))):
        k = round(2**n / size)
        err = abs(k / 2**n - 1 / size)
        if best is None or err < best[0]:
            best = (err, k, n)
    return best[1], best[2]


def avgpool_factor(kh: int, kw: int) -> float:
    """What the DPU's average of a ``kh x kw`` window is, relative to the true average (``K * k / 2^n``)."""
    mult = avgpool_multiplier(kh, kw)
    if mult is None:
        return 1.0
    return kh * kw * mult[0] / 2 ** mult[1]


def is_dpu_leaky_slope(slope: float) -> bool:
    """True for the LeakyReLU slope the DPU replaces by 26/256 (0.1)."""
    return abs(float(slope) - 0.1) < LEAKY_RELU_TOLERANCE


@keras.saving.register_keras_serializable(package="qstrat")
class DPUHardSigmoid(KeepsMask, keras.layers.Layer):
    """The DPU's sigmoid: ``relu6(x + 3) * 2731 / 2^14``.

    Why: the DPU has no exponential; this hard sigmoid is what it runs for
    sigmoid, hard sigmoid and (times x) swish. It differs from sigmoid by up to
    0.07 and from Keras' hard_sigmoid (``relu6(x + 3) / 6``) by 0.01%.

    Example:
        >>> y = DPUHardSigmoid()(x)
    """

    def call(self, inputs):
        scale = HARD_SIGMOID_MULTIPLIER / 2**HARD_SIGMOID_SHIFT
        return ops.multiply(ops.relu6(ops.add(inputs, 3.0)), scale)

    def compute_output_shape(self, input_shape):
        return input_shape


class _WindowSum:
    """Mixin: the window sum of a 2-D pooling layer, times the DPU's ``k / 2^n``."""

    def _multiplier_of(self, kh: int, kw: int) -> float:
        mult = avgpool_multiplier(kh, kw)
        if mult is None:
            raise ValueError(f"{self.name}: a {kh}x{kw} window has no DPU multiplier (sides above {AVGPOOL_MAX_SIDE})")
        return mult[0] / 2 ** mult[1]


@keras.saving.register_keras_serializable(package="qstrat")
class DPUAveragePooling2D(_WindowSum, keras.layers.AveragePooling2D):
    """AveragePooling2D as the DPU computes it: the window's sum times ``k / 2^n`` (`avgpool_multiplier`).

    Only windows that never read padding are supported (``padding="valid"``):
    how the DPU averages a partly padded window is not documented, so the
    quantize stage keeps such layers as they are. Rectangular windows get
    their own multiplier.

    Example:
        >>> y = DPUAveragePooling2D(pool_size=3, strides=1)(x)   # sum * 7 / 64
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding != "valid":
            raise ValueError(f"{self.name}: DPUAveragePooling2D supports padding 'valid' only, got {self.padding!r}")

    def build(self, input_shape):
        axis = 1 if self.data_format == "channels_first" else -1
        channels = input_shape[axis]
        if channels is None:
            raise ValueError(f"{self.name}: DPUAveragePooling2D needs a known channel count")
        self._ones = np.ones((*self.pool_size, channels, 1), np.float32)
        self._multiplier = self._multiplier_of(*self.pool_size)
        self.built = True

    def call(self, inputs):
        ones = ops.cast(ops.convert_to_tensor(self._ones), inputs.dtype)
        sh, sw = self.strides
        if sh == sw:
            sums = ops.depthwise_conv(inputs, ones, self.strides, "valid", self.data_format)
        else:  # TensorFlow's CPU depthwise convolution takes equal strides only: sum every window, then pick
            sums = ops.depthwise_conv(inputs, ones, 1, "valid", self.data_format)
            sums = sums[:, :, ::sh, ::sw] if self.data_format == "channels_first" else sums[:, ::sh, ::sw, :]
        return ops.multiply(sums, self._multiplier)


@keras.saving.register_keras_serializable(package="qstrat")
class DPUGlobalAveragePooling2D(_WindowSum, keras.layers.GlobalAveragePooling2D):
    """GlobalAveragePooling2D as the DPU computes it: the sum over H x W times ``k / 2^n``.

    The spatial size must be known when the layer is built (the multiplier
    depends on it). The reference tool used lcm(H, W) for rectangular inputs;
    here an H x W window gets the rule's multiplier for K = H * W.

    Example:
        >>> y = DPUGlobalAveragePooling2D()(x)   # 7x7 input: sum * 21 / 1024
    """

    def build(self, input_shape):
        spatial = input_shape[2:4] if self.data_format == "channels_first" else input_shape[1:3]
        if any(s is None for s in spatial):
            raise ValueError(f"{self.name}: DPUGlobalAveragePooling2D needs a known height and width")
        self._axes = (2, 3) if self.data_format == "channels_first" else (1, 2)
        self._multiplier = self._multiplier_of(*spatial)
        self.built = True

    def call(self, inputs):
        return ops.multiply(ops.sum(inputs, axis=self._axes, keepdims=self.keepdims), self._multiplier)
