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

import numpy as np

from qstrat.layers.bias_axis import misplaces_bias

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


def misplaced_bias(node) -> bool:
    """Whether Keras may add this channels_first layer's bias on another axis than its channels
    (`qstrat.layers.bias_axis`). Moving values into such a bias (BN folding, CLE) would not move them where
    the model adds them."""
    if not _channels_first(node):
        return False
    return misplaces_bias(node.op.compute_output_shape(tuple(node.in_tensors[0].shape)))


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
