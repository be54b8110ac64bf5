"""Where an exported file rounds differently from the Keras model, counted on data.

ONNX's QuantizeLinear rounds half to even. A quantizer that rounds ties
another way (the DPU's activations round half up) differs from it exactly on
the ties that the two rules send to different integers. `count_rounding_mismatch`
feeds data through the Keras model and counts, per quantized tensor, the
elements on which the quantizer and its half-to-even twin disagree, given the
same input: the mismatch each tensor adds (differences upstream can move a
tensor's input too; compare outputs end to end for their total effect).
"""

from __future__ import annotations

import hashlib

import numpy as np

from qstrat.arrays import to_numpy
from qstrat.export.qdq import Grid, grid_of
from qstrat.graph import capture
from qstrat.layers import FakeQuant


def _arrays(data) -> list[np.ndarray]:
    if isinstance(data, dict):
        return [np.asarray(data[k]) for k in sorted(data)]
    if isinstance(data, list | tuple):
        return [np.asarray(d) for d in data]
    return [np.asarray(data)]


def calibration_fingerprint(data) -> str:
    """sha256 over the arrays' dtypes, shapes and bytes: identifies the data a model was calibrated or checked on."""
    h = hashlib.sha256()
    for a in _arrays(data):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return "sha256:" + h.hexdigest()


def count_rounding_mismatch(qmodel, data, batch_size: int = 32) -> list[dict]:
    """Per tensor quantizer ONNX does not reproduce exactly: elements seen, and elements it quantizes differently.

    Every quantizer is counted except those `Grid.onnx_exact` proves equal
    (power-of-2 scales rounding half to even): another tie rule differs on
    ties, and a float scale can differ near ties because ONNX divides by the
    scale where Keras multiplies by its reciprocal.
    """
    import keras
    from keras import ops

    graph = capture(qmodel)
    nodes = []
    for n in graph.nodes:
        if not isinstance(n.op, FakeQuant) or float(to_numpy(n.op.enabled)) <= 0.5:
            continue
        if n.op.quantizer.params.data_format.is_float:
            continue
        k = int(n.name.rsplit("@", 1)[1]) if "@" in n.name else 0
        targets = [n.op.target or n.op.name, *n.op.more_targets]
        target = targets[k] if k < len(targets) else n.name
        grid = grid_of(n.op.quantizer, {key: to_numpy(v) for key, v in n.op.state.items()}, target)
        if not grid.onnx_exact:
            nodes.append((n, target, grid))
    if not nodes:
        return []
    probe = keras.Model(qmodel.inputs, [n.in_tensors[0] for n, _, _ in nodes])
    # As given: a dict is matched to the inputs by name, a list by position.
    feed = {k: np.asarray(v) for k, v in data.items()} if isinstance(data, dict) else data
    values = probe.predict(feed, batch_size=batch_size, verbose=0)
    values = values if isinstance(values, list) else [values]
    out = []
    for (n, target, grid), x in zip(nodes, values, strict=True):
        layer = n.op
        keras_q = ops.convert_to_numpy(layer.quantizer(ops.convert_to_tensor(x), layer.state))
        mism = int(np.sum(keras_q != onnx_qdq(x, grid)))
        out.append(
            {
                "target": target,
                "round_mode": grid.round_mode.value,
                "elements": int(x.size),
                "mismatches": mism,
                "fraction": mism / max(int(x.size), 1),
            }
        )
    return out


def onnx_qdq(x: np.ndarray, grid: Grid) -> np.ndarray:
    """What QuantizeLinear then DequantizeLinear compute (as ONNX Runtime does: x / scale, half to even)."""
    x = np.asarray(x, np.float32)
    scale, zp = grid._broadcast(x.ndim)
    lo, hi = grid.type_range()
    q = np.clip(np.rint(x / scale) + zp, lo, hi)
    q = np.clip(q, grid.qmin, grid.qmax)
    return ((q - zp).astype(np.float32) * scale).astype(np.float32)
