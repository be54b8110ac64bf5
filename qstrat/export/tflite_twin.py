"""The float twin of a quantized model, which TFLite's converter reads (`qstrat.export.tflite`).

Each `FakeQuant` becomes TensorFlow's ``fake_quant_with_min_max_vars`` over
its grid's range; each wrapped layer reads its weights fake-quantized on their
own grid (a BatchNormalization after it folded into the per-channel scale) and
its bias as a constant. Tensors qstrat left in float get min/max ranges from
calibration data (`Twin.add_ranges`).
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import NamedTuple

import keras
import numpy as np

from qstrat.arrays import to_numpy
from qstrat.errors import CalibrationDataError, UnsupportedError
from qstrat.graph import Graph, Node, TensorRef, capture, rebuild
from qstrat.graph.rebuild import replay
from qstrat.layers.fake_quant import FakeQuant
from qstrat.layers.wrapper import QuantizeWrapper
from qstrat.quantizers.grid import RoundMode

_FOLDABLE = ("Conv1D", "Conv2D", "Conv3D", "DepthwiseConv2D", "Dense")
_FUSES = ("Add", "Subtract", "Multiply")  # TFLite fuses a ReLU into these, as into Conv and Dense
_KEEPS_RANGE = (
    "MaxPooling1D",
    "MaxPooling2D",
    "MaxPooling3D",
    "Reshape",
    "Flatten",
    "Dropout",
    "Identity",
    "ZeroPadding1D",
    "ZeroPadding2D",
    "ZeroPadding3D",
    "UpSampling1D",
    "UpSampling2D",
    "UpSampling3D",
    "Cropping1D",
    "Cropping2D",
    "Cropping3D",
    "GlobalMaxPooling1D",
    "GlobalMaxPooling2D",
    "GlobalMaxPooling3D",
    "Permute",
    "RepeatVector",
)


def _calib_arrays(calib_data, n_inputs: int) -> list[np.ndarray]:
    arrays = [np.asarray(a, np.float32) for a in (calib_data if isinstance(calib_data, (list, tuple)) else [calib_data])]  # fmt: skip
    if len(arrays) != n_inputs or len({len(a) for a in arrays}) != 1 or len(arrays[0]) == 0:
        raise CalibrationDataError(
            f"calib_data: expected {n_inputs} non-empty array(s) with as many samples each, "
            f"got {len(arrays)} of lengths {[len(a) for a in arrays]}."
        )
    if not all(np.isfinite(a).all() for a in arrays):
        raise CalibrationDataError("calib_data holds NaN or Inf values.")
    return arrays


def _numpy(v) -> np.ndarray:
    return to_numpy(v).astype(np.float64)


def tflite_grid(q, state, enabled, where: str, weight: bool):
    """(scale, zero_point, qmin, qmax) of a qstrat quantizer, or an `UnsupportedError` on what TFLite cannot hold."""
    p, fix = q.params, "for this target in the strategy"
    checks = (
        (_numpy(enabled) < 0.5, "is bypassed (enabled 0), so its tensor is float. Call set_quantizers_enabled(model, True)"),
        (p.data_format.is_float, f"uses the float format {p.data_format.value}; TFLite has none. Use an 8-bit INT grid {fix}"),
        (p.bit_width != 8, f"has a {p.bit_width}-bit grid; TFLite int8 tensors are 8-bit. Set bit_width 8 {fix}"),
        (not weight and q.axis is not None, f"is per channel; TFLite activations are per tensor. Set per_channel false {fix}"),
        (not weight and p.round_mode == RoundMode.FLOOR, f"rounds with FLOOR; TFLite rounds to nearest. Use HALF_UP {fix}"),
    )  # fmt: skip
    problem = next((text for bad, text in checks if bad), None)
    if problem:
        raise UnsupportedError(f"{where}: {q.type_name} {problem}.")
    st = {k: _numpy(v) for k, v in state.items()}
    if "scale" in st:
        scale = st["scale"]
    elif "log_th" in st or "pos" in st:
        scale = 2.0 ** -(np.asarray(q.position(st), np.float64) if "log_th" in st else st["pos"])
    else:
        raise UnsupportedError(f"{where}: {q.type_name} has no scale or position that TFLite can use.")
    zp = st.get("zero_point", np.zeros_like(scale))
    if weight and np.any(zp != 0):
        raise UnsupportedError(
            f"{where}: asymmetric weights (zero point {zp.tolist()}); TFLite int8 weights have zero point 0. "
            f"Set symmetry true {fix}."
        )
    if not np.array_equal(zp, np.round(zp)):
        raise UnsupportedError(f"{where}: zero point {zp.tolist()} is not an integer.")
    return scale, zp, q.grid.qmin, q.grid.qmax


class _Weight(NamedTuple):
    """A weight on its grid, as float32 ``values``, with per-tensor or per-output-channel bounds."""

    values: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    narrow: bool


def layer_name(node: Node) -> str:
    """The name a user gave the layer (a wrapped layer's own name, not its wrapper's)."""
    return getattr(node.op, "layer", node.op).name


def _reread(node: Node, rename: dict) -> Node:
    return replace(node, inputs=tuple(rename.get(r, r) for r in node.inputs))


def _share_ranges(graph: Graph) -> Graph:
    """The graph with each reader of a tensor that a FakeQuant reads reading the FakeQuant's output instead."""
    quantized: dict[TensorRef, TensorRef] = {}
    for n in graph.nodes:
        if isinstance(n.op, FakeQuant):
            for r in n.inputs:
                quantized.setdefault(r, TensorRef(n.name, 0))
    nodes = [n if isinstance(n.op, FakeQuant) else _reread(n, quantized) for n in graph.nodes]
    ordered, done = [], set()
    while len(ordered) < len(nodes):  # topological order again: a reader may come before its FakeQuant now
        for n in nodes:
            if n.name not in done and all(r.node in done for r in n.inputs):
                ordered.append(n)
                done.add(n.name)
    return replace(graph, nodes=tuple(ordered))


