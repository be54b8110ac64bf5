"""`ScaleShift`: ``x * scale + shift`` along the last axis.

What an inference-mode BatchNormalization computes, as one layer with two
weight vectors. The optimize stage turns a BatchNormalization that has no
layer to fold into, on tensors that are not 4-D, into this layer (4-D ones
become a 1x1 DepthwiseConv2D, which DPU targets run).
"""

from __future__ import annotations

import keras
from keras import ops

from qstrat.layers.masking import KeepsMask


@keras.saving.register_keras_serializable(package="qstrat")
class ScaleShift(KeepsMask, keras.layers.Layer):
    """Per-channel affine map on the last axis: ``y = x * scale + shift``."""

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError("ScaleShift needs a known last dimension (the channel count).")
        self.scale = self.add_weight(name="scale", shape=(channels,), initializer="ones")
        self.shift = self.add_weight(name="shift", shape=(channels,), initializer="zeros")
        self.built = True

    def call(self, inputs):
        return ops.add(ops.multiply(inputs, self.scale), self.shift)

    def compute_output_shape(self, input_shape):
        return input_shape
