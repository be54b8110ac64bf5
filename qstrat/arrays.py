"""NumPy values of backend tensors and Keras variables, on every backend."""

from __future__ import annotations

import numpy as np


def to_numpy(x) -> np.ndarray:
    """``x`` (a backend tensor, a Keras variable, an array or a number) as a NumPy array.

    A variable gives a copy of its values, never a view of its buffer (on torch
    the two share memory; on JAX a buffer may be donated and deleted). It is read
    through its backend value: NumPy 2 warns (DeprecationWarning) each time it
    converts a Keras variable, or a TensorFlow or torch one, itself.
    """
    import keras

    variable = isinstance(x, keras.Variable)
    if variable:
        x = x.value
    if hasattr(x, "detach"):  # torch
        x = x.detach().cpu()
    if hasattr(x, "numpy") and hasattr(x, "dtype"):  # TensorFlow and torch tensors and variables
        out = x.numpy()
    else:
        out = keras.ops.convert_to_numpy(x)
    return np.array(out, copy=True) if variable else np.asarray(out)