def _is_relu(op) -> bool:
    """A ReLU or ReLU6, which TFLite fuses into the op before it."""
    if isinstance(op, keras.layers.ReLU):
        return op.negative_slope == 0 and op.threshold == 0 and op.max_value in (None, 6.0)
    return isinstance(op, keras.layers.Activation) and op.activation in (
        keras.activations.relu,
        keras.activations.relu6,
    )


class Twin:
    """The float twin of a quantized model: its graph, a TensorFlow-ready op per node, what it folded and ranged."""

    def __init__(self, qmodel):
        self.graph = _share_ranges(capture(qmodel))
        self.folded = {n.name: bn for n in self.graph.nodes if (bn := self._foldable_bn(n)) is not None}
        folded_bns = {bn.name for bn in self.folded.values()}
        self.ops, self.calibrated, shared = {}, [], {}
        for node in self.graph.nodes:
            if node.name in folded_bns:
                self.ops[node.name] = keras.layers.Lambda(lambda x: x, name=node.op.name)
            elif isinstance(node.op, FakeQuant):
                fq = node.op
                scale, zp, qmin, qmax = tflite_grid(
                    fq.quantizer, fq.state, fq.enabled, f"{fq.name} ({fq.target})", False
                )
                lo, hi = float((qmin - zp) * scale), float((qmax - zp) * scale)
                self.ops[node.name] = _fake_quant(lo, hi, qmax - qmin == 254, fq.name)
            elif isinstance(node.op, QuantizeWrapper):
                # A shared layer is one Lambda called once per use (Keras names must be unique).
                key = id(node.op) if node.name not in self.folded else node.name
                if key not in shared:
                    shared[key] = self._wrapped(node)
                self.ops[node.name] = shared[key]

    def _foldable_bn(self, node):
        inner = getattr(node.op, "layer", None)
        if not isinstance(node.op, QuantizeWrapper) or type(inner).__name__ not in _FOLDABLE:
            return None
        if getattr(inner, "data_format", "channels_last") != "channels_last" or "kernel" not in node.op.quantizers:
            return None
        users = self.graph.consumers(TensorRef(node.name, 0))
        if inner.activation is not keras.activations.linear or len(users) != 1:
            return None
        last = (-1, len(node.meta["shapes"][0]) - 1)
        return (
            users[0] if isinstance(users[0].op, keras.layers.BatchNormalization) and users[0].op.axis in last else None
        )

    def _wrapped(self, node):
        w, inner = node.op, node.op.layer
        if type(inner).__name__.startswith("SeparableConv"):
            raise UnsupportedError(
                f"{inner.name}: a SeparableConv keeps the tensor between its depthwise and pointwise halves in float, "
                "and TFLite would have to quantize it, which the quantized model does not do. Quantize with the "
                "optimize key separable_conv=True (it splits the layer, and each half gets its quantizers)."
            )
        depthwise = type(inner).__name__ == "DepthwiseConv2D"
        bias = _numpy(inner.bias) if getattr(inner, "use_bias", False) else None
        factor, shift = _bn_factor(self.folded[node.name].op) if node.name in self.folded else (None, None)
        weights = {}
        for attr, q in w.quantizers.items():
            where, values = f"{inner.name}.{attr}", _numpy(w.quantized_weight(attr))
            if attr == "bias":  # TFLite quantizes a bias to int32 at input scale * weight scale
                bias = values
                continue
            scale, _, qmin, qmax = tflite_grid(q, w.state[attr], w.enabled[attr], where, True)
            axis = None if q.axis is None else q.axis % values.ndim
            if depthwise and axis == 2:  # TFLite's depthwise filter is (1, kh, kw, in * multiplier)
                scale = np.repeat(scale, values.shape[3])
            elif axis not in (None, values.ndim - 1):
                raise UnsupportedError(f"{where}: per-channel weights along axis {axis}, which TFLite cannot lay out.")
            if attr == "kernel" and factor is not None:
                values, scale = _fold(values, scale, factor, qmin, qmax, where, depthwise)
            weights[attr] = _Weight(values.astype(np.float32), np.float32(qmin * scale), np.float32(qmax * scale), qmax - qmin == 254)  # fmt: skip
        if factor is not None:
            bias = shift if bias is None else bias * factor + shift
        # A call with its own folded BN is its own op: one name per call then.
        name = w.name if node.name not in self.folded else f"{w.name}_{node.name}".replace("@", "_call")
        return keras.layers.Lambda(functools.partial(_call_wrapped, inner, weights, bias, depthwise), name=name)

    def op_for(self, node):
        return self.ops.get(node.name, node.op)

    def build(self):
        graph = self.graph
        if graph.structure is not None:  # the converter traces a list of inputs, not a dict: keep the outputs'
            n = len(graph.inputs)
            graph = replace(graph, structure=(list(range(n)) if n > 1 else 0, graph.structure[1]))
        return rebuild(graph, self.op_for, copy_layers=False, name=f"{graph.name}_tflite")

    def unranged(self) -> list[TensorRef]:
        """Float tensors that need a range no FakeQuant gives, by the converter's fusion rules.

        Left out: tensors only FakeQuants read; a Conv/Dense/Add output read only by a
        ReLU (TFLite fuses the two); a conv output whose BN was folded; the outputs
        of layers that keep their input's range (max pooling, reshapes).
        """
        folded_bns, out = {bn.name for bn in self.folded.values()}, []
        for node in self.graph.nodes:
            ref, op = TensorRef(node.name, 0), node.op
            users, is_output = self.graph.consumers(ref), ref in self.graph.outputs
            if isinstance(op, FakeQuant) or node.name in self.folded or type(op).__name__ in _KEEPS_RANGE:
                continue
            if not is_output and users and all(isinstance(u.op, FakeQuant) for u in users):
                continue
            fusing = isinstance(op, QuantizeWrapper) or node.name in folded_bns or type(op).__name__ in _FUSES
            if fusing and not is_output and len(users) == 1 and _is_relu(users[0].op):
                continue
            if node.num_outputs == 1 and "float" in node.output_dtype(0):
                out.append(ref)
        return out

    def add_ranges(self, refs: list[TensorRef], calib_data) -> None:
        """Give each of ``refs`` a FakeQuant with its min/max over ``calib_data``."""
        arrays = _calib_arrays(calib_data, len(self.graph.inputs))
        lo, hi = np.zeros(len(refs)), np.zeros(len(refs))  # the range always holds 0
        for start in range(0, len(arrays[0]), 64):
            for i, v in enumerate(replay(self.graph, self.op_for, [a[start : start + 64] for a in arrays], refs)):
                lo[i], hi[i] = min(lo[i], float(keras.ops.min(v))), max(hi[i], float(keras.ops.max(v)))
        nodes, rename = [], {}
        for node in self.graph.nodes:
            nodes.append(_reread(node, rename))
            if (ref := TensorRef(node.name, 0)) in refs:
                i, name = refs.index(ref), f"{node.name}_range"
                self.ops[name] = _fake_quant(lo[i], max(hi[i], lo[i] + 1e-6), False, name)  # an all-zero tensor too
                nodes.append(Node(name, self.ops[name], (ref,)))
                rename[ref] = TensorRef(name, 0)
                self.calibrated.append(layer_name(node))
        outputs = tuple(rename.get(r, r) for r in self.graph.outputs)
        self.graph = replace(self.graph, nodes=tuple(nodes), outputs=outputs)


