"""`to_numpy` gives the values of variables and tensors on every backend, without NumPy 2's warning."""

import warnings

import keras
import numpy as np
import pytest

from qstrat.arrays import to_numpy


@pytest.mark.portable
@pytest.mark.parametrize("dtype", ["float32", "int32"])
def test_variables_tensors_and_arrays_give_their_values_without_a_warning(dtype):
    values = np.arange(6, dtype=dtype).reshape(2, 3)
    variable = keras.Variable(values, dtype=dtype, trainable=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # NumPy 2's "__array__ ... copy keyword"
        for x in (variable, keras.ops.convert_to_tensor(values), values, variable.value):
            got = to_numpy(x)
            assert isinstance(got, np.ndarray) and got.dtype == values.dtype
            np.testing.assert_array_equal(got, values)
    copy = to_numpy(variable)
    variable.assign(values + 1)
    np.testing.assert_array_equal(copy, values)  # a snapshot, not a view of the variable's buffer
