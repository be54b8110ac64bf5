"""How data meets a model's inputs: their specs, matching by key or position, and the checks of one batch.

Inputs are matched the way ``model.predict`` matches them: a dict by input
name (every name must be an input of the model, and every input must be
given), a list or tuple by position. A model that takes a dict of inputs
takes its data by the dict's keys. Each batch is checked against the
model's input specs (rank, static dimensions, numeric dtype, the same
number of samples in every input, no NaN or Inf) and cast to the input
dtypes. Tensors of any backend (``tf.Tensor``, ``torch.Tensor``, JAX
arrays) are read as arrays, never iterated sample by sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from qstrat.errors import CalibrationDataError, did_you_mean, warn_at_caller


def is_arraylike(x) -> bool:
    """An array or a backend tensor (not a container, not a dataset)."""
    if isinstance(x, np.ndarray):
        return True
    if isinstance(x, (list, tuple, dict, str, bytes)):
        return False
    return hasattr(x, "shape") and hasattr(x, "dtype") and (hasattr(x, "__array__") or hasattr(x, "numpy"))


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, np.ma.MaskedArray):
        return np.ma.getdata(x)  # what the model reads: the values under the mask too
    if isinstance(x, np.ndarray):
        return x
    if getattr(x, "requires_grad", False):  # a torch tensor in a graph
        x = x.detach()
    if hasattr(x, "cpu") and hasattr(x, "numpy"):  # torch, wherever it lives
        x = x.cpu()
        if str(getattr(x, "dtype", "")) == "torch.bfloat16":  # NumPy has no bfloat16 of its own
            x = x.float()
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x)


def _names(specs) -> str:
    return ", ".join(f"'{s[0]}'" for s in specs)


def _by_name(x: dict, specs, where: str) -> list:
    """The values of dict ``x`` in the model's input order; unknown and missing names are errors."""
    names = [s[0] for s in specs]
    for key in x:
        if key not in names:
            hint = did_you_mean(str(key), names) or f"The model's inputs are {_names(specs)}."
            raise CalibrationDataError(f"{where}: '{key}' is not an input of the model. {hint}")
    missing = [n for n in names if n not in x]
    if missing:
        raise CalibrationDataError(
            f"{where}: no data for input '{missing[0]}'. The model's inputs are {_names(specs)}; "
            "give one array per input, keyed by input name."
        )
    return [x[n] for n in names]


def model_inputs(x, specs, where: str) -> list:
    """The model inputs in one element or bundle ``x``, as a list in the model's input order."""
    n = len(specs)
    if isinstance(x, dict):
        return _by_name(x, specs, where)
    _refuse_unkeyed(x, specs, where)
    if isinstance(x, (list, tuple)):
        if n == 1 and len(x) == 1:
            return [x[0]]
        if n > 1:
            return list(x)
    return [x]


def check_batch(arrays: Sequence[Any], specs: Sequence[tuple], step: int, label: str = "") -> list[np.ndarray]:
    """Check one batch against the model inputs ``specs`` [(name, shape, dtype)]; cast to the input dtypes.
    Errors name it ``label``, by default "calibration batch <step>"."""
    label = label or f"calibration batch {step}"
    if len(arrays) != len(specs):
        raise CalibrationDataError(
            f"{label}: {len(arrays)} input arrays for a model with {len(specs)} inputs "
            f"({_names(specs)}). Give one array per model input (a list in input order, or a dict by name)."
        )
    out = []
    for arr, (name, shape, dtype) in zip(arrays, specs, strict=True):
        where = f"{label}, input '{name}'"
        if not is_arraylike(arr):
            raise CalibrationDataError(
                f"{where}: expected an array, got {type(arr).__name__}. Give one array per model input."
            )
        if "Ragged" in type(arr).__name__:
            raise CalibrationDataError(
                f"{where}: a ragged tensor (rows of different lengths). Pad its rows to one length first "
                "(e.g. .to_tensor()), as the model reads them."
            )
        if str(dtype) == "string":
            raise CalibrationDataError(
                f"{where}: the model reads strings here, and qstrat calibrates numeric inputs only. Quantize the "
                "part after the string lookup: a model from the lookup's output (keras.Model(lookup_output, "
                "model.output)), calibrated with the ids the lookup gives."
            )
        arr = _to_numpy(arr)
        if arr.dtype.name == "bfloat16":  # ml_dtypes' (TensorFlow, JAX): every value is a float32 too
            arr = arr.astype(np.float32)
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
            raise CalibrationDataError(f"{where}: {bad} of {arr.size} values are NaN or Inf. Clean the data first.")
        want_dtype = np.dtype(str(dtype)) if _numpy_dtype(dtype) else np.dtype("float32")
        if want_dtype.kind in "iub" and arr.dtype.kind == "f":
            raise CalibrationDataError(
                f"{where}: the model reads {want_dtype} here (e.g. token ids), got floats ({arr.dtype}). "
                f"Pass the data as integers, e.g. .astype('{want_dtype}')."
            )
        out.append(_cast(arr, want_dtype, where))
    if len({len(a) for a in out}) > 1:
        listed = ", ".join(f"'{s[0]}' {len(a)}" for s, a in zip(specs, out, strict=True))
        raise CalibrationDataError(
            f"{label}: the inputs have different numbers of samples ({listed}). "
            "Give every model input the same number of samples in each batch."
        )
    return out


