"""Calibration data: numpy arrays, tf.data, keras.utils.PyDataset and Python generators.

`iterate_batches` yields lists of NumPy arrays, one per model input, checked
against the model's input specs: rank, static dimensions, numeric dtype, and
no NaN or Inf. It never materialises the dataset, so memory does not depend
on its size.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from qstrat.errors import CalibrationDataError


def _first(obj):
    """The model inputs of one dataset element: (x, y) and (x, y, w) tuples drop their targets."""
    if isinstance(obj, tuple) and len(obj) in (2, 3):
        return obj[0]
    return obj


def _as_list(x, n_inputs: int) -> list:
    if isinstance(x, dict):
        return list(x.values())
    if isinstance(x, (list, tuple)) and n_inputs > 1:
        return list(x)
    return [x]


def _to_numpy(x):
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "numpy"):
        return x.numpy()
    import keras

    return keras.ops.convert_to_numpy(x)


def check_batch(arrays: Sequence[np.ndarray], specs: Sequence[tuple], step: int) -> list[np.ndarray]:
    """Check one batch against the model inputs ``specs`` [(name, shape, dtype)]."""
    if len(arrays) != len(specs):
        raise CalibrationDataError(
            f"calibration batch {step}: {len(arrays)} input arrays for a model with {len(specs)} inputs "
            f"({', '.join(s[0] for s in specs)}). Give one array per model input."
        )
    out = []
    for arr, (name, shape, _dtype) in zip(arrays, specs, strict=True):
        arr = _to_numpy(arr)
        where = f"calibration batch {step}, input '{name}'"
        if arr.dtype.kind not in "fiub":
            raise CalibrationDataError(
                f"{where}: expected numbers, got dtype {arr.dtype}. Convert it with .astype('float32')."
            )
        if arr.ndim != len(shape):
            raise CalibrationDataError(
                f"{where}: expected shape {tuple(shape)} (batch first), got {arr.shape}. "
                "Pass batches, not single samples (add a leading batch axis), and check the layout."
            )
        for got, want in zip(arr.shape[1:], shape[1:], strict=True):
            if want is not None and got != want:
                raise CalibrationDataError(f"{where}: expected shape {tuple(shape)}, got {arr.shape}.")
        if arr.shape[0] == 0:
            raise CalibrationDataError(f"{where}: the batch is empty.")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            raise CalibrationDataError(
                f"{where}: {bad} of {arr.size} values are NaN or Inf. Clean the data before calibrating."
            )
        out.append(arr.astype(np.float32) if arr.dtype.kind != "f" else arr)
    return out


def iterate_batches(
    data: Any, specs: Sequence[tuple], batch_size: int = 32, steps: int | None = None
) -> Iterator[list]:
    """Yield checked batches (lists of arrays, one per model input) from any supported source."""
    if batch_size is None or batch_size < 1:
        raise CalibrationDataError(f"calib_batch_size must be a positive integer, got {batch_size!r}.")
    if steps is not None and steps < 1:
        raise CalibrationDataError(f"calib_steps must be a positive integer or None, got {steps!r}.")
    n_inputs = len(specs)
    if data is None:
        raise CalibrationDataError(
            "no calibration data: pass calib_dataset (an array, a tf.data.Dataset, a PyDataset or a generator)."
        )
    count = 0
    if isinstance(data, np.ndarray) or (isinstance(data, (list, tuple, dict)) and _is_array_bundle(data)):
        arrays = _as_list(data, n_inputs)
        total = len(arrays[0])
        if total == 0:
            raise CalibrationDataError("calibration data is empty (0 samples).")
        for i in range(0, total, batch_size):
            if steps is not None and count >= steps:
                return
            yield check_batch([a[i : i + batch_size] for a in arrays], specs, count)
            count += 1
        return
    source = data
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and hasattr(data, "on_epoch_end"):  # PyDataset
        source = (data[i] for i in range(len(data)))
    elif not hasattr(data, "__iter__"):
        raise CalibrationDataError(
            f"calibration data of type {type(data).__name__} is not supported. Use a numpy array, "
            "a tf.data.Dataset, a keras.utils.PyDataset or a generator of batches."
        )
    for element in source:
        if steps is not None and count >= steps:
            break
        yield check_batch(_as_list(_first(element), n_inputs), specs, count)
        count += 1
    if count == 0:
        raise CalibrationDataError("the calibration dataset yielded no batches.")


def count_batches(data: Any, batch_size: int, steps: int | None = None) -> int | None:
    """How many batches `iterate_batches` will yield, when that is known up front (else None)."""
    total = None
    if isinstance(data, np.ndarray) and data.ndim > 0:
        total = -(-len(data) // batch_size) if batch_size and batch_size > 0 else None
    elif isinstance(data, (list, tuple, dict)) and _is_array_bundle(data):
        first = next(iter(data.values() if isinstance(data, dict) else data))
        total = -(-len(first) // batch_size) if batch_size and batch_size > 0 and first.ndim > 0 else None
    elif hasattr(data, "__len__") and hasattr(data, "on_epoch_end"):  # PyDataset
        total = len(data)
    if total is None:
        return steps
    return total if steps is None else min(total, steps)


def _is_array_bundle(data) -> bool:
    values = data.values() if isinstance(data, dict) else data
    return all(isinstance(v, np.ndarray) for v in values) and len(values) > 0
