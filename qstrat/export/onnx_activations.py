"""ONNX nodes for activations and per-channel affine layers (BatchNormalization, ScaleShift, Rescaling, Normalization).

Each follows Keras' own formula op for op where quantized values make the
result exact: hard sigmoid is ``relu6(x + 3) / 6``, ReLU6 a Clip, swish
``x * sigmoid(x)``. Normalization's mean and variance stay constants of the
graph (Keras' own ONNX export turns them into extra graph inputs).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from qstrat.arrays import to_numpy
from qstrat.export.onnx_build import Call, Tensor, channel_const, physical_axis, unsupported
from qstrat.layers.dpu import HARD_SIGMOID_MULTIPLIER, HARD_SIGMOID_SHIFT

SIMPLE = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "elu": "Elu", "selu": "Selu"}
SIMPLE |= {"softplus": "Softplus", "softsign": "Softsign", "exponential": "Exp"}
OTHER_KEYS = ("relu6", "softmax", "log_softmax", "leaky_relu", "hard_sigmoid", "hard_silu", "hard_swish")
ACTIVATION_KEYS = frozenset({None, "linear", *SIMPLE, *OTHER_KEYS, "silu", "swish", "gelu"})


def activation_key(fn) -> str | None:
    """The name of ``fn``, a Keras activation function or its name."""
    import keras

    key = fn if isinstance(fn, str) else keras.activations.serialize(fn)
    return key if isinstance(key, str) else key.get("config", key.get("class_name"))


def settings_refusal(layer) -> str | None:
    """Why a layer of a class with an emitter here has settings with no ONNX export, or None. The settings
    are known before calibration, so a quantize_model that writes ONNX checks them first; the emitters check
    them again."""
    kind = type(layer).__name__
    if kind not in ("Softmax", "PReLU") and getattr(layer, "activation", None) is not None:
        key = activation_key(layer.activation)
        if key not in ACTIVATION_KEYS:
            return f'with activation "{key}"'
    if kind == "ReLU":
        if float(layer.threshold) != 0.0:
            return "with a threshold"
        if float(layer.negative_slope) != 0.0 and layer.max_value is not None:
            return "with both negative_slope and max_value"
    if kind == "Softmax" and isinstance(layer.axis, list | tuple) and len(layer.axis) != 1:
        return "over several axes"
    if kind == "Normalization" and getattr(layer, "invert", False):
        return "with invert=True"
    if kind == "UpSampling2D" and layer.interpolation != "nearest":
        return f'with interpolation "{layer.interpolation}"'
    return None


def refuse_settings(c: Call) -> None:
    why = settings_refusal(c.layer)
    if why:
        raise unsupported(c, why)


def activation(c: Call, t: Tensor, fn, name: str | None = None, axis: int = -1) -> Tensor:
    """``fn`` (a Keras activation function or its name) applied to ``t``."""
    key = activation_key(fn)
    if key in (None, "linear"):
        return t
    b = c.b
    name = name or f"{c.name}/{key}"
    x = t.name

    def const(v):
        return b.const(np.float32(v), f"{c.name}/{key}_c")

    if key in SIMPLE:
        y = b.one(SIMPLE[key], [x], name)
    elif key == "relu6":
        y = b.one("Clip", [x, const(0.0), b.const(np.float32(6.0), f"{c.name}/six")], name)
    elif key in ("softmax", "log_softmax"):
        y = b.one("Softmax" if key == "softmax" else "LogSoftmax", [x], name, axis=physical_axis(axis, t))
    elif key == "leaky_relu":
        y = b.one("LeakyRelu", [x], name, alpha=0.2)
    elif key in ("hard_sigmoid", "hard_silu", "hard_swish"):
        # Keras: relu6(x + 3) / 6, and x times that for hard_silu.
        p = b.one("Add", [x, b.const(np.float32(3.0), f"{c.name}/three")], f"{name}/add3")
        r = b.one(
            "Clip",
            [p, b.const(np.float32(0.0), f"{c.name}/zero"), b.const(np.float32(6.0), f"{c.name}/six")],
            f"{name}/relu6",
        )
        hs = key == "hard_sigmoid"
        y = b.one("Div", [r, b.const(np.float32(6.0), f"{c.name}/six")], name if hs else f"{name}/div6")
        if not hs:
            y = b.one("Mul", [x, y], name)
    elif key in ("silu", "swish"):
        y = b.one("Mul", [x, b.one("Sigmoid", [x], f"{name}/sigmoid")], name)
    elif key == "gelu":
        half = b.one("Div", [x, b.const(np.float32(math.sqrt(2.0)), f"{c.name}/sqrt2")], f"{name}/scaled")
        e = b.one("Add", [b.one("Erf", [half], f"{name}/erf"), b.const(np.float32(1.0), f"{c.name}/one")], f"{name}/1p")
        y = b.one("Mul", [b.one("Mul", [x, b.const(np.float32(0.5), f"{c.name}/half")], f"{name}/halfx"), e], name)
    else:
        raise unsupported(c, f'with activation "{key}"')
    return Tensor(y, t.shape, t.layout)


def _activation_layer(c: Call) -> list[Tensor]:
    return [activation(c, c.inputs[0], c.layer.get_config()["activation"], c.name)]


def _relu(c: Call) -> list[Tensor]:
    layer, b, x = c.layer, c.b, c.inputs[0]
    refuse_settings(c)
    slope, top = float(layer.negative_slope), layer.max_value
    if slope != 0.0:
        return [c.out(b.one("LeakyRelu", [x.name], c.name, alpha=slope), x.layout)]
    if top is None:
        return [c.out(b.one("Relu", [x.name], c.name), x.layout)]
    lo, hi = b.const(np.float32(0.0), f"{c.name}/zero"), b.const(np.float32(top), f"{c.name}/max_value")
    return [c.out(b.one("Clip", [x.name, lo, hi], c.name), x.layout)]


def _leaky_relu(c: Call) -> list[Tensor]:
    x = c.inputs[0]
    return [c.out(c.b.one("LeakyRelu", [x.name], c.name, alpha=float(c.layer.negative_slope)), x.layout)]


def _dpu_hard_sigmoid(c: Call) -> list[Tensor]:
    """The DPU's hard sigmoid, op for op as Keras computes it: relu6(x + 3) * 2731 / 2^14."""
    b, x = c.b, c.inputs[0]
    p = b.one("Add", [x.name, b.const(np.float32(3.0), f"{c.name}/three")], f"{c.name}/add3")
    zero, six = b.const(np.float32(0.0), f"{c.name}/zero"), b.const(np.float32(6.0), f"{c.name}/six")
    r = b.one("Clip", [p, zero, six], f"{c.name}/relu6")
    scale = np.float32(HARD_SIGMOID_MULTIPLIER / 2**HARD_SIGMOID_SHIFT)
    return [c.out(b.one("Mul", [r, b.const(scale, f"{c.name}/multiplier")], c.name), x.layout)]