def _cast(arr: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    """``arr`` in the input's dtype; values it cannot hold (float32 overflow, integers out of range) are errors."""
    if arr.dtype == dtype:
        return arr
    if dtype.kind in "iu" and arr.dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = int(arr.min()), int(arr.max())
        if low < info.min or high > info.max:
            raise CalibrationDataError(
                f"{where}: values from {low} to {high} do not fit the model's input dtype {dtype} "
                f"([{info.min}, {info.max}]); they would wrap around. Check the data (token ids past the vocabulary?)."
            )
        return arr.astype(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(dtype)
    if dtype.kind == "f" and not np.isfinite(out).all():
        bad = int(np.count_nonzero(~np.isfinite(out)))
        raise CalibrationDataError(
            f"{where}: {bad} of {arr.size} values overflow the model's input dtype {dtype} "
            f"(largest magnitude {float(np.max(np.abs(arr))):.4g}). Scale the data to the range the model was "
            "trained on."
        )
    return out


def _numpy_dtype(dtype) -> bool:
    try:
        np.dtype(str(dtype))
    except TypeError:
        return False
    return True


def array_bundle(data, specs) -> list[np.ndarray] | None:
    """The data as one array per model input if it is arrays held in memory (not a dataset), else None."""
    if is_arraylike(data):
        arrays = [data]
    elif isinstance(data, dict) and data and all(is_arraylike(v) for v in data.values()):
        arrays = _by_name(data, specs, "calibration data")
    elif isinstance(data, (list, tuple)) and data and all(is_arraylike(v) for v in data):
        _refuse_unkeyed(data, specs, "calibration data")
        arrays = list(data)
    else:
        return None
    arrays = [_to_numpy(a) for a in arrays]
    if any(a.ndim == 0 for a in arrays):
        raise CalibrationDataError("calibration data: got a scalar; give arrays with a leading batch axis.")
    if len(arrays) == len(specs):
        lengths = {s[0]: len(a) for s, a in zip(specs, arrays, strict=True)}
        if len(set(lengths.values())) > 1:
            listed = ", ".join(f"'{k}' {v}" for k, v in lengths.items())
            raise CalibrationDataError(
                f"calibration data: the inputs have different numbers of samples ({listed}). "
                "Give every model input the same number of samples."
            )
    return arrays


def input_specs(model) -> list[tuple]:
    """(key, shape, dtype) of each input of ``model``, in its order. The key is what a dict of data gives it
    by, as Keras reads one: the model's own key where it takes a dict of inputs, its Input's name otherwise."""
    struct = getattr(model, "_inputs_struct", None)
    if not isinstance(struct, dict):
        return [(t.name, tuple(t.shape), t.dtype) for t in model.inputs]
    by_id = {id(t): str(k) for k, t in struct.items()}
    return KeyedSpecs((by_id.get(id(t), t.name), tuple(t.shape), t.dtype) for t in model.inputs)


class KeyedSpecs(list):
    """The input specs of a model that takes a dict of inputs: its data is a dict too, since a list would be
    matched in the model's own order (sorted by key), not the one it was declared in (Keras refuses it)."""


def _refuse_unkeyed(x, specs, where: str) -> None:
    if isinstance(specs, KeyedSpecs) and len(specs) > 1 and isinstance(x, list | tuple):
        raise CalibrationDataError(
            f"{where}: a {type(x).__name__} of {len(x)} for a model that takes a dict of inputs "
            f"({_names(specs)}). Give a dict keyed so, as model.predict takes it."
        )


def checked_arrays(data, model, label: str) -> list[np.ndarray]:
    """Samples held in memory (an array, or a list or dict of arrays, one per input of ``model``), checked as
    calibration batches are (`check_batch`: a dict by input name, shapes, dtypes, no NaN or Inf), in the
    model's input order; errors name them ``label`` (e.g. "export_onnx data")."""
    specs = input_specs(model)
    arrays = array_bundle(data, specs)
    if arrays is None:
        raise CalibrationDataError(
            f"{label}: expected an array, or a list or dict of arrays (one per model input), got "
            f"{type(data).__name__}. Give the samples themselves (a dataset is not read here)."
        )
    return check_batch(arrays, specs, 0, label)


class InputValues:
    """The smallest and largest value of each float model input over the calibration batches, to say when an
    input holds one value throughout (all zeros: data not loaded), which calibrates every quantizer on nothing."""

    def __init__(self, specs):
        self.names = [s[0] for s in specs]
        self.lo: list[float | None] = [None] * len(specs)
        self.hi: list[float | None] = [None] * len(specs)

    def watch(self, batches):
        for batch in batches:
            for k, a in enumerate(batch):
                if a.dtype.kind == "f" and a.size:
                    lo, hi = float(a.min()), float(a.max())
                    self.lo[k] = lo if self.lo[k] is None else min(self.lo[k], lo)
                    self.hi[k] = hi if self.hi[k] is None else max(self.hi[k], hi)
            yield batch

    def warn_if_constant(self) -> None:
        for name, lo, hi in zip(self.names, self.lo, self.hi, strict=True):
            if lo is not None and lo == hi:
                warn_at_caller(
                    f"calibration data: input '{name}' holds one value ({lo:g}) in every sample, so every quantizer "
                    "is calibrated on that alone. Check the data (not loaded? all zeros?)."
                )