def _bn_factor(bn) -> tuple[np.ndarray, np.ndarray]:
    """Inference BatchNormalization as x * factor + shift."""
    mean, var = _numpy(bn.moving_mean), _numpy(bn.moving_variance)
    factor = (_numpy(bn.gamma) if bn.scale else 1.0) / np.sqrt(var + bn.epsilon)
    return factor, (_numpy(bn.beta) if bn.center else 0.0) - mean * factor


def _fold(values, scale, factor, qmin: int, qmax: int, where: str, depthwise: bool):
    """Weights and per-channel scale with a BatchNormalization's factor folded in; the integers keep their size."""
    f = factor.reshape(values.shape[2:]) if depthwise else factor
    scale = np.broadcast_to(scale, factor.shape)
    ints = np.round(values / scale.reshape(f.shape)) * np.sign(f)
    if ints.min() < qmin or ints.max() > qmax or np.any(factor == 0):
        raise UnsupportedError(
            f"{where}: folding the BatchNormalization after it negates a channel that holds {qmin} "
            "(or zeroes one). Use narrow_range true for this weight, or keep BN out of the model."
        )
    return values * f, scale * np.abs(factor)


def _fake_quant(lo: float, hi: float, narrow: bool, name: str):
    """A layer running TensorFlow's FakeQuant op with fixed bounds: the converter reads its range."""
    import tensorflow as tf

    return keras.layers.Lambda(lambda x: tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, 8, narrow), name=name)


