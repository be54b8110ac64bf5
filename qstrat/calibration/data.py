"""Calibration data: arrays, tf.data, keras.utils.PyDataset and Python generators.

`iterate_batches` yields lists of NumPy arrays, one per model input, in the
model's input order, each batch checked against the model's inputs
(`qstrat.calibration.inputs`). It never materialises the dataset, so memory
does not depend on its size. A dataset element may be the inputs
themselves or an ``(x, y)`` / ``(x, y, sample_weight)`` tuple; for a model
with several inputs, a tuple of one array per input is read as the inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from qstrat.calibration.inputs import array_bundle, check_batch, is_arraylike, model_inputs
from qstrat.errors import CalibrationDataError


def split_element(element, specs) -> Any:
    """The model inputs of one dataset element, dropping the targets of an ``(x, y[, w])`` tuple.

    For a model with n > 1 inputs, a tuple of exactly n arrays is the inputs
    themselves (an ``(x, y)`` pair cannot be: one array is not n inputs).
    """
    n = len(specs)
    if isinstance(element, (tuple, list)):
        if n > 1 and len(element) == n and all(is_arraylike(e) for e in element):
            return element
        if len(element) in (2, 3) and (n == 1 or not is_arraylike(element[0])):
            return element[0]
    return element


def check_count(value, name: str, allow_none: bool = False):
    """A positive integer argument (``calib_batch_size``, ``calib_steps``), or a clear error."""
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        hint = f" Write {value} without quotes." if isinstance(value, str) and value.strip().isdigit() else ""
        what = "a positive integer or None" if allow_none else "a positive integer"
        raise CalibrationDataError(f"{name} must be {what}, got {value!r}.{hint}")
    return int(value)


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
    steps_arg = f"{caller} steps" if caller else "calib_steps"
    batch_size = check_count(batch_size, f"{caller} batch_size" if caller else "calib_batch_size")
    steps = check_count(steps, steps_arg, allow_none=True)
    label = f"{caller} data, batch" if caller else "calibration batch"
    what = f"the {caller} data" if caller else "the calibration data"
    if data is None:
        raise CalibrationDataError(
            "no calibration data: pass calib_dataset (an array, a tf.data.Dataset, a PyDataset or a generator)."
        )
    count = 0
    arrays = array_bundle(data, specs)
    if arrays is not None:
        total = len(arrays[0])
        if total == 0:
            raise CalibrationDataError(f"{what} is empty (0 samples).")
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
            f"{what} is of type {type(data).__name__}, which is not supported. Use a numpy array, "
            "a tf.data.Dataset, a keras.utils.PyDataset or a generator of batches."
        )
    if steps is None and _infinite(data):
        raise CalibrationDataError(
            f"{what} never ends (it repeats without a count). Pass {steps_arg}, the number "
            "of batches to read, or make the dataset finite (e.g. .take(n))."
        )
    if steps is not None and hasattr(data, "take") and hasattr(data, "element_spec"):
        source = _no_read_ahead(data).take(steps)
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
        raise CalibrationDataError(f"{what} yielded no batches.")


def _no_read_ahead(dataset):
    """A tf.data pipeline that produces no element before it is asked for: its autotuning (prefetch, parallel
    calls) would read batches past ``calib_steps``, which may fail or cost."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.inject_prefetch = False
    return dataset.with_options(options)


def _bad_dict(data: dict):
    """Why a dict given as calibration data is not arrays in memory (`array_bundle` took those): a clear error."""
    if not data:
        raise CalibrationDataError(
            "calibration data is an empty dict. Give one array per model input, keyed by input name."
        )
    for key, value in data.items():
        if not is_arraylike(value):
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
    if is_arraylike(data):
        first = data
    elif isinstance(data, (list, tuple, dict)) and data:
        values = list(data.values() if isinstance(data, dict) else data)
        first = values[0] if all(is_arraylike(v) for v in values) else None
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
