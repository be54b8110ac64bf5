"""Calibration data: arrays, tf.data, keras.utils.PyDataset and Python generators.

`iterate_batches` yields lists of NumPy arrays, one per model input, in the
model's input order, checked against the model's input specs: rank, static
dimensions, numeric dtype, and no NaN or Inf. It never materialises the
dataset, so memory does not depend on its size.

Inputs are matched the way ``model.predict`` matches them: a dict by input
name (every name must be an input of the model, and every input must be
given), a list or tuple by position. A dataset element may be the inputs
themselves or an ``(x, y)`` / ``(x, y, sample_weight)`` tuple; for a model
with several inputs, a tuple of one array per input is read as the inputs.
Tensors of any backend (``tf.Tensor``, ``torch.Tensor``, JAX arrays) are
read as arrays, never iterated sample by sample.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from qstrat.errors import CalibrationDataError, did_you_mean


def _is_arraylike(x) -> bool:
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


def split_element(element, specs) -> Any:
    """The model inputs of one dataset element, dropping the targets of an ``(x, y[, w])`` tuple.

    For a model with n > 1 inputs, a tuple of exactly n arrays is the inputs
    themselves (an ``(x, y)`` pair cannot be: one array is not n inputs).
    """
    n = len(specs)
    if isinstance(element, (tuple, list)):
        if n > 1 and len(element) == n and all(_is_arraylike(e) for e in element):
            return element
        if len(element) in (2, 3) and (n == 1 or not _is_arraylike(element[0])):
            return element[0]
    return element


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
        if not _is_arraylike(arr):
            raise CalibrationDataError(
                f"{where}: expected an array, got {type(arr).__name__}. Give one array per model input."
            )
        arr = _to_numpy(arr)
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


def check_count(value, name: str, allow_none: bool = False):
    """A positive integer argument (``calib_batch_size``, ``calib_steps``), or a clear error."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        hint = f" Write {value} without quotes." if isinstance(value, str) and value.strip().isdigit() else ""
        what = "a positive integer or None" if allow_none else "a positive integer"
        raise CalibrationDataError(f"{name} must be {what}, got {value!r}.{hint}")
    return int(value)


def array_bundle(data, specs) -> list[np.ndarray] | None:
    """The data as one array per model input if it is arrays held in memory (not a dataset), else None."""
    if _is_arraylike(data):
        arrays = [data]
    elif isinstance(data, dict) and data and all(_is_arraylike(v) for v in data.values()):
        arrays = _by_name(data, specs, "calibration data")
    elif isinstance(data, (list, tuple)) and data and all(_is_arraylike(v) for v in data):
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


def is_one_shot(data) -> bool:
    """True for data that can be read only once (a generator or another iterator)."""
    return data is not None and hasattr(data, "__next__") and iter(data) is data


def take_samples(
    data: Any, specs: Sequence[tuple], count: int, batch_size: int = 32, steps: int | None = None, spread: bool = True
):
    """``count`` samples of the calibration data (all of it if it holds fewer), as checked arrays, one per input.

    In-memory arrays with ``spread`` give a fixed random choice of rows
    (`sample_rows`), so data sorted by class still gives a mix; other
    sources, and arrays without ``spread``, give their first samples.
    """
    arrays = array_bundle(data, specs) if spread else None
    if arrays is not None:
        total = len(arrays[0]) if steps is None else min(len(arrays[0]), steps * batch_size)
        rows = sample_rows(total, count)
        return check_batch([a[rows] for a in arrays], specs, 0)
    parts, have, other = [], 0, 0
    for batch in iterate_batches(data, specs, batch_size, steps):
        if parts and any(a.shape[1:] != b.shape[1:] for a, b in zip(batch, parts[0], strict=True)):
            other += 1  # samples of another size (free input dimensions) cannot be stacked with the first
            continue
        take = min(len(batch[0]), count - have)
        parts.append([a[:take] for a in batch])
        have += take
        if have >= count:
            break
    if other:
        shapes = ", ".join(str(a.shape[1:]) for a in parts[0])
        warnings.warn(
            f"{other} calibration batch(es) of another sample shape than the first ({shapes}) were left out of "
            f"the {have} samples read again after calibration (bias correction, fast finetune, mixed precision): "
            "those steps measure samples of one shape.",
            stacklevel=3,
        )
    return [np.concatenate([p[i] for p in parts]) for i in range(len(specs))]


def sample_rows(total: int, count: int) -> np.ndarray:
    """The rows `take_samples` takes from ``total`` samples in memory: ``count`` of them (all where there are
    fewer), a fixed random choice (seed 0), in increasing order. Rows spread at random, not the first of
    each batch: data made of copies of a set in turn (augmentations) would give few distinct samples."""
    return np.sort(np.random.default_rng(0).permutation(total)[:count])