def _tf_weight(w: _Weight, depthwise: bool):
    import tensorflow as tf

    values, shape = tf.constant(w.values), w.values.shape
    if w.lo.ndim == 0:
        return tf.quantization.fake_quant_with_min_max_vars(values, float(w.lo), float(w.hi), 8, w.narrow)
    if depthwise:
        values = tf.reshape(values, (*shape[:2], 1, shape[2] * shape[3]))
    out = tf.quantization.fake_quant_with_min_max_vars_per_channel(values, w.lo, w.hi, 8, w.narrow)
    return tf.reshape(out, shape) if depthwise else out


def _call_wrapped(inner, weights: dict, bias, depthwise: bool, x):
    """``inner(x)`` with TensorFlow-fake-quantized weights, other variables as constants, a folded BN's bias."""
    import tensorflow as tf

    kernel = weights.get("kernel")
    bias = None if bias is None else tf.constant(bias, tf.float32)
    if isinstance(inner, keras.layers.Dense) and kernel is not None and kernel.lo.ndim == 1:
        n_in, n_out = kernel.values.shape
        as_conv = kernel._replace(values=kernel.values.reshape(1, 1, n_in, n_out))
        y = tf.nn.conv2d(tf.reshape(x, (-1, 1, 1, n_in)), _tf_weight(as_conv, False), 1, "VALID")
        y = y if bias is None else y + bias
        shape = (-1, n_out) if len(x.shape) == 2 else tf.concat([tf.shape(x)[:-1], [n_out]], 0)
        return inner.activation(tf.reshape(y, shape))
    by_id = {id(getattr(inner, a)): w for a, w in weights.items()}
    bias_id = id(inner.bias) if getattr(inner, "use_bias", False) else None

    def value(v):
        if id(v) == bias_id and bias is not None:
            return bias
        return _tf_weight(by_id[id(v)], depthwise) if id(v) in by_id else tf.constant(to_numpy(v))

    variables = ([value(v) for v in inner.trainable_variables], [value(v) for v in inner.non_trainable_variables])
    y, _ = inner.stateless_call(*variables, x)
    return y + bias if bias_id is None and bias is not None else y
