"""1x1 convolutions with strides, computed at stride 1 on the pixels they read.

A 1x1 kernel with strides s reads only the pixels at multiples of s, and
pads nothing ("same", "valid" and "causal" agree for it), so slicing out
those pixels and convolving them at stride 1 gives the same outputs.

Training takes this path, on every backend (QAT through `QuantizeWrapper`
and `FoldedConvBN`, and fast finetune); inference keeps the layer's own
strided convolution, which is not always bit for bit the same (JAX sums in
another order). TensorFlow's oneDNN filter gradient of a 1x1 stride-2
convolution corrupts memory on some shapes and crashes the process (60x60
inputs with 4 or 8 channels, as in the mini-Xception's shortcuts; seen with
TensorFlow 2.21 on an AVX-512 CPU, where a plain Keras model with that layer
crashes in ``fit``). It is also less work.
"""

from __future__ import annotations

import keras
from keras import ops

CONVS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


def pointwise_strides(layer) -> tuple[int, ...] | None:
    """The strides of a channels_last Conv1D/2D/3D with a 1x1 kernel and some stride above 1; else None.

    Those classes exactly: a subclass may compute something else in its own ``call``.
    """
    if type(layer) not in CONVS or getattr(layer, "data_format", "channels_last") != "channels_last":
        return None
    strides = tuple(int(s) for s in layer.strides)
    if any(int(k) != 1 for k in layer.kernel_size) or all(s == 1 for s in strides):
        return None
    return strides


def pick(x, strides: tuple[int, ...]):
    """The pixels a 1x1 kernel with ``strides`` reads from channels_last ``x``."""
    return x[(slice(None), *(slice(None, None, s) for s in strides), slice(None))]


def conv(x, kernel, strides: tuple[int, ...]):
    """``ops.conv(x, kernel, strides)`` for a 1x1 ``kernel``, channels_last, as a stride-1 convolution."""
    return ops.conv(pick(x, strides), kernel, 1, "valid", "channels_last")


def call_conv(layer, inputs, kernel, bias, strides: tuple[int, ...]):
    """What ``layer`` (a `pointwise_strides` conv) computes on ``inputs``, with ``kernel`` and ``bias`` (or None)."""
    y = conv(inputs, kernel, strides)
    if bias is not None:
        y = ops.add(y, bias)
    return y if layer.activation is None else layer.activation(y)