def iterate_batches(
    data: Any, specs: Sequence[tuple], batch_size: int = 32, steps: int | None = None, caller: str = ""
) -> Iterator[list]:
    """Yield checked batches (lists of arrays, one per model input) from any supported source. ``caller``
    ("analyze", ...): errors name its data and its ``batch_size``/``steps`` arguments, not calibration's."""
    batch_size = check_count(batch_size, f"{caller} batch_size" if caller else "calib_batch_size")
    steps = check_count(steps, f"{caller} steps" if caller else "calib_steps", allow_none=True)
    label = f"{caller} data, batch" if caller else "calibration batch"
    if data is None:
        raise CalibrationDataError(
            "no calibration data: pass calib_dataset (an array, a tf.data.Dataset, a PyDataset or a generator)."
        )
    count = 0
    arrays = array_bundle(data, specs)
    if arrays is not None:
        total = len(arrays[0])
        if total == 0:
            raise CalibrationDataError("calibration data is empty (0 samples).")
        for i in range(0, total, batch_size):
            if steps is not None and count >= steps:
                return
            yield check_batch([a[i : i + batch_size] for a in arrays], specs, count, f"{label} {count}")
            count += 1
        return
    if isinstance(data, dict):
        _bad_dict(data)
    source = data
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and hasattr(data, "on_epoch_end"):  # PyDataset
        source = (data[i] for i in range(len(data)))
    elif not hasattr(data, "__iter__") or isinstance(data, (str, bytes)):
        raise CalibrationDataError(
            f"calibration data of type {type(data).__name__} is not supported. Use a numpy array, "
            "a tf.data.Dataset, a keras.utils.PyDataset or a generator of batches."
        )
    if steps is None and _infinite(data):
        raise CalibrationDataError(
            "the calibration dataset never ends (it repeats without a count). Pass calib_steps, the number "
            "of batches to read, or make the dataset finite (e.g. .take(n))."
        )
    elements = iter(source)
    while steps is None or count < steps:  # checked before reading: never a batch more than asked for
        try:
            element = next(elements)
        except StopIteration:
            break
        where = f"{label} {count}"
        yield check_batch(model_inputs(split_element(element, specs), specs, where), specs, count, where)
        count += 1
    if count == 0:
        raise CalibrationDataError("the calibration dataset yielded no batches.")


def _bad_dict(data: dict):
    """Why a dict given as calibration data is not arrays in memory (`array_bundle` took those): a clear error."""
    if not data:
        raise CalibrationDataError(
            "calibration data is an empty dict. Give one array per model input, keyed by input name."
        )
    for key, value in data.items():
        if not _is_arraylike(value):
            raise CalibrationDataError(
                f"calibration data, input '{key}': expected an array, got {type(value).__name__}. Give one "
                "array per model input (np.asarray(...) a list first)."
            )


def _infinite(data) -> bool:
    """True for a tf.data.Dataset that repeats forever (a known infinite cardinality), and a PyDataset with no
    number of batches (None, or neither ``num_batches`` nor ``__len__``: Keras reads it without end)."""
    if hasattr(data, "on_epoch_end") and hasattr(data, "__getitem__") and not hasattr(data, "__len__"):
        try:
            return data.num_batches is None
        except NotImplementedError:
            return True
    cardinality = getattr(data, "cardinality", None)
    if not callable(cardinality) or not hasattr(data, "element_spec"):
        return False
    try:
        return int(cardinality()) == -1  # tf.data.INFINITE_CARDINALITY
    except Exception:  # noqa: BLE001 - a look only: where it cannot tell, the data is read as it comes
        return False


def array_samples(data: Any) -> int | None:
    """The number of samples of data given as arrays in memory (one, or a list or dict of them), else None."""
    first = None
    if _is_arraylike(data):
        first = data
    elif isinstance(data, (list, tuple, dict)) and data:
        values = list(data.values() if isinstance(data, dict) else data)
        first = values[0] if all(_is_arraylike(v) for v in values) else None
    if first is not None and len(getattr(first, "shape", ())) > 0:
        return int(first.shape[0])
    return None


def count_batches(data: Any, batch_size: int, steps: int | None = None) -> int | None:
    """How many batches `iterate_batches` will yield, when that is known up front (else None)."""
    total = None
    if isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size > 0:
        samples = array_samples(data)
        if samples is not None:
            total = -(-samples // batch_size)
    if total is None and hasattr(data, "__len__") and hasattr(data, "on_epoch_end"):  # PyDataset
        total = len(data)
    if total is None:
        return steps
    return total if steps is None else min(total, steps)
