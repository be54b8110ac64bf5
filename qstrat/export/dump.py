"""Golden dumps: a power-of-2 quantized model's weights, biases and activations as integers, per layer.

Why: a DPU (or any integer implementation) is verified tensor by tensor
against reference values. ``dump_model`` writes, for every power-of-2
quantizer of the model:

- ``<layer>_<target>.bin``: the grid integers, little-endian, in the
  narrowest type that holds the grid (int8/uint8 up to 8 bits, int16/uint16
  up to 16, int32/uint32 above: a 32-bit bias);
- ``<layer>_<target>.txt``: the same integers, one per line (row-major);
- with ``dump_float=True``, ``<layer>_<target>_float.bin``/``.txt``: the
  float32 tensor the quantizer read (the float weight, or the layer output
  before quantization);
- ``dump_index.json``: for each file, the layer, target, kind (weight, bias,
  input, output), bit width, signedness, position (one, or one per channel
  with the channel axis; a value is ``integer * 2^-position``), shape, dtype.

Activations come from the first ``batch_size`` samples of ``dataset`` (one
batch, as hardware bring-up uses). The values are the fake-quant Keras
model's own: `qstrat.integer.simulate_integer` computes the same integers
from integer arithmetic, which its tests check bit for bit.

Every file is written atomically into ``output_dir`` (created if needed,
checked before any work); a file of the same name is replaced.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import numpy as np

from qstrat.arrays import to_numpy
from qstrat.errors import ConfigError, UnsupportedError
from qstrat.files import check_folder, write_atomically
from qstrat.graph.rebuild import float32_policy
from qstrat.layers import FakeQuant, QuantizeWrapper, require_quantizers
from qstrat.quantizers import Pof2SQuantizer, TQTQuantizer

INDEX = "dump_index.json"


def _position(q, state: dict[str, np.ndarray]) -> np.ndarray:
    if isinstance(q, TQTQuantizer):
        return np.asarray(q.position(state), np.int64)
    return np.asarray(state["pos"]).astype(np.int64)


def _storage(q) -> np.dtype:
    bits, unsigned = q.params.bit_width, q.params.is_unsigned
    width = 8 if bits <= 8 else 16 if bits <= 16 else 32
    return np.dtype(f"{'u' if unsigned else ''}int{width}").newbyteorder("<")


def _integers(q, state, values: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The grid integers of ``values`` quantized by ``q`` (and the positions), checked to be integers."""
    if not isinstance(q, (Pof2SQuantizer, TQTQuantizer)):
        raise UnsupportedError(
            f"{where}: dump_model writes power-of-2 integers, and this is a {q.type_name} (float scale). "
            "Quantize with the pof2s or tqt strategy for a golden dump."
        )
    if not q.params.symmetry:
        raise UnsupportedError(f"{where}: dump_model writes symmetric grids; this one has a zero point.")
    pos = _position(q, state)
    axis = None if pos.size == 1 else q.axis % values.ndim
    shape = [1] * values.ndim
    if axis is not None:
        shape[axis] = pos.size
    scaled = np.asarray(values, np.float64) * np.exp2(pos.reshape(shape if axis is not None else ()))
    ints = np.rint(scaled)
    if not np.array_equal(ints, scaled):
        raise UnsupportedError(f"{where}: the quantized values are not integers times 2^-position.")
    return ints.astype(np.int64), pos