def _prelu(c: Call) -> list[Tensor]:
    x = c.b.to_keras(c.inputs[0])
    alpha = c.weight("alpha", lambda a: a[None], None, None)
    return [c.out(c.b.one("PRelu", [x.name, alpha], c.name), "keras")]


def _softmax(c: Call) -> list[Tensor]:
    refuse_settings(c)
    axis = c.layer.axis
    if isinstance(axis, list | tuple):
        axis = axis[0]
    return [activation(c, c.inputs[0], "softmax", c.name, axis=int(axis))]


def _affine(c: Call, scale, shift, axis: int = -1) -> list[Tensor]:
    """x * scale + shift, per channel."""
    b, x = c.b, c.inputs[0]
    y = b.one("Mul", [x.name, channel_const(b, x, scale, f"{c.name}/scale", axis)], f"{c.name}/Mul")
    y = b.one("Add", [y, channel_const(b, x, shift, f"{c.name}/shift", axis)], c.name)
    return [c.out(y, x.layout)]


def _batch_norm(c: Call) -> list[Tensor]:
    layer = c.layer
    refuse_settings(c)
    mean = to_numpy(layer.moving_mean).astype(np.float32)
    var = to_numpy(layer.moving_variance).astype(np.float32)
    gamma = to_numpy(layer.gamma) if layer.scale else np.ones_like(mean)
    beta = to_numpy(layer.beta) if layer.center else np.zeros_like(mean)
    inv = (np.float32(1.0) / np.sqrt(var + np.float32(layer.epsilon))).astype(np.float32) * gamma
    return _affine(c, inv, (beta - mean * inv).astype(np.float32), layer.axis)  # Keras 3: one axis, any


def _scale_shift(c: Call) -> list[Tensor]:
    return _affine(c, to_numpy(c.layer.scale), to_numpy(c.layer.shift))


def _rescaling(c: Call) -> list[Tensor]:
    """x * scale + offset, each broadcast as Keras broadcasts it (against the channels-last layout)."""
    b, x = c.b, c.b.to_keras(c.inputs[0])
    y = b.one("Mul", [x.name, b.const(np.asarray(c.layer.scale, np.float32), f"{c.name}/scale")], f"{c.name}/Mul")
    y = b.one("Add", [y, b.const(np.asarray(c.layer.offset, np.float32), f"{c.name}/offset")], c.name)
    return [c.out(y, "keras")]


def _normalization(c: Call) -> list[Tensor]:
    """Keras: (x - mean) / max(sqrt(variance), epsilon). Mean and variance stay constants (not graph inputs)."""
    import keras

    layer, b = c.layer, c.b
    refuse_settings(c)
    x = b.to_keras(c.inputs[0])
    mean = to_numpy(layer.mean).astype(np.float32)
    denom = np.maximum(np.sqrt(to_numpy(layer.variance).astype(np.float32)), np.float32(keras.backend.epsilon()))
    y = b.one("Sub", [x.name, b.const(mean, f"{c.name}/mean")], f"{c.name}/Sub")
    return [c.out(b.one("Div", [y, b.const(denom.astype(np.float32), f"{c.name}/std")], c.name), "keras")]


ACTIVATION_EMITTERS: dict[str, Callable[[Call], list[Tensor]]] = {
    "Activation": _activation_layer,
    "ReLU": _relu,
    "LeakyReLU": _leaky_relu,
    "PReLU": _prelu,
    "DPUHardSigmoid": _dpu_hard_sigmoid,
    "Softmax": _softmax,
    "BatchNormalization": _batch_norm,
    "ScaleShift": _scale_shift,
    "Rescaling": _rescaling,
    "Normalization": _normalization,
}
