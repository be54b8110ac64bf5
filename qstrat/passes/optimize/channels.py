"""Where a layer's channels are, in its weights and in its output: the per-channel arithmetic of BN folding and CLE.

Keras 3 kernel layouts (the same for either ``data_format``; a channels_first
layer's output holds its channels on axis 1 instead of the last, see
`channel_axis`):

| layer | kernel | output channel c | input channel c |
|---|---|---|---|
| Conv1D/2D/3D | (..., in, out) | ``[..., c]`` | ``[..., c, :]`` |
| Dense | (in, out) | ``[:, c]`` | ``[c, :]`` |
| DepthwiseConv1D/2D | (..., in, mult) | ``[..., c // mult, c % mult]`` | ``[..., c, :]`` |
| Conv1D/2D/3DTranspose | (..., out, in) | ``[..., c, :]`` | ``[..., c]`` |

The reference tool scales depthwise kernels on axis -2, which is right only
for ``depth_multiplier=1``; here the output channel is ``in * mult`` wide.
"""

from __future__ import annotations

import functools

import numpy as np

CONV = ("Conv1D", "Conv2D", "Conv3D", "Dense")
DEPTHWISE = ("DepthwiseConv1D", "DepthwiseConv2D")
TRANSPOSE = ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")
FOLDABLE = CONV + DEPTHWISE + TRANSPOSE


def _channels_first(node) -> bool:
    return node.op.get_config().get("data_format") == "channels_first"


def channel_axis(node) -> int:
    """The axis of the node's output that holds its channels: 1 for a channels_first layer, else the last.

    The output has its input's rank (every layer here keeps it).
    """
    return 1 if _channels_first(node) else len(node.in_tensors[0].shape) - 1


@functools.cache
def keras_adds_channels_first_bias_last() -> bool:
    """Whether this backend's ``keras.ops.add`` adds a (1, C, 1, 1) bias on the last axis of a (N, C, H, C) tensor.

    Keras 3.15's TensorFlow ``add`` turns such an add into ``tf.nn.bias_add`` and picks NHWC whenever the
    last axis has C entries: a channels_first conv whose output is as wide as its channels adds its bias per
    column. Measured, not assumed, so a Keras that fixes it folds those layers again.
    """
    import keras

    x, b = np.zeros((1, 2, 1, 2), np.float32), np.arange(2, dtype=np.float32).reshape(1, 2, 1, 1)
    return not np.array_equal(keras.ops.convert_to_numpy(keras.ops.add(x, b)), x + b)


def misplaced_bias(node) -> bool:
    """Whether Keras adds this layer's bias on another axis than its channels' (`keras_adds_channels_first_bias_last`):
    a channels_first layer whose output's last axis is as long as its channel axis. Moving values into such a
    bias (BN folding, CLE) would not move them where the model adds them."""
    if not _channels_first(node):
        return False
    out = node.op.compute_output_shape(tuple(node.in_tensors[0].shape))
    return out[-1] == out[1] and keras_adds_channels_first_bias_last()


def per_out_channel(type_name: str, kernel: np.ndarray) -> np.ndarray:
    """The kernel as a (taps, out_channels) matrix."""
    if type_name in TRANSPOSE:
        kernel = np.moveaxis(kernel, -2, -1)
    if type_name in DEPTHWISE:
        return kernel.reshape(-1, kernel.shape[-2] * kernel.shape[-1])
    return kernel.reshape(-1, kernel.shape[-1])


def scale_out(type_name: str, kernel: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Multiply output channel c of the kernel by ``s[c]``."""
    if type_name in TRANSPOSE:
        return kernel * s[:, None]
    if type_name in DEPTHWISE:
        return kernel * s.reshape(kernel.shape[-2], kernel.shape[-1])
    return kernel * s


def per_in_channel(kernel: np.ndarray) -> np.ndarray:
    """The kernel of a Conv, Dense or Depthwise layer as a (taps, in_channels) matrix."""
    moved = np.moveaxis(kernel, -2, -1)
    return moved.reshape(-1, moved.shape[-1])


def scale_in(kernel: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Multiply input channel c of a Conv, Dense or Depthwise kernel by ``s[c]``."""
    return kernel * s.reshape(-1, 1)


def shift_through(type_name: str, kernel: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The output change of a Conv, Dense or Depthwise layer when input channel i gets ``+c[i]`` everywhere.

    Exact where the kernel sees no padding (1x1 kernels, "valid" padding, Dense).
    """
    if type_name in DEPTHWISE:
        return (kernel.reshape(-1, kernel.shape[-2], kernel.shape[-1]).sum(0) * c[:, None]).reshape(-1)
    return np.tensordot(kernel.reshape(-1, kernel.shape[-2], kernel.shape[-1]).sum(0), c, axes=([0], [0]))
