"""Where Keras adds a channels_first layer's bias: a backend check, for the passes that move values into biases.

Keras 3.15's TensorFlow ``keras.ops.add`` turns an add of a (1, C, 1, ...)
tensor into ``tf.nn.bias_add`` and picks NHWC whenever the other operand's
last axis also has C entries. So a channels_first conv whose output is as
wide as its channels (6 filters writing 6x6 maps) adds its bias per column.
The model computes that; a value a pass moves into such a bias (BN folding,
CLE, bias correction) would not land on the channels, and a plain conv with
a folded bias would not compute what `FoldedConvBN` trained. The check is
measured on the backend, not assumed, so a Keras that fixes it gets those
layers optimized again.
"""

from __future__ import annotations

import functools

import numpy as np

MISPLACED = (
    "Keras on this backend adds the bias of this channels_first layer on its last axis where that axis is as "
    "long as its channels (keras.ops.add of a (1, C, 1, 1) bias), as it is here or may be (its size is "
    "unknown until the model runs)"
)


@functools.cache
def keras_adds_channels_first_bias_last() -> bool:
    """Whether this backend's ``keras.ops.add`` adds a (1, C, 1, 1) bias on the last axis of an (N, C, H, C) tensor."""
    import keras

    x, b = np.zeros((1, 2, 1, 2), np.float32), np.arange(2, dtype=np.float32).reshape(1, 2, 1, 1)
    return not np.array_equal(keras.ops.convert_to_numpy(keras.ops.add(x, b)), x + b)


def misplaces_bias(output_shape) -> bool:
    """Whether Keras may add the bias of a channels_first layer writing ``output_shape`` on its last axis: as
    long as the channel axis (1), or of a size known only when it runs (Keras picks the axis from the tensor)."""
    return output_shape[-1] in (None, output_shape[1]) and keras_adds_channels_first_bias_last()