def _stem(target: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", target.replace("/", "_"))


def _check_dir(output_dir: str) -> str:
    if not isinstance(output_dir, (str, os.PathLike)):
        raise ConfigError.expected("dump_model output_dir", "a folder path", output_dir)
    output_dir = os.fspath(output_dir) or "."  # empty: the current folder, as for quantize_model's output_dir
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ConfigError("output_dir", f"{output_dir} is a file", "Give a folder for the dump files.")
    parent = os.path.dirname(os.path.abspath(output_dir))
    if not os.path.isdir(parent):
        raise ConfigError("output_dir", f"the folder {parent} does not exist", "Create it first, or choose another.")
    check_folder(output_dir, "output_dir")
    return output_dir


def _fq_calls(qmodel):
    """(FakeQuant layer, call index, input tensor, output tensor, target) for every call of every FakeQuant."""
    for layer in qmodel.layers:
        if not isinstance(layer, FakeQuant):
            continue
        targets = [layer.target or layer.name, *layer.more_targets]
        for k, node in enumerate(layer._inbound_nodes):
            target = targets[k] if k < len(targets) else f"{layer.name}@{k}"
            yield layer, node.input_tensors[0], node.output_tensors[0], target


def dump_model(qmodel, dataset=None, output_dir="./dump_results", dump_float=False, batch_size=1) -> dict:
    """Write a power-of-2 quantized model's integer tensors (and optionally their floats); returns the index.

    Args:
        qmodel: a model quantized with pof2s or tqt (`qstrat.Quantizer.quantize_model`).
        dataset: input samples (an array, or a list/dict of arrays for several inputs); the first
            ``batch_size`` are run for the activations. None dumps weights and biases only.
        output_dir: the folder to write (created if it does not exist).
        dump_float: also write each tensor's float values before quantization.
        batch_size: how many samples of ``dataset`` the activation files hold.

    Example:
        >>> index = qstrat.dump_model(qmodel, x_test[:1], "golden")
        >>> index["conv1_kernel.bin"]["position"]
        7
    """
    with float32_policy():
        import keras

        from qstrat.calibration.data import iterate_batches
        from qstrat.passes.calibrate import input_specs

        output_dir = _check_dir(output_dir)
        require_quantizers(qmodel)
        entries: dict[str, tuple[dict, np.ndarray, np.ndarray | None, np.dtype]] = {}

        def add(target: str, kind: str, q, state, ints: np.ndarray, pos: np.ndarray, floats):
            meta = {
                "layer": target.partition("/")[0],
                "target": target.partition("/")[2] or "output",
                "kind": kind,
                "bit_width": q.params.bit_width,
                "signed": not q.params.is_unsigned,
                "position": int(pos) if pos.size == 1 else [int(p) for p in pos.reshape(-1)],
                "shape": list(ints.shape),
                "dtype": _storage(q).name,
            }
            if pos.size != 1:
                meta["channel_axis"] = q.axis % ints.ndim
            entries[_stem(target)] = (meta, ints, floats, _storage(q))

        for layer in qmodel.layers:
            if not isinstance(layer, QuantizeWrapper):
                continue
            for attr, q in layer.quantizers.items():
                state = {k: np.asarray(v) for k, v in layer.state[attr].items()}
                w = to_numpy(getattr(layer.layer, attr))
                target = f"{layer.layer.name}/{attr}"
                ints, pos = _integers(q, state, q.reference(w, state), target)
                add(target, "bias" if attr == "bias" else "weight", q, state, ints, pos, w)
        if dataset is not None:
            calls = list(_fq_calls(qmodel))
            batch = next(iter(iterate_batches(dataset, input_specs(qmodel), batch_size, steps=1, caller="dump_model")))
            probe = keras.Model(qmodel.inputs, [c[2] for c in calls] + ([c[1] for c in calls] if dump_float else []))
            values = probe.predict(batch if len(batch) > 1 else batch[0], verbose=0, batch_size=batch_size)
            values = [to_numpy(v) for v in (values if isinstance(values, list) else [values])]
            for i, (fq, _, _, target) in enumerate(calls):
                if float(np.asarray(fq.enabled)) < 0.5:
                    raise UnsupportedError(f"{target}: the quantizer is bypassed (enabled 0), so its tensor is float.")
                state = {k: np.asarray(v) for k, v in fq.state.items()}
                what = target.partition("/")[2]
                ints, pos = _integers(fq.quantizer, state, values[i], target)
                floats = values[len(calls) + i] if dump_float else None
                add(
                    target,
                    "input" if what.startswith("input") or not what else "output",
                    fq.quantizer,
                    state,
                    ints,
                    pos,
                    floats,
                )
        return _write(output_dir, entries, dump_float)


def _write(output_dir: str, entries, dump_float: bool) -> dict[str, Any]:
    os.makedirs(output_dir, exist_ok=True)
    index: dict[str, Any] = {}
    for stem, (meta, ints, floats, dtype) in entries.items():
        info = np.iinfo(dtype)
        if ints.min(initial=0) < info.min or ints.max(initial=0) > info.max:
            raise UnsupportedError(f"{stem}: integers outside {dtype.name}: the grid is wider than its storage.")
        write_atomically(os.path.join(output_dir, f"{stem}.bin"), ints.astype(dtype).tobytes())
        write_atomically(os.path.join(output_dir, f"{stem}.txt"), _text(ints))
        index[f"{stem}.bin"] = meta
        if dump_float and floats is not None:
            f32 = np.asarray(floats, np.dtype("<f4"))
            write_atomically(os.path.join(output_dir, f"{stem}_float.bin"), f32.tobytes())
            write_atomically(os.path.join(output_dir, f"{stem}_float.txt"), _text(f32))
            meta["float_file"] = f"{stem}_float.bin"
    data = json.dumps(index, indent=2, sort_keys=True).encode()
    write_atomically(os.path.join(output_dir, INDEX), data)
    return index


def _text(values: np.ndarray) -> bytes:
    flat = values.reshape(-1)
    if np.issubdtype(flat.dtype, np.integer):
        return ("\n".join(str(int(v)) for v in flat) + "\n").encode()
    return ("\n".join(repr(float(v)) for v in flat) + "\n").encode()
