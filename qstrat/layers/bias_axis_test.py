"""The backend check for where Keras adds a channels_first bias."""

import keras
import numpy as np
import pytest
from keras import ops

from qstrat.layers.bias_axis import keras_adds_channels_first_bias_last, misplaces_bias

pytestmark = pytest.mark.portable


def test_it_measures_the_backends_add():
    """A (1, 3, 1, 1) bias on (2, 3, 4, 3) data lands either on the channels or on the last axis."""
    x = np.zeros((2, 3, 4, 3), "float32")
    b = np.random.default_rng(0).normal(size=(1, 3, 1, 1)).astype("float32")
    got = ops.convert_to_numpy(ops.add(x, b))
    on_last = np.array_equal(got, x + b.reshape(1, 1, 1, 3))
    assert keras_adds_channels_first_bias_last() == on_last
    assert on_last or np.array_equal(got, x + b)


def test_a_conv_layer_adds_its_bias_where_the_check_says():
    """A channels_first conv writing (6, 6, 6) with a bias of 0..5: per channel, or per column."""
    conv = keras.layers.Conv2D(6, 3, data_format="channels_first")
    conv.build((None, 2, 8, 8))
    conv.set_weights([np.zeros((3, 3, 2, 6), "float32"), np.arange(6, dtype="float32")])
    y = ops.convert_to_numpy(conv(np.zeros((1, 2, 8, 8), "float32")))
    per_column = np.array_equal(y[0, 0, 0], np.arange(6))
    assert per_column == keras_adds_channels_first_bias_last()
    assert per_column or np.array_equal(y[0, :, 0, 0], np.arange(6))


@pytest.mark.parametrize(
    "shape,where_as_long", [((None, 6, 5, 6), True), ((None, 6, 5, None), True), ((None, 6, 6, 5), False)]
)
def test_misplaces_bias_where_the_last_axis_is_or_may_be_as_long_as_the_channels(shape, where_as_long):
    assert misplaces_bias(shape) == (where_as_long and keras_adds_channels_first_bias_last())
